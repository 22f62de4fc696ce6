"""The PTQ pipeline: prepare -> calibrate -> reparameterize -> finalize.

`quantize(model, calib, method, w_bits, a_bits)` returns a copy of the model whose Linear and
Conv2d layers fake-quantize their input (per tensor) and their weights (per output channel,
symmetric). Presets:

- `minmax`: activation ranges from min and max (the per-tensor baseline);
- `percentile`: activation ranges from the 0.01 / 99.99 percentiles;
- `repq`: activation ranges chosen by MSE among min-max and percentiles (weights: min-max
  at 8 bits, MSE below); inputs that come straight
  from a LayerNorm are calibrated per channel and reparameterized to per tensor (RepQ-ViT),
  the scale and shift folded into the consumer and, where the norm feeds nothing else, into
  the norm's affine (otherwise, as in post-norm BERT, an elementwise affine stays in front of
  the quantizer: exactly the per-channel codes).

Calibration is sequential: each quantizer is fitted on the first batch it sees, with every
layer upstream already quantized. Conv-BatchNorm pairs are folded first.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgeport.errors import UserError
from edgeport.quant.calibrate import observer
from edgeport.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer, check_bits
from edgeport.quant.reparam import fold_batchnorm, fold_into_linear, fold_targets

# method -> (activation observer, weight observer); "auto" weights: min-max at 8 bits, where a
# 256-level grid loses more to clipping than to rounding, MSE below. Measured on MiniLM
# W8A8: MSE for the weights gave cosine 0.990 (0.989 for the refitted folded layers alone),
# min-max 0.9945.
PRESETS = {"minmax": ("minmax", "minmax"), "percentile": ("percentile", "minmax"), "repq": ("mse", "auto")}
METHODS = tuple(PRESETS)
TARGETS = ("onnxruntime", "tensorrt")


class QuantLinear(nn.Module):
    """A Linear whose input and weight are fake-quantized; `pre_scale`/`pre_shift` hold a
    folded reparameterization (x' = x * pre_scale + pre_shift before the input quantizer)."""

    def __init__(self, linear: nn.Linear, act: UniformQuantizer, weight: UniformQuantizer):
        super().__init__()
        self.inner, self.act, self.wq = linear, act, weight
        self.register_buffer("pre_scale", None)
        self.register_buffer("pre_shift", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_scale is not None:
            x = x * self.pre_scale + self.pre_shift
        y = F.linear(self.act(x), self.wq(self.inner.weight))
        if self.inner.bias is None:
            return y
        # The bias is added at full rank: in the QDQ form ONNX Runtime fuses MatMul with a 1-D
        # bias Add into a float Gemm before its QDQ pass runs, which then leaves DQ -> Gemm in
        # float. With an Add it cannot fuse, DQ -> MatMul becomes an integer kernel.
        return y + self.inner.bias.reshape([1] * (y.ndim - 1) + [-1])


class QuantConv2d(nn.Module):
    """A Conv2d whose input (per tensor) and weight (per output channel) are fake-quantized."""

    def __init__(self, conv: nn.Conv2d, act: UniformQuantizer, weight: UniformQuantizer):
        super().__init__()
        self.inner, self.act, self.wq = conv, act, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.inner
        return F.conv2d(self.act(x), self.wq(c.weight), c.bias, c.stride, c.padding, c.dilation, c.groups)


class QuantMatMul(nn.Module):
    """An activation x activation matmul (attention scores, attention-weighted values) with
    both operands fake-quantized per tensor.

    A left operand that is a softmax output brings candidate probability quantizers
    (`left_choices`: uniform, log-sqrt2), each fitted on the first calibration batch; the
    pipeline then keeps the one that gives the smaller error at the model's output."""

    def __init__(self, left: nn.Module, right: UniformQuantizer, left_choices: tuple[nn.Module, ...] = ()):
        super().__init__()
        self.left, self.right = left, right
        self.left_choices = left_choices

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        for candidate in self.left_choices:
            if not candidate.fitted:
                candidate.fit(a)
        return torch.matmul(self.left(a), self.right(b))


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

        reference, errors = flat(model(*args)), []
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
    """What the pipeline did: layers quantized, Conv-BN folds, layers reparameterized,
    activation matmuls quantized (and which run as float ops), why matmuls stayed float, and
    the activation calibration used."""

    method: str
    w_bits: int
    a_bits: int
    target: str
    layers: list[str] = field(default_factory=list)
    batchnorm_folds: list[str] = field(default_factory=list)
    reparameterized: list[str] = field(default_factory=list)
    matmuls: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    matmuls_not_quantized: str = ""
    calibration_samples: int = 0
    activation_calibration: str = ""


def _fold_batchnorms(model: nn.Module, report: QuantReport) -> None:
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq._modules.items())
        for (k1, conv), (k2, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[k1] = fold_batchnorm(conv, bn)
                seq._modules[k2] = nn.Identity()
                report.batchnorm_folds.append(f"{name}.{k1}" if name else k1)


_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_SOFTMAXES = {torch.softmax, F.softmax, torch.Tensor.softmax, "softmax"}


def _quantize_matmuls(model: nn.Module, act_quantizer, probability_choices, report: QuantReport) -> nn.Module:
    """The model as a torch.fx graph whose activation x activation matmuls are `QuantMatMul`s
    (found in the graph, not by module names); the model unchanged when it has none or cannot
    be traced, the reason in the report. `act_quantizer()` makes an operand quantizer and
    `probability_choices()` the candidates for a softmax output."""
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as error:  # tracing runs arbitrary model code; any failure means "not traceable"
        report.matmuls_not_quantized = f"not traceable by torch.fx ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
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
        choices = probability_choices() if softmax else ()
        graph_module.add_submodule(name, QuantMatMul(choices[0] if choices else act_quantizer(), act_quantizer(),
                                                     choices))
        with graph_module.graph.inserting_after(node):
            replacement = graph_module.graph.call_module(name, node.args)
        node.replace_all_uses_with(replacement)
        graph_module.graph.erase_node(node)
        report.matmuls.append(name)
    if not report.matmuls:
        report.matmuls_not_quantized = "no activation x activation matmul"
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
    fed: dict[str, str] = {}
    names = {m: n for n, m in model.named_modules()}

    def probe(norm, args, out):
        probes[norm] = torch.zeros((), dtype=out.dtype, requires_grad=True)
        norm_outputs[norm] = out + probes[norm]
        return norm_outputs[norm]

    def read(linear, args):
        norm = next((n for n, out in norm_outputs.items() if args[0] is out), None)
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
    try:
        with torch.no_grad():
            model(*(a[:1] for a in args))
    except Exception as error:
        shapes = ", ".join(f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}" for a in args)
        raise UserError(f"the model does not accept calibration data of shape {shapes}: "
                        f"{str(error).splitlines()[0][:160]}") from error
    return args


def quantize(model: nn.Module, calib: torch.Tensor | tuple[torch.Tensor, ...], method: str = "repq", w_bits: int = 8,
             a_bits: int = 8, target: str = "onnxruntime", keep_8bit: tuple[str, ...] = (),
             act_observer: str | None = None, weight_observer: str | None = None) -> tuple[nn.Module, QuantReport]:
    """A fake-quantized copy of `model` calibrated on `calib` (a batch of real samples), and
    its report. `target="tensorrt"` makes every quantizer symmetric (zero point 0); layers
    named in `keep_8bit` (e.g. the first and last) stay at 8 bits. `act_observer` and
    `weight_observer` ("minmax", "percentile", "mse") override the preset's choice."""
    if method not in METHODS:
        raise UserError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if target not in TARGETS:
        raise UserError(f"unknown quantization target {target!r}; choose one of {', '.join(TARGETS)}")
    check_bits(w_bits), check_bits(a_bits)
    args = _calibration_args(model, calib)
    qmodel = copy.deepcopy(model).eval()
    report = QuantReport(method, w_bits, a_bits, target, calibration_samples=int(args[0].shape[0]),
                         activation_calibration=act_observer or PRESETS[method][0])
    _fold_batchnorms(qmodel, report)
    fed, exclusive = _norm_fed(qmodel, tuple(a[:1] for a in args)) if method == "repq" else ({}, set())
    act_observer = observer(report.activation_calibration)
    weight_choice = weight_observer or PRESETS[method][1]
    weight_fit = observer(("minmax" if w_bits >= 8 else "mse") if weight_choice == "auto" else weight_choice)
    symmetric = target == "tensorrt"

    def act_quantizer(bits: int = a_bits, per_channel: bool = False) -> UniformQuantizer:
        quantizer = UniformQuantizer(bits, symmetric=symmetric and not per_channel, axis=-1 if per_channel else None)
        quantizer.observer = act_observer
        return quantizer

    def probability_choices() -> tuple[nn.Module, ...]:
        # Log-sqrt2 runs as float ops in every runtime; it is a candidate only where the
        # method calibrates by error (repq) — the baselines keep the plain uniform grid.
        return (act_quantizer(),) + ((LogSqrt2Quantizer(a_bits),) if method == "repq" else ())

    qmodel = _quantize_matmuls(qmodel, act_quantizer, probability_choices, report)
    for name, module in list(qmodel.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or any(name.startswith(f"{n}.") for n in report.layers):
            continue
        bits_a, bits_w = (8, 8) if name in keep_8bit else (a_bits, w_bits)
        act = act_quantizer(bits_a, per_channel=name in fed)
        weight = UniformQuantizer(bits_w, symmetric=True, axis=0)
        weight.set_range(*weight_fit(module.weight.detach(), weight))
        wrapped = (QuantLinear if isinstance(module, nn.Linear) else QuantConv2d)(module, act, weight)
        parent, _, leaf = name.rpartition(".")
        setattr(qmodel.get_submodule(parent) if parent else qmodel, leaf, wrapped)
        report.layers.append(name)
    if not report.layers:
        raise UserError("the model has no Linear or Conv2d layer to quantize")
    with torch.no_grad():
        qmodel(*args)  # pass 1: sequential, lazy fitting in forward order
        _choose_probability_quantizers(qmodel, model, args)
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantLinear) and module.act.axis is not None:
            _reparameterize(name, module, symmetric, report, weight_fit)
        elif isinstance(module, QuantMatMul) and isinstance(module.left, LogSqrt2Quantizer):
            report.float_ops.append(f"{name}: log-sqrt2 softmax quantizer (float ops; no runtime has it as an "
                                    f"integer kernel)")
    for norm in exclusive:
        _fold_into_norm(qmodel.get_submodule(norm), [qmodel.get_submodule(name) for name, n in fed.items() if n == norm])
    return qmodel, report


def _fold_into_norm(norm: nn.LayerNorm, layers: list[QuantLinear]) -> None:
    """Move the layers' shared input affine into the norm's own (gamma/r, beta/r - b) when the
    norm feeds nothing else: one elementwise affine fewer at run time, same function up to
    float32 rounding."""
    scale, shift = layers[0].pre_scale, layers[0].pre_shift
    if any(not (torch.equal(l.pre_scale, scale) and torch.equal(l.pre_shift, shift)) for l in layers):
        return
    norm.weight.data.copy_((norm.weight.double() * scale.double()).float())
    norm.bias.data.copy_((norm.bias.double() * scale.double() + shift.double()).float())
    for layer in layers:
        layer.pre_scale = layer.pre_shift = None


def _reparameterize(name: str, layer: QuantLinear, symmetric: bool, report: QuantReport, weight_fit) -> None:
    """Per-channel input quantizer -> per-tensor, folded into the layer (exact codes)."""
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
    tensor.fitted = True
    layer.act = tensor
    weight = UniformQuantizer(layer.wq.bits, symmetric=True, axis=0)
    weight.set_range(*weight_fit(layer.inner.weight.detach(), weight))  # refitted on W' = W diag(r)
    layer.wq = weight
    report.reparameterized.append(name)


def precision_label(model: nn.Module) -> str:
    """"fp32", or "w<bits>a<bits>" for a model from `quantize` (its narrowest layer)."""
    weights = [m.wq.bits for m in model.modules() if isinstance(getattr(m, "wq", None), UniformQuantizer)]
    acts = [m.act.bits for m in model.modules() if isinstance(getattr(m, "act", None), UniformQuantizer)]
    return f"w{min(weights)}a{min(acts)}" if weights and acts else "fp32"
