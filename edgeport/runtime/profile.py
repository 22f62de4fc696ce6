"""One profile of one runner: latency over several sessions, throughput, energy, per-op time.

The order is chosen so that nothing perturbs what is measured: latency first (sessions
loaded and closed one after another), then throughput at other batch sizes, then the energy
window (its own session), and the op profiler last, because profiling slows every node.
"""
from __future__ import annotations

import resource
from typing import Callable

import numpy as np

from edgeport.devices.estimate import Estimate
from edgeport.runtime.energy import MeterError, MeterUnavailable, detect_meter, measure_energy
from edgeport.runtime.latency import measure, measure_sessions
from edgeport.runtime.opprofile import OpProfile
from edgeport.runtime.report import Energy, Profile, environment
from edgeport.core import Runner


def measure_energy_of(runner: Runner, feeds: list[dict[str, np.ndarray]], gpu: bool, window_s: float, idle_s: float,
                      rapl_root, hwmon_root) -> Energy:
    """Energy per inference from the first meter that works here, or why there is none."""
    meter, reasons = detect_meter(rapl_root, hwmon_root, gpu=gpu)
    if meter is None:
        return Energy(False, "unavailable", reasons=reasons)
    count = iter(range(1 << 62))
    try:
        m = measure_energy(meter, lambda: runner.infer(feeds[next(count) % len(feeds)]), min_window_s=window_s,
                           idle_s=idle_s)
    except (MeterUnavailable, MeterError) as error:
        return Energy(False, "unavailable", reasons=[str(error)])
    return Energy(True, m.provenance, m.gross_mj_per_inference, m.net_mj_per_inference, m.idle_watts, idle_s > 0,
                  m.window_s, m.inferences)


def profile_runner(make_runner: Callable[[], Runner], feeds: list[dict[str, np.ndarray]], target: str,
                   inputs_source: str, *, backend: str, device: str, runs: int, warmup: int, warmup_s: float,
                   min_duration_s: float, sessions: int, energy: bool, gpu: bool, energy_window_s: float,
                   idle_s: float, rapl_root, hwmon_root, threads: int | None, label: str,
                   op_profiler: Callable[[], OpProfile] | None = None, estimate: Estimate | None = None,
                   batch_feeds: dict[int, list[dict[str, np.ndarray]]] | None = None) -> Profile:
    """Profile the runners `make_runner` loads, on `feeds`; see `edgeport.profile` for the options."""
    latency = measure_sessions(make_runner, feeds, runs=runs, sessions=sessions, warmup=warmup, warmup_s=warmup_s,
                               min_duration_s=min_duration_s)
    runner = make_runner()
    try:
        throughput = {latency.batch: latency.throughput_per_s}
        for size, batch in (batch_feeds or {}).items():
            throughput[size] = measure(runner, batch, runs=max(10, runs // 5), warmup=3).throughput_per_s
        energy_record = (measure_energy_of(runner, feeds, gpu, energy_window_s, idle_s, rapl_root, hwmon_root)
                         if energy else Energy(False, "unavailable", reasons=["not requested"]))
    finally:
        runner.close()  # no idle worker threads beside the op profiler's session
    op_profile = op_profiler() if op_profiler else None
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Profile(target, backend, device, latency, energy_record, inputs_source, peak_mb, environment(threads),
                   op_profile, estimate, throughput, label)
