"""ONNX -> TensorRT: a readiness check that runs anywhere, the trtexec command for the device,
and engine building through the `tensorrt` Python API where that package and a GPU exist.

The readiness check reads the ONNX graph against TensorRT's documented constraints:
operators its ONNX parser does not implement; explicit quantization rules (INT8 Q/DQ with
zero point 0, scales that are positive constants, per-tensor activations, per-channel weights
only along the consumer's output-channel axis); symbolic input dimensions, which need an
optimization profile. Each violation names the node and the rule. TensorRT itself cannot be
installed on the development machines (its wheels live on NVIDIA's own index), so nothing
here pretends to build an engine without it.
"""
from __future__ import annotations

import re
import shlex
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from edgeport.core import Artifact, Backend, ExportRequest, Runner, option
from edgeport.errors import BackendUnavailable, EdgeportWarning, UserError
from edgeport.export.onnx import OnnxFileOptions, export_onnx
from edgeport.export.onnxgraph import Constants, attribute_value, consumers, producers
from edgeport.quant.config import tensorrt_width_caveat

# From onnx-tensorrt's docs/operators.md (the parser's support matrix); operators listed there
# as unsupported that later releases still do not implement.
UNSUPPORTED_OPS = {
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow",
    "CenterCropPad", "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix",
    "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "STFT", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat",
    "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique"}
OPS_SOURCE = "onnx-tensorrt docs/operators.md support matrix, TensorRT 10.0"
INSTALL = ("install TensorRT from NVIDIA's package index (pip install tensorrt) on a machine with an NVIDIA GPU, "
           "or run the trtexec command written beside the ONNX file on the device")


@dataclass
class Violation:
    rule: str
    node: str
    message: str


@dataclass
class Readiness:
    """The result of checking an ONNX model against TensorRT's constraints."""

    model: str
    violations: list[Violation] = field(default_factory=list)
    dynamic_inputs: dict[str, list] = field(default_factory=dict)  # need an optimization profile
    quantized: bool = False

    @property
    def ready(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        head = f"{self.model}: {'ready for TensorRT' if self.ready else f'{len(self.violations)} violation(s)'}"
        lines = [head] + [f"  [{v.rule}] {v.node}: {v.message}" for v in self.violations]
        if self.dynamic_inputs:
            lines.append("  symbolic dimensions need an optimization profile: " + ", ".join(
                f"{k} {v}" for k, v in self.dynamic_inputs.items()))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "ready": self.ready}


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

# Where a weight keeps its output channels, by the op that consumes it: the only axis along
# which TensorRT takes per-channel weight scales. Other consumers do not read a weight.
WEIGHT_OUTPUT_AXIS: dict[str, Callable[[onnx.NodeProto, int], int]] = {
    "Conv": lambda consumer, rank: 0,
    "ConvTranspose": lambda consumer, rank: 1,
    "MatMul": lambda consumer, rank: rank - 1,
    "Gemm": lambda consumer, rank: 0 if attribute_value(consumer, "transB", 0) else 1,
}


@dataclass
class _GraphIndex:
    """What the per-node checks look up in the model: its constants and who reads and
    writes each tensor."""

    constants: Constants
    consumers: dict[str, list[onnx.NodeProto]]
    producers: dict[str, onnx.NodeProto]

    def is_weight(self, name: str) -> bool:
        """A constant, or what a QuantizeLinear makes of one (TensorRT folds Q(weight))."""
        producer = self.producers.get(name)
        return name in self.constants or (
            producer is not None and producer.op_type == "QuantizeLinear" and producer.input[0] in self.constants)

    def weight_rank(self, name: str) -> int:
        """The rank of the constant behind a weight tensor (DQ(Q(weight)): of the weight itself)."""
        while name not in self.constants:
            name = self.producers[name].input[0]
        return len(self.constants.shape(name))


def _operator_violations(node: onnx.NodeProto, where: str) -> list[Violation]:
    if node.domain not in ("", "ai.onnx"):
        return [Violation("operator", where, f"custom domain {node.domain!r}: the TensorRT parser needs a plugin "
                                             f"for it")]
    if node.op_type in UNSUPPORTED_OPS:
        return [Violation("operator", where, f"not implemented by TensorRT's ONNX parser ({OPS_SOURCE})")]
    return []


