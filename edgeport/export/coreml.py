"""torch -> Core ML (mlprogram `.mlpackage`) through torch.export, tracing as the fallback.

coremltools converts on any OS but predicts only on macOS. So every package is checked
structurally here — it reloads, its spec has the expected inputs, outputs and shapes, its
op histogram is recorded — and numerical parity is checked only where Core ML can run; the
artifact says plainly which of the two happened. The minimum deployment target is the
lowest the model needs, and the reason is recorded.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeport.errors import BackendUnavailable, ExportError, UserError
from edgeport.core import (Artifact, Backend, ExportRequest, Runner, TensorSpec, flatten_outputs, input_names, option,
                           source_sha256)
from edgeport.export.onnx import quiet, summarize_error
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
    """A per-tensor activation quantizer as the quantize/dequantize pair Core ML converts."""

    def __init__(self, scale: float, zero_point: int, signed: bool):
        super().__init__()
        self.scale, self.zero_point = scale, zero_point
        self.dtype = torch.qint8 if signed else torch.quint8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.dequantize(torch.quantize_per_tensor(x, self.scale, self.zero_point, self.dtype))


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
            replacement = (QuantLinear(params.layer, act, torch.nn.Identity(), params.input_affine)
                           if isinstance(module, QuantLinear) else QuantConv2d(params.layer, act, torch.nn.Identity()))
        parent, _, leaf = name.rpartition(".")
        setattr(form.get_submodule(parent) if parent else form, leaf, replacement)
    w_bits = min(weight_bits)
    if w_bits not in (4, 8):
        notes.append(f"{w_bits}-bit weights are stored with Core ML's int8 compression (its scale, not ours)")
    return form, "int4-per-channel" if w_bits <= 4 else "int8", sorted(set(notes))


def _core_ml_activation(params: UniformQParams | LogSqrt2QParams, notes: list[str]) -> torch.nn.Module:
    """An activation quantizer as Core ML runs it: a per-tensor uniform one as the
    quantize/dequantize pair Core ML has (8-bit; a narrower width is noted), log-sqrt2, which
    it has no op for, as the float ops that compute it."""
    if isinstance(params, LogSqrt2QParams):
        return LogSqrt2Quantizer.from_qparams(params)
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


def unsupported_ops(program: torch.export.ExportedProgram) -> dict:
    """{op: [nn.Module paths]} for every op in the program that coremltools cannot convert."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    known = _TORCH_OPS_REGISTRY.name_to_func_mapping
    found: dict = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and op_kind(node.target) not in known:
            stack = node.meta.get("nn_module_stack") or {}
            path = next(reversed(stack.values()))[0] if stack else "<root>"
            found.setdefault(node.target, []).append(path or "<root>")
    return found


def decompose_for_coreml(program: torch.export.ExportedProgram, rounds: int = 4):
    """Decompose every op coremltools lacks into ops it has, where PyTorch's core ATen
    decompositions know how (e.g. `new_ones`, `diff`, `__and__` in `transformers` attention
    masks). Returns (program, decomposed op names, {op: module paths} still unsupported)."""
    from torch._decomp import core_aten_decompositions

    table, applied = core_aten_decompositions(), []
    for _ in range(rounds):
        missing = unsupported_ops(program)
        decomposable = {op: table[op] for op in missing if op in table}
        if not decomposable:
            return program, applied, missing
        applied += [op_kind(op) for op in decomposable]
        program = program.run_decompositions(decomposable)
    return program, applied, unsupported_ops(program)


def _convert(route: str, model: torch.nn.Module, args: tuple, names: list[str], outputs: list[str], target: str,
             precision: str, notes: list[str]):
    import coremltools as ct

    if route == "torch.export":
        source, applied, missing = decompose_for_coreml(torch.export.export(model, args).run_decompositions({}))
        if applied:
            notes.append(f"decomposed for Core ML: {', '.join(sorted(set(applied)))}")
        if missing:
            where = "; ".join(f"{op_kind(op)} in {', '.join(sorted(set(paths))[:3])}" for op, paths in missing.items())
            raise ExportError(f"Core ML's converter has no conversion for: {where}")
    else:
        with torch.no_grad():
            source = torch.jit.trace(model, args)
    return ct.convert(source, convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                      compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                      inputs=[ct.TensorType(name=n, shape=tuple(a.shape)) for n, a in zip(names, args)],
                      outputs=[ct.TensorType(name=n) for n in outputs])


def op_histogram(mlmodel) -> dict[str, int]:
    """Count of each MIL op type in the program's main function (works on reloaded packages)."""
    counts: collections.Counter = collections.Counter()
    program = mlmodel.get_spec().mlProgram
    for function in program.functions.values():
        for block in function.block_specializations.values():
            counts.update(op.type for op in block.operations)
    return dict(counts.most_common())


def _specs(features) -> list[TensorSpec]:
    specs = []
    for feature in features:
        array = feature.type.multiArrayType
        dtype = {65568: "float32", 65552: "float16", 131104: "int32"}.get(array.dataType, str(array.dataType))
        specs.append(TensorSpec(feature.name, list(array.shape), dtype))
    return specs


