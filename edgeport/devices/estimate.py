"""Roofline estimates from an ONNX graph: latency and energy per inference on a catalog device.

For each node, MACs (Conv, MatMul, Gemm) or elementwise operations and the bytes it reads
and writes come from shape inference; its precision from its op type or a feeding
DequantizeLinear (QDQ). Node time = max(ops / (efficiency x peak), bytes / (efficiency x
bandwidth)) + the device's per-node overhead. Energy = the device's active power x that
latency, labelled `estimated:roofline`; beside it, the 45 nm theoretical compute energy
(Horowitz: MAC 4.6 / 1.5 / 0.23 pJ at fp32 / fp16 / int8, accumulate 0.9 / 0.4 / 0.03 pJ),
where inputs with a given firing rate count as accumulates (synaptic operations).

Symbolic dimensions (a dynamic batch or sequence axis) are set before shape inference, so
every intermediate shape is concrete: from `dims`, else from the shapes of given inputs. A
batch axis (axis 0) left open counts as 1, and the estimate says so; any other axis left
open is refused, because a sequence length of 1 prices a different model. The dims used,
and where each came from, are recorded in the estimate.
"""
from __future__ import annotations

import ast
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from edgeport.devices.catalog import CONFIDENCE_LEVELS, Device, check_device, get
from edgeport.errors import UserError

ESTIMATED_FORMATS = ("onnx",)  # artifact formats whose graphs the estimator reads

ENERGY_45NM_PJ = {  # Horowitz, ISSCC 2014, 45 nm: (MAC, accumulate)
    "fp32": (4.6, 0.9), "fp16": (1.5, 0.4), "int8": (0.23, 0.03)}
ELEMENTWISE_OPS = {"Softmax": 5, "LayerNormalization": 8, "Gelu": 8, "Erf": 4, "BatchNormalization": 2,
                   "Sigmoid": 4, "Tanh": 4, "Exp": 4, "Sqrt": 2, "Pow": 2, "ReduceMean": 1, "Div": 1}
FREE_OPS = {"Constant", "Shape", "Identity"}
FUSED_OPS = {"QuantizeLinear", "DequantizeLinear"}  # folded into integer kernels by the runtime
INT8_OPS = {"QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"}
CONV_OPS = {"Conv", "QLinearConv", "ConvInteger"}
MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"}
# Memory-bound ops (pointwise, data movement, reductions, pooling) for which one operation per
# output element plus the bytes they move is the intended model; anything outside the known
# sets gets that same price, but as a guess that the estimate names in its assumptions.
PER_ELEMENT_OPS = {
    "Add", "Sub", "Mul", "Neg", "Abs", "Reciprocal", "Max", "Min", "Sum", "Mean", "Clip", "Where", "Sign", "Floor",
    "Ceil", "Round", "Mod", "Log", "Sin", "Cos", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "HardSigmoid",
    "HardSwish", "Softplus", "Softsign", "Mish", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not",
    "And", "Or", "Xor", "Cast", "CastLike", "Dropout", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
    "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "Expand",
    "Tile", "Pad", "Resize", "DepthToSpace", "SpaceToDepth", "Range", "ConstantOfShape", "Trilu", "CumSum",
    "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ArgMax", "ArgMin", "TopK", "MaxPool",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
KNOWN_OPS = CONV_OPS | MATMUL_OPS | set(ELEMENTWISE_OPS) | PER_ELEMENT_OPS | FREE_OPS | FUSED_OPS | INT8_OPS
_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8,
          onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT8: 1,
          onnx.TensorProto.UINT8: 1, onnx.TensorProto.BOOL: 1, onnx.TensorProto.INT4: 1, onnx.TensorProto.UINT4: 1}


@dataclass
class NodeEstimate:
    name: str
    op_type: str
    module: str
    precision: str
    macs: float
    ops: float  # elementwise operations (not MACs)
    bytes: float
    time_us: float
    bound: str  # "compute", "memory", "overhead", "fused"


