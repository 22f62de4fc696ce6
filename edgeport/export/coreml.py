"""torch -> Core ML (mlprogram `.mlpackage`) through torch.export, tracing as the fallback.

Every package is checked numerically against torch on the same inputs: by Core ML itself on
macOS, by edgeport's MIL interpreter (`edgeport.export.mil`) everywhere else; the parity
report names the runner (`mil-interpreter (fp16)`). Before that it is checked structurally:
it reloads, its inputs and outputs are the model's (a name coremltools must change — `state`
is reserved in MIL — is mapped, and the mapping recorded), and its op histogram is recorded.
Dynamic axes become Core ML flexible shapes (ranges from torch.export's constraints) and the
package is also run at a second size; where they cannot be kept, the export is refused. Ops
coremltools lacks, or converts only in some cases (PReLU with per-channel alpha below rank
4), are decomposed first. The minimum deployment target is the lowest the model needs, and
the reason is recorded.
"""
from __future__ import annotations

import collections
import math
import re
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.export.graph_signature import TensorArgument

from edgeport.core import (Artifact, Backend, ExportRequest, Runner, TensorSpec, TorchRunner, draw_input,
                           flatten_outputs, input_names, option, second_size_feeds, source_sha256, vocabulary_size)
from edgeport.errors import BackendUnavailable, CheckFailed, ExportError, UserError
from edgeport.export.mil import MILInterpreterRunner, import_coremltools_quietly
from edgeport.export.onnx import output_names_for, quiet, summarize_error
from edgeport.quant.adalog import AdaLogQParams, AdaLogQuantizer
from edgeport.quant.ptq import QUANTIZED_MODULES, QuantConv2d, QuantLinear, QuantMatMul
from edgeport.quant.quantizers import LogSqrt2QParams, LogSqrt2Quantizer, UniformQParams

ROUTES = ("torch.export", "torchscript-trace")
# mlprogram needs iOS 15; these features raise it (coremltools' documented requirements)
TARGET_NEEDS = {"mlprogram": ("iOS15", "the mlprogram format"), "int8-weights": ("iOS16", "linear weight quantization"),
                "palettized-weights": ("iOS16", "palettized weights"), "int4-weights": ("iOS18", "int4 weights"),
                "activation-quantization": ("iOS17", "quantize/dequantize of activations")}
_ORDER = ["iOS15", "iOS16", "iOS17", "iOS18"]


def deployment_target(features: list[str]) -> tuple[str, str]:
    """The lowest deployment target every feature allows, with the feature that set it."""
    needs = [TARGET_NEEDS[f] for f in ["mlprogram", *features]]
    target, reason = max(needs, key=lambda need: _ORDER.index(need[0]))
    return target, reason


WEIGHT_MODES = {  # mode -> (deployment feature, MIL ops that store the compressed weights, precision label)
    "int8": ("int8-weights", ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"), "w8"),
    "int4-per-channel": ("int4-weights", ("constexpr_blockwise_shift_scale",), "w4"),
    "int4": ("int4-weights", ("constexpr_blockwise_shift_scale",), "w4"),
    "palettize4": ("palettized-weights", ("constexpr_lut_to_dense",), "w4-palettized"),
    "palettize6": ("palettized-weights", ("constexpr_lut_to_dense",), "w6-palettized"),
}


def compress_weights(mlmodel, mode: str, min_elements: int = 256):
    """Core ML weight compression: symmetric int8 per output channel, int4 in blocks of 32,
    or k-means palettes of 16 / 64 entries; weights with fewer than `min_elements` stay."""
    import coremltools.optimize.coreml as cto

    if mode in ("int8", "int4", "int4-per-channel"):
        dtype = mode.removesuffix("-per-channel")
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=dtype, weight_threshold=min_elements,
                                         granularity="per_block" if mode == "int4" else "per_channel",
                                         **({"block_size": 32} if mode == "int4" else {}))
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=int(mode.removeprefix("palettize")), weight_threshold=min_elements)
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))


