"""Per-op breakdown: ONNX Runtime's profiler (or torch.profiler), aggregated per node with the
median over runs, each node mapped back to the `nn.Module` path that produced it.

Why medians per node: one preempted kernel call can take longer than a hundred ordinary
runs of the whole model, so summed times let a single outlier claim most of the profile.
Each node's time per run is taken in every profiled run (warm-up runs dropped) and its
median kept; shares are fractions of the summed medians, and `scale_to` turns them into
milliseconds of the latency measured without the profiler (its p50).

Why the optimized graph: ONNX Runtime runs a rewritten graph (Conv+Relu fused, NCHWc layout
with reorder nodes, MatMul+Add as Gemm), whose node names the exported file does not know.
The profiling session saves that graph, and a node it created is traced through its input and
output tensors to the nearest node of the exported graph, whose metadata names the module.

Categories follow the systems-characterization papers: conv, matmul/gemm, attention
(softmax and activation-by-activation matmuls), normalization, elementwise, quantization,
data movement (reshape, transpose, gather, concat, pooling, layout reorders, ...).
"""
from __future__ import annotations

import bisect
import gc
import json
import re
import tempfile
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

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
                      "Expand", "Shape", "Identity", "Tile", "Pad", "MaxPool", "AveragePool", "GlobalAveragePool",
                      "ReorderInput", "ReorderOutput", "ReduceMean", "GlobalMaxPool"},
}
ROOT = "<root>"  # the model's own forward, outside any submodule
UNMAPPED = "(not traced to a module)"  # a runtime node with no path to the exported graph
TORCH_ATTENTION_STEMS = ("softmax", "scaled_dot_product", "flash_attention", "efficient_attention")
TORCH_MATMULS = {"addmm", "mm", "linear", "bmm", "matmul", "baddbmm", "addmv", "mv", "dot", "einsum",
                 "addmm_activation"}
TORCH_NORM_STEMS = ("layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm")
TORCH_DATA_MOVEMENT = {"view", "reshape", "permute", "transpose", "t", "cat", "stack", "select", "slice", "narrow",
                       "expand", "clone", "contiguous", "copy_", "to", "to_copy", "flatten", "unflatten", "squeeze",
                       "unsqueeze", "split", "split_with_sizes", "chunk", "unbind", "index_select", "gather",
                       "embedding", "as_strided", "unsafe_view", "reshape_alias", "pad", "constant_pad_nd", "mean",
                       "repeat", "tile", "roll", "flip"}
WARMUP_RUNS = 5  # profiled runs dropped before aggregating: first runs allocate and fill caches
TORCH_WARMUP_RUNS = 10  # torch.profiler itself runs its first few traced calls far slower (0.3 s each here)
MODULE_SCOPE = "edgeport.module::"  # torch.profiler ranges that name the module an op ran in
MATMUL_DATA_INPUTS = {"QLinearMatMul": (0, 3), "QGemm": (0, 3)}  # the two matrices; (0, 1) for the others
PARAMETER_NAME = re.compile(r"^([A-Za-z_][\w.]*?)\.(?:weight|bias)(?:$|_)")  # features.0.weight_quantized


def category(op_type: str, inputs_are_weights: bool = True) -> str:
    """The category of an op; a MatMul of two activations counts as attention."""
    if op_type in CATEGORIES["matmul/gemm"] and not inputs_are_weights:
        return "attention"
    return next((c for c, ops in CATEGORIES.items() if op_type in ops), "elementwise")


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """The tensors fixed before any input arrives: initializers, Constant outputs, and the
    outputs of nodes fed only by those (a weight's DequantizeLinear, Transpose or Cast: in a
    QDQ graph a Linear's weight reaches its MatMul through a DequantizeLinear, never directly)."""
    constant = {i.name for i in graph.initializer}
    for node in graph.node:  # ONNX keeps nodes in topological order
        if node.op_type == "Constant" or all(not t or t in constant for t in node.input):
            constant.update(node.output)
    return constant


def multiplies_a_weight(node: onnx.NodeProto, constant: set[str]) -> bool:
    """Whether one of the matrices a matmul-like node multiplies is a weight (a constant);
    scales and zero points, constants in every quantized matmul, are not looked at."""
    data_inputs = MATMUL_DATA_INPUTS.get(node.op_type, (0, 1))
    return any(i < len(node.input) and node.input[i] in constant for i in data_inputs)


