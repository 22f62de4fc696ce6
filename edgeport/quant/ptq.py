"""The PTQ pipeline: prepare -> calibrate -> reparameterize -> finalize.

`quantize(model, calib, config)` returns a copy of the model whose Linear and Conv2d layers
fake-quantize their input (per tensor) and their weights (symmetric), and whose activation x
activation matmuls fake-quantize both operands, as the `QuantConfig` says (presets
`minmax`, `percentile`, `repq` in `edgeport.quant.config`). With `norm_reparam` (RepQ-ViT),
inputs that come straight from a LayerNorm are calibrated per channel and reparameterized to
per tensor, the scale and shift folded into the consumer and, with `fold_norm_affine` where
the norm feeds nothing else, into the norm's affine (otherwise, as in post-norm BERT, an
elementwise affine stays in front of the quantizer: exactly the per-channel codes).

Calibration is sequential: each quantizer is fitted on the first batch it sees, with every
layer upstream already quantized. Conv-BatchNorm pairs are folded first. Exporters read a
quantized module through its `qparams()`, not its attributes.
"""
from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgeport.core import capture
from edgeport.errors import EverythingLeftFloat, UserError
from edgeport.quant.adalog import AdaLogQParams, AdaLogQuantizer, choose_input_quantizer, gelu_fed
from edgeport.quant.calibrate import observer
from edgeport.quant.config import QuantConfig
from edgeport.quant.erq import compensate
from edgeport.quant.exported_matmuls import exported_matmul_sites, route_matmuls
from edgeport.quant.live import mark_live_rows
from edgeport.quant.quantizers import (LogSqrt2QParams, LogSqrt2Quantizer, UniformQParams, UniformQuantizer,
                                       calibration_rows)
from edgeport.quant.reconstruct import reconstruct
from edgeport.quant.rotate import online_rotation_paths, rotate_inputs, rotate_values
from edgeport.quant.reparam import fold_batchnorm, fold_into_linear, fold_targets, scale_output_channels

# its phases, for a user's logging configuration (DEBUG: every quantization of a mixed-precision
# search or a form choice would repeat them)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerQParams:
    """A quantized Linear or Conv2d as exporters see it: `layer`, a float copy of the layer
    whose weight is on its quantization grid (the values the fake-quant model multiplies by);
    `input`, the per-tensor quantizer of its input, applied after `input_affine` (x * scale
    + shift) where a LayerNorm reparameterization stayed in front of it; `weight`, the weight
    quantizer; `output`, the per-tensor quantizer of its result where one follows it (a
    Conv2d's: with it ONNX Runtime runs the conv as one integer kernel, QLinearConv), else
    None."""

    layer: nn.Module
    input: UniformQParams | AdaLogQParams
    weight: UniformQParams
    input_affine: tuple[torch.Tensor, torch.Tensor] | None
    output: UniformQParams | None = None


@dataclass(frozen=True)
class MatMulQParams:
    """A quantized activation x activation matmul as exporters see it: its operands'
    quantizers (the left one log-sqrt2 or AdaLog where calibration chose it for a softmax output)."""

    left: UniformQParams | LogSqrt2QParams | AdaLogQParams
    right: UniformQParams


def on_integer_codes(operand: nn.Module, other: nn.Module) -> bool:
    """Whether a product of `operand` (an activation, quantized per tensor) and `other` (a
    weight quantized per output channel or per tensor, or a second activation) is computed on
    their integer codes: both uniform and fitted, the activation narrower than 8 bits, and
    not while exporting (the export writes the Q/DQ form of the same function).

    Sums of such codes are exact in float32, in any order. The export runs every product with
    a narrower activation on the codes too (MatMulInteger, or a float conv of the codes; see
    `edgeport.quant.qdq.integer_matmuls` and `code_domain_convs`), so the fake-quant model and
    ONNX Runtime form the same sums. Summed as dequantized floats, in torch's order and the
    runtime's, results near a rounding boundary of the next quantizer fell on different sides:
    the zoo ViT's W4A4 export changed 3 of its 360 test predictions that way. At 8 bits ONNX
    Runtime re-quantizes inside its integer kernels (QGemm, QLinearMatMul, QLinearConv) with
    its own arithmetic, so those products keep the dequantized form."""
    return (not torch.compiler.is_exporting()
            and all(isinstance(q, UniformQuantizer) and q.enabled and q.fitted for q in (operand, other))
            and operand.axis is None and other.axis in (None, 0) and operand.bits < 8)


class _QuantizedLayer(nn.Module):
    """A weight layer (`inner`) whose input is fake-quantized by `act`, its weight by `wq`."""

    def __init__(self, layer: nn.Module, act: nn.Module, weight: nn.Module):
        super().__init__()
        self.inner, self.act, self.wq = layer, act, weight

    def qparams(self) -> LayerQParams:
        """The layer's parameters for an exporter (see LayerQParams)."""
        layer = copy.deepcopy(self.inner)
        with torch.no_grad():
            layer.weight.copy_(self.wq(self.inner.weight))
        output = getattr(self, "out", None)
        return LayerQParams(layer, self.act.qparams(), self.wq.qparams(), self._input_affine(),
                            output.qparams() if output is not None else None)

    def _input_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