def _zero_point_violations(zero_name: str, where: str, constants: Constants) -> list[Violation]:
    if zero_name not in constants:
        return [Violation("symmetric", where, "the zero point must be a constant 0")]
    zero = constants[zero_name]
    violations = []
    if zero.dtype == np.int32:
        violations.append(Violation("int8", where, "an INT32 quantized bias: TensorRT dequantizes INT8 only; keep "
                                                   "biases in float"))
    elif zero.dtype != np.int8 and zero.dtype.name not in ("int4", "float8_e4m3fn"):
        violations.append(Violation("int8", where, f"zero point of type {zero.dtype}: TensorRT quantizes to INT8 "
                                                   f"(not UINT8)"))
    if np.any(zero.astype(np.int64) != 0):
        violations.append(Violation("symmetric", where, f"zero point {zero.ravel()[:4].tolist()}: TensorRT supports "
                                                        f"symmetric quantization only (zero point 0)"))
    return violations


# The types TensorRT quantizes to (INT4 for weights only), spelled as ONNX does (numpy's
# "float8_e4m3fn" compares upper-cased without underscores). An ONNX QuantizeLinear without a
# zero point or output_dtype writes UINT8, which TensorRT does not have.
TENSORRT_QUANTIZED_TYPES = {"INT8", "INT4", "FLOAT8E4M3FN"}


def _implicit_type_violations(node: onnx.NodeProto, where: str, graph: _GraphIndex) -> list[Violation]:
    """A Q/DQ without a zero point takes its type from elsewhere: a QuantizeLinear from its
    output_dtype attribute (UINT8 when absent), a DequantizeLinear from its input. ONNX Runtime
    verifies that type's arithmetic (UINT8 clamps negatives to 0), which TensorRT's INT8 would
    not reproduce."""
    if node.op_type == "QuantizeLinear":
        quantized_type = attribute_value(node, "output_dtype", 0) or onnx.TensorProto.UINT8
        type_name = onnx.TensorProto.DataType.Name(quantized_type)
    elif node.input[0] in graph.constants:
        type_name = graph.constants[node.input[0]].dtype.name
    else:
        return []  # a DQ of a Q is checked at the Q
    key = type_name.upper().replace("_", "")
    if key == "INT4":
        return _int4_activation_violations(node, where, graph)
    if key in TENSORRT_QUANTIZED_TYPES:
        return []
    return [Violation("int8", where, f"no zero point, so ONNX quantizes to {type_name.upper()} here (what ONNX Runtime "
                                     f"verified), TensorRT to INT8: give an INT8 zero point 0")]


def _int4_activation_violations(node: onnx.NodeProto, where: str, graph: _GraphIndex) -> list[Violation]:
    if graph.is_weight(node.input[0]):
        return []
    return [Violation("int4-weights-only", where, "INT4 on an activation: TensorRT quantizes weights only to INT4; "
                                                  "activations take INT8 or FP8")]


def _per_channel_violations(node: onnx.NodeProto, where: str, scales: int, graph: _GraphIndex) -> list[Violation]:
    if not graph.is_weight(node.input[0]):
        return [Violation("per-tensor-activations", where, f"{scales} scales on an activation: TensorRT quantizes "
                                                           f"activations per tensor")]
    rank = graph.weight_rank(node.input[0])
    axis = attribute_value(node, "axis", 1) % rank
    violations = []
    for consumer in graph.consumers.get(node.output[0], []):
        output_axis = WEIGHT_OUTPUT_AXIS.get(consumer.op_type)
        expected = output_axis(consumer, rank) if output_axis else axis
        if axis != expected:
            violations.append(Violation("weight-axis", where, f"per-channel scales on axis {axis}, but "
                                                              f"{consumer.op_type} {consumer.name} has its output "
                                                              f"channels on axis {expected}"))
    return violations


