"""Device objects from `catalog.toml`, and the host, detected and calibrated here.

The host's peak figures come from micro-benchmarks (an fp32 GEMM and a chain of tiny nodes in
ONNX Runtime, a large array copy), not from a data sheet; its power is an assumption, said as
such, because no meter exists on most hosts. On a shared machine one short benchmark moves by
several times between runs: a call that loses its core to another process takes many times
longer, and under sustained load most calls do. The fastest call of a repeat is what the
hardware can do (nothing makes a call faster than that), so each figure is the median over
repeats of each repeat's fastest call, and the result is cached per machine (a fingerprint of CPU, core count, ISA flags and runtime
versions) with the date it was taken: later estimates reuse it until asked to recalibrate.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import gc
import hashlib
import json
import logging
import os
import platform
import time
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from edgeport.errors import UserError, finite_at_least

CATALOG = Path(__file__).with_name("catalog.toml")
log = logging.getLogger(__name__)  # the host calibration takes seconds on first use
HOST_WATTS_PER_CORE = 5.0  # assumption for the host's active power when no meter exists
CALIBRATION_SCHEMA = "edgeport.host-calibration/2"
# repeats per calibration (about 0.3 s each): with 7, a slow phase of a shared machine lasting
# about as long as the calibration moved the median (vit-digits' host estimate 0.40-0.54 ms over
# five calibrations on a 2-vCPU AMD EPYC, per-node dispatch 0.56 vs 0.84 us)
CALIBRATION_REPEATS = 15
# how each figure is taken from its repeats, in words and as a quantile: the median for the two
# rates, the fastest repeat for per-node dispatch, which on a 2-vCPU AMD EPYC Zen 4 came in two
# modes lasting seconds, about 0.35 and 0.50 us, so that the median of 15 repeats fell in either:
# vit-digits' host estimates over five calibrations were 1.08-1.19x apart in four runs (and above
# 1.3x in one of five test runs) with the median, 1.06-1.13x with the fastest
REPEAT_STATISTIC = {"fp32_flops": ("median", 0.5), "copy_bytes_per_s": ("median", 0.5),
                    "node_overhead_us": ("fastest", 0.0)}
CONFIDENCE_LEVELS = ("measured", "vendor", "derived", "third-party", "assumed")


@dataclass
class Device:
    """A device's peak throughput per precision (TOPS/TFLOPS), bandwidth (GB/s), power (W)."""

    name: str
    description: str
    kind: str
    backends: list[str]
    peak: dict[str, float]
    memory_bandwidth_gbs: float
    active_w: float
    idle_w: float
    node_overhead_us: float
    efficiency: dict[str, float]
    sources: dict[str, str] = field(default_factory=dict)
    confidence: dict[str, str] = field(default_factory=dict)  # figure -> one of CONFIDENCE_LEVELS
    machines: list[str] = field(default_factory=list)  # CPU architectures, as platform.machine() names them
    gpu: str = ""  # a word of the GPU's name ("Orin", "H100"), where the device is a GPU

    def peak_precision(self, precision: str) -> str:
        """The precision whose catalog peak stands for `precision`'s: itself, else the nearest
        wider one (fp32 falls back to fp16 on an NPU that lists none), else the largest."""
        for p in {"int8": ("int8", "fp16", "fp32"), "fp16": ("fp16", "fp32")}.get(precision, ("fp32", "fp16")):
            if p in self.peak:
                return p
        return max(self.peak, key=self.peak.get)

    def peak_ops(self, precision: str) -> float:
        """Peak operations per second at `precision` (see `peak_precision`)."""
        return self.peak[self.peak_precision(precision)] * 1e12


def check_device(device: Device) -> Device:
    """`device` itself if its figures can price a model; else a UserError naming the device and
    the figure. Peaks (TOPS/TFLOPS), bandwidth (GB/s) and active power (W) must be finite and
    positive: a zero divides by zero in the roofline, a NaN or a negative prints as a latency or
    energy; idle power (W, below the active power) and per-node overhead (µs) finite and non-negative; both
    efficiencies (compute, memory) fractions above 0 and at most 1."""
    problems = []
    if not isinstance(device.peak, dict) or not device.peak:
        problems.append(f"peak {device.peak!r} lists no precision (e.g. peak = {{ fp32 = 1.0 }}, in TOPS)")
    else:
        problems += [f"peak {p} = {v!r} TOPS is not a finite positive number"
                     for p, v in device.peak.items() if not finite_at_least(v, 0, strictly=True)]
    for figure, unit, strictly in (("memory_bandwidth_gbs", "GB/s", True), ("active_w", "W", True),
                                   ("idle_w", "W", False), ("node_overhead_us", "µs", False)):
        value = getattr(device, figure)
        if not finite_at_least(value, 0, strictly):
            problems.append(f"{figure} = {value!r} {unit} is not a finite {'positive' if strictly else 'non-negative'} "
                            f"number")
    efficiency = device.efficiency if isinstance(device.efficiency, dict) else {}
    for kind in ("compute", "memory"):
        value = efficiency.get(kind)
        if not (finite_at_least(value, 0, strictly=True) and value <= 1):
            problems.append(f"efficiency {kind} = {value!r} is not a fraction above 0 and at most 1")
    if not problems and device.idle_w >= device.active_w:  # no energy left for the work: net 0 or below
        problems.append(f"idle_w = {device.idle_w!r} W is not below active_w = {device.active_w!r} W")
    if problems:
        raise UserError(f"device {device.name!r} cannot price a model: {'; '.join(problems)}")
    return device