@dataclass
class Estimate:
    """Estimated latency (ms) and energy (mJ) per inference of one artifact on one device:
    `energy_mj` gross (active power x latency), `net_energy_mj` less the idle power over the
    same time, the figure a measurement's net energy compares with."""

    artifact: str
    device: str
    latency_ms: float
    energy_mj: float
    net_energy_mj: float
    energy_provenance: str
    compute_energy_45nm_mj: float
    macs: float
    synaptic_ops: float
    bytes: float
    nodes: list[NodeEstimate] = field(repr=False)
    assumptions: list[str] = field(default_factory=list)
    provenance: str = "estimated:roofline"
    dims: dict[str, int] = field(default_factory=dict)  # symbolic dimension -> value used
    dims_source: dict[str, str] = field(default_factory=dict)  # -> "given", "from inputs" or "assumed"
    confidence: dict[str, str] = field(default_factory=dict)  # device figure -> vendor/derived/...

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line, as `edgeport estimate` and a profile print it: latency, energy and their basis."""
        dims = ", ".join(f"{d}={v} ({self.dims_source.get(d, 'given')})" for d, v in self.dims.items())
        return (f"estimate for {self.device}: {self.latency_ms:.4f} ms, {self.energy_mj:.4f} mJ gross, "
                f"{self.net_energy_mj:.4f} mJ net "
                f"({self.energy_provenance}); {self.macs:,.0f} MACs, {self.bytes / 1e6:.2f} MB moved"
                + (f"; {dims}" if dims else "") + f" [{self.provenance}]")

    def breakdown(self) -> dict[str, float]:
        """Estimated time per op type, in microseconds."""
        totals: dict[str, float] = {}
        for n in self.nodes:
            totals[n.op_type] = totals.get(n.op_type, 0.0) + n.time_us
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def module_path(node: onnx.NodeProto) -> str:
    """The `nn.Module` path a node came from: the torch.export exporter's name scopes, or the
    legacy exporter's `/a/a.0/b/Op` node names. A conv the exporter's optimizer fused with the
    BatchNorm after it carries the norm's scopes; its weight still names the conv."""
    rules = next((p.value for p in node.metadata_props if p.key == "pkg.onnxscript.rewriter.rule_name"), "")
    if "FuseBatchNormIntoConv" in rules and len(node.input) > 1 and ".weight" in node.input[1]:
        return node.input[1].rpartition(".weight")[0]
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            return scopes[-2] if len(scopes) > 1 else ""
    parts = [p for p in node.name.split("/") if p][:-1]
    path = ""
    for part in parts:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path


def tensor_table(model: onnx.ModelProto) -> dict[str, tuple[list[int], int]]:
    """Every tensor's (shape, elem_type); a dimension still symbolic after inference counts as 1
    (see `open_dims`, which the estimate names in its assumptions)."""
    table = {}
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for value in values:
        t = value.type.tensor_type
        table[value.name] = ([d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim], t.elem_type)
    for init in model.graph.initializer:
        table[init.name] = (list(init.dims), init.data_type)
    return table


def open_dims(model: onnx.ModelProto) -> list[str]:
    """Names of dimensions that stay symbolic in some intermediate tensor after inference."""
    return sorted({d.dim_param or "?" for v in model.graph.value_info for d in v.type.tensor_type.shape.dim
                   if not d.HasField("dim_value")})


def symbolic_inputs(model: onnx.ModelProto) -> dict[str, list[tuple[str, int]]]:
    """{symbol: [(graph input, axis), ...]} for every symbolic dimension of the graph's inputs;
    an unnamed one is called `<input>[<axis>]`."""
    weights = {i.name for i in model.graph.initializer}
    found: dict[str, list[tuple[str, int]]] = {}
    for value in model.graph.input:
        if value.name in weights:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                found.setdefault(dim.dim_param or f"{value.name}[{axis}]", []).append((value.name, axis))
    return found


def resolve_dims(model: onnx.ModelProto, dims: dict[str, int] | None,
                 input_shapes: dict[str, Sequence[int]] | None) -> tuple[dict[str, int], dict[str, str]]:
    """({symbol: value}, {symbol: "given" | "from inputs" | "assumed"}) for every symbolic input
    dimension: `dims` first, then the shapes of given inputs, then 1 for a batch axis (axis 0).
    A UserError names a symbol `dims` sets that the model lacks, a value that is not a positive
    integer, inputs that disagree, and a non-batch symbol left without a value."""
    symbols, dims = symbolic_inputs(model), dict(dims or {})
    unknown = sorted(set(dims) - set(symbols))
    if unknown:
        have = ", ".join(sorted(symbols)) or "none"
        raise UserError(f"the model has no symbolic dimension {', '.join(map(repr, unknown))} "
                        f"(its symbolic dimensions: {have})")
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"dimension {name!r} must be a positive integer, not {value!r}")
    values, sources = dict(dims), {name: "given" for name in dims}
    for symbol, places in symbols.items():
        if symbol in values:
            continue
        seen = {tuple(input_shapes[i])[axis] for i, axis in places
                if input_shapes and i in input_shapes and axis < len(input_shapes[i])}
        if len(seen) > 1:
            raise UserError(f"the given inputs disagree on dimension {symbol!r}: {sorted(seen)}")
        if seen:
            values[symbol], sources[symbol] = int(seen.pop()), "from inputs"
        elif all(axis == 0 for _, axis in places):
            values[symbol], sources[symbol] = 1, "assumed"
        else:
            where = ", ".join(f"{i} axis {axis}" for i, axis in places)
            raise UserError(f"symbolic dimension {symbol!r} ({where}) has no value: a roofline estimate needs it "
                            f"(pass dims={{{symbol!r}: N}}, or --dim {symbol}=N on the command line, or inputs)")
    return values, sources