def _quantization_violations(node: onnx.NodeProto, where: str, graph: _GraphIndex) -> list[Violation]:
    """TensorRT's explicit-quantization rules for one QuantizeLinear or DequantizeLinear."""
    if node.input[1] not in graph.constants:
        return [Violation("constant-scale", where, "the scale must be a constant initializer")]
    scale = graph.constants[node.input[1]]
    violations = []
    if not (scale > 0).all():
        violations.append(Violation("positive-scale", where, "every scale must be positive"))
    if len(node.input) > 2 and node.input[2]:
        violations += _zero_point_violations(node.input[2], where, graph.constants)
        zero = graph.constants[node.input[2]] if node.input[2] in graph.constants else None
        if zero is not None and zero.dtype.name == "int4":
            violations += _int4_activation_violations(node, where, graph)
    else:
        violations += _implicit_type_violations(node, where, graph)
    if scale.size > 1:
        violations += _per_channel_violations(node, where, scale.size, graph)
    return violations


# The rules a node must meet beyond having a supported operator, by its op type.
NODE_CHECKS: dict[str, Callable[[onnx.NodeProto, str, _GraphIndex], list[Violation]]] = {
    "QuantizeLinear": _quantization_violations,
    "DequantizeLinear": _quantization_violations,
}


def check_readiness(path: str | Path) -> Readiness:
    """Check an ONNX file against TensorRT's parser and explicit-quantization constraints.

    Every node is checked for an operator the parser implements, then against the rules its
    op type has in `NODE_CHECKS`; inputs with symbolic dimensions are listed for the
    optimization profile. Raises `UserError` when the file is not ONNX."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise UserError(f"cannot read {path} as ONNX: {str(error).splitlines()[0][:160]}") from error
    result = Readiness(path.name)
    graph = _GraphIndex(Constants(model.graph), consumers(model.graph), producers(model.graph))
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        if any(isinstance(d, str) and d for d in dims) or any(d == 0 for d in dims):
            result.dynamic_inputs[value.name] = dims
    for node in model.graph.node:
        where = f"{node.op_type} {node.name or node.output[0]}"
        result.violations += _operator_violations(node, where)
        if node.op_type in NODE_CHECKS:
            result.violations += NODE_CHECKS[node.op_type](node, where, graph)
    result.quantized = any(node.op_type in QDQ_OPS for node in model.graph.node)
    return result


def _shape_flag_value(shapes: dict[str, tuple[list[int], list[int], list[int]]], index: int) -> str:
    """One --minShapes/--optShapes/--maxShapes value: trtexec splits it at commas, each entry
    at its last colon, and drops single quotes from a name, so a name holding a comma or a
    quote cannot be written there."""
    unwritable = sorted(name for name in shapes if "," in name or "'" in name)
    if unwritable:
        raise UserError(f"trtexec cannot take shapes for inputs named {unwritable}: its shape flags split at commas "
                        f"and drop single quotes; rename these inputs")
    return ",".join(f"{name}:{'x'.join(map(str, dims[index]))}" for name, dims in shapes.items())


def _check_profile_ranks(shapes: dict[str, tuple[list[int], list[int], list[int]]], dynamic: dict[str, list]) -> None:
    for name, bounds in shapes.items():
        if any(len(dims) != len(dynamic[name]) for dims in bounds):
            raise UserError(f"the optimization profile of input {name!r} gives shapes {[list(d) for d in bounds]}, but "
                            f"the ONNX input has rank {len(dynamic[name])} ({dynamic[name]})")


def trtexec_command(onnx_path: Path, readiness: Readiness, precision: str = "fp16",
                    shapes: dict[str, tuple[list[int], list[int], list[int]]] | None = None) -> str:
    """The trtexec command line that builds the engine on the device (a Jetson, a GPU server).

    `shapes` gives (min, opt, max) for every input with symbolic dimensions.
    """
    args = ["trtexec", f"--onnx={onnx_path.name}", f"--saveEngine={onnx_path.stem}.engine",
            f"--timingCacheFile={onnx_path.stem}.timing.cache"]
    # with Q/DQ nodes, int8 is explicit quantization: the scales come from the graph
    args += [f"--{flag}" for flag in builder_flags(precision, readiness.quantized)]
    if readiness.dynamic_inputs:
        if not shapes or set(shapes) != set(readiness.dynamic_inputs):
            raise UserError(f"inputs with symbolic dimensions {sorted(readiness.dynamic_inputs)} need (min, opt, max) "
                            f"shapes for the optimization profile")
        _check_profile_ranks(shapes, readiness.dynamic_inputs)
        for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}={_shape_flag_value(shapes, index)}")
    return " ".join(shlex.quote(a) for a in args)


def write_trtexec_script(path: Path, command: str, readiness: Readiness) -> None:
    """An executable shell script that runs `command` from its own folder (the command names
    the ONNX file relatively); for a model that is not ready, it stops with the reason unless
    EDGEPORT_FORCE=1."""
    guard = "" if readiness.ready else (
        f'if [ "$EDGEPORT_FORCE" != 1 ]; then\n'
        f'  echo "NOT READY: {len(readiness.violations)} violation(s) TensorRT will refuse or compute differently; '
        f'see the sidecar\'s tensorrt.readiness (EDGEPORT_FORCE=1 builds anyway)" >&2\n  exit 1\nfi\n')
    path.write_text(f'#!/bin/sh\n# Build the TensorRT engine on the device (written by edgeport)\n'
                    f'cd "$(dirname "$0")" || exit 1\n{guard}{command}\n')
    path.chmod(0o755)


def width_caveat(precision: str) -> str | None:
    """`tensorrt_width_caveat` of a model quantized to `precision` ("w4a4"; None for a float one)."""
    widths = re.fullmatch(r"w(\d+)a(\d+)", precision)
    return tensorrt_width_caveat(*map(int, widths.groups())) if widths else None


def tensorrt_module():
    """The `tensorrt` package, or `BackendUnavailable` saying how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailable("tensorrt", "the tensorrt package is not installed", INSTALL) from error
    return tensorrt