class _QuantizeDequantize(torch.nn.Module):
    """A per-tensor activation quantizer as the quantize/dequantize pair Core ML converts: the
    `quantized_decomposed` ops for torch.export (coremltools' frontend for it converts those),
    quantized tensors when traced (its TorchScript frontend converts those)."""

    def __init__(self, scale: float, zero_point: int, signed: bool):
        super().__init__()
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)

        self.scale, self.zero_point = scale, zero_point
        self.traced_dtype = torch.qint8 if signed else torch.quint8
        self.dtype, (self.low, self.high) = (torch.int8, (-128, 127)) if signed else (torch.uint8, (0, 255))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            return torch.dequantize(torch.quantize_per_tensor(x, self.scale, self.zero_point, self.traced_dtype))
        ops = torch.ops.quantized_decomposed
        codes = ops.quantize_per_tensor(x, self.scale, self.zero_point, self.low, self.high, self.dtype)
        return ops.dequantize_per_tensor(codes, self.scale, self.zero_point, self.low, self.high, self.dtype)


def coreml_quantized_form(model: torch.nn.Module) -> tuple[torch.nn.Module, str | None, list[str]]:
    """A copy of an `edgeport.quantize`d model in the form Core ML takes, built from each
    quantized module's `qparams()`: weights baked onto their grid (then stored by Core ML's
    int8 or int4 weight compression) and activation quantizers as quantize/dequantize pairs.
    Returns (module, weight mode or None, what could not be expressed exactly)."""
    import copy

    if not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in model.modules()):
        return model, None, []
    form, notes, weight_bits = copy.deepcopy(model), [], []
    for name, module in [(n, m) for n, m in form.named_modules() if isinstance(m, QUANTIZED_MODULES)]:
        params = module.qparams()
        if isinstance(module, QuantMatMul):
            replacement = QuantMatMul(_core_ml_activation(params.left, notes), _core_ml_activation(params.right, notes))
        else:  # params.layer holds the weight on its grid: no weight quantizer left to run
            weight_bits.append(params.weight.bits)
            act = _core_ml_activation(params.input, notes)
            if isinstance(module, QuantLinear):
                replacement = QuantLinear(params.layer, act, torch.nn.Identity(), params.input_affine)
            else:
                replacement = QuantConv2d(params.layer, act, torch.nn.Identity())
                if params.output is not None:  # the conv's result quantized where the pipeline put a quantizer
                    replacement.out = _core_ml_activation(params.output, notes)
        parent, _, leaf = name.rpartition(".")
        setattr(form.get_submodule(parent) if parent else form, leaf, replacement)
    w_bits = min(weight_bits)
    if w_bits not in (4, 8):
        notes.append(f"{w_bits}-bit weights are stored with Core ML's int8 compression (its scale, not ours)")
    return form, "int4-per-channel" if w_bits <= 4 else "int8", sorted(set(notes))


def _core_ml_activation(params: UniformQParams | LogSqrt2QParams | AdaLogQParams, notes: list[str]
                        ) -> torch.nn.Module:
    """An activation quantizer as Core ML runs it: a per-tensor uniform one as the
    quantize/dequantize pair Core ML has (8-bit; a narrower width is noted), log-sqrt2 and
    AdaLog, which it has no op for, as the float ops that compute them."""
    if isinstance(params, LogSqrt2QParams):
        return LogSqrt2Quantizer.from_qparams(params)
    if isinstance(params, AdaLogQParams):
        return AdaLogQuantizer.from_qparams(params)
    if params.bits < 8:
        notes.append(f"{params.bits}-bit activations run as 8-bit quantize/dequantize (Core ML quantizes to 8 "
                     f"bits): values beyond the {params.bits}-bit range are not clipped")
    return _QuantizeDequantize(float(params.scale), int(params.zero_point), params.signed)


def op_kind(target) -> str:
    """The name under which coremltools' torch frontend looks an op up."""
    from coremltools.converters.mil.frontend.torch.utils import sanitize_op_kind

    try:
        kind = target.name()
    except (AttributeError, TypeError):
        kind = getattr(target, "__name__", str(target))
    return sanitize_op_kind(kind)


def module_path(node: torch.fx.Node) -> str:
    """The `nn.Module` path that called a node of a torch.export graph ("<root>" for the model's own code)."""
    stack = node.meta.get("nn_module_stack") or {}
    return (next(reversed(stack.values()))[0] if stack else "") or "<root>"


