"""Latency: warm-up, timed runs, raw samples, and the one place statistics are computed.

Inputs are rotated among several real samples so that caches do not flatter the result.
Times are wall-clock milliseconds from `time.perf_counter_ns` around `runner.infer`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeport.errors import UserError
from edgeport.runtime.runners import Runner


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
    median_ci95: tuple[float, float]  # distribution-free 95% interval for the median
    throughput_per_s: float  # batch items per second at the median
    batch: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def median_ci(sorted_samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Order-statistic confidence interval for the median (binomial, normal approximation)."""
    n = len(sorted_samples)
    z = {0.9: 1.645, 0.95: 1.96, 0.99: 2.576}[confidence]
    half = z * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    return float(sorted_samples[lo]), float(sorted_samples[hi])


def summarize(samples_ms: list[float], batch: int = 1) -> LatencyStats:
    """Percentiles, mean, std, CV, the median's confidence interval and throughput."""
    if not samples_ms:
        raise UserError("no latency samples to summarize")
    data = np.sort(np.asarray(samples_ms, dtype=np.float64))
    p50, p90, p95, p99 = (float(np.percentile(data, q)) for q in (50, 90, 95, 99))
    mean, std = float(data.mean()), float(data.std(ddof=1)) if len(data) > 1 else 0.0
    return LatencyStats(list(map(float, samples_ms)), p50, p90, p95, p99, mean, std,
                        std / mean if mean > 0 else 0.0, median_ci(data), 1000.0 * batch / p50, batch)


def measure(runner: Runner, feeds: list[dict[str, np.ndarray]], runs: int = 100, warmup: int = 10) -> LatencyStats:
    """Time `runs` inferences after `warmup` untimed ones, cycling through `feeds`."""
    if runs <= 0 or warmup < 0:
        raise UserError(f"runs must be positive and warm-up non-negative (got runs={runs}, warmup={warmup})")
    if not feeds:
        raise UserError("latency measurement needs at least one input")
    for i in range(warmup):
        runner.infer(feeds[i % len(feeds)])
    samples = []
    for i in range(runs):
        start = time.perf_counter_ns()
        runner.infer(feeds[i % len(feeds)])
        samples.append((time.perf_counter_ns() - start) / 1e6)
    batch = next(iter(feeds[0].values())).shape[0] if feeds[0] else 1
    return summarize(samples, batch)