def check_structure(path: Path, names: list[str], outputs: list[str], args: tuple) -> dict:
    """Reload the package without Core ML's runtime and compare its interface with the model's."""
    import coremltools as ct

    with quiet():
        reloaded = ct.models.MLModel(str(path), skip_model_load=True)
    spec = reloaded.get_spec()
    got_inputs = {f.name: list(f.type.multiArrayType.shape) for f in spec.description.input}
    got_outputs = [f.name for f in spec.description.output]
    expected_inputs = {n: list(a.shape) for n, a in zip(names, args)}
    if got_inputs != expected_inputs:
        raise ExportError(f"Core ML package inputs {got_inputs} differ from the model's {expected_inputs}")
    if got_outputs != outputs:
        raise ExportError(f"Core ML package outputs {got_outputs} differ from the model's {outputs}")
    return {"reloaded": True, "spec_version": spec.specificationVersion, "inputs": got_inputs,
            "outputs": got_outputs, "op_histogram": op_histogram(reloaded)}


def export_coreml(model: torch.nn.Module, args: tuple[torch.Tensor, ...], folder: Path, name: str, *,
                  precision: str = "fp32", names: list[str] | None = None, output_names: list[str] | None = None,
                  weights: str | None = None) -> Artifact:
    """Convert `model` called on `args` to `folder/name.mlpackage`; returns the Artifact with
    its structural check in `settings["verification"]` (numerical parity comes separately).

    `weights` compresses the stored weights: "int8", "int4", "palettize4" or "palettize6".
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
        outputs = output_names or [f"output_{i}" for i in range(len(flatten_outputs(model(*args))))]
    target, reason = deployment_target(features)
    path = folder / f"{name}.mlpackage"
    failures, notes = {}, [f"not expressed exactly: {n}" for n in not_expressed]
    # coremltools converts quantize/dequantize pairs from traced graphs only
    for route in ROUTES[1:] if quantized_weights else ROUTES:
        try:
            with quiet():
                mlmodel = _convert(route, model, args, names, outputs, target, precision, notes)
                if weights:
                    mlmodel = compress_weights(mlmodel, weights)
                mlmodel.save(str(path))
            structure = check_structure(path, names, outputs, args)
        except Exception as error:  # coremltools raises many types: the next route may work
            failures[route] = error
            notes.append(f"{route} failed: {summarize_error(error)}")
            continue
        spec_inputs = _specs(mlmodel.get_spec().description.input)
        spec_outputs = _specs(mlmodel.get_spec().description.output)
        if weights and not set(WEIGHT_MODES[weights][1]) & set(structure["op_histogram"]):
            raise ExportError(f"{weights} weight compression left no {' or '.join(WEIGHT_MODES[weights][1])} op: "
                              f"no weight was large enough to compress")
        label = WEIGHT_MODES[weights][2] if weights else precision
        if quantized_weights:
            label += "a8"  # Core ML's quantize/dequantize pairs are 8-bit
        return Artifact(path=path, format="coreml", precision=label,
                        inputs=spec_inputs, outputs=spec_outputs,
                        source_sha256=source_sha256(model), exporter=route, notes=notes, files=[path.name],
                        settings={"minimum_deployment_target": target, "target_reason": reason,
                                  "compute_precision": precision, "weight_compression": weights,
                                  "verification": {"structure": structure}})
    detail = "; ".join(f"{route}: {summarize_error(e)}" for route, e in failures.items())
    raise ExportError(f"cannot convert to Core ML: {detail}")


class CoreMLRunner(Runner):
    """A Core ML package run by Core ML itself; only macOS has that runtime."""

    def __init__(self, path: str | Path, compute_units: str = "ALL"):
        self.path, self.compute_units = Path(path), compute_units
        self.name, self.model = "coreml", None

    def load(self) -> "CoreMLRunner":
        import platform

        if platform.system() != "Darwin":
            raise BackendUnavailable("coreml", f"Core ML predicts only on macOS; this is {platform.system()}",
                                     "verify and profile the package on a Mac")
        import coremltools as ct

        self.model = ct.models.MLModel(str(self.path), compute_units=getattr(ct.ComputeUnit, self.compute_units))
        spec = self.model.get_spec()
        self.input_names = [f.name for f in spec.description.input]
        self.output_names = [f.name for f in spec.description.output]
        self.device = f"coreml-{self.compute_units.lower()}"
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.model.predict({n: feeds[n] for n in self.input_names})
        return {n: np.asarray(result[n]) for n in self.output_names}


@dataclass
class CoreMLOptions:
    """How the Core ML package is converted and stored."""

    precision: str = option("fp32", "Core ML compute precision", choices=("fp32", "fp16"))
    weights: str | None = option(None, "Core ML weight compression", choices=tuple(m for m in WEIGHT_MODES
                                                                                   if m != "int4-per-channel"))


class CoreMLBackend(Backend):
    """Core ML ML Programs (`.mlpackage`): converted on any OS, run by Core ML on macOS."""

    name = "coreml"
    summary = "Core ML ML Program, checked structurally everywhere and numerically on macOS"
    Options = CoreMLOptions
    formats = ("coreml",)
    quantized = ("weights on their grid in Core ML's int8/int4 compression, activations as 8-bit "
                 "quantize/dequantize (iOS17+)")

    def export(self, request: ExportRequest, options: CoreMLOptions) -> list[Artifact]:
        return [export_coreml(request.module, request.args, request.folder, request.name,
                              precision=options.precision, weights=options.weights, names=request.input_names,
                              output_names=request.output_names)]

    def runner(self, artifact: Artifact, threads: int | None = None, profiling: bool = False) -> Runner:
        return CoreMLRunner(artifact.path)


BACKEND = CoreMLBackend()