def _prelu_refused(node: torch.fx.Node) -> bool:
    """coremltools' prelu takes a per-channel alpha only on rank-4 inputs ("rank 3 or rank 5
    input is only supported when all the values of alpha are same"; rank 2 goes through rank 3)."""
    x, alpha = node.args[0].meta.get("val"), node.args[1].meta.get("val")
    return x is not None and alpha is not None and x.dim() != 4 and alpha.numel() > 1


# ops coremltools has a converter for that refuses some cases: op -> (refused?, why), decomposed when refused
CONVERTER_LIMITS = {torch.ops.aten.prelu.default: (_prelu_refused, "per-channel alpha below rank 4")}


def unsupported_ops(program: torch.export.ExportedProgram) -> dict:
    """{op: [nn.Module paths]} for every op in the program that coremltools cannot convert,
    or converts only in cases other than this one (`CONVERTER_LIMITS`)."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    known = _TORCH_OPS_REGISTRY.name_to_func_mapping
    found: dict = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        refused, _ = CONVERTER_LIMITS.get(node.target, (lambda n: False, ""))
        if op_kind(node.target) not in known or refused(node):
            found.setdefault(node.target, []).append(module_path(node))
    return found


def aliases_as_copies(program: torch.export.ExportedProgram) -> int:
    """Turn every `aten.alias` of the graph into `aten.clone`, which coremltools converts as
    the identity it is; returns how many. torch.export leaves an alias where a model slices the
    whole of an axis (GhostNet's and Swin's `x[:, :channels]`) and coremltools has no converter
    for it: the torch.export route failed there. Retargeting keeps the node's name, so a graph
    output that is an alias stays the output the program's signature names."""
    aliases = [node for node in program.graph.nodes
               if node.op == "call_function" and node.target == torch.ops.aten.alias.default]
    for node in aliases:
        node.target = torch.ops.aten.clone.default
    if aliases:
        program.graph_module.recompile()
    return len(aliases)


def distinct_outputs(program: torch.export.ExportedProgram) -> int:
    """Give every graph output its own node; returns how many were given one. coremltools
    names each output by renaming its var, so an output the model returns twice (a spiking step
    whose output is also its next membrane, `return y, y`) or an input it returns as it is would
    leave the package with two outputs of one name, or fail to convert. Each repeat becomes
    `output * 1`, an op coremltools keeps because its result is a program output."""
    output = next(node for node in program.graph.nodes if node.op == "output")
    inputs = {node.name for node in program.graph.nodes if node.op == "placeholder"} & set(
        program.graph_signature.user_inputs)
    seen, results, copies = set(), [], 0
    for index, value in enumerate(output.args[0]):
        repeated = isinstance(value, torch.fx.Node) and (value in seen or value.name in inputs)
        if repeated and value.meta.get("val") is not None and value.meta["val"].dtype != torch.bool:
            with program.graph.inserting_before(output):
                copy = program.graph.call_function(torch.ops.aten.mul.Tensor, (value, 1))
            copy.meta = dict(value.meta)
            program.graph_signature.output_specs[index].arg = TensorArgument(name=copy.name)
            value, copies = copy, copies + 1
        seen.add(value)
        results.append(value)
    if copies:
        output.args = (tuple(results),)
        program.graph_module.recompile()
    return copies


def decompose_for_coreml(program: torch.export.ExportedProgram, rounds: int = 4):
    """Decompose every op coremltools lacks (or would refuse here) into ops it has, where
    PyTorch's core ATen decompositions know how (e.g. `new_ones`, `diff`, `__and__` in
    `transformers` attention masks; PReLU with a per-channel alpha on a rank-2 input, as
    `where(x > 0, x, alpha * x)`). Returns (program, decomposed op names, {op: module paths}
    still unsupported)."""
    from torch._decomp import core_aten_decompositions

    table, applied = core_aten_decompositions(), []
    for _ in range(rounds):
        missing = unsupported_ops(program)
        decomposable = {op: table[op] for op in missing if op in table}
        if not decomposable:
            return program, applied, missing
        applied += [op_kind(op) + (f" ({CONVERTER_LIMITS[op][1]})" if op in CONVERTER_LIMITS else "")
                    for op in decomposable]
        program = program.run_decompositions(decomposable)
    return program, applied, unsupported_ops(program)