def module_of_weights(tensors: Iterable[str]) -> str | None:
    """The module whose parameter a node reads (`features.0.weight_quantized` names
    `features.0`): exporters name initializers by parameter path, and tools that rewrite a
    graph (onnxruntime's quantize_dynamic) keep it as a prefix."""
    for tensor in tensors:
        match = PARAMETER_NAME.match(tensor)
        if match:
            return match.group(1)
    return None


def exported_module(node: onnx.NodeProto) -> str | None:
    """The module path of a node of the exported graph: ROOT for the model's own forward,
    None where the node does not say and reads no named parameter. Only the torch.export
    exporter's name scopes and the legacy exporter's `/scope/Op` names place a node in the
    root forward: a node with neither (written by another tool, or added after export) says
    nothing, and counting it as the root would claim its time was traced."""
    path = module_path(node)
    if path:
        return path
    if node.name.startswith("/") or any(p.key == "pkg.torch.onnx.name_scopes" for p in node.metadata_props):
        return ROOT
    return module_of_weights(node.input)


@dataclass
class OpTime:
    """One node (or aten op): its median time per run in microseconds, under the profiler."""

    name: str
    op_type: str
    module: str  # nn.Module path; ROOT for the model's own forward, UNMAPPED if not traced
    category: str
    median_us: float  # median over profiled runs of this node's time in one run
    calls_per_run: float
    ms_at_p50: float | None = None  # its part of the measured p50 (see OpProfile.scale_to)