def builder_flags(precision: str, quantized: bool) -> list[str]:
    """The precisions TensorRT may choose kernels in beyond fp32, one list for the trtexec
    script and the API build alike: fp16 where asked for (int8 asks for it too, for the layers
    between Q/DQ pairs), int8 where the graph's Q/DQ nodes carry the scales."""
    return [flag for flag, wanted in (("fp16", precision in ("fp16", "int8")), ("int8", quantized or precision == "int8"))
            if wanted]


def build_engine(onnx_path: Path, engine_path: Path, precision: str = "fp16", quantized: bool = False,
                 shapes: dict[str, tuple[list[int], list[int], list[int]]] | None = None,
                 timing_cache: Path | None = None) -> Path:
    """Build a serialized engine with the tensorrt API (explicit batch; the `builder_flags` of
    `precision` and of a `quantized` graph's Q/DQ nodes), with optimization profiles for
    symbolic inputs and a timing cache reused across builds. Raises `BackendUnavailable`
    without tensorrt or a GPU."""
    trt = tensorrt_module()

    if not torch.cuda.is_available():
        raise BackendUnavailable("tensorrt", "no CUDA device is visible", "build on a machine with an NVIDIA GPU")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    for flag in builder_flags(precision, quantized):
        config.set_flag(getattr(trt.BuilderFlag, flag.upper()))
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