def _traceable(args: tuple[torch.Tensor, ...], names: list[str], dynamic_axes: dict[str, dict[int, str]] | None):
    """Example arguments and torch.export dynamic shapes for `dynamic_axes` ({input: {axis:
    symbol}}): `Dim.AUTO`, so that torch.export finds each axis's range itself (MiniLM's
    sequence stops at its 512 positions). torch.export specializes a dimension of size 1, so
    such an example is widened to 2 along a dynamic axis."""
    if not dynamic_axes:
        return args, None
    widened = []
    for name, arg in zip(names, args):
        for axis in dynamic_axes.get(name, {}):
            if arg.shape[axis] == 1:
                arg = arg.expand(*arg.shape[:axis], 2, *arg.shape[axis + 1:]).clone()
        widened.append(arg)
    shapes = tuple({axis: torch.export.Dim.AUTO for axis in dynamic_axes.get(n, {})} or None for n in names)
    return tuple(widened), shapes


UNBOUNDED_AXIS_LIMIT = 1024  # an ML Program's flexible axis needs an upper bound; torch.export may prove none


def flexible_inputs(program: torch.export.ExportedProgram, names: list[str], args: tuple[torch.Tensor, ...],
                    dynamic_axes: dict[str, dict[int, str]]) -> list:
    """coremltools input types whose dynamic axes are `RangeDim`s over the range torch.export
    proved (its lower bound 2, an artifact of specializing 0 and 1, taken as 1; where it proves
    no upper bound, `UNBOUNDED_AXIS_LIMIT`), the example's size the default. An axis the model
    fixed is refused."""
    import coremltools as ct

    placeholders = {node.name: node.meta["val"] for node in program.graph.nodes if node.op == "placeholder"}
    types = []
    for name, arg in zip(names, args):
        dims = []
        for axis, size in enumerate(placeholders[name].shape):
            if axis not in dynamic_axes.get(name, {}):
                dims.append(int(arg.shape[axis]))
                continue
            if not isinstance(size, torch.SymInt):
                raise ExportError(f"the model fixes input {name!r} axis {axis} ({dynamic_axes[name][axis]}) at "
                                  f"{size}: it cannot be a flexible Core ML shape")
            bounds = program.range_constraints[size.node.expr]
            # int_oo, torch's unbounded, claims is_finite: compare its value
            upper = UNBOUNDED_AXIS_LIMIT if math.isinf(float(bounds.upper)) else int(bounds.upper)
            dims.append(ct.RangeDim(lower_bound=1 if bounds.lower <= 2 else int(bounds.lower), upper_bound=upper,
                                    default=int(arg.shape[axis])))
        types.append(ct.TensorType(name=name, shape=ct.Shape(dims)))
    return types


FP16_MAX = 65504.0


def clamp_to_fp16_range(program: torch.export.ExportedProgram) -> int:
    """Clamp the float constants among the graph's op arguments that fp16 cannot hold to
    +-65504; returns how many. `transformers` fills attention masks with float32's lowest value,
    which is -inf in fp16, and a fully masked softmax row of -inf is NaN where torch's is
    uniform; at -65504 it is uniform again."""
    clamped = 0

    def clamp(value):
        nonlocal clamped
        if isinstance(value, float) and math.isfinite(value) and abs(value) > FP16_MAX:
            clamped += 1
            return math.copysign(FP16_MAX, value)
        return value

    for node in program.graph.nodes:
        if node.op == "call_function":
            node.args = torch.fx.node.map_aggregate(node.args, clamp)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, clamp)
    program.graph_module.recompile()
    return clamped