class QuantLinear(_QuantizedLayer):
    """A Linear whose input and weight are fake-quantized; `pre_scale`/`pre_shift` hold a
    folded reparameterization (x' = x * pre_scale + pre_shift before the input quantizer;
    no shift where only channels were scaled), given as `input_affine` or set by the
    pipeline."""

    def __init__(self, linear: nn.Linear, act: nn.Module, weight: nn.Module,
                 input_affine: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__(linear, act, weight)
        pre_scale, pre_shift = input_affine or (None, None)
        self.register_buffer("pre_scale", pre_scale)
        self.register_buffer("pre_shift", pre_shift)

    def quantizer_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the input quantizer sees it: after the folded scale and shift, where there are."""
        if self.pre_scale is not None:
            x = x * self.pre_scale
        if self.pre_shift is not None:
            x = x + self.pre_shift
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.quantizer_input(x), self.inner.weight
        if on_integer_codes(self.act, self.wq):
            y = F.linear(self.act.centered_codes(x), self.wq.centered_codes(weight)) * (self.act.scale * self.wq.scale)
        else:
            y = F.linear(self.act(x), self.wq(weight))
        if self.inner.bias is None:
            return y
        # The bias is added at full rank: in the QDQ form ONNX Runtime fuses MatMul with a 1-D
        # bias Add into a float Gemm before its QDQ pass runs, which then leaves DQ -> Gemm in
        # float. With an Add it cannot fuse, DQ -> MatMul becomes an integer kernel.
        return y + self.inner.bias.reshape([1] * (y.ndim - 1) + [-1])

    def _input_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.pre_scale is None:
            return None
        return self.pre_scale.clone(), torch.zeros_like(self.pre_scale) if self.pre_shift is None else self.pre_shift.clone()


class QuantConv2d(_QuantizedLayer):
    """A Conv2d whose input (per tensor) and weight are fake-quantized, and its result too
    where the pipeline gives it an output quantizer (`out`)."""

    def __init__(self, layer: nn.Conv2d, act: nn.Module, weight: nn.Module):
        super().__init__(layer, act, weight)
        self.out: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.inner
        if on_integer_codes(self.act, self.wq):
            y = F.conv2d(self.act.centered_codes(x), self.wq.centered_codes(c.weight), None, c.stride, c.padding,
                         c.dilation, c.groups) * (self.act.scale * self.wq.scale).reshape(-1, 1, 1)
            y = y if c.bias is None else y + c.bias.reshape(-1, 1, 1)
        else:
            y = F.conv2d(self.act(x), self.wq(c.weight), c.bias, c.stride, c.padding, c.dilation, c.groups)
        return y if self.out is None else self.out(y)


# float layer type -> its fake-quantized wrapper (subclasses of the float type included)
QUANTIZED_LAYERS: dict[type[nn.Module], type[_QuantizedLayer]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


class QuantMatMul(nn.Module):
    """An activation x activation matmul (attention scores, attention-weighted values) with
    both operands fake-quantized per tensor.

    A left operand that is a softmax output brings candidate probability quantizers
    (`left_choices`: uniform, and log-sqrt2 where the config lets calibration choose), each
    fitted on the first calibration batch; the pipeline then keeps the one that gives the
    smaller error at the model's output."""

    def __init__(self, left: nn.Module, right: nn.Module, left_choices: tuple[nn.Module, ...] = ()):
        super().__init__()
        self.left, self.right = left, right
        self.left_choices = left_choices

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        for candidate in self.left_choices:
            if candidate.fitted:
                continue
            if isinstance(candidate, AdaLogQuantizer):  # its base is searched on the product's error
                live = getattr(candidate, "live", None)
                # rows the output does not read count as zeros, which cost no error (batched matmul: no selection)
                fitted_on = a if live is None or live.shape != a.shape else a * live
                candidate.fit(fitted_on, lambda t: torch.matmul(t, b))
            else:
                candidate.fit(a)
        for operand, other in ((self.left, self.right), (self.right, self.left)):
            if on_integer_codes(operand, other):
                return torch.matmul(self.left.centered_codes(a), self.right.centered_codes(b)) * (
                    self.left.scale * self.right.scale)
        return torch.matmul(self.left(a), self.right(b))

    def qparams(self) -> MatMulQParams:
        """The operands' quantizer parameters for an exporter (see MatMulQParams)."""
        return MatMulQParams(self.left.qparams(), self.right.qparams())


QUANTIZED_MODULES = (*QUANTIZED_LAYERS.values(), QuantMatMul)


def _choose_probability_quantizers(qmodel: nn.Module, model: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    """Per bit width, let the calibration error choose the softmax-output quantizer: each
    candidate kind in every attention, the one whose model output is closest (mean squared
    error) to the float model's on the calibration batch. Measured on the zoo ViT: log-sqrt2
    gives the smaller error on each attention product at 4 bits yet the worse model output."""
    layers = [m for m in qmodel.modules() if isinstance(m, QuantMatMul) and len(m.left_choices) > 1]
    if layers:
        def flat(outputs):
            return torch.cat([o.float().flatten() for o in torch.utils._pytree.tree_leaves(outputs)
                              if isinstance(o, torch.Tensor) and o.is_floating_point()])

        errors = []
        with torch.no_grad():
            reference = flat(model(*args))
            for k in range(len(layers[0].left_choices)):
                for layer in layers:
                    layer.left = layer.left_choices[k]
                errors.append(float(((flat(qmodel(*args)) - reference) ** 2).mean()))
        for layer in layers:
            layer.left = layer.left_choices[errors.index(min(errors))]
    for layer in (m for m in qmodel.modules() if isinstance(m, QuantMatMul)):
        layer.left_choices = ()


@dataclass
class QuantReport:
    """What the pipeline did: layers quantized, attention values and Linear inputs rotated,
    branches merged, Conv-BN and layer-scale folds (and why none were looked for), layers
    reparameterized, weights compensated, units reconstructed (with their error before and
    after, iterations and seconds), outlier channels migrated into weights, activation matmuls
    quantized (and which run as float ops), the convs left float for ONNX
    Runtime's speed (each also named with the reason in `float_ops`), why matmuls stayed float,
    and the activation calibration used. `reparam_declined`: LayerNorm-fed layers left per tensor
    because that generalized better (`QuantConfig.check_reparam_held_out`)."""

    method: str
    w_bits: int
    a_bits: int
    target: str
    layers: list[str] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)
    batchnorm_folds: list[str] = field(default_factory=list)
    folds_skipped: str = ""
    layer_scale_folds: list[str] = field(default_factory=list)
    merged_branches: list[str] = field(default_factory=list)
    reparameterized: list[str] = field(default_factory=list)
    reparam_declined: list[str] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)
    reconstructed: list[str] = field(default_factory=list)
    outlier_migrations: list[str] = field(default_factory=list)
    matmuls: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    convs_kept_float: list[str] = field(default_factory=list)
    matmuls_not_quantized: str = ""
    calibration_samples: int = 0
    activation_calibration: str = ""

    def summary(self) -> str:
        """What the pipeline did, as `edgeport quantize` prints it: the counts on one line, then
        each layer that runs as float ops (with why) and each rotation."""
        head = (f"quantized {len(self.layers)} layers and {len(self.matmuls)} activation matmuls"
                f"{f' ({self.matmuls_not_quantized})' if self.matmuls_not_quantized else ''}; reparameterized "
                f"{len(self.reparameterized)}; conv-BN folded {len(self.batchnorm_folds)}"
                f"{f'; layer scales folded {len(self.layer_scale_folds)}' if self.layer_scale_folds else ''}"
                f"{f'; rotated {len(self.rotated)}' if self.rotated else ''}")
        return "\n".join([head, *(f"  runs as float ops: {line}" for line in self.float_ops),
                           *(f"  rotated: {line}" for line in self.rotated)])


