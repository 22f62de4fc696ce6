"""Device objects from `catalog.toml`, and the host, detected and calibrated at run time.

The host's peak figures come from micro-benchmarks run here (an fp32 GEMM, a large array
copy, a chain of tiny ONNX Runtime nodes), not from a data sheet; its power is an
assumption, said as such, because no meter exists on most hosts.
"""
from __future__ import annotations

import difflib
import gc
import os
import platform
import time
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgeport.errors import UserError

CATALOG = Path(__file__).with_name("catalog.toml")
HOST_WATTS_PER_CORE = 5.0  # assumption for the host's active power when no meter exists


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

    def peak_ops(self, precision: str) -> float:
        """Peak operations per second at `precision`, falling back to the nearest wider one."""
        for p in {"int8": ("int8", "fp16", "fp32"), "fp16": ("fp16", "fp32")}.get(precision, ("fp32", "fp16")):
            if p in self.peak:
                return self.peak[p] * 1e12
        return max(self.peak.values()) * 1e12


@lru_cache(maxsize=1)
def _entries() -> dict[str, dict]:
    return tomllib.loads(CATALOG.read_text())


def names() -> list[str]:
    """Every device name: 'host' and the catalog's entries."""
    return ["host", *sorted(_entries())]


def get(name: str) -> Device:
    """The device called `name`; an unknown name suggests the closest ones."""
    if name == "host":
        return host()
    entries = _entries()
    if name not in entries:
        close = difflib.get_close_matches(name, names(), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown device {name!r}{hint} (see `edgeport devices`)")
    return Device(name=name, **entries[name])


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


def _timed_runs(session, feed: dict, seconds: float) -> float:
    """Seconds per run of `session` on `feed`, averaged over about `seconds`."""
    for _ in range(3):
        session.run(None, feed)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, feed)
        count += 1
    return (time.perf_counter() - start) / count


def _gemm_flops(size: int = 512, seconds: float = 0.3) -> float:
    """fp32 FLOP/s of ONNX Runtime's own MatMul kernel on all cores: the runtime we estimate."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).random((size, size), dtype=np.float32), "b")
    session = _ort_session([helper.make_node("MatMul", ["a", "b"], ["c"])],
                           [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
                           [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])], [weight])
    seconds_per_run = _timed_runs(session, {"a": np.ones((size, size), np.float32)}, seconds)
    del session
    gc.collect()  # its worker threads must not outlive the calibration
    return 2 * size ** 3 / seconds_per_run


def _copy_bandwidth(megabytes: int = 64, seconds: float = 0.3) -> float:
    src = np.ones(megabytes * 2 ** 20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.copyto(dst, src)
        count += 1
    return 2 * src.nbytes * count / (time.perf_counter() - start)  # read + write


def _node_overhead_s(nodes: int = 100) -> float:
    """Seconds per node of a chain of tiny Add nodes in ONNX Runtime, one thread, unoptimized."""
    from onnx import TensorProto, helper

    session = _ort_session([helper.make_node("Add", [f"t{i}", "one"], [f"t{i + 1}"]) for i in range(nodes)],
                           [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 16])],
                           [helper.make_tensor_value_info(f"t{nodes}", TensorProto.FLOAT, [1, 16])],
                           [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])], threads=1, optimize=False)
    return _timed_runs(session, {"t0": np.zeros((1, 16), np.float32)}, 0.1) / nodes


@lru_cache(maxsize=1)
def host() -> Device:
    """This machine, calibrated by micro-benchmarks (about one second, once per process)."""
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    fp32 = _gemm_flops()
    cores = os.cpu_count() or 1
    return Device(
        name="host", description=f"this machine: {cpu_model()}, {cores} logical CPUs", kind="cpu",
        backends=["onnxruntime", "torch"], peak={"fp32": fp32 / 1e12, "int8": (4 if vnni else 2) * fp32 / 1e12},
        memory_bandwidth_gbs=_copy_bandwidth() / 1e9, active_w=HOST_WATTS_PER_CORE * cores,
        idle_w=0.0, node_overhead_us=_node_overhead_s() * 1e6, efficiency={"compute": 0.8, "memory": 0.7},
        sources={"peak": "measured here: ONNX Runtime fp32 MatMul 512x512, all cores; int8 derived as "
                         f"{'4x (VNNI)' if vnni else '2x'} fp32",
                 "memory_bandwidth_gbs": "measured here: 64 MB numpy copy",
                 "node_overhead_us": "measured here: ONNX Runtime chain of 100 Add nodes, 1 thread",
                 "active_w": f"assumed: {HOST_WATTS_PER_CORE} W per logical CPU (no meter)",
                 "idle_w": "not subtracted (assumed 0)"})