@dataclass
class OpProfile:
    """Where the time goes: per-node medians under the profiler, shares of their sum, and
    (after `scale_to`) milliseconds of the latency measured without the profiler."""

    backend: str
    runs: int  # profiled runs aggregated (warm-up runs excluded)
    ops: list[OpTime] = field(default_factory=list)
    run_median_us: float | None = None  # median of whole runs under the profiler
    measured_p50_ms: float | None = None

    @property
    def op_median_sum_us(self) -> float:
        return sum(op.median_us for op in self.ops)

    @property
    def in_ops_fraction(self) -> float:
        """Share of a profiled run spent inside nodes; the rest is the runtime's own work
        between them (input binding, scheduling, output copies)."""
        if not self.run_median_us:
            return 1.0
        return min(1.0, self.op_median_sum_us / self.run_median_us)

    def scale_to(self, measured_p50_ms: float) -> "OpProfile":
        """Give each op its part of `measured_p50_ms` (the latency measured without the
        profiler): its share of a profiled run times that p50. Returns self."""
        self.measured_p50_ms = measured_p50_ms
        per_run = max(self.run_median_us or 0.0, self.op_median_sum_us) or 1.0
        for op in self.ops:
            op.ms_at_p50 = measured_p50_ms * op.median_us / per_run
        return self

    def _share(self, key: Callable[[OpTime], str]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for op in self.ops:
            totals[key(op)] = totals.get(key(op), 0.0) + op.median_us
        whole = sum(totals.values()) or 1.0
        return {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}

    def by_category(self) -> dict[str, float]:
        """Fraction of op time per category (sums to 1)."""
        return self._share(lambda op: op.category)

    def by_op_type(self) -> dict[str, float]:
        """Fraction of op time per op type (sums to 1)."""
        return self._share(lambda op: op.op_type)

    def by_module(self) -> dict[str, float]:
        """Fraction of op time per `nn.Module` path (sums to 1)."""
        return self._share(lambda op: op.module)

    def module_coverage(self) -> float:
        """Fraction of op time traced to an `nn.Module` path (the root module included)."""
        return 1.0 - self.by_module().get(UNMAPPED, 0.0)

    def _ms(self, shares: dict[str, float]) -> dict[str, float] | None:
        if self.measured_p50_ms is None:
            return None
        return {k: v * self.in_ops_fraction * self.measured_p50_ms for k, v in shares.items()}

    def to_dict(self) -> dict:
        categories, modules = self.by_category(), self.by_module()
        return {**asdict(self), "by_category": categories, "by_op_type": self.by_op_type(), "by_module": modules,
                "by_category_ms": self._ms(categories), "by_module_ms": self._ms(modules),
                "in_ops_fraction": self.in_ops_fraction, "module_coverage": self.module_coverage()}


def aggregate(records: Iterable[tuple[str, int, float]], runs: int) -> dict[str, tuple[float, float]]:
    """{node: (median µs per run, calls per run)} from (node, run index, µs) records over
    `runs` runs; a run in which a node did not appear counts as 0 µs for it."""
    per_run: dict[str, np.ndarray] = {}
    calls: dict[str, int] = {}
    for node, run, micros in records:
        if node not in per_run:
            per_run[node], calls[node] = np.zeros(runs), 0
        per_run[node][run] += micros
        calls[node] += 1
    return {node: (float(np.median(times)), calls[node] / runs) for node, times in per_run.items()}


class GraphTracer:
    """Maps the nodes of ONNX Runtime's optimized graph to the exported graph's module paths.

    A node of the exported graph has its own path. One the runtime made or renamed is traced
    by name first (fusions are named `<original>/<Fusion>`, NCHWc nodes `<output>_nchwc`),
    then through its tensors: an output or input the exported graph also has names the node
    that produced or consumed it there; failing that, the nearest traced neighbour in the
    optimized graph (a layout reorder belongs to the conv it feeds) lends its path.
    """

    def __init__(self, exported: onnx.GraphProto, optimized: onnx.GraphProto | None):
        self.exported = {n.name: n for n in exported.node}
        self.modules = {n.name: exported_module(n) for n in exported.node}
        self.producer = {o: n.name for n in exported.node for o in n.output}
        constant = constant_tensors(exported)
        for node in exported.node:  # a weight that reaches its node through a DequantizeLinear still names it
            if self.modules[node.name] is None:
                self.modules[node.name] = module_of_weights(
                    t for i in node.input if i in constant and i in self.producer
                    for t in self.exported[self.producer[i]].input)
        self.consumers: dict[str, list[str]] = {}
        for node in exported.node:
            for tensor in node.input:
                self.consumers.setdefault(tensor, []).append(node.name)
        self.optimized = {n.name: n for n in (optimized.node if optimized is not None else [])}
        self.optimized_producer = {o: n.name for n in self.optimized.values() for o in n.output}
        self.optimized_consumers: dict[str, list[str]] = {}
        for node in self.optimized.values():
            for tensor in node.input:
                self.optimized_consumers.setdefault(tensor, []).append(node.name)
        self._cache: dict[str, str] = {}

    def _direct(self, name: str) -> str | None:
        """The module of an optimized node from its name or its own tensors, without walking."""
        node = self.optimized.get(name)
        op_type = node.op_type if node is not None else ""
        for candidate in (name, name.split("/")[0], name.removesuffix("_nchwc")):
            if candidate in self.exported:
                return self._module_of(candidate, op_type)
            if candidate in self.producer:
                return self._module_of(self.producer[candidate], op_type)
        if node is None:
            return None
        for tensor in node.output:
            if tensor in self.producer:
                return self._module_of(self.producer[tensor], op_type)
        for tensor in node.input:
            if len(self.consumers.get(tensor, [])) == 1:
                return self._module_of(self.consumers[tensor][0], op_type)
        return module_of_weights(node.input)

    def _module_of(self, exported_name: str, op_type: str, depth: int = 4) -> str | None:
        """The module of the exported node `exported_name`, or, when a fusion ended there
        (a Conv fused with the BatchNormalization and Relu after it keeps the Relu's output),
        of the node up its input chain with the fused node's `op_type`: the conv does the work."""
        node = self.exported[exported_name]
        while op_type and node.op_type != op_type and depth > 0:
            upstream = [self.producer[t] for t in node.input if t in self.producer]
            if len(upstream) != 1:
                break
            node, depth = self.exported[upstream[0]], depth - 1
        if node.op_type != op_type:
            node = self.exported[exported_name]
        return self.modules[node.name]

    def module(self, name: str) -> str:
        """The module path of the optimized node `name` (UNMAPPED if nothing leads back)."""
        if name not in self._cache:
            self._cache[name] = self._direct(name) or self._walk(name) or UNMAPPED
        return self._cache[name]

    def _walk(self, start: str) -> str | None:
        """Breadth-first through the optimized graph's tensors to the nearest traced node."""
        seen, queue = {start}, deque([start])
        while queue:
            node = self.optimized.get(queue.popleft())
            if node is None:
                continue
            neighbours = [self.optimized_producer[t] for t in node.input if t in self.optimized_producer]
            neighbours += [c for t in node.output for c in self.optimized_consumers.get(t, [])]
            for neighbour in neighbours:
                if neighbour in seen:
                    continue
                found = self._direct(neighbour)
                if found:
                    return found
                seen.add(neighbour)
                queue.append(neighbour)
        return None


def _run_index(starts: list[float], timestamp: float) -> int:
    return bisect.bisect_right(starts, timestamp) - 1


def name_every_node(model: onnx.ModelProto) -> bool:
    """Give each unnamed node of `model` a unique name, `<op type>_<position>`; True if any
    lacked one. ONNX Runtime's profiler makes up names for unnamed nodes from indices its
    saved optimized graph does not keep, so those nodes (edgeport's own Q/DQ nodes, files
    built with onnx.helper) could never be traced; naming them first changes no kernel."""
    taken = {n.name for n in model.graph.node}
    unnamed = [n for n in model.graph.node if not n.name]
    for position, node in enumerate(model.graph.node):
        if not node.name:
            name, suffix = f"{node.op_type}_{position}", 0
            while name in taken:
                suffix += 1
                name = f"{node.op_type}_{position}_{suffix}"
            node.name = name
            taken.add(name)
    return bool(unnamed)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _read_trace(trace_file: str) -> list[dict]:
    """The events of ONNX Runtime's profiler trace; a missing, empty or cut-off file is a
    UserError that says so (it happens when the disk is full or the temp folder vanished)."""
    from edgeport.errors import UserError

    try:
        events = json.loads(Path(trace_file).read_text()) if trace_file else None
    except (OSError, ValueError) as error:
        raise UserError(f"ONNX Runtime's profiler left no readable trace ({trace_file or 'no file'}: "
                        f"{str(error).splitlines()[0][:120]}); profile again, or with ops=False (--no-ops)") from error
    if not isinstance(events, list):
        raise UserError(f"ONNX Runtime's profiler left no readable trace ({trace_file or 'no file'}); profile "
                        f"again, or with ops=False (--no-ops)")
    return events


def _is_weighted(name: str, optimized: dict[str, onnx.NodeProto], optimized_constants: set[str],
                 exported: dict[str, onnx.NodeProto], exported_constants: set[str]) -> bool:
    """Whether the profiled node `name` multiplies a weight: read in the graph that ran
    (the optimized one), else in the exported node it came from; a node found in neither
    counts as weighted, the common case."""
    if name in optimized:
        return multiplies_a_weight(optimized[name], optimized_constants)
    original = exported.get(name) or exported.get(name.split("/")[0])
    return original is None or multiplies_a_weight(original, exported_constants)


def profile_onnxruntime(path: str | Path, feeds: list[dict[str, np.ndarray]], runs: int = 50,
                        threads: int | None = None) -> OpProfile:
    """Run an ONNX model `runs` times (after WARMUP_RUNS) under ONNX Runtime's profiler and
    aggregate per node: median time per run in µs, category and `nn.Module` path. The
    profiler's trace and the optimized graph are written to a temporary folder that is
    removed before returning; `threads` sets intra-op threads as the timed runner does."""
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    # named in memory only where the weights are inside the file: external data is found
    # relative to the file's own folder, which a model given as bytes does not have
    renamed = not _uses_external_data(model) and name_every_node(model)
    exported = model.graph
    with tempfile.TemporaryDirectory(prefix="edgeport-ops-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1  # as OnnxRuntimeRunner sets it
        session = ort.InferenceSession(model.SerializeToString() if renamed else str(path), options,
                                       providers=["CPUExecutionProvider"])
        try:
            names = [i.name for i in session.get_inputs()]
            for i in range(WARMUP_RUNS + runs):
                session.run(None, {n: feeds[i % len(feeds)][n] for n in names})
        finally:
            trace_file = session.end_profiling()  # written now, inside the folder about to be removed
            del session
            gc.collect()  # release its worker threads now; they would spin beside the next timing
        events = _read_trace(trace_file)
        optimized_file = Path(tmp) / "optimized.onnx"
        optimized = onnx.load(str(optimized_file), load_external_data=False).graph if optimized_file.exists() \
            else None
    run_events = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[WARMUP_RUNS:]
    starts = [float(e["ts"]) for e in run_events]
    tracer, op_types, records = GraphTracer(exported, optimized), {}, []
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        run = _run_index(starts, float(event["ts"]))
        if run < 0:
            continue  # a warm-up run
        node_name = event["name"].removesuffix("_kernel_time")
        op_types[node_name] = event.get("args", {}).get("op_name", "")
        records.append((node_name, run, float(event["dur"])))
    ran = {n.name: n for n in optimized.node} if optimized is not None else {}
    ran_constants = constant_tensors(optimized) if optimized is not None else set()
    originals, original_constants = {n.name: n for n in exported.node}, constant_tensors(exported)
    ops = []
    for node_name, (median_us, calls) in aggregate(records, len(starts)).items():
        weighted = _is_weighted(node_name, ran, ran_constants, originals, original_constants)
        ops.append(OpTime(node_name, op_types[node_name], tracer.module(node_name),
                          category(op_types[node_name], weighted), median_us, calls))
    return OpProfile("onnxruntime", len(starts), sorted(ops, key=lambda o: -o.median_us),
                     float(np.median([e["dur"] for e in run_events])) if run_events else None)


def _module_scopes(model) -> list:
    """Forward hooks that open a torch.profiler range named after each submodule's path
    while it runs, so that every aten op can be traced to its innermost module.

    The open ranges live in a stack held by the hooks, not on the modules: an attribute left
    on the user's module would outlive the profile and make `torch.save` and `copy.deepcopy`
    of it fail (a RecordFunction cannot be pickled)."""
    import torch

    open_ranges: list = []

    def opener(scope: str):
        def enter(mod, args):
            record = torch.autograd.profiler.record_function(scope)
            record.__enter__()
            open_ranges.append(record)
        return enter

    def leave(mod, args, output):
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(opener(f"{MODULE_SCOPE}{name}")),
                        module.register_forward_hook(leave)]
    return handles


def torch_category(op: str) -> str:
    """The category of an aten op (`aten::` prefix or not), by the same classes as ONNX
    Runtime's nodes. ATen spells one op many ways (`conv2d`, `thnn_conv2d`,
    `_slow_conv2d_forward`, `mkldnn_convolution`; `native_layer_norm`,
    `_native_batch_norm_legit_no_training`; `max_pool2d_with_indices`), so families are
    matched by stem, not by exact name."""
    bare = op.removeprefix("aten::").lstrip("_")
    if any(stem in bare for stem in TORCH_ATTENTION_STEMS):
        return "attention"
    if "conv" in bare:
        return "conv"
    if bare in TORCH_MATMULS:
        return "matmul/gemm"
    if any(stem in bare for stem in TORCH_NORM_STEMS):
        return "normalization"
    if "quantize" in bare:
        return "quantization"
    if bare in TORCH_DATA_MOVEMENT or "pool" in bare:
        return "data movement"
    return "elementwise"


def _torch_module(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(MODULE_SCOPE):
            return parent.name.removeprefix(MODULE_SCOPE)
        parent = parent.cpu_parent
    return ROOT


def profile_torch(model, input_names: list[str], feeds: list[dict[str, np.ndarray]], runs: int = 50) -> OpProfile:
    """Run a torch model `runs` times (after TORCH_WARMUP_RUNS) under torch.profiler and aggregate
    self CPU time per aten op and module: median µs per run."""
    import os

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    # Kineto prints its start and stop lines from C++ unless its log level is above 5; the
    # user's own setting wins
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    args = [[torch.from_numpy(f[n]) for n in input_names] for f in feeds]
    handles = _module_scopes(model)
    try:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(TORCH_WARMUP_RUNS + runs):
                with record_function("edgeport.run"):
                    model(*args[i % len(args)])
    finally:
        for handle in handles:
            handle.remove()
    events = prof.events()
    run_events = sorted((e for e in events if e.name == "edgeport.run"), key=lambda e: e.time_range.start)
    starts = [float(e.time_range.start) for e in run_events[TORCH_WARMUP_RUNS:]]
    kinds, records = {}, []
    for event in events:
        if not event.name.startswith("aten::") or event.self_cpu_time_total <= 0:
            continue
        run = _run_index(starts, float(event.time_range.start))
        if run < 0:
            continue
        key = f"{event.name} in {_torch_module(event)}"
        kinds[key] = (event.name, _torch_module(event))
        records.append((key, run, float(event.self_cpu_time_total)))
    ops = []
    for key, (median_us, calls) in aggregate(records, len(starts)).items():
        op, module = kinds[key]
        ops.append(OpTime(key, op.removeprefix("aten::"), module, torch_category(op), median_us, calls))
    run_medians = [float(e.cpu_time_total) for e in run_events[TORCH_WARMUP_RUNS:]]
    return OpProfile("torch", len(starts), sorted(ops, key=lambda o: -o.median_us),
                     float(np.median(run_medians)) if run_medians else None)


def op_profiler_for(artifact_format: str):
    """The per-op profiler for artifacts of a format, or None where the runtime has none here."""
    return {"onnx": profile_onnxruntime}.get(artifact_format)