def load_catalog(path: Path) -> dict[str, dict]:
    """The entries of a catalog file, {name: fields}, each checked as a Device (`check_device`);
    a file that is not TOML, an entry that is no table, lacks a field or has one Device does not
    know, or a figure no device can have, is a UserError naming the file and the entry."""
    try:
        entries = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"cannot read the device catalog {path}: {error}") from error
    known = {f.name for f in fields(Device)} - {"name"}
    required = {f.name for f in fields(Device) if f.default is f.default_factory is MISSING} - {"name"}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise UserError(f"device catalog {path}: [{name}] is {entry!r}, not a table of figures")
        unknown, missing = sorted(set(entry) - known), sorted(required - set(entry))
        if unknown or missing:
            raise UserError(f"device catalog {path}: [{name}] " + "; ".join(
                [*([f"has unknown fields {', '.join(unknown)}"] if unknown else []),
                 *([f"lacks {', '.join(missing)}"] if missing else [])]))
        try:
            check_device(Device(name=name, **entry))
        except UserError as error:
            raise UserError(f"device catalog {path}: {error}") from error
    return entries


@lru_cache(maxsize=1)
def _entries() -> dict[str, dict]:
    return load_catalog(CATALOG)


def names() -> list[str]:
    """Every device name: 'host' and the catalog's entries."""
    return ["host", *sorted(_entries())]


