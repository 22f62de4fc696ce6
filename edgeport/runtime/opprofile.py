"""Per-op breakdown: ONNX Runtime's profiler (or torch.profiler), aggregated per node, op type,
module and category, each ONNX node mapped back to the `nn.Module` path that produced it.

Categories follow the systems-characterization papers: conv, matmul/gemm, attention
(softmax and activation-by-activation matmuls), normalization, elementwise, quantization,
data movement (reshape, transpose, gather, concat, ...).
"""
from __future__ import annotations

import gc
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgeport.devices.estimate import module_path

CATEGORIES = {
    "conv": {"Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv", "ConvTranspose"},
    "matmul/gemm": {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "QLinearMatMul", "MatMulInteger", "MatMulNBits",
                    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"},
    "attention": {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"},
    "normalization": {"LayerNormalization", "BatchNormalization", "SkipLayerNormalization", "InstanceNormalization",
                      "GroupNormalization", "SimplifiedLayerNormalization", "RMSNormalization"},
    "quantization": {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"},
    "data movement": {"Reshape", "Transpose", "Gather", "Concat", "Slice", "Split", "Squeeze", "Unsqueeze", "Flatten",
                      "Expand", "Shape", "Identity", "Tile", "Pad", "MaxPool", "AveragePool", "GlobalAveragePool"},
}
CREATED = "(created by onnxruntime)"  # nodes the runtime made, e.g. layout reorders
TORCH_CATEGORIES = {
    "conv": ("conv", "convolution", "mkldnn_convolution"), "matmul/gemm": ("addmm", "mm", "linear", "bmm", "matmul"),
    "attention": ("softmax", "scaled_dot_product"), "normalization": ("layer_norm", "batch_norm", "group_norm"),
    "data movement": ("view", "reshape", "permute", "transpose", "cat", "select", "slice", "expand", "clone",
                      "contiguous", "copy_", "flatten", "max_pool", "avg_pool", "adaptive_avg_pool", "mean")}


def category(op_type: str, inputs_are_weights: bool = True) -> str:
    """The category of an op; a MatMul of two activations counts as attention."""
    if op_type in CATEGORIES["matmul/gemm"] and not inputs_are_weights:
        return "attention"
    return next((c for c, ops in CATEGORIES.items() if op_type in ops), "elementwise")


@dataclass
class OpTime:
    name: str
    op_type: str
    module: str
    category: str
    total_us: float  # summed over every profiled run
    calls: int


@dataclass
class OpProfile:
    """Where the time goes; shares are fractions of the summed op time."""

    backend: str
    runs: int
    ops: list[OpTime] = field(default_factory=list)

    def _share(self, key) -> dict[str, float]:
        totals: dict[str, float] = {}
        for op in self.ops:
            totals[key(op)] = totals.get(key(op), 0.0) + op.total_us
        whole = sum(totals.values()) or 1.0
        return {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}

    def by_category(self) -> dict[str, float]:
        return self._share(lambda op: op.category)

    def by_op_type(self) -> dict[str, float]:
        return self._share(lambda op: op.op_type)

    def by_module(self) -> dict[str, float]:
        return self._share(lambda op: op.module or "<root>")

    def to_dict(self) -> dict:
        return {**asdict(self), "by_category": self.by_category(), "by_op_type": self.by_op_type(),
                "by_module": self.by_module()}


def profile_onnxruntime(path: str | Path, feeds: list[dict[str, np.ndarray]], runs: int = 50,
                        threads: int | None = None) -> OpProfile:
    """Run an ONNX model `runs` times under ONNX Runtime's profiler and aggregate per node."""
    import onnxruntime as ort

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    originals = {n.name: n for n in graph.node}
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        for i in range(runs):
            session.run(None, {n: feeds[i % len(feeds)][n] for n in names})
        events = json.loads(Path(session.end_profiling()).read_text())
        del session
        gc.collect()  # release its worker threads now; they would spin beside the next timing
    totals: dict[str, OpTime] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node_name = event["name"].removesuffix("_kernel_time")
        op_type = event.get("args", {}).get("op_name", "")
        original = originals.get(node_name) or originals.get(node_name.split("/")[0])  # fused: "orig/Fusion"
        if node_name not in totals:
            is_weighted = original is None or any(i in weights for i in original.input)
            totals[node_name] = OpTime(node_name, op_type, module_path(original) if original else CREATED,
                                       category(op_type, is_weighted), 0.0, 0)
        totals[node_name].total_us += float(event["dur"])
        totals[node_name].calls += 1
    return OpProfile("onnxruntime", runs, sorted(totals.values(), key=lambda o: -o.total_us))


def profile_torch(model, input_names: list[str], feeds: list[dict[str, np.ndarray]], runs: int = 50) -> OpProfile:
    """Run a torch model `runs` times under torch.profiler and aggregate self CPU time per aten op."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    args = [[torch.from_numpy(f[n]) for n in input_names] for f in feeds]
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(runs):
            model(*args[i % len(args)])
    ops = []
    for event in prof.key_averages():
        if not event.key.startswith("aten::") or event.self_cpu_time_total <= 0:
            continue
        op = event.key.removeprefix("aten::")
        cat = next((c for c, keys in TORCH_CATEGORIES.items() if op.lstrip("_") in keys), "elementwise")
        ops.append(OpTime(event.key, op, "", cat, float(event.self_cpu_time_total), int(event.count)))
    return OpProfile("torch", runs, sorted(ops, key=lambda o: -o.total_us))


def op_profiler_for(artifact_format: str):
    """The per-op profiler for artifacts of a format, or None where the runtime has none here."""
    return {"onnx": profile_onnxruntime}.get(artifact_format)