# dim_param expressions exporters write ("Min(512, seq)", "2*s0", "floor(seq/2)"), evaluated
# without eval: an ONNX file is untrusted input
_FUNCTIONS = {"Min": min, "Max": max, "min": min, "max": max, "floor": math.floor, "ceil": math.ceil,
              "FloorToInt": math.floor, "CeilToInt": math.ceil}
_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.FloorDiv: lambda a, b: a // b, ast.Div: lambda a, b: a / b, ast.Mod: lambda a, b: a % b}


def dim_value(expression: str, values: dict[str, int]) -> int | None:
    """The integer a symbolic dimension's expression takes at `values`, or None where it names
    another symbol or is not plain arithmetic."""
    def evaluate(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -evaluate(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
                and not node.keywords:
            return _FUNCTIONS[node.func.id](*map(evaluate, node.args))
        raise ValueError(expression)

    try:
        result = evaluate(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, RecursionError):
        return None
    return int(result) if float(result).is_integer() else None


def _fix_input_dims(model: onnx.ModelProto, values: dict[str, int]) -> None:
    """Write `values` into the graph inputs' symbolic dimensions, in place, and into every
    other tensor's dimension whose expression they settle (the exporter's `Min(512, seq)`):
    shape inference keeps the exporter's symbolic dims where it infers none itself."""
    for symbol, places in symbolic_inputs(model).items():
        for name, axis in places:
            value = next(v for v in model.graph.input if v.name == name)
            value.type.tensor_type.shape.dim[axis].dim_value = values[symbol]
    for value in [*model.graph.value_info, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                settled = dim_value(dim.dim_param, values)
                if settled is not None:
                    dim.dim_value = settled


def _size(entry) -> int:
    return int(np.prod(entry[0])) if entry and entry[0] else 1


def node_work(node: onnx.NodeProto, table) -> tuple[float, float]:
    """(MACs, elementwise ops) of one node from its input and output shapes."""
    out = table.get(node.output[0]) if node.output else None
    if node.op_type in CONV_OPS:
        weight = table.get(node.input[3 if node.op_type == "QLinearConv" else 1])
        if out and weight and len(weight[0]) >= 2:
            return float(_size(out) * np.prod(weight[0][1:])), 0.0
    if node.op_type in MATMUL_OPS:
        a = table.get(node.input[0])
        if out and a and a[0]:
            k = a[0][0] if node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute) \
                else a[0][-1]
            return float(_size(out) * k), 0.0
    if node.op_type in FREE_OPS or node.op_type in FUSED_OPS or out is None:
        return 0.0, 0.0
    return 0.0, float(_size(out) * ELEMENTWISE_OPS.get(node.op_type, 1))


def node_precision(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], table) -> str:
    if node.op_type in INT8_OPS:
        return "int8"
    if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input):
        return "int8"
    if node.output and table.get(node.output[0], ([], 0))[1] == onnx.TensorProto.FLOAT16:
        return "fp16"
    return "fp32"


def _integer_epilogue(node: onnx.NodeProto, accumulators: set[str], constants: set[str]) -> bool:
    """Whether `node` is part of an integer matmul's epilogue, which the runtime runs inside
    the kernel (MatMulIntegerToFloat): the Cast of its int32 result, the Muls by its scale,
    and one Add of a constant bias. Records the chain in `accumulators`."""
    if node.op_type == "MatMulInteger":
        accumulators.add(node.output[0])
        return False
    if not any(i in accumulators for i in node.input):
        return False
    if node.op_type in ("Cast", "Mul"):
        accumulators.add(node.output[0])
        return True
    return node.op_type == "Add" and any(i in constants for i in node.input)