def exported_for_coreml(model: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str],
                        dynamic_axes: dict[str, dict[int, str]] | None = None, precision: str = "fp32"
                        ) -> tuple[torch.export.ExportedProgram, list[str]]:
    """The torch.export graph Core ML converts: exported (flexible along `dynamic_axes`),
    lowered to ATen, decomposed where coremltools lacks an op, and for fp16 its out-of-range
    constants clamped (`clamp_to_fp16_range`). Returns it with notes on what was changed; an op
    left without conversion raises ExportError naming its modules."""
    traced_args, shapes = _traceable(args, names, dynamic_axes)
    try:
        program = torch.export.export(model, traced_args, dynamic_shapes=shapes).run_decompositions({})
    except Exception as error:  # torch.export raises many types
        if shapes is None:
            raise
        raise ExportError(f"torch.export cannot keep the dynamic axes {dynamic_axes} ({summarize_error(error)})") \
            from error
    aliases_as_copies(program)
    program, applied, missing = decompose_for_coreml(program)
    if missing:
        where = "; ".join(f"{op_kind(op)} in {', '.join(sorted(set(paths))[:3])}" for op, paths in missing.items())
        raise ExportError(f"Core ML's converter has no conversion for: {where}")
    notes = [f"decomposed for Core ML: {', '.join(sorted(set(applied)))}"] if applied else []
    distinct_outputs(program)
    clamped = clamp_to_fp16_range(program) if precision == "fp16" else 0
    if clamped:
        notes.append(f"fp16: {clamped} constants beyond fp16's range (attention-mask fills) clamped to +-{FP16_MAX:g}")
    return program, notes


def _convert(route: str, model: torch.nn.Module, args: tuple, names: list[str], outputs: list[str], target: str,
             precision: str, dynamic_axes: dict | None, notes: list[str]):
    import coremltools as ct

    if route == "torch.export":
        source, changes = exported_for_coreml(model, args, names, dynamic_axes, precision)
        notes += changes
        inputs = flexible_inputs(source, names, args, dynamic_axes) if dynamic_axes else None
    else:
        with torch.no_grad():
            source = torch.jit.trace(model, args)
        inputs = [ct.TensorType(name=n, shape=tuple(a.shape)) for n, a in zip(names, args)]
    return ct.convert(source, convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                      compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                      inputs=inputs, outputs=[ct.TensorType(name=n) for n in outputs])


# coremltools' refusal of an op the deployment target's opset lacks, naming the target that has it
_OP_NEEDS_TARGET = re.compile(r"No available version for (\w+) in the coremltools\.target\.\w+ opset\. "
                              r"Please update the minimum_deployment_target to at least coremltools\.target\.(iOS\d+)")


def _convert_at_lowest_target(route: str, model: torch.nn.Module, args: tuple, names: list[str], outputs: list[str],
                              target: str, reason: str, precision: str, dynamic_axes: dict | None,
                              notes: list[str]):
    """`_convert` at `target`, raised to the lowest target whose opset has every op of the model
    (pixel_unshuffle needs iOS16, for one). Returns (mlmodel, target, the reason for it)."""
    while True:
        try:
            return _convert(route, model, args, names, outputs, target, precision, dynamic_axes, notes), target, reason
        except Exception as error:  # coremltools raises many types; only an opset refusal is retried
            needed = _OP_NEEDS_TARGET.search(str(error))
            if not needed or needed.group(2) not in _ORDER or _ORDER.index(needed.group(2)) <= _ORDER.index(target):
                raise
            target, reason = needed.group(2), f"the {needed.group(1)} op"


def op_histogram(mlmodel) -> dict[str, int]:
    """Count of each MIL op type in the program's main function (works on reloaded packages)."""
    counts: collections.Counter = collections.Counter()
    program = mlmodel.get_spec().mlProgram
    for function in program.functions.values():
        for block in function.block_specializations.values():
            counts.update(op.type for op in block.operations)
    return dict(counts.most_common())


CORE_ML_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32"}


def _feature_shape(feature, symbols: dict[int, str]) -> list:
    """A feature's shape, a flexible dimension as its symbol (or a range `lo..hi` without one)."""
    array = feature.type.multiArrayType
    ranges = list(array.shapeRange.sizeRanges)
    shape = []
    for axis, size in enumerate(array.shape):
        if ranges and ranges[axis].lowerBound != ranges[axis].upperBound:
            low, high = ranges[axis].lowerBound, ranges[axis].upperBound
            shape.append(symbols.get(axis) or f"{low}..{high if high >= 0 else ''}")
        else:
            shape.append(int(size))
    return shape


