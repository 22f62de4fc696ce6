"""Latency: warm-up, timed runs, raw samples, and the one place statistics are computed.

Inputs are rotated among several real samples so that caches do not flatter the result.
Times are milliseconds: wall clock (`time.perf_counter_ns`) around `runner.infer`, or CUDA
events around the model call for runners on a GPU (device-side time).

The validity verdict follows the spirit of MLPerf's rules: enough samples for the
percentiles reported, a coefficient of variation under a threshold, no drift between the
first and the last tenth of the run (thermal throttling, frequency changes), and a tail
bound: a p99 many times the p50 means some runs (preemption, page faults, another tenant)
took so long that the median no longer describes what a caller sees.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np

from edgeport.errors import UserError
from edgeport.core import Runner

log = logging.getLogger(__name__)  # a line per session: a profile's sessions take seconds each


@dataclass
class LatencyStats:
    """Statistics of latency samples in milliseconds; the samples themselves are kept."""

    samples_ms: list[float] = field(repr=False)
    p50: float
    p90: float
    p95: float
    p99: float
    mean: float
    std: float
    cv: float  # std / mean
    robust_cv: float  # IQR / 1.349 / median: the spread without the outliers' pull; judged for validity
    median_ci95: tuple[float, float]  # distribution-free 95% interval for the median
    throughput_per_s: float  # batch items per second at the median
    batch: int = 1
    drift: float = 0.0  # (median of last tenth - median of first tenth) / median
    problems: list[str] = field(default_factory=list)  # empty: valid

    @property
    def tail_ratio(self) -> float:
        """p99 / p50: how much slower the slowest 1% of runs are than the typical one."""
        return self.p99 / self.p50 if self.p50 > 0 else 0.0

    @property
    def valid(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "tail_ratio": self.tail_ratio}


# Student's t, 97.5th percentile, by degrees of freedom (1-30, from the standard table)
T_975_BY_DF = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
               2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
               2.045, 2.042)


def t_975(df: int) -> float:
    """Student's t 97.5th percentile with `df` degrees of freedom: the table to 30, then the
    Cornish-Fisher expansion around z = 1.96 (within 0.1 % there)."""
    if df < 1:  # the table's index -1 once answered 2.042 for 0 degrees of freedom
        raise ValueError(f"Student's t needs at least 1 degree of freedom, not {df}")
    if df <= len(T_975_BY_DF):
        return T_975_BY_DF[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


# Below this many samples no pair of order statistics covers the median with 95 %
# probability (min to max of 5 covers it 93.75 % of the time): the interval is then min to max.
MIN_SAMPLES_FOR_MEDIAN_CI = 6


def median_order_statistics(n: int) -> tuple[int, int]:
    """0-based indices (low, high) of the sorted samples that bound a distribution-free 95%
    interval for the median of `n` samples: the narrowest symmetric pair whose exact binomial
    coverage is at least 95 % (the count of samples below the median is Binomial(n, 1/2));
    (0, n - 1) where no pair reaches 95 % (fewer than 6 samples)."""
    below = np.arange(1, n // 2 + 1)
    log_pmf = np.concatenate([[n * math.log(0.5)], n * math.log(0.5) + np.cumsum(np.log((n - below + 1) / below))])
    cdf = np.cumsum(np.exp(log_pmf))  # P(fewer than k + 1 samples below the median), k = 0 .. n/2
    within = np.flatnonzero(cdf <= 0.025)
    if not within.size:
        return 0, n - 1
    low = int(within[-1])
    return low, n - 1 - low


def median_ci(sorted_samples: np.ndarray, block_medians: list[float] | None = None) -> tuple[float, float]:
    """95% confidence interval for the median, in the samples' unit (ms).

    The order-statistic interval (exact binomial; min to max below 6 samples, where it covers
    less than 95 %, which `validity` flags) covers sampling noise within one run; with
    `block_medians` (one per session), it is widened to a Student-t interval on their spread,
    which covers what changes between sessions (memory layout, thread placement): without it,
    two profiles of one model would disagree beyond their intervals. The spread is taken on the
    logarithm of the session medians (latency noise multiplies), so that the interval stays
    above zero however few and scattered they are.
    """
    low, high = median_order_statistics(len(sorted_samples))
    lo, hi = float(sorted_samples[low]), float(sorted_samples[high])
    if block_medians and len(block_medians) > 1 and min(block_medians) > 0:  # the log of a 0 ms median is -inf
        k = len(block_medians)
        spread = t_975(k - 1) * float(np.std(np.log(block_medians), ddof=1)) / math.sqrt(k)
        median = float(np.median(sorted_samples))
        lo, hi = min(lo, median * math.exp(-spread)), max(hi, median * math.exp(spread))
    return lo, hi


MAX_CV = 0.25  # a run whose robust CV is above this is flagged
MAX_DRIFT = 0.05  # 5% between the first and last tenth
# p99 / p50 above this is a tail the median hides: a run preempted for a scheduler slice
# (milliseconds) costs a sub-millisecond model tens of medians, and one run in a hundred
# like that is what a caller of the model then sees once in a hundred calls.
MAX_TAIL_RATIO = 3.0


# perf_counter's tick in ms; a median within RESOLUTION_TICKS of it is mostly rounding
TIMER_RESOLUTION_MS = time.get_clock_info("perf_counter").resolution * 1e3
RESOLUTION_TICKS = 100


def validity(samples_ms: np.ndarray, robust_cv: float, max_cv: float = MAX_CV, max_drift: float = MAX_DRIFT,
             max_tail_ratio: float = MAX_TAIL_RATIO, resolution_ms: float = TIMER_RESOLUTION_MS
             ) -> tuple[float, list[str]]:
    """(drift, problems) of a run whose latencies (ms) are in time order; no problems means valid.

    Problems: too few samples for p99/p95/p90, for a spread (one sample) or for a 95% interval
    for the median, a median within `RESOLUTION_TICKS` ticks of the timer (`resolution_ms`), a
    robust CV above `max_cv`, a drift above `max_drift` between the first and last tenth, a p99
    above `max_tail_ratio` times the p50.
    """
    n, problems = len(samples_ms), []
    for q, needed in ((99, 100), (95, 20), (90, 10)):
        if n < needed:
            problems.append(f"{n} samples are too few for p{q} (needs {needed})")
            break
    if n < MIN_SAMPLES_FOR_MEDIAN_CI:
        problems.append(f"{n} samples are too few for a 95% interval for the median (needs "
                        f"{MIN_SAMPLES_FOR_MEDIAN_CI}); the interval given is their range")
    if n == 1:
        problems.append("1 sample has no spread: its std and CV are not measured (reported as 0)")
    median = float(np.median(samples_ms))
    if median < RESOLUTION_TICKS * resolution_ms:
        problems.append(f"the median {median:.3g} ms is within {RESOLUTION_TICKS} ticks of the timer's "
                        f"resolution ({resolution_ms:.3g} ms): time several calls per sample")
    if robust_cv > max_cv:
        problems.append(f"robust coefficient of variation {robust_cv:.2f} is above {max_cv}")
    tenth = max(1, n // 10)
    drift = 0.0
    if n >= 20 and median > 0:
        first, last = np.median(samples_ms[:tenth]), np.median(samples_ms[-tenth:])
        drift = float((last - first) / median)
        if abs(drift) > max_drift:
            problems.append(f"latency drifted {drift:+.1%} between the first and last tenth of the run")
    p50, p99 = np.percentile(samples_ms, [50, 99])
    if n >= 100 and p50 > 0 and p99 / p50 > max_tail_ratio:
        slow = int(np.sum(samples_ms > max_tail_ratio * p50))
        problems.append(f"long tail: p99 is {p99 / p50:.1f}x the p50 (bound {max_tail_ratio:g}x); {slow} of {n} "
                        f"runs took over {max_tail_ratio:g}x the median (preemption or another load)")
    return drift, problems


def summarize(samples_ms: list[float], batch: int = 1, blocks: int = 1,
              block_sizes: Sequence[int] | None = None) -> LatencyStats:
    """Percentiles, mean, std, CV, the median's confidence interval, throughput and validity.

    `samples_ms` (milliseconds, finite, >= 0, the median above 0) must be in the order they
    were taken (drift is judged from it). Consecutive parts came from separate sessions:
    `block_sizes` gives each part's count, else `blocks` equal parts.
    """
    if not samples_ms:
        raise UserError("no latency samples to summarize")
    ordered = np.asarray(samples_ms, dtype=np.float64)
    if not np.isfinite(ordered).all() or (ordered < 0).any():
        raise UserError(f"latency samples must be finite and non-negative milliseconds; "
                        f"{int((~np.isfinite(ordered) | (ordered < 0)).sum())} of {len(ordered)} are not")
    if np.median(ordered) <= 0:  # throughput, CV and drift divide by it
        raise UserError(f"the median latency is 0 ms: the timer (resolution {TIMER_RESOLUTION_MS:.3g} ms) "
                        f"cannot resolve one call; time several calls per sample")
    if block_sizes is not None and sum(block_sizes) != len(ordered):
        raise UserError(f"session sizes {list(block_sizes)} add up to {sum(block_sizes)}, not the "
                        f"{len(ordered)} samples")
    data = np.sort(ordered)
    p50, p90, p95, p99 = (float(np.percentile(data, q)) for q in (50, 90, 95, 99))
    mean, std = float(data.mean()), float(data.std(ddof=1)) if len(data) > 1 else 0.0
    cv = std / mean if mean > 0 else 0.0
    iqr = float(np.percentile(data, 75) - np.percentile(data, 25))
    robust_cv = iqr / 1.349 / p50 if p50 > 0 else 0.0
    drift, problems = validity(ordered, robust_cv)
    parts = np.split(ordered, np.cumsum(block_sizes)[:-1]) if block_sizes is not None else \
        np.array_split(ordered, blocks)
    block_medians = [float(np.median(part)) for part in parts if len(part)] if len(parts) > 1 else None
    return LatencyStats(list(map(float, samples_ms)), p50, p90, p95, p99, mean, std, cv, robust_cv,
                        median_ci(data, block_medians), 1000.0 * batch / p50, batch, drift, problems)


def _timer(runner: Runner):
    """A function that runs one inference and returns its time in ms (CUDA events on a GPU)."""
    if runner.device.startswith("cuda"):
        import torch

        def timed(feeds):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.infer(feeds)  # returns host arrays, so the work is finished when it returns
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop)
        return timed

    def timed(feeds):
        start = time.perf_counter_ns()
        runner.infer(feeds)
        return (time.perf_counter_ns() - start) / 1e6
    return timed


def _collect(runner: Runner, feeds: list[dict[str, np.ndarray]], runs: int, warmup: int, warmup_s: float,
             min_duration_s: float) -> list[float]:
    if runs <= 0 or warmup < 0 or warmup_s < 0 or min_duration_s < 0:
        raise UserError(f"runs must be positive and warm-up non-negative (got runs={runs}, warmup={warmup})")
    if not feeds:
        raise UserError("latency measurement needs at least one input")
    start, i = time.perf_counter(), 0
    while i < warmup or time.perf_counter() - start < warmup_s:
        runner.infer(feeds[i % len(feeds)])
        i += 1
    timed, samples = _timer(runner), []
    start = time.perf_counter()
    while len(samples) < runs or time.perf_counter() - start < min_duration_s:
        try:
            samples.append(timed(feeds[len(samples) % len(feeds)]))
        except Exception as error:  # the runtime's message names neither the run nor the feed
            error.add_note(f"while timing run {len(samples) + 1} (input {len(samples) % len(feeds) + 1} of "
                           f"{len(feeds)}) on {runner.name}")
            raise
    return samples


def _batch(feeds: list[dict[str, np.ndarray]]) -> int:
    return next(iter(feeds[0].values())).shape[0] if feeds and feeds[0] else 1


def measure(runner: Runner, feeds: list[dict[str, np.ndarray]], runs: int = 100, warmup: int = 10,
            warmup_s: float = 0.0, min_duration_s: float = 0.0) -> LatencyStats:
    """Time at least `runs` inferences (and at least `min_duration_s` of them) after warm-up
    (`warmup` untimed runs and at least `warmup_s` seconds), cycling through `feeds`."""
    return summarize(_collect(runner, feeds, runs, warmup, warmup_s, min_duration_s), _batch(feeds))


def measure_sessions(make_runner: Callable[[], Runner], feeds: list[dict[str, np.ndarray]], runs: int = 100,
                     sessions: int = 5, warmup: int = 10, warmup_s: float = 0.0, min_duration_s: float = 0.0
                     ) -> LatencyStats:
    """`measure` spread over `sessions` freshly loaded runners, one after another, so that the
    median's confidence interval includes the variation between sessions. Each session gets
    the full warm-up and an equal share of `runs` and `min_duration_s`."""
    if sessions < 1:
        raise UserError(f"sessions must be at least 1, not {sessions}")
    per_session = math.ceil(runs / sessions) if runs > 0 else runs
    samples: list[float] = []
    sizes: list[int] = []  # a session timed for a duration takes as many runs as fit: the parts differ
    for session in range(sessions):
        log.info("latency: session %d of %d", session + 1, sessions)
        runner = make_runner()
        try:
            collected = _collect(runner, feeds, per_session, warmup, warmup_s, min_duration_s / sessions)
        finally:
            runner.close()
        samples += collected
        sizes.append(len(collected))
    return summarize(samples, _batch(feeds), block_sizes=sizes)


def interleaved_medians(runners: dict[Hashable, Runner], feed: dict[str, np.ndarray], blocks: int = 8, runs: int = 40,
                        warmup: int = 10) -> dict[Hashable, float]:
    """Median latency (ms) of each runner, timed in alternating blocks so that the machine's
    slow drifts fall on every variant alike: the way to compare variants side by side. The
    runners' keys (a name, or a (variant, threads) pair) key the result."""
    if not runners or blocks < 1 or runs < 1 or warmup < 0:
        raise UserError(f"interleaved timing needs runners, blocks and runs of at least 1 and a warm-up of at "
                        f"least 0 (got {len(runners)} runners, blocks={blocks}, runs={runs}, warmup={warmup})")
    timers = {name: _timer(runner) for name, runner in runners.items()}
    for runner in runners.values():
        for _ in range(warmup):
            runner.infer(feed)
    samples: dict[Hashable, list[float]] = {name: [] for name in runners}
    for _ in range(blocks):
        for name, timed in timers.items():
            samples[name] += [timed(feed) for _ in range(runs)]
    return {name: float(np.median(values)) for name, values in samples.items()}