def load_graph(path: Path, dims: dict[str, int] | None = None) -> onnx.ModelProto:
    """The ONNX model at `path` (external weights left on disk), its graph inputs' symbolic
    dimensions set from `dims`, and its shapes inferred.

    A file that is empty, is not an ONNX protobuf, holds no graph or defeats shape inference
    raises a UserError naming it, so that a broken artifact is never estimated as zero work.
    """
    model = read_graph(path)
    if dims:
        _fix_input_dims(model, dims)
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as error:
        raise UserError(f"cannot infer the shapes of {path}: {str(error).splitlines()[0][:160]}") from error


def read_graph(path: Path) -> onnx.ModelProto:
    """The ONNX model at `path`, unmodified; a UserError naming the file if it holds none."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise UserError(f"cannot read {path} as ONNX: {str(error).splitlines()[0][:160]}") from error
    if not model.HasField("graph"):  # protobuf parses an empty file, and some garbage, as an empty model
        what = "is empty (0 bytes)" if path.stat().st_size == 0 else "holds no ONNX graph"
        raise UserError(f"cannot read {path} as ONNX: it {what}")
    return model


def op_label(node: onnx.NodeProto) -> str:
    """`op_type`, prefixed by its domain unless that is the standard ONNX one."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def pricing_gaps(graph: onnx.GraphProto, table: dict[str, tuple[list[int], int]]) -> list[str]:
    """Assumption lines for the nodes the estimator can only guess at: op types it has no cost
    model for (priced as one operation per output element), and nodes whose output shape
    shape inference could not give (their compute counts as zero). Each op type with its count.
    """
    def counted(nodes) -> str:
        return ", ".join(f"{op} x{count}" for op, count in sorted(Counter(map(op_label, nodes)).items()))

    unknown = [n for n in graph.node if n.op_type not in KNOWN_OPS]
    shapeless = [n for n in graph.node if n.op_type not in FREE_OPS | FUSED_OPS
                 and (not n.output or n.output[0] not in table)]
    gaps = []
    if unknown:
        gaps.append(f"no cost model for op types {counted(unknown)}: priced as one operation per output element "
                    "plus memory traffic and per-node overhead")
    if shapeless:
        gaps.append(f"output shape unknown for {counted(shapeless)}: compute priced at zero (only the memory "
                    "traffic of tensors with known shapes and per-node overhead count)")
    return gaps


def _dims_assumptions(values: dict[str, int], sources: dict[str, str], still_open: list[str]) -> list[str]:
    lines = []
    assumed = [name for name, source in sources.items() if source == "assumed"]
    if assumed:
        lines.append(f"ASSUMED: symbolic batch dimension {', '.join(map(repr, assumed))} = 1 (no value given; set it "
                     f"with dims={{...}} or --dim {assumed[0]}=N)")
    if values:
        lines.append("dims used: " + ", ".join(f"{k}={v} ({sources[k]})" for k, v in values.items()))
    if still_open:
        lines.append(f"symbolic dimensions {', '.join(still_open)} remain in intermediate tensors after shape "
                     "inference: counted as 1")
    return lines


def _device_confidence(dev: Device, confidence: dict[str, str]) -> list[str]:
    return [f"device '{dev.name}' figures: " + ", ".join(f"{figure} {level}" for figure, level in confidence.items())]


def _peak_confidence(dev: Device, nodes: list[NodeEstimate]) -> dict[str, str]:
    """The confidence of the peaks a model's MACs were priced at: the weakest among the peaks
    of the precisions it uses (a device may list a vendor int8 figure and an assumed fp16 one)."""
    used = {dev.peak_precision(n.precision) for n in nodes if n.macs}
    levels = [dev.confidence.get(f"peak_{p}", dev.confidence.get("peak", "assumed")) for p in sorted(used)]
    return {"peak": max(levels, key=CONFIDENCE_LEVELS.index)} if levels else {}