def check_structure(path: Path, names: list[str], outputs: list[str], args: tuple,
                    dynamic_axes: dict[str, dict[int, str]] | None = None) -> dict:
    """Reload the package without Core ML's runtime and compare its interface with the model's:
    inputs and outputs by position, their names up to coremltools' renaming (returned as
    {model name: package name}), static dims exactly, dynamic axes as flexible ranges
    (returned as {symbol: [lower, upper]})."""
    import coremltools as ct

    with quiet():
        reloaded = ct.models.MLModel(str(path), skip_model_load=True)
    spec = reloaded.get_spec()
    features, dynamic = list(spec.description.input), dynamic_axes or {}
    package_outputs = [f.name for f in spec.description.output]
    if len(features) != len(names) or len(package_outputs) != len(outputs):
        raise ExportError(f"Core ML package has inputs {[f.name for f in features]} and outputs "
                          f"{package_outputs}; the model's are {names} and {outputs}")
    if len(set(package_outputs)) != len(package_outputs):  # a runner's results, keyed by name, would lose one
        raise ExportError(f"Core ML package names two outputs alike ({package_outputs}): the model returns one "
                          f"tensor as several of its outputs {outputs}")
    got = {n: _feature_shape(f, dynamic.get(n, {})) for n, f in zip(names, features)}
    for name, arg in zip(names, args):
        expected = [dynamic.get(name, {}).get(axis, size) for axis, size in enumerate(arg.shape)]
        if got[name] != expected:
            raise ExportError(f"Core ML package input {name!r} has shape {got[name]}, the model's is {expected}")
    renamed = {n: f.name for n, f in zip([*names, *outputs], [*features, *spec.description.output]) if n != f.name}
    ranges = {symbol: [int(bounds.lowerBound), int(bounds.upperBound)] for n, f in zip(names, features)
              for axis, symbol in dynamic.get(n, {}).items()
              for bounds in [f.type.multiArrayType.shapeRange.sizeRanges[axis]]}
    return {"reloaded": True, "spec_version": spec.specificationVersion, "inputs": got, "flexible_ranges": ranges,
            "outputs": [f.name for f in spec.description.output], "renamed": renamed,
            "package_inputs": {f.name: CORE_ML_DTYPES.get(f.type.multiArrayType.dataType, "?") for f in features},
            "op_histogram": op_histogram(reloaded)}


def flexible_output_shapes(model: torch.nn.Module, args: tuple, names: list[str], dynamic_axes: dict,
                           ranges: dict[str, tuple[int, int]]) -> list[list]:
    """The model's output shapes with each axis that follows a flexible input named by that
    input's symbol, from the model run at the example and at `second_size_feeds`' sizes: an ML
    Program declares no shape for such an output. An axis that moves with no symbol is "flexible"."""
    feeds, sizes = second_size_feeds(model, args, names, dynamic_axes, ranges)
    example_sizes = {symbol: int(arg.shape[axis]) for name, arg in zip(names, args)
                     for axis, symbol in dynamic_axes.get(name, {}).items()}
    with torch.no_grad():
        first = flatten_outputs(model(*args))
        second = flatten_outputs(model(*(torch.from_numpy(feeds[0][name]) for name in names)))
    return [[int(a) if a == b else next((symbol for symbol, size in sizes.items()
                                         if (example_sizes[symbol], size) == (a, b)), "flexible")
             for a, b in zip(x.shape, y.shape)] for x, y in zip(first, second)]


def check_flexible_shapes(artifact: Artifact, model: torch.nn.Module, args: tuple, names: list[str],
                          dynamic_axes: dict[str, dict[int, str]]) -> dict:
    """Run the package at a second size of its flexible axes against torch (the export's own
    verification covers the example's size); a failure raises CheckFailed."""
    from edgeport.verify import compare

    feeds, sizes = second_size_feeds(model, args, names, dynamic_axes, artifact.settings["flexible_ranges"])
    runner = BACKEND.runner(artifact)
    try:
        runner.load()
    except BackendUnavailable as unavailable:
        return {"sizes": sizes, "checked": f"not checked here: {unavailable.reason}"}
    report = compare(TorchRunner(model, names, [o.name for o in artifact.outputs]).load(), runner, feeds,
                     precision=artifact.precision,
                     inputs_source=f"seeded inputs at {', '.join(f'{k}={v}' for k, v in sizes.items())}")
    if not report.passed:
        raise CheckFailed(f"Core ML package {artifact.path.name} fails at {sizes}: "
                          f"{report.failures()[0].describe()}", report)
    return {"sizes": sizes, "checked": report.summary().splitlines()[0]}