class TensorRTRunner(Runner):
    """A serialized TensorRT engine run through the tensorrt API on the GPU (torch holds the
    device buffers). Raises `BackendUnavailable` without tensorrt or a CUDA device."""

    def __init__(self, path: str | Path):
        self.path, self.name, self.device = Path(path), "tensorrt", "cuda"

    def load(self) -> "TensorRTRunner":
        trt = tensorrt_module()
        if not torch.cuda.is_available():
            raise BackendUnavailable("tensorrt", "no CUDA device is visible", "run on a machine with an NVIDIA GPU")
        self.trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.path} is not a TensorRT engine for this GPU and TensorRT version")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = []
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outputs = {}
        for name in self.output_names:
            dtype = torch.from_numpy(np.zeros(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outputs.items()}


def _largest_running(runs: Callable[[dict[str, int]], bool], sizes: dict[str, int], symbol: str,
                     wanted: int) -> int:
    """The largest size of `symbol` up to `wanted` at which the model runs (the others at their
    example sizes), assuming it runs at every size from the example's up to that one."""
    fits, fails = sizes[symbol], wanted
    if runs(sizes | {symbol: wanted}):
        return wanted
    while fails - fits > 1:
        middle = (fits + fails) // 2
        fits, fails = (middle, fails) if runs(sizes | {symbol: middle}) else (fits, middle)
    return fits


def _smallest_running(runs: Callable[[dict[str, int]], bool], sizes: dict[str, int], symbol: str) -> int:
    """The smallest size of `symbol` from 1 up at which the model runs (the others at their
    example sizes), assuming it runs at every size from that one up to the example's."""
    if runs(sizes | {symbol: 1}):
        return 1
    fails, fits = 1, sizes[symbol]
    while fits - fails > 1:
        middle = (fits + fails) // 2
        fails, fits = (fails, middle) if runs(sizes | {symbol: middle}) else (middle, fits)
    return fits


def profile_shapes(artifact: Artifact, args: tuple) -> tuple[dict, list[str]]:
    """(min, opt, max) per input with symbolic dims, and a note for each bound moved.

    Min is 1 and opt the example's size; max is 4x the example (at least 8). Both bounds move
    to the nearest size at which the ONNX file still runs in ONNX Runtime: a limit the graph does
    not show, such as a BERT's position embeddings (max) or unpadded convolutions that need a
    few pixels (min), would otherwise surface as a failed engine build on the device, since
    TensorRT builds for every shape of the profile. Dimensions that share a symbol move
    together; the search assumes a model runs at every size between a bound and the example's."""
    specs = {spec.name: spec for spec in artifact.inputs}
    examples = {spec.name: np.asarray(arg) for spec, arg in zip(artifact.inputs, args)}
    sizes = {d: int(examples[spec.name].shape[axis]) for spec in artifact.inputs
             for axis, d in enumerate(spec.shape) if isinstance(d, str)}
    if not sizes:
        return {}, []
    import onnxruntime as ort

    options, quiet = ort.SessionOptions(), ort.RunOptions()
    # the search fails on purpose: keep ORT's error log of each failed size off the user's console
    options.log_severity_level = quiet.log_severity_level = 4
    session = ort.InferenceSession(str(artifact.path), options, providers=["CPUExecutionProvider"])

    def runs(symbols: dict[str, int]) -> bool:
        feeds = {}
        for name, example in examples.items():
            for axis, d in enumerate(specs[name].shape):
                if isinstance(d, str):  # repeat the example along the axis: token ids stay valid ids
                    example = np.take(example, np.arange(symbols[d]) % example.shape[axis], axis=axis)
            feeds[name] = example
        try:
            session.run(None, feeds, quiet)
        except Exception:  # ORT raises its own Fail/InvalidArgument types; any is "does not run"
            return False
        return True

    lows, highs, notes = {}, {}, []
    for symbol, size in sizes.items():
        wanted = max(8, 4 * size)
        lows[symbol] = _smallest_running(runs, sizes, symbol)
        highs[symbol] = _largest_running(runs, sizes, symbol, wanted)
        if lows[symbol] > 1:
            notes.append(f"TensorRT profile min for {symbol} is {lows[symbol]}, not 1: the ONNX file fails below "
                         f"{lows[symbol]} in ONNX Runtime (a size the model's layers need)")
        if highs[symbol] < wanted:
            notes.append(f"TensorRT profile max for {symbol} is {highs[symbol]}, not {wanted}: the ONNX file fails "
                         f"beyond {highs[symbol]} in ONNX Runtime (a size the model's code limits)")
    shapes = {}
    for name, spec in specs.items():
        if any(isinstance(d, str) for d in spec.shape):
            shapes[name] = tuple([bound[d] if isinstance(d, str) else d for d in spec.shape]
                                 for bound in (lows, sizes, highs))
    return shapes, notes


@dataclass
class TensorRTOptions(OnnxFileOptions):
    """The ONNX file TensorRT parses, and the engine's precision."""

    precision: str = option("fp16", "TensorRT engine precision (a quantized model's Q/DQ nodes make it int8)",
                            choices=("fp32", "fp16", "int8"))


class TensorRTBackend(Backend):
    """TensorRT: the verified ONNX in pure QDQ form (`<name>-tensorrt.onnx`), a readiness
    report, the trtexec command for the device, and the engine where tensorrt and a GPU exist."""

    name = "tensorrt"
    summary = "TensorRT: readiness-checked ONNX + trtexec script; the engine where tensorrt and a GPU exist"
    Options = TensorRTOptions
    formats = ("tensorrt",)
    quantized = "pure QDQ (no MatMulInteger): symmetric INT8 Q/DQ pairs TensorRT fuses (explicit quantization)"

    def export(self, request: ExportRequest, options: TensorRTOptions) -> list[Artifact]:
        """The ONNX artifact (ready or not, with the reasons), and the engine when one was built."""
        onnx_artifact = export_onnx(request.module, request.args, request.folder, f"{request.name}-tensorrt",
                                    opset=options.opset, dynamic_axes=request.dynamic_axes,
                                    exporter=options.exporter, precision=request.precision,
                                    names=request.input_names, output_names=request.output_names,
                                    onnxruntime_form=False)
        readiness = check_readiness(onnx_artifact.path)
        if options.precision == "int8" and not readiness.quantized:
            raise UserError("TensorRT int8 needs a quantized model (its Q/DQ scales); TensorRT's implicit INT8 "
                            "calibration is not what edgeport writes: quantize first with target='tensorrt' "
                            "(edgeport quantize --target tensorrt), or build fp16")
        shapes, profile_notes = profile_shapes(onnx_artifact, request.args)
        onnx_artifact.notes.extend(profile_notes)
        command = trtexec_command(onnx_artifact.path, readiness, options.precision, shapes)
        script = onnx_artifact.path.with_suffix(".trtexec.sh")
        write_trtexec_script(script, command, readiness)
        onnx_artifact.files.insert(0, script.name)
        onnx_artifact.settings["tensorrt"] = {"readiness": readiness.to_dict(), "trtexec": command, "profiles": shapes,
                                              "precision": "int8" if readiness.quantized else options.precision}
        caveat = width_caveat(request.precision)
        if caveat:
            onnx_artifact.notes.append(caveat)
            warnings.warn(caveat, EdgeportWarning, stacklevel=2)
        if not readiness.ready:
            onnx_artifact.notes.append(readiness.summary())
            first = readiness.violations[0]
            remedy = ("; quantize with target='tensorrt' (edgeport quantize --target tensorrt) for the symmetric INT8 "
                      "quantizers TensorRT runs") if request.precision != "fp32" else ""
            warnings.warn(f"{onnx_artifact.path.name} is not ready for TensorRT: {len(readiness.violations)} "
                          f"violation(s), the first [{first.rule}] {first.node}: {first.message}{remedy}",
                          EdgeportWarning, stacklevel=2)
            return [onnx_artifact]
        engine_path = onnx_artifact.path.with_suffix(".engine")
        try:
            build_engine(onnx_artifact.path, engine_path, options.precision, readiness.quantized, shapes or None)
        except BackendUnavailable as unavailable:
            onnx_artifact.settings["tensorrt"]["engine"] = f"not built here: {unavailable}"
            onnx_artifact.notes.append(f"TensorRT engine not built: {unavailable}; run {script.name} on the device")
            return [onnx_artifact]
        precision = request.precision if request.precision != "fp32" else options.precision
        engine = Artifact(path=engine_path, format="tensorrt", precision=precision, inputs=onnx_artifact.inputs,
                          outputs=onnx_artifact.outputs, source_sha256=onnx_artifact.source_sha256,
                          exporter="tensorrt-api", files=[engine_path.name],
                          settings={"onnx": onnx_artifact.path.name, "profiles": shapes})
        return [onnx_artifact, engine]

    def runner(self, artifact: Artifact, threads: int | None = None, profiling: bool = False) -> Runner:
        return TensorRTRunner(artifact.path)


BACKEND = TensorRTBackend()