def estimate(artifact: str | Path, device: str | Device = "host", dims: dict[str, int] | None = None,
             firing_rates: dict[str, float] | None = None,
             input_shapes: dict[str, Sequence[int]] | None = None) -> Estimate:
    """Roofline latency (ms) and energy (mJ) of one inference of an ONNX artifact on `device`.

    `dims` sets symbolic dimensions by name (e.g. {"batch": 8, "seq": 32}); `input_shapes`
    ({graph input: shape}) gives the rest from real inputs; a batch axis left open counts as
    1 (named in the assumptions) and any other axis left open is a UserError. `firing_rates`
    maps an input tensor name to the fraction of its elements that are spikes, which turns the
    consuming node's MACs into that many accumulates (synaptic operations) for the 45 nm figure.
    The energy is gross: the device's active power, idle included, over the roofline latency.
    A device (a catalog name or a `Device`) whose figures cannot price a model is a UserError.
    """
    dev = check_device(device if isinstance(device, Device) else get(device))
    path = Path(artifact)
    values, sources = resolve_dims(read_graph(path), dims, input_shapes)
    model = load_graph(path, values)
    table = tensor_table(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    eff_c, eff_m = dev.efficiency["compute"], dev.efficiency["memory"]
    rates = firing_rates or {}
    read = {name for node in model.graph.node for name in node.input}
    for name, rate in rates.items():
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and 0 <= rate <= 1):
            raise UserError(f"firing rate {rate!r} of {name!r} is not a fraction of spikes from 0 to 1")
        if name not in read:
            raise UserError(f"firing rate given for {name!r}, which no node of {path.name} reads")
    constants = {i.name for i in model.graph.initializer}
    accumulators: set[str] = set()  # a MatMulInteger result on its way through Cast, scale and bias
    nodes, energy_45nm, sops = [], 0.0, 0.0
    for node in model.graph.node:
        macs, ops = node_work(node, table)
        precision = node_precision(node, producers, table)
        nbytes = float(sum(_size(table[t]) * _BYTES.get(table[t][1], 4) for t in [*node.input, *node.output]
                           if t in table))
        epilogue = _integer_epilogue(node, accumulators, constants)
        if node.op_type in FREE_OPS or node.op_type in FUSED_OPS or epilogue:
            time_us, bound = 0.0, "fused" if node.op_type in FUSED_OPS or epilogue else "overhead"
        else:
            compute = (2 * macs + ops) / (eff_c * dev.peak_ops(precision))
            memory = nbytes / (eff_m * dev.memory_bandwidth_gbs * 1e9)
            time_us = max(compute, memory) * 1e6 + dev.node_overhead_us
            bound = "compute" if compute >= memory else "memory"
            if dev.node_overhead_us > max(compute, memory) * 1e6:
                bound = "overhead"
        mac_pj, ac_pj = ENERGY_45NM_PJ.get(precision, ENERGY_45NM_PJ["fp32"])
        rate = next((rates[i] for i in node.input if i in rates), None)
        if rate is not None and macs:
            sops += rate * macs
            energy_45nm += rate * macs * ac_pj
        else:
            energy_45nm += macs * mac_pj
        nodes.append(NodeEstimate(node.name, node.op_type, module_path(node), precision, macs, ops, nbytes,
                                  time_us, bound))
    latency_s = sum(n.time_us for n in nodes) / 1e6
    confidence = {figure: dev.confidence.get(figure, "assumed")
                  for figure in ("peak", "memory_bandwidth_gbs", "active_w", "node_overhead_us", "efficiency")
                  } | _peak_confidence(dev, nodes)
    return Estimate(
        artifact=str(path), device=dev.name, latency_ms=latency_s * 1e3, energy_mj=dev.active_w * latency_s * 1e3,
        net_energy_mj=(dev.active_w - dev.idle_w) * latency_s * 1e3,
        energy_provenance=f"estimated:roofline (device '{dev.name}': {dev.active_w:.1f} W active x roofline latency, "
                          f"gross; net: less {dev.idle_w:.1f} W idle)",
        compute_energy_45nm_mj=energy_45nm * 1e-9, macs=sum(n.macs for n in nodes), synaptic_ops=sops,
        bytes=sum(n.bytes for n in nodes), nodes=nodes,
        assumptions=[*_dims_assumptions(values, sources, open_dims(model)),
                     f"efficiency compute {eff_c}, memory {eff_m}; per-node overhead {dev.node_overhead_us:.2f} us",
                     f"active power: {dev.sources.get('active_w', 'catalog')}", *_device_confidence(dev, confidence),
                     *(f"{dev.name} lists no {p} peak: its {p} nodes are priced at the {dev.peak_precision(p)} peak"
                       for p in sorted({n.precision for n in nodes if n.macs or n.ops})
                       if dev.peak_precision(p) != p),
                     "45 nm theoretical compute energy (Horowitz, ISSCC 2014) ignores memory traffic",
                     *([f"firing rates {', '.join(f'{n} {r:g}' for n, r in rates.items())}: the MACs of the nodes "
                        f"reading them priced as that many accumulates"] if rates else []),
                     "Q/DQ nodes and integer matmul epilogues (Cast, scale, bias) assumed fused into "
                     "integer kernels", *pricing_gaps(model.graph, table)],
        dims=values, dims_source=sources,
        confidence=confidence)