def export_coreml(model: torch.nn.Module, args: tuple[torch.Tensor, ...], folder: Path, name: str, *,
                  precision: str = "fp32", names: list[str] | None = None, output_names: list[str] | None = None,
                  weights: str | None = None, dynamic_axes: dict[str, dict[int, str]] | None = None) -> Artifact:
    """Convert `model` called on `args` to `folder/name.mlpackage`; returns the Artifact with
    its structural check in `settings["verification"]` (numerical parity comes separately,
    through `CoreMLBackend.runner`).

    `weights` compresses the stored weights: "int8", "int4", "palettize4" or "palettize6".
    `dynamic_axes` ({input: {axis: symbol}}) become flexible shapes, checked at a second size.
    """
    if precision not in ("fp32", "fp16"):
        raise UserError(f"Core ML compute precision must be fp32 or fp16, not {precision!r}")
    if weights is not None and weights not in WEIGHT_MODES:
        raise UserError(f"unknown Core ML weight compression {weights!r}; choose one of {', '.join(WEIGHT_MODES)}")
    model, quantized_weights, not_expressed = coreml_quantized_form(model)
    weights = weights or quantized_weights
    features = ([WEIGHT_MODES[weights][0]] if weights else []) + (["activation-quantization"] if quantized_weights
                                                                   else [])
    names = names or input_names(model, len(args))
    with torch.no_grad(), quiet():
        outputs = output_names or output_names_for(model(*args))
    unknown = set(dynamic_axes or {}) - set(names)
    if unknown:
        raise UserError(f"dynamic axes name unknown inputs {sorted(unknown)}; the inputs are {names}")
    target, reason = deployment_target(features)
    path = folder / f"{name}.mlpackage"
    failures, notes = {}, [f"not expressed exactly: {n}" for n in not_expressed]
    for route in ROUTES[:1] if dynamic_axes else ROUTES:  # tracing bakes every shape: no dynamic axes there
        try:
            with quiet():
                mlmodel, target, reason = _convert_at_lowest_target(route, model, args, names, outputs, target, reason,
                                                                    precision, dynamic_axes, notes)
                if weights:
                    mlmodel = compress_weights(mlmodel, weights)
                mlmodel.save(str(path))
            structure = check_structure(path, names, outputs, args, dynamic_axes)
        except Exception as error:  # coremltools raises many types: the next route may work
            failures[route] = error
            notes.append(f"{route} failed: {summarize_error(error)}")
            continue
        if weights and not set(WEIGHT_MODES[weights][1]) & set(structure["op_histogram"]):
            raise ExportError(f"{weights} weight compression left no {' or '.join(WEIGHT_MODES[weights][1])} op: "
                              f"no weight was large enough to compress")
        label = WEIGHT_MODES[weights][2] if weights else precision
        if quantized_weights:
            label += "a8"  # Core ML's quantize/dequantize pairs are 8-bit
        spec = mlmodel.get_spec().description
        artifact = Artifact(
            path=path, format="coreml", precision=label,
            # the runners take what the torch model takes (int64 token ids are cast to the
            # package's int32, range-checked); the package's own types are in the structure
            inputs=[TensorSpec(f.name, structure["inputs"][n], str(a.numpy().dtype))
                    for n, f, a in zip(names, spec.input, args)],
            outputs=[TensorSpec(f.name, _feature_shape(f, {}), CORE_ML_DTYPES.get(f.type.multiArrayType.dataType, "?"))
                     for f in spec.output],
            source_sha256=source_sha256(model), exporter=route, notes=notes, files=[path.name],
            settings={"minimum_deployment_target": target, "target_reason": reason, "compute_precision": precision,
                      "weight_compression": weights,
                      "input_names": {n: structure["renamed"][n] for n in names if n in structure["renamed"]},
                      "verification": {"structure": structure}})
        if structure["renamed"]:
            artifact.notes.append("coremltools renamed " + ", ".join(f"{a!r} to {b!r}" for a, b in
                                                                      structure["renamed"].items()) +
                                  " (a name MIL reserves, or inputs the module takes as *args); edgeport's "
                                  "runners take either name")
        if dynamic_axes:
            artifact.settings["flexible_ranges"] = structure["flexible_ranges"]
            shapes = flexible_output_shapes(model, args, names, dynamic_axes, structure["flexible_ranges"])
            for spec, shape in zip(artifact.outputs, shapes):
                spec.shape = spec.shape or shape
            artifact.settings["verification"]["flexible_shapes"] = check_flexible_shapes(
                artifact, model, args, names, dynamic_axes)
        return artifact
    detail = "; ".join(f"{route}: {summarize_error(e)}" for route, e in failures.items())
    if dynamic_axes:
        raise ExportError(f"cannot convert to Core ML with the dynamic axes {dynamic_axes} kept (tracing, the "
                          f"fallback, bakes every shape; export without them for fixed shapes): {detail}")
    raise ExportError(f"cannot convert to Core ML: {detail}")