def get(name: str) -> Device:
    """The device called `name`; an unknown name suggests the closest ones."""
    if not isinstance(name, str):
        raise UserError(f"a device is named by text (one of `edgeport devices`), not {name!r}")
    if name == "host":
        return host()
    entries = _entries()
    if name not in entries:
        close = difflib.get_close_matches(name, names(), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown device {name!r}{hint} (see `edgeport devices`)")
    return Device(name=name, **copy.deepcopy(entries[name]))  # a caller's edits must not reach the cache


def identity_mismatch(device: str) -> str | None:
    """Why this machine is not catalog `device`, or None where nothing here says it is not:
    a CPU architecture the device does not have, or a GPU (by torch's name for it) that is not
    the device's. A fleet node advertising a device it is not measures itself, not the device."""
    if device == "host":
        return None
    spec, machine = get(device), platform.machine()
    if spec.machines and machine not in spec.machines:
        return f"this node is {machine} ({cpu_model()}); {device} is {' or '.join(spec.machines)}"
    if spec.gpu:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
        if spec.gpu.lower() not in name.lower():
            return f"this node has {name}; {device}'s GPU is {spec.gpu}"
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's word for it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ort_session(nodes, inputs, outputs, initializers, threads: int | None = None, optimize: bool = True):
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(helper.make_graph(nodes, "calibration", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _fastest_run_s(run: Callable[[], object], seconds: float) -> float:
    """Seconds of the fastest call of `run`, timed call by call for about `seconds` (at least 5
    calls) after 3 untimed ones: preempted calls, however many, do not move it."""
    for _ in range(3):
        run()
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return min(times)


class _Benchmarks:
    """The host's three micro-benchmarks, each set up once and run in short repeats.

    gemm: fp32 MatMul of 256x256 in ONNX Runtime on one thread (the runtime we estimate),
    times the logical CPUs: a call of a fraction of a millisecond that needs one free core runs
    unpreempted often enough on a busy machine, where an all-core call almost never does;
    copy: a 64 MB numpy copy, larger than the caches, timed 1 MB at a time (read + write
    bytes; a chunk takes tens of microseconds, so most chunks run unpreempted and their median
    is the streaming rate even on a busy machine, where a whole 64 MB copy is preempted every
    time); node: a chain of 100 tiny Add nodes, unoptimized, one thread (the fixed cost of
    dispatching one node).
    """

    GEMM, COPY_MB, NODES, CHUNK_BYTES = 256, 64, 100, 2 ** 20

    def __init__(self):
        from onnx import TensorProto, helper, numpy_helper

        size, nodes = self.GEMM, self.NODES
        weight = numpy_helper.from_array(np.random.default_rng(0).random((size, size), dtype=np.float32), "b")
        self.gemm = _ort_session([helper.make_node("MatMul", ["a", "b"], ["c"])],
                                 [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
                                 [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])], [weight],
                                 threads=1)
        self.gemm_feed = {"a": np.ones((size, size), np.float32)}
        self.chain = _ort_session([helper.make_node("Add", [f"t{i}", "one"], [f"t{i + 1}"]) for i in range(nodes)],
                                  [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 16])],
                                  [helper.make_tensor_value_info(f"t{nodes}", TensorProto.FLOAT, [1, 16])],
                                  [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])], threads=1,
                                  optimize=False)
        self.chain_feed = {"t0": np.zeros((1, 16), np.float32)}
        self.src = np.ones(self.COPY_MB * 2 ** 20 // 4, dtype=np.float32)
        self.dst = np.empty_like(self.src)

    def once(self) -> dict[str, float]:
        """One repeat of each: fp32 FLOP/s, copy bytes/s, µs per node."""
        gemm_s = _fastest_run_s(lambda: self.gemm.run(None, self.gemm_feed), 0.1)
        copy_s = self._chunk_copy_s()
        node_s = _fastest_run_s(lambda: self.chain.run(None, self.chain_feed), 0.05)
        return {"fp32_flops": 2 * self.GEMM ** 3 / gemm_s * (os.cpu_count() or 1), "copy_bytes_per_s": 2 * self.CHUNK_BYTES / copy_s,
                "node_overhead_us": node_s / self.NODES * 1e6}

    def _chunk_copy_s(self, passes: int = 2) -> float:
        """Median seconds to copy one 1 MB chunk while streaming through the whole buffer."""
        step = self.CHUNK_BYTES // self.src.itemsize
        np.copyto(self.dst, self.src)
        times = []
        for _ in range(passes):
            for start in range(0, self.src.size, step):
                begin = time.perf_counter()
                np.copyto(self.dst[start:start + step], self.src[start:start + step])
                times.append(time.perf_counter() - begin)
        return float(np.median(times))

    def close(self) -> None:
        del self.gemm, self.chain
        gc.collect()  # their worker threads must not outlive the calibration


def calibrate(repeats: int = CALIBRATION_REPEATS) -> dict[str, dict[str, float]]:
    """Measure the host: each micro-benchmark `repeats` times, interleaved so that a slow phase
    of a shared machine touches all three alike. Returns {"figures": each one's REPEAT_STATISTIC over
    the repeats (the median rate, the fastest dispatch), "spread": (max - min) / figure of
    each}; about 0.3 s per repeat."""
    benchmarks = _Benchmarks()
    try:
        runs = [benchmarks.once() for _ in range(repeats)]
    finally:
        benchmarks.close()
    figures = {key: float(np.quantile([r[key] for r in runs], REPEAT_STATISTIC[key][1])) for key in runs[0]}
    spread = {key: float((max(r[key] for r in runs) - min(r[key] for r in runs)) / figures[key]) for key in figures}
    return {"figures": figures, "spread": spread}


def cpu_flags() -> str:
    """The CPU's flags line of /proc/cpuinfo ("flags : fpu vme ... avx2 ..."; empty where there is none)."""
    try:
        return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return ""


# x86 CPU flags under which ONNX Runtime multiplies uint8 by int8 without saturating: VNNI's
# dot products and AMX accumulate in 32 bits (its AVX2 and plain AVX-512 kernels add each pair
# of products in 16 bits first)
EXACT_U8S8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels can saturate on this host: an x86 CPU
    without VNNI or AMX, or one whose flags cannot be read here (assumed to). ARM and other
    CPUs multiply exactly."""
    if platform.machine().lower() not in X86_MACHINES:
        return False
    flags = cpu_flags().split()
    return not any(flag in flags for flag in EXACT_U8S8_FLAGS)


def fingerprint() -> dict[str, str | int]:
    """What the calibration depends on: CPU model, logical CPUs, ISA flags (hashed) and the
    versions of ONNX Runtime and numpy, whose kernels the benchmarks time."""
    import onnxruntime

    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count() or 1, "machine": platform.machine(),
            "cpu_flags_sha256": hashlib.sha256(cpu_flags().encode()).hexdigest()[:16],
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def calibration_path() -> Path:
    """Where the host calibration is cached: $EDGEPORT_CACHE_DIR, else $XDG_CACHE_HOME/edgeport,
    else ~/.cache/edgeport; the file is host-calibration.json."""
    folder = os.environ.get("EDGEPORT_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeport"
    return Path(folder) / "host-calibration.json"


def _cached_calibration(path: Path, machine: dict) -> dict | None:
    """The cached record if it is readable, of this schema and for this machine's fingerprint."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("schema") != CALIBRATION_SCHEMA or \
            record.get("fingerprint") != machine or not isinstance(record.get("figures"), dict):
        return None
    figures = record["figures"]
    if set(figures) != set(REPEAT_STATISTIC) or not all(
            isinstance(v, (int, float)) and np.isfinite(v) and v > 0 for v in figures.values()):
        return None
    return record


def host_calibration(recalibrate: bool = False) -> dict:
    """The host's calibration record: the cached one for this machine, or a new one (measured
    now and cached) when there is none, it is for another fingerprint, or `recalibrate`.
    The record says when it was taken and where it is cached, or why it could not be."""
    path, machine = calibration_path(), fingerprint()
    record = None if recalibrate else _cached_calibration(path, machine)
    if record is not None:
        return {**record, "cache": str(path)}
    log.info("calibrating the host: ONNX Runtime GEMM, node chain, memory copy (once per machine)")
    record = {"schema": CALIBRATION_SCHEMA, "fingerprint": machine,
              "calibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "repeats": CALIBRATION_REPEATS, **calibrate()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
        where = str(path)
    except OSError as error:
        with contextlib.suppress(OSError):  # a folder it could not write to may not be readable either
            tmp.unlink(missing_ok=True)
        where = f"not cached ({path}: {error.strerror or error})"
    return {**record, "cache": where}


@lru_cache(maxsize=1)
def _host(record_json: str) -> Device:
    record = json.loads(record_json)
    figures, spread = record["figures"], record["spread"]
    vnni = "avx512_vnni" in cpu_flags() or "avx_vnni" in cpu_flags()
    fp32, cores = figures["fp32_flops"], os.cpu_count() or 1
    taken_as = {key: f"{word} of {record['repeats']} repeats, spread {spread[key]:.0%}"
                for key, (word, _) in REPEAT_STATISTIC.items()}
    taken = (f"measured here {record['calibrated_at']}; cache {record['cache']}; `edgeport devices --recalibrate` "
             f"measures again")
    return Device(
        name="host", description=f"this machine: {cpu_model()}, {cores} logical CPUs", kind="cpu",
        backends=["onnxruntime", "torch"], peak={"fp32": fp32 / 1e12, "int8": (4 if vnni else 2) * fp32 / 1e12},
        memory_bandwidth_gbs=figures["copy_bytes_per_s"] / 1e9, active_w=HOST_WATTS_PER_CORE * cores,
        idle_w=0.0, node_overhead_us=figures["node_overhead_us"], efficiency={"compute": 0.8, "memory": 0.7},
        sources={"peak": f"ONNX Runtime fp32 MatMul 256x256 on one thread x {cores} logical CPUs "
                         f"({taken_as['fp32_flops']}); int8 derived as {'4x (VNNI)' if vnni else '2x'} fp32; {taken}",
                 "memory_bandwidth_gbs": f"64 MB numpy copy, median 1 MB chunk ({taken_as['copy_bytes_per_s']}); "
                                         f"{taken}",
                 "node_overhead_us": f"ONNX Runtime chain of 100 Add nodes, 1 thread ({taken_as['node_overhead_us']}); "
                                     f"{taken}",
                 "active_w": f"assumed: {HOST_WATTS_PER_CORE} W per logical CPU (no meter)",
                 "idle_w": "not subtracted (assumed 0)"},
        # the fp32 peak is one thread's measurement times the cores: measured only on one core
        confidence={"peak": "measured" if cores == 1 else "derived", "peak_int8": "derived",
                    "memory_bandwidth_gbs": "measured",
                    "node_overhead_us": "measured",
                    "active_w": "assumed", "idle_w": "assumed", "efficiency": "assumed"})


def host(recalibrate: bool = False, threads: int | None = None) -> Device:
    """This machine as a Device, from its cached calibration (measured once per machine, about
    2 s; `recalibrate=True` measures again and replaces the cache). `threads` prices compute and
    active power at that many of its logical CPUs, as a runtime limited to them runs (one thread
    is the measured peak itself)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be a whole number of logical CPUs, 1 or more, not {threads!r}")
    device = _host(json.dumps(host_calibration(recalibrate), sort_keys=True))
    cores = os.cpu_count() or 1
    if threads is None or threads >= cores:
        return device
    share = threads / cores
    return replace(device, description=f"{device.description}, {threads} of them used",
                   peak={p: v * share for p, v in device.peak.items()}, active_w=device.active_w * share,
                   sources=device.sources | {"peak": f"{device.sources['peak']}; x {threads}/{cores} for {threads} "
                                                      f"thread{'s' if threads > 1 else ''}",
                                             "active_w": f"{device.sources['active_w']}, {threads} used"},
                   confidence=device.confidence | {"peak": "measured" if threads == 1 else "derived"})
