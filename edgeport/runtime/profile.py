"""One profile of one runner: latency over several sessions, throughput, memory, energy, per-op time.

The order is chosen so that nothing perturbs what is measured: latency first (sessions
loaded and closed one after another), then one more session for throughput at other batch
sizes, the session's own memory and the energy window, and the op profiler last, because
profiling slows every node (its shares are then scaled to the p50 measured without it).
"""
from __future__ import annotations

import logging
import os
import resource
from pathlib import Path
from typing import Callable

import numpy as np

from edgeport.core import Runner
from edgeport.devices.estimate import Estimate
from edgeport.runtime.energy import MeterError, MeterUnavailable, detect_meter, measure_energy
from edgeport.runtime.latency import measure, measure_sessions
from edgeport.runtime.opprofile import OpProfile
from edgeport.runtime.report import Energy, Profile, SessionMemory, Variant, environment

log = logging.getLogger(__name__)  # the steps of a profile, each seconds long

PROC_STATUS = Path("/proc/self/status")
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")
CLEAR_REFS = Path("/proc/self/clear_refs")
MEMORY_RUNS = 10  # inferences in the measured session, so that its peak includes activations


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
    if m.net_joules <= 0:  # no inference is free: the work drew less than the meter's idle reading varies by
        return Energy(False, "unavailable", reasons=[
            f"{m.provenance} read {m.gross_mj_per_inference:.4g} mJ per inference, no more than its idle draw "
            f"({m.idle_watts:.3g} W over the {m.window_s:.3g} s window): the work's energy is within the idle "
            f"power's noise; measure a longer window (min_window_s, --min-duration) or a larger batch"])
    return Energy(True, m.provenance, m.gross_mj_per_inference, m.net_mj_per_inference, m.idle_watts, idle_s > 0,
                  m.window_s, m.inferences)


def _status_mb(field_name: str) -> float | None:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak resident memory (VmHWM) to its current RSS (Linux 4.0+)."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class SessionMemoryProbe:
    """The resident memory one session adds: read before it loads, after, and at its peak.

    ONNX Runtime's Python API offers no allocator statistics, so the session's memory is the
    process's resident-set delta around it; the process's peak is reset first (Linux
    clear_refs), so the peak is the session's, not torch's from before.
    """

    def __init__(self):
        self.peak_reset = _reset_peak()
        self.before = _status_mb("VmRSS")
        self.loaded: float | None = None

    def loaded_now(self) -> None:
        self.loaded = _status_mb("VmRSS")

    def result(self) -> SessionMemory:
        process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.before is None or self.loaded is None:
            return SessionMemory("unavailable: /proc/self/status cannot be read here", 0.0, None, process_peak)
        peak = _status_mb("VmHWM") if self.peak_reset else None
        method = ("rss-delta: resident memory around the session (peak: VmHWM after a clear_refs reset), "
                  "the same for every runtime (ONNX Runtime exposes no allocator statistics to Python); memory "
                  "the process freed earlier and reuses here is not counted")
        if not self.peak_reset:
            method += "; peak unavailable (clear_refs not writable)"
        return SessionMemory(method, max(0.0, self.loaded - self.before),
                             max(0.0, peak - self.before) if peak is not None else None, process_peak)


def physical_cores() -> int:
    """The physical cores this process may run on, ONNX Runtime's default number of intra-op
    threads: one per distinct (package, core) among the CPUs of its affinity mask, read from
    sysfs; the logical CPU count where sysfs cannot tell."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        topology = CPU_TOPOLOGY / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(allowed)
    return len(cores) or len(allowed)


def runtime_threads(backend: str, threads: int | None) -> int:
    """The intra-op threads the profiled runtime ran on: `threads` where ONNX Runtime was
    given it, else its default (one per physical core); for torch eager, torch's own setting,
    which the torch runner takes as it finds it."""
    if backend.startswith("torch"):
        import torch

        return torch.get_num_threads()
    return threads or physical_cores()


def session_memory(make_runner: Callable[[], Runner], feeds: list[dict[str, np.ndarray]]) -> SessionMemory:
    """The memory of one session of `make_runner` running MEMORY_RUNS inferences, measured
    before any other session of the profile, so that its allocations are not reused ones."""
    probe = SessionMemoryProbe()
    runner = make_runner()
    probe.loaded_now()
    try:
        for i in range(MEMORY_RUNS):
            runner.infer(feeds[i % len(feeds)])
        return probe.result()
    finally:
        runner.close()


def profile_runner(make_runner: Callable[[], Runner], feeds: list[dict[str, np.ndarray]], target: str,
                   inputs_source: str, *, backend: str, device: str, runs: int, warmup: int, warmup_s: float,
                   min_duration_s: float, sessions: int, energy: bool, gpu: bool, energy_window_s: float,
                   idle_s: float, rapl_root, hwmon_root, threads: int | None, label: str,
                   op_profiler: Callable[[], OpProfile] | None = None, estimate: Estimate | None = None,
                   batch_feeds: dict[int, list[dict[str, np.ndarray]]] | None = None,
                   throughput_skipped: dict[int, str] | None = None, variant: Variant | None = None) -> Profile:
    """Profile the runners `make_runner` loads, on `feeds`; see `edgeport.profile` for the options.
    `batch_feeds` are feeds at other batch sizes for throughput; `throughput_skipped` says why
    requested batch sizes were not measured."""
    log.info("session memory")
    memory = session_memory(make_runner, feeds)
    latency = measure_sessions(make_runner, feeds, runs=runs, sessions=sessions, warmup=warmup, warmup_s=warmup_s,
                               min_duration_s=min_duration_s)
    runner = make_runner()
    try:
        throughput = {latency.batch: latency.throughput_per_s}
        for size, batch in (batch_feeds or {}).items():
            log.info("throughput at batch %d", size)
            throughput[size] = measure(runner, batch, runs=max(10, runs // 5), warmup=3).throughput_per_s
        if energy:
            log.info("energy")
        energy_record = (measure_energy_of(runner, feeds, gpu, energy_window_s, idle_s, rapl_root, hwmon_root)
                         if energy else Energy(False, "unavailable", reasons=["not requested"]))
    finally:
        runner.close()  # no idle worker threads beside the op profiler's session
    if op_profiler:
        log.info("time per op")
    op_profile = op_profiler().scale_to(latency.p50) if op_profiler else None
    # environment() records `threads or torch's setting`: for ONNX Runtime left at its
    # default that is torch's thread count, not the one the session ran on
    manifest = {**environment(threads), "threads": runtime_threads(backend, threads)}
    return Profile(target, backend, device, latency, energy_record, inputs_source, memory, manifest,
                   op_profile, estimate, throughput, dict(throughput_skipped or {}), label, variant)