class CoreMLRunner(Runner):
    """A Core ML package run by Core ML itself; only macOS has that runtime."""

    def __init__(self, path: str | Path, compute_units: str = "ALL", input_map: dict[str, str] | None = None):
        self.path, self.compute_units, self.input_map = Path(path), compute_units, dict(input_map or {})
        self.name, self.model = "coreml", None

    def load(self) -> "CoreMLRunner":
        if platform.system() != "Darwin":
            raise BackendUnavailable("coreml", f"Core ML predicts only on macOS; this is {platform.system()}",
                                     "verify and profile the package on a Mac")
        ct = import_coremltools_quietly()
        self.model = ct.models.MLModel(str(self.path), compute_units=getattr(ct.ComputeUnit, self.compute_units))
        spec = self.model.get_spec()
        self.input_names = [f.name for f in spec.description.input]
        self.output_names = [f.name for f in spec.description.output]
        self.device = f"coreml-{self.compute_units.lower()}"
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        renamed = {self.input_map.get(name, name): array for name, array in feeds.items()}
        result = self.model.predict({n: np.asarray(renamed[n]).astype(np.int32) if renamed[n].dtype == np.int64
                                     else renamed[n] for n in self.input_names})
        return {n: np.asarray(result[n]) for n in self.output_names}


@dataclass
class CoreMLOptions:
    """How the Core ML package is converted and stored."""

    precision: str = option("fp32", "Core ML compute precision", choices=("fp32", "fp16"))
    weights: str | None = option(None, "Core ML weight compression", choices=tuple(m for m in WEIGHT_MODES
                                                                                   if m != "int4-per-channel"))


class CoreMLBackend(Backend):
    """Core ML ML Programs (`.mlpackage`): converted on any OS, run by Core ML on macOS and by
    the MIL interpreter elsewhere."""

    name = "coreml"
    summary = "Core ML ML Program, verified by Core ML on macOS and by edgeport's MIL interpreter elsewhere"
    Options = CoreMLOptions
    formats = ("coreml",)
    quantized = ("weights on their grid in Core ML's int8/int4 compression, activations as 8-bit "
                 "quantize/dequantize (iOS17+)")

    def export(self, request: ExportRequest, options: CoreMLOptions) -> list[Artifact]:
        return [export_coreml(request.module, request.args, request.folder, request.name,
                              precision=options.precision, weights=options.weights, names=request.input_names,
                              output_names=request.output_names, dynamic_axes=request.dynamic_axes)]

    def runner(self, artifact: Artifact, threads: int | None = None, profiling: bool = False) -> Runner:
        """Core ML itself on macOS; the MIL interpreter everywhere else, for checking only: its
        numpy arithmetic says nothing of Core ML's speed, so profiling it is refused."""
        input_map = artifact.settings.get("input_names")
        if platform.system() == "Darwin":
            return CoreMLRunner(artifact.path, input_map=input_map)
        if profiling:
            raise BackendUnavailable("coreml", "Core ML runs only on macOS; here its package runs in edgeport's MIL "
                                     "interpreter, which checks numbers but measures nothing of Core ML's speed",
                                     "profile the package on a Mac, or the model's ONNX export here")
        return MILInterpreterRunner(artifact.path, input_map)


BACKEND = CoreMLBackend()