def _module_path(node: torch.fx.Node) -> str | None:
    """The path of the module whose forward made `node` in a torch.export graph."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else None


@dataclass
class _Folds:
    """What the captured graph lets fold into the conv or Linear that feeds it: (conv path, norm
    path) per BatchNorm2d, (layer path, scale module path) per LayerScale-style module, the
    BatchNorm2d modules the graph calls that cannot fold, and why nothing could be looked for
    when the model cannot be captured."""

    batchnorms: list[tuple[str, str]] = field(default_factory=list)
    unfolded: list[str] = field(default_factory=list)
    scales: list[tuple[str, str]] = field(default_factory=list)
    not_captured: str = ""


def _folds(model: nn.Module, args: tuple[torch.Tensor, ...]) -> _Folds:
    """Every BatchNorm2d applied to a Conv2d's output that nothing else reads, and every module
    that only multiplies its input by its one parameter, a vector (timm's LayerScale,
    LayerScale2d), applied per channel to a Conv2d's or Linear's output that nothing else reads
    (directly, or through an eval-mode dropout or a BatchNorm2d folded here), found in the graph
    torch.export captures (timm's ConvNormAct, torchvision's resnet keep conv and norm as
    attributes, not neighbours in an nn.Sequential). A conv and its norm called several times
    fold when every call of each is one of their pairs (a spiking net's conv and norm, run once
    per timestep); a layer scale called more than once is never folded. Otherwise one call's
    fold would change the others."""
    try:
        program = capture(model, args)
    except Exception as error:  # capture runs arbitrary model code; any failure means "not capturable"
        return _Folds(not_captured=f"not capturable by torch.export ({type(error).__name__}: "
                                   f"{str(error).splitlines()[0][:120]})")
    graph, folds = program.graph, _Folds()
    calls: dict[str, int] = {}
    by_module: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        path = _module_path(node) if node.op == "call_function" else None
        if path is not None:
            by_module.setdefault(path, []).append(node)
            if node.target in (*_CHANNEL_AXIS, *_BATCH_NORMS):
                calls[path] = calls.get(path, 0) + 1
    pairs: dict[tuple[str, str], int] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _BATCH_NORMS:
            continue
        conv = node.args[0]
        if isinstance(conv, torch.fx.Node) and conv.target == torch.ops.aten.conv2d.default and len(conv.users) == 1:
            pair = (_module_path(conv), _module_path(node))
            pairs[pair] = pairs.get(pair, 0) + 1
    for (conv_path, norm_path), count in pairs.items():
        if calls.get(conv_path) != count or calls.get(norm_path) != count:
            continue
        if isinstance(model.get_submodule(conv_path), nn.Conv2d) and _folded_norm(model.get_submodule(norm_path)):
            folds.batchnorms.append((conv_path, norm_path))
    folded_norms = {norm for _, norm in folds.batchnorms}
    folds.unfolded = [path for path in calls if path not in folded_norms
                      and isinstance(model.get_submodule(path), nn.BatchNorm2d)]
    parameters = program.graph_signature.inputs_to_parameters
    for node in graph.nodes:
        scale_path = _module_path(node) if node.op == "call_function" and node.target in _MULS else None
        name = _scale_parameter(model.get_submodule(scale_path)) if scale_path else None
        if name is None:
            continue
        for output, factor in (node.args[:2], node.args[1::-1]):
            views = [factor]
            while isinstance(views[-1], torch.fx.Node) and views[-1].target in _VIEWS:
                views.append(views[-1].args[0])
            if isinstance(views[-1], torch.fx.Node) and parameters.get(views[-1].name) == f"{scale_path}.{name}":
                break
        else:
            continue
        between = [output]  # the scale's input back to the layer: eval-mode dropout, a folded norm
        while isinstance(between[-1], torch.fx.Node) and (
                between[-1].target == torch.ops.aten.dropout.default and not between[-1].args[2]
                or between[-1].target in _BATCH_NORMS and _module_path(between[-1]) in folded_norms):
            between.append(between[-1].args[0])
        layer = between[-1]
        if set(by_module[scale_path]) != {node, *views[:-1]} or not isinstance(layer, torch.fx.Node) \
                or layer.target not in _CHANNEL_AXIS or any(len(n.users) != 1 for n in between):
            continue
        layer_path = _module_path(layer)
        shape, factor_shape = layer.meta["val"].shape, factor.meta["val"].shape
        axis = _CHANNEL_AXIS[layer.target] % len(shape)
        padded = (1,) * (len(shape) - len(factor_shape)) + tuple(factor_shape)
        if calls.get(layer_path) == 1 and isinstance(model.get_submodule(layer_path), (nn.Conv2d, nn.Linear)) \
                and padded == tuple(shape[axis] if i == axis else 1 for i in range(len(shape))):
            folds.scales.append((layer_path, scale_path))
    return folds


def _scale_parameter(module: nn.Module) -> str | None:
    """The name of a LayerScale-style module's parameter: its only one, a vector (FastViT's is
    shaped (C, 1, 1)), with no submodules."""
    parameters = list(module.named_parameters(recurse=False))
    if list(module.children()) or len(parameters) != 1 or sum(size > 1 for size in parameters[0][1].shape) != 1:
        return None
    return parameters[0][0]


# a conv's or Linear's output channel axis; the ops a per-channel factor's shape passes through
_CHANNEL_AXIS = {torch.ops.aten.conv2d.default: 1, torch.ops.aten.linear.default: -1}
_MULS = (torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor)
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
          torch.ops.aten.unsqueeze.default)


_BATCH_NORMS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default)


def _folded_norm(norm: nn.Module) -> nn.Module | None:
    """What stays of a BatchNorm2d once folded into its conv: nothing (Identity), or for
    timm's BatchNormAct2d its dropout and activation, which run after the normalization;
    None for another subclass, whose forward may do more than the fold knows, and for a norm
    without running statistics (it normalizes by each batch's own)."""
    if not isinstance(norm, nn.BatchNorm2d) or norm.running_mean is None:
        return None
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if set(norm._modules) == {"drop", "act"}:
        return nn.Sequential(norm.drop, norm.act)
    return None


def _merge_branches(model: nn.Module, report: QuantReport) -> None:
    """Merge the training-time parallel branches of structurally reparameterizable blocks
    (MobileOne, RepVGG, FastViT's RepMixer: modules with a `reparameterize()` method, the
    timm convention) into the single conv each was built to become for inference, as
    deployment does: the same function, one integer kernel instead of several float ones
    (FastViT-T8 kept 24 BatchNormalization nodes and their adds without it)."""
    for name, module in list(model.named_modules()):
        if callable(getattr(module, "reparameterize", None)):
            module.reparameterize()
            report.merged_branches.append(name)


def _fold_into_layers(model: nn.Module, args: tuple[torch.Tensor, ...], report: QuantReport) -> None:
    """Fold every Conv2d -> BatchNorm2d pair of the captured graph into the conv, then every
    per-channel layer scale into the conv or Linear before it, in place. Into an 8-bit integer
    conv too, although its output's one per-tensor step then covers channels of unequal scale:
    in driver A/B runs on the AMD EPYC Zen 4 (`erq-heldout`, every conv integer, exported) that
    cost no cosine (EfficientFormerV2-S0, 32 held-out images: 0.999953 folded against 0.999952
    with the 18 scales left float Muls; 0.999892 against 0.999885 with them drawn log-uniform in
    [1e-3, 1]; EfficientFormer-L1 0.999911 against 0.999903) and EfficientFormerV2-S0 ran
    1.26x fp32 at 1 thread against 1.18x with the Muls."""
    if not any(isinstance(m, nn.BatchNorm2d) or _scale_parameter(m) for m in model.modules()):
        return  # nothing to fold: spare the capture
    folds = _folds(model, args)
    report.folds_skipped = folds.not_captured
    report.float_ops += [f"{path}: BatchNorm2d not folded ("
                         + ("it does not read, on every call, a Conv2d output that only it reads)"
                            if _folded_norm(model.get_submodule(path)) else
                            "a subclass with a forward of its own, or one normalizing by each batch's statistics)")
                         for path in folds.unfolded]
    for conv_path, norm_path in folds.batchnorms:
        norm = model.get_submodule(norm_path)
        _replace(model, conv_path, fold_batchnorm(model.get_submodule(conv_path), norm))
        _replace(model, norm_path, _folded_norm(norm))
        report.batchnorm_folds.append(conv_path)
    for layer_path, scale_path in folds.scales:
        scale = model.get_submodule(scale_path)
        _replace(model, layer_path, scale_output_channels(model.get_submodule(layer_path),
                                                          getattr(scale, _scale_parameter(scale))))
        _replace(model, scale_path, nn.Identity())
        report.layer_scale_folds.append(scale_path)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_SOFTMAXES = {torch.softmax, F.softmax, torch.Tensor.softmax, "softmax"}


def _quantize_matmuls(model: nn.Module, args: tuple[torch.Tensor, ...], act_quantizer, probability_choices,
                      report: QuantReport) -> nn.Module:
    """The model with its activation x activation matmuls as `QuantMatMul`s (found in the
    graph, not by module names): a torch.fx graph module where torch.fx can trace the model
    and sees every product, else the model itself with the matmuls torch.export's graph
    shows routed to quantized ones (`edgeport.quant.exported_matmuls`: `transformers`' BERT
    family, and timm's ViT and DeiT, whose attention torch.fx keeps as one
    scaled_dot_product_attention call); the model unchanged when it has none or can be
    captured by neither, the reason in the report. Where torch.export cannot capture a model
    whose fx graph calls SDPA, the fx graph's own matmuls are quantized and the report names
    the attention left float. `act_quantizer(name)` makes an operand quantizer for the matmul
    `name` and `probability_choices(name)` the candidates for its softmax output."""
    def quantized(name: str, softmax_left: bool) -> QuantMatMul:
        choices = probability_choices(name) if softmax_left else ()
        return QuantMatMul(choices[0] if choices else act_quantizer(name), act_quantizer(name), choices)

    try:
        graph_module, untraceable = torch.fx.symbolic_trace(model), ""
    except Exception as error:  # tracing runs arbitrary model code; any failure means "not traceable"
        graph_module = None
        first = str(error).splitlines()[0]
        reason = first if len(first) <= 120 else first[:120].rsplit(" ", 1)[0] + " ..."  # cut at a word
        untraceable = f"not traceable by torch.fx ({type(error).__name__}: {reason})"
    calls_sdpa = graph_module is not None and any(
        node.target is F.scaled_dot_product_attention for node in graph_module.graph.nodes)
    if graph_module is None or calls_sdpa:
        sites, why_not = exported_matmul_sites(model, args)
        if sites:
            route_matmuls(model, sites, lambda site: quantized(site.name, site.softmax_left))
            report.matmuls = [site.name for site in sites]
            return model
        if graph_module is None:
            report.matmuls_not_quantized = f"{untraceable}; {why_not or 'no activation x activation matmul'}"
            return model
    parameters = {n for n, _ in graph_module.named_parameters()} | {n for n, _ in graph_module.named_buffers()}
    counts: dict[str, int] = {}
    for node in list(graph_module.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target not in _MATMULS or len(node.args) != 2:
            continue
        if any(not isinstance(a, torch.fx.Node) or a.op == "get_attr" and a.target in parameters for a in node.args):
            continue
        scope = next(reversed(node.meta.get("nn_module_stack", {"": None})), "")
        counts[scope] = counts.get(scope, -1) + 1
        name = f"{scope}.matmul{counts[scope]}" if scope else f"matmul{counts[scope]}"
        left = node.args[0]
        softmax = left.op in ("call_function", "call_method") and left.target in _SOFTMAXES
        graph_module.add_submodule(name, quantized(name, softmax))
        with graph_module.graph.inserting_after(node):
            replacement = graph_module.graph.call_module(name, node.args)
        node.replace_all_uses_with(replacement)
        graph_module.graph.erase_node(node)
        report.matmuls.append(name)
    if calls_sdpa:  # torch.export could not capture the model: the fx graph's own matmuls only
        report.matmuls_not_quantized = f"scaled_dot_product_attention left float: {why_not or 'not captured'}"
    elif not report.matmuls:
        report.matmuls_not_quantized = "no activation x activation matmul"
    if not report.matmuls:
        return model
    graph_module.recompile()
    return graph_module


def _norm_fed(model: nn.Module, sample: tuple[torch.Tensor, ...]) -> tuple[dict[str, str], set[str]]:
    """Linear layers whose input is exactly a LayerNorm's output tensor (name -> norm name), and
    the norms whose output reaches nothing but those layers (pre-norm blocks; a post-norm block's
    residual also reads it).

    Exclusivity is read from autograd: each norm output gets a zero probe that requires grad
    added (same values, graph intact) and the fed Linears read it detached, so a probe that
    still gets a gradient from the model's outputs reaches them another way. The outputs are
    kept alive for the pass: comparing ids of freed tensors would match unrelated tensors
    that reuse their memory (it did, on MiniLM)."""
    norm_outputs: dict[nn.LayerNorm, torch.Tensor] = {}
    probes: dict[nn.LayerNorm, torch.Tensor] = {}
    versions: dict[nn.LayerNorm, int] = {}
    fed: dict[str, str] = {}
    names = {m: n for n, m in model.named_modules()}

    def probe(norm, args, out):
        probes[norm] = torch.zeros((), dtype=out.dtype, requires_grad=True)
        norm_outputs[norm] = out + probes[norm]
        versions[norm] = norm_outputs[norm]._version
        return norm_outputs[norm]

    def read(linear, args):
        # The same tensor changed in place since the norm made it (an inplace activation, as in
        # EfficientViT's head) is no longer the norm's output: folding into that norm would
        # move the affine in front of the activation.
        norm = next((n for n, out in norm_outputs.items() if args[0] is out and out._version == versions[n]), None)
        if norm is not None:
            fed[names[linear]] = names[norm]
            return (args[0].detach(),) + args[1:]

    hooks = [m.register_forward_hook(probe) if isinstance(m, nn.LayerNorm) else m.register_forward_pre_hook(read)
             for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.Linear))]
    try:
        with torch.enable_grad():
            outputs = [o for o in torch.utils._pytree.tree_leaves(model(*sample))
                       if isinstance(o, torch.Tensor) and o.requires_grad]
            norms = list(probes)
            if not (outputs and probes):  # nothing to read exclusivity from: assume shared, the safe side
                return fed, set()
            grads = torch.autograd.grad([o.float().sum() for o in outputs], [probes[n] for n in norms],
                                        allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    exclusive = {names[n] for n, g in zip(norms, grads)
                 if g is None and names[n] in fed.values() and n.elementwise_affine and n.bias is not None}
    return fed, exclusive


def _kept_float(name: str, layer: nn.Module, config: QuantConfig, conv_macs: dict[str, int]) -> str | None:
    """Why the layer at `name` is left float for ONNX Runtime's speed (the report's float-ops
    line), or None where it is quantized. Only an 8-bit conv under a config with conv forms
    (`QuantConfig.has_conv_forms`) is ever left float."""
    input_bits, weight_bits = config.layer_bits(name)
    if not (config.has_conv_forms and input_bits == weight_bits == 8 and isinstance(layer, nn.Conv2d)):
        return None
    # Measured per node on FastViT-T8 (64x64, 2 threads): ORT's integer depthwise 3x3 and
    # 7x7 convs 1.2-1.8x slower than its float NCHWc ones, grouped 7x7 with two outputs per
    # group 4-7x slower, while dense convs of 2 M multiply-adds and more were 1.5-2.6x
    # faster; dense 1x1 convs of 0.3-0.6 M gained 0-3 us, less than the 10-20 us of Q, DQ
    # and NCHW/NHWC transposes ORT puts around an integer island (float_convs_below_macs).
    if layer.groups > 1 and config.float_grouped_convs:
        return (f"grouped conv ({layer.groups} groups) kept float: ONNX Runtime's integer grouped and depthwise "
                f"kernels are slower than its float ones")
    if conv_macs.get(name, config.float_convs_below_macs) < config.float_convs_below_macs:
        return (f"small conv ({conv_macs[name] / 1e6:.2f} M multiply-adds per sample) kept float: its integer "
                f"kernel would save less than the quantize, dequantize and layout changes around it cost in "
                f"ONNX Runtime")
    return None


def _conv_macs(model: nn.Module, sample: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Each Conv2d's multiply-adds for one sample (name -> count), from one forward pass."""
    macs: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def record(conv, args, out):
        macs[names[conv]] = macs.get(names[conv], 0) + conv.weight[0].numel() * out[0].numel()

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(*sample)
    finally:
        for h in hooks:
            h.remove()
    return macs


DEGENERATE_SCALE = 1e-8  # UniformQuantizer's floor: a range that collapsed to a point


def _refuse_degenerate_ranges(qmodel: nn.Module) -> None:
    """Refuse a calibration under which a layer's input never varied (zero range): its
    quantizer would map every value to one code and the model would output biases only."""
    collapsed = [name for name, module in qmodel.named_modules() if isinstance(module, tuple(QUANTIZED_LAYERS.values()))
                 and module.act.fitted and float(module.act.scale.max()) <= DEGENERATE_SCALE]
    if collapsed:
        raise UserError(f"degenerate calibration: the input of {', '.join(collapsed[:3])}"
                        f"{f' and {len(collapsed) - 3} more' if len(collapsed) > 3 else ''} has zero range over the "
                        f"calibration data; calibrate on real samples")


def _calibration_args(model: nn.Module, calib) -> tuple[torch.Tensor, ...]:
    """The calibration batch as model arguments (a tensor, or a tuple such as token ids and
    attention mask), checked: not empty, finite, accepted by the model."""
    args = calib if isinstance(calib, tuple) else (calib,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise UserError(f"calibration data must be a tensor (or a tuple of tensors), not {type(calib).__name__}")
    if any(a.numel() == 0 or a.shape[0] == 0 for a in args):
        raise UserError("the calibration set is empty")
    if any(a.is_floating_point() and not torch.isfinite(a).all() for a in args):
        raise UserError("the calibration set contains NaN or Inf values")
    try:  # the whole batch: slicing one sample off axis 0 breaks inputs whose batch is elsewhere (LSTM state)
        with torch.no_grad():
            model(*args)
    except Exception as error:
        shapes = ", ".join(f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}" for a in args)
        raise UserError(f"the model does not accept calibration data of shape {shapes}: "
                        f"{str(error).splitlines()[0][:160]}") from error
    constant = next((a for a in args if a.is_floating_point() and bool((a == a.flatten()[0]).all())), None)
    if constant is not None:
        raise UserError(f"degenerate calibration: every value of the calibration data is "
                        f"{float(constant.flatten()[0]):g}; quantization ranges fitted on it mean nothing, "
                        f"calibrate on real samples")
    return args


def quantize(model: nn.Module, calib: torch.Tensor | tuple[torch.Tensor, ...], config: QuantConfig
             ) -> tuple[nn.Module, QuantReport]:
    """A fake-quantized copy of `model` calibrated on `calib` (a batch of real samples, or a
    tuple of them for a model of several inputs), quantized as `config` says, and the report
    of what was done. The model itself is left as it was; UserError for calibration data the
    model does not accept and for a model with no layer to quantize."""
    args = _calibration_args(model, calib)
    qmodel = copy.deepcopy(model).eval()
    report = QuantReport(config.name, config.w_bits, config.a_bits, config.target,
                         calibration_samples=int(args[0].shape[0]), activation_calibration=config.act_observer)
    if config.rotate_values:
        report.rotated = rotate_values(qmodel, args)
    if config.rotate_inputs:  # after the values: their rotation folds into the projections it wraps
        report.rotated += rotate_inputs(qmodel, args, online_rotation_paths(qmodel, tuple(a[:1] for a in args)))
    _merge_branches(qmodel, report)
    _fold_into_layers(qmodel, tuple(a[:1] for a in args), report)
    conv_macs = _conv_macs(qmodel, tuple(a[:1] for a in args))
    fed, exclusive = _norm_fed(qmodel, tuple(a[:1] for a in args)) if config.norm_reparam else ({}, set())
    after_gelu = gelu_fed(qmodel, tuple(a[:1] for a in args)) if config.adalog else set()
    act_observer, weight_observer = observer(config.act_observer), observer(config.weight_calibration)

    def act_quantizer(bits: int, per_channel: bool = False) -> UniformQuantizer:
        quantizer = UniformQuantizer(bits, symmetric=config.symmetric and not per_channel,
                                     axis=-1 if per_channel else None)
        quantizer.observer = act_observer
        return quantizer

    def weight_quantizer(weight: torch.Tensor, bits: int) -> UniformQuantizer:
        quantizer = UniformQuantizer(bits, symmetric=True, axis=config.weight_axis)
        quantizer.set_range(*weight_observer(weight.detach(), quantizer))
        return quantizer

    def probability_choices(name: str) -> tuple[nn.Module, ...]:
        # A log quantizer runs as float ops in every runtime: a candidate only where the config
        # lets the calibration error choose, and below 8 bits, where a 256-level uniform grid
        # is already close and keeps the integer kernel (MobileViT-XS at W8A8: log-sqrt2 was
        # chosen, its float ops cost 0.3 ms of 2.3, 0.88x fp32 speed against 0.98x without)
        bits = config.matmul_bits_of(name)
        log = AdaLogQuantizer(bits) if config.adalog else LogSqrt2Quantizer(bits)
        return (act_quantizer(bits),) + ((log,) if config.choose_softmax_quantizer and bits < 8 else ())

    # each Linear's float output as this copy computes it, rotated and folded, is what the ridge
    # regression fits; the original's would undo a rotation or fold (erq with rotated values on
    # DeiT-Ti: held-out cosine 0.79)
    float_targets = copy.deepcopy(qmodel) if config.compensate_weights and config.weight_ridge is not None else model
    qmodel = _quantize_matmuls(qmodel, tuple(a[:1] for a in args), lambda name: act_quantizer(config.matmul_bits_of(name)),
                               probability_choices, report)
    for name, module in list(qmodel.named_modules()):
        wrapper = next((w for kind, w in QUANTIZED_LAYERS.items() if isinstance(module, kind)), None)
        if wrapper is None or any(name.startswith(f"{n}.") for n in report.layers):
            continue
        reason = _kept_float(name, module, config, conv_macs)
        if reason:
            report.convs_kept_float.append(name)
            report.float_ops.append(f"{name}: {reason}")
            continue
        input_bits, weight_bits = config.layer_bits(name)
        wrapped = wrapper(module, act_quantizer(input_bits, per_channel=name in fed),
                          weight_quantizer(module.weight, weight_bits))
        _replace(qmodel, name, wrapped)
        report.layers.append(name)
    for module in qmodel.modules():
        # DQ -> Conv -> Q is the pattern ONNX Runtime runs as QLinearConv; without the Q after
        # it, the conv stays float and dequantizes its weights on every call (slower than fp32
        # on every conv-heavy timm model). Only at 8 bits: narrower convs run in float anyway.
        if isinstance(module, QuantConv2d) and module.act.bits == module.wq.bits == 8:
            module.out = act_quantizer(8)
    if not report.layers and report.float_ops:
        raise EverythingLeftFloat(f"every layer of the model was left float ({report.float_ops[0]}); nothing is "
                                  f"left to quantize: lower float_convs_below_macs or quantize for the tensorrt target")
    if not report.layers:
        raise UserError(f"the model has no {' or '.join(kind.__name__ for kind in QUANTIZED_LAYERS)} layer to quantize")
    unknown = sorted(set(config.keep_8bit) - {*report.layers, *report.matmuls, *report.convs_kept_float})
    if unknown:
        raise UserError(f"keep_8bit names {unknown}, which match no quantized layer or matmul of the model (such as "
                        f"{', '.join((report.layers + report.matmuls)[:3])})")
    if config.live_rows:  # before the first-input hooks: the probe pass must not run them
        mark_live_rows(qmodel, args)
    # AdaLog's hooks first: a layer that keeps its uniform quantizer can still migrate outliers
    first_input_hooks = [module.register_forward_pre_hook(lambda layer, inputs: choose_input_quantizer(layer, inputs[0]))
                         for name, module in qmodel.named_modules() if name in after_gelu and isinstance(module, QuantLinear)]
    first_input_hooks += [module.register_forward_pre_hook(
        lambda layer, inputs, name=name: _migrate_outliers(name, layer, inputs[0], weight_quantizer, report))
        for name, module in qmodel.named_modules() if config.migrate_outliers and isinstance(module, QuantLinear)
        and module.act.axis is None and module.pre_scale is None]
    first_input_hooks += [module.register_forward_pre_hook(
        lambda layer, inputs, name=name: _check_reparam_held_out(name, layer, inputs[0], act_quantizer,
                                                                 config.symmetric, weight_quantizer, report))
        for name, module in qmodel.named_modules() if config.check_reparam_held_out and isinstance(module, QuantLinear)
        and module.act.axis is not None]
    first_input_hooks += [module.register_forward_pre_hook(
        lambda layer, inputs, name=name: _choose_reparam_strength(name, layer, inputs[0], act_quantizer,
                                                                  config.symmetric, weight_quantizer, report))
        for name, module in qmodel.named_modules() if config.partial_reparam and isinstance(module, QuantLinear)
        and module.act.axis is not None]
    log.debug("calibrating %d layers and %d activation matmuls on %d samples", len(report.layers),
              len(report.matmuls), report.calibration_samples)
    with torch.no_grad():
        qmodel(*args)  # pass 1: sequential, lazy fitting in forward order
    for hook in first_input_hooks:
        hook.remove()
    _choose_probability_quantizers(qmodel, model, args)
    _refuse_degenerate_ranges(qmodel)
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantLinear) and module.act.axis is not None:
            _reparameterize(name, module, config.symmetric, report, weight_quantizer)
        elif isinstance(module, QuantMatMul) and isinstance(module.left, (LogSqrt2Quantizer, AdaLogQuantizer)):
            kind = "AdaLog" if isinstance(module.left, AdaLogQuantizer) else "log-sqrt2"
            report.float_ops.append(f"{name}: {kind} softmax quantizer (float ops; no runtime has it as an "
                                    f"integer kernel)")
        elif isinstance(module, QuantLinear) and isinstance(module.act, AdaLogQuantizer):
            report.float_ops.append(f"{name}: AdaLog input quantizer (float ops; the layer runs as a float "
                                    f"MatMul with dequantized weights)")
    if config.fold_norm_affine:
        for norm in exclusive:
            _fold_into_norm(qmodel.get_submodule(norm),
                            [qmodel.get_submodule(name) for name, n in fed.items() if n == norm])
    if config.compensate_weights:
        log.debug("compensating the weights for their quantized inputs (%s)",
                  "ridge regression, then error-feedback rounding" if config.weight_ridge is not None
                  else "error-feedback rounding")
        report.compensated = compensate(qmodel, float_targets, args, QuantLinear, weight_quantizer, config.weight_ridge,
                                        config.damping)
    if config.recon_iters:
        report.reconstructed = reconstruct(qmodel, args, tuple(QUANTIZED_LAYERS.values()), config.recon_iters)
    return qmodel, report


# candidate thresholds for outlier channels: the quantiles of the per-channel maxima above which
# a channel is scaled down to the threshold (none: no migration, also a candidate)
OUTLIER_QUANTILES = (0.99, 0.995, 0.999)
OUTLIER_SAMPLE_ROWS = 256
# a migration's Mul in front of the quantizer costs run time: taken only where it at least
# halves the layer's output error (MiniLM's post-GELU inputs: to 0.15-0.49 of it; the ViT-S
# stack's layers 0.67-0.92, where 13 Muls cost more than they bought)
OUTLIER_MIN_ERROR_RATIO = 0.5


def _migrate_outliers(name: str, layer: QuantLinear, x: torch.Tensor,
                      weight_quantizer: Callable[[torch.Tensor, int], UniformQuantizer], report: QuantReport) -> None:
    """Scale the few input channels whose range dwarfs the rest (MiniLM's post-GELU FFN input:
    one channel to 24.6 where the 99th percentile of channel maxima is about 4) down to a
    threshold, x' = x / s, the weight's columns up by s (W' = W diag(s)), so one per-tensor
    scale no longer spends its levels on them: SmoothQuant's migration for outliers only.
    The division stays a Mul in front of the quantizer (after a GELU nothing can absorb it).
    Each threshold of OUTLIER_QUANTILES is tried on the calibration batch `x`, and the
    smallest mean squared error of the layer's output against its float output on `x`
    chooses, where it is at most OUTLIER_MIN_ERROR_RATIO of the error without migration; called on the layer's first calibration input, before its input quantizer
    fits. The candidates are compared on at most OUTLIER_SAMPLE_ROWS positions of `x` (each
    comparison fits a quantizer: on all of MiniLM's 1024 calibration tokens this step took
    most of the calibration time)."""
    if layer.act.fitted:
        return
    rows = calibration_rows(layer.act, x.detach()).flatten(0, -2)
    x = rows[::-(-len(rows) // OUTLIER_SAMPLE_ROWS)]
    weight, bias, bits = layer.inner.weight.detach(), layer.inner.bias, layer.wq.bits
    reference = F.linear(x, weight, bias)
    channel_max = rows.abs().amax(0).double()

    def error(scale: torch.Tensor | None) -> float:
        inputs, scaled = (x, weight) if scale is None else (x / scale.float(), (weight.double() * scale).float())
        act = copy.deepcopy(layer.act)
        act.fit(inputs)
        return float(((F.linear(act(inputs), weight_quantizer(scaled, bits)(scaled), bias) - reference) ** 2).mean())

    candidates = [(channel_max / channel_max.quantile(q)).clamp(min=1) for q in OUTLIER_QUANTILES]
    errors = [error(None)] + [error(scale) for scale in candidates]
    best = errors.index(min(errors))
    if best == 0 or errors[best] > OUTLIER_MIN_ERROR_RATIO * errors[0]:
        return
    scale = candidates[best - 1]
    with torch.no_grad():
        layer.inner.weight.copy_((weight.double() * scale).float())
    layer.wq = weight_quantizer(layer.inner.weight, bits)
    layer.pre_scale = (1 / scale).float()
    report.outlier_migrations.append(f"{name}: {int((scale > 1).sum())} channels above the "
                                     f"{OUTLIER_QUANTILES[best - 1]:g} quantile of channel maxima")


def _check_reparam_held_out(name: str, layer: QuantLinear, x: torch.Tensor,
                            act_quantizer: Callable[[int, bool], UniformQuantizer], symmetric: bool,
                            weight_quantizer: Callable[[torch.Tensor, int], UniformQuantizer],
                            report: QuantReport) -> None:
    """Keep the layer's per-channel (reparameterized) input quantizer only where it beats a
    per-tensor one on samples it was not fitted to: both are fitted on the first half of the
    calibration batch `x` (split by sample) and the layer's output error against float is
    compared on the second half. Per-channel ranges fitted to few tokens clip what they never
    saw: on Swin-T at 64x64 (4 tokens per image in the last stage, 8 images) held-out cosine
    fell to 0.980 against 0.9995 on the calibration images. Called on the layer's first calibration input,
    before its quantizer fits; a batch of one sample cannot be split and keeps per-channel."""
    if layer.act.fitted or len(x) < 2:
        return
    fit, held = x.detach()[: len(x) // 2], x.detach()[len(x) // 2:]
    errors = []
    # as in _choose_reparam_strength: a matmul router may be active around this call
    with torch._C.DisableTorchFunction():
        reference = F.linear(held, layer.inner.weight, layer.inner.bias)
        for per_channel in (True, False):
            candidate = copy.deepcopy(layer)
            candidate.act = act_quantizer(layer.act.bits, per_channel)
            candidate.act.fit(fit)
            if per_channel:
                # a trial on a copy: its report is thrown away
                _reparameterize(name, candidate, symmetric, QuantReport("", 0, 0, ""), weight_quantizer)
            with torch.no_grad():
                errors.append(float(((candidate.forward(held) - reference) ** 2).mean()))  # not its copied hooks
    if errors[1] < errors[0]:
        layer.act = act_quantizer(layer.act.bits, False)
        report.reparam_declined.append(f"{name}: per-tensor input error {errors[1]:.3g} below per-channel "
                                       f"{errors[0]:.3g} on held-out calibration samples")


# the share of RepQ's per-channel scale moved into the weight (1: all of it, RepQ; the rest stays in
# the per-tensor input's range): on MiniLM's FFN input at W4 the full move made the folded weight's
# output error 3-5x the unfolded one's (channel ratios up to 10 landing in the weight's columns)
REPARAM_STRENGTHS = (1.0, 0.75, 0.5)


def _choose_reparam_strength(name: str, layer: QuantLinear, x: torch.Tensor,
                             act_quantizer: Callable[[int, bool], UniformQuantizer], symmetric: bool,
                             weight_quantizer: Callable[[torch.Tensor, int], UniformQuantizer],
                             report: QuantReport) -> None:
    """Move a share a of the per-channel input scales r (RepQ's, from the layer's per-channel
    quantizer fitted on `x`) into the weight, x' = x / r^a, W' = W diag(r^a), with a
    per-tensor input quantizer on x': for each strength of REPARAM_STRENGTHS the layer's
    output error against float on `x` (its live rows), both quantizers in place, and the
    smallest chooses. At a = 1 this is RepQ's exact reparameterization (left to the pipeline);
    below it, the channels' ranges still differ by r^(1 - a), which costs the input grid less
    than r costs a 4-bit weight grid. Called on the layer's first calibration input, before
    its quantizer fits; the fold is exact (the scale stays an elementwise Mul in front of the
    quantizer where no norm can absorb it)."""
    if layer.act.fitted:
        return
    # this runs inside the forward of the module that calls the layer, where a matmul router
    # (`exported_matmuls`) may be sending every matmul to a quantized one: not the fold's algebra
    with torch._C.DisableTorchFunction():
        rows = calibration_rows(layer.act, x.detach()).flatten(0, -2)
        reference = F.linear(rows, layer.inner.weight, layer.inner.bias)
        per_channel = copy.deepcopy(layer.act)
        per_channel.fit(rows)
        r = fold_targets(per_channel.scale, per_channel.zero_point)[0]
        candidates = []
        for strength in REPARAM_STRENGTHS:
            candidate = copy.deepcopy(layer)
            if strength == 1.0:
                candidate.act = per_channel
                _reparameterize(name, candidate, symmetric, QuantReport("", 0, 0, ""), weight_quantizer)
            else:
                _partial_fold(candidate, r ** strength, act_quantizer(layer.act.bits, False), weight_quantizer)
            with torch.no_grad():
                candidates.append(float(((candidate.forward(rows) - reference) ** 2).mean()))  # not its copied hooks
        strength = REPARAM_STRENGTHS[candidates.index(min(candidates))]
        if strength != 1.0:
            _partial_fold(layer, r ** strength, act_quantizer(layer.act.bits, False), weight_quantizer)
            report.reparameterized.append(f"{name} (strength {strength:g}: output error {min(candidates):.3g}, "
                                          f"{candidates[0]:.3g} at {REPARAM_STRENGTHS[0]:g})")


def _partial_fold(layer: QuantLinear, scale: torch.Tensor, act: UniformQuantizer,
                  weight_quantizer: Callable[[torch.Tensor, int], UniformQuantizer]) -> None:
    """x' = x / scale into a per-tensor input quantizer `act` (fitted on x' when it first sees
    it), W' = W diag(scale), the weight quantizer refitted."""
    act.live = getattr(layer.act, "live", None)
    fold_into_linear(layer.inner, scale, torch.zeros_like(scale))
    layer.pre_scale, layer.act = (1 / scale).float(), act
    layer.wq = weight_quantizer(layer.inner.weight, layer.wq.bits)


def _fold_into_norm(norm: nn.LayerNorm, layers: list[QuantLinear]) -> None:
    """Move the layers' shared input affine into the norm's own (gamma/r, beta/r - b) when the
    norm feeds nothing else: one elementwise affine fewer at run time, same function up to
    float32 rounding."""
    scale, shift = layers[0].pre_scale, layers[0].pre_shift
    if any(l.pre_scale is None or l.pre_shift is None for l in layers):  # one of them left per tensor
        return
    if any(not (torch.equal(l.pre_scale, scale) and torch.equal(l.pre_shift, shift)) for l in layers):
        return
    norm.weight.data.copy_((norm.weight.double() * scale.double()).float())
    norm.bias.data.copy_((norm.bias.double() * scale.double() + shift.double()).float())
    for layer in layers:
        layer.pre_scale = layer.pre_shift = None


def _reparameterize(name: str, layer: QuantLinear, symmetric: bool, report: QuantReport,
                    weight_quantizer: Callable[[torch.Tensor, int], UniformQuantizer]) -> None:
    """Per-channel input quantizer -> per-tensor, folded into the layer (exact codes); the
    weight quantizer is refitted (`weight_quantizer(weight, bits)`) on the folded weight."""
    act = layer.act
    bits = act.bits
    r, b, target_scale, target_zero = fold_targets(act.scale, act.zero_point,
                                                   symmetric_zero=2 ** (bits - 1) if symmetric else None)
    fold_into_linear(layer.inner, r, b)
    layer.pre_scale = (1 / r).float()
    layer.pre_shift = (-b).float()
    tensor = UniformQuantizer(bits, symmetric=symmetric, axis=None)
    if symmetric:  # unsigned codes around 2^(b-1) are signed codes around 0: same grid
        tensor.scale, tensor.zero_point = torch.tensor(target_scale), torch.tensor(0, dtype=torch.int32)
        tensor.qmin, tensor.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        tensor.scale, tensor.zero_point = torch.tensor(target_scale), torch.tensor(target_zero, dtype=torch.int32)
    tensor.scale = tensor.scale.float()
    tensor.fitted, tensor.live = True, getattr(act, "live", None)
    layer.act = tensor
    layer.wq = weight_quantizer(layer.inner.weight, layer.wq.bits)  # refitted on W' = W diag(r)
    report.reparameterized.append(name)


def precision_label(model: nn.Module) -> str:
    """"fp32", or "w<bits>a<bits>" for a model from `quantize`: its narrowest weights, and its
    narrowest activations (layer inputs and matmul operands)."""
    params = [m.qparams() for m in model.modules() if isinstance(m, QUANTIZED_MODULES)]
    weights = [p.weight.bits for p in params if isinstance(p, LayerQParams)]
    acts = [bits for p in params for bits in ((p.input.bits,) if isinstance(p, LayerQParams)
                                              else (p.left.bits, p.right.bits))]
    return f"w{min(weights)}a{min(acts)}" if weights and acts else "fp32"
