"""The PTQ pipeline: prepare -> calibrate -> reparameterize -> finalize.

`quantize(model, calib, method, w_bits, a_bits)` returns a copy of the model whose Linear and
Conv2d layers fake-quantize their input (per tensor) and their weights (per output channel,
symmetric). Presets:

- `minmax`: activation ranges from min and max (the per-tensor baseline);
- `percentile`: activation ranges from the 0.01 / 99.99 percentiles;
- `repq`: activation ranges chosen by MSE among min-max and percentiles (weights: min-max
  at 8 bits, MSE below); inputs that come straight
  from a LayerNorm are calibrated per channel and reparameterized to per tensor (RepQ-ViT),
  the scale and shift folded into the consumer (an elementwise affine stays in front of the
  quantizer, exactly the per-channel codes).

Calibration is sequential: each quantizer is fitted on the first batch it sees, with every
layer upstream already quantized. Conv-BatchNorm pairs are folded first.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgeport.errors import UserError
from edgeport.quant.calibrate import observer
from edgeport.quant.quantizers import UniformQuantizer, check_bits
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
        return F.linear(self.act(x), self.wq(self.inner.weight), self.inner.bias)


class QuantConv2d(nn.Module):
    """A Conv2d whose input (per tensor) and weight (per output channel) are fake-quantized."""

    def __init__(self, conv: nn.Conv2d, act: UniformQuantizer, weight: UniformQuantizer):
        super().__init__()
        self.inner, self.act, self.wq = conv, act, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.inner
        return F.conv2d(self.act(x), self.wq(c.weight), c.bias, c.stride, c.padding, c.dilation, c.groups)


@dataclass
class QuantReport:
    """What the pipeline did: layers quantized, Conv-BN folds, layers reparameterized."""

    method: str
    w_bits: int
    a_bits: int
    target: str
    layers: list[str] = field(default_factory=list)
    batchnorm_folds: list[str] = field(default_factory=list)
    reparameterized: list[str] = field(default_factory=list)
    calibration_samples: int = 0


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


def _norm_fed(model: nn.Module, sample: tuple[torch.Tensor, ...]) -> set[str]:
    """Names of Linear layers whose input is exactly a LayerNorm's output tensor.

    The outputs are kept alive for the pass: comparing ids of freed tensors would match
    unrelated tensors that reuse their memory (it did, on MiniLM, one run in three)."""
    norm_outputs: list[torch.Tensor] = []
    fed: set[str] = set()
    names = {m: n for n, m in model.named_modules()}
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            hooks.append(m.register_forward_hook(lambda mod, a, out: norm_outputs.append(out)))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, a: fed.add(names[mod]) if any(a[0] is out for out in norm_outputs) else None))
    try:
        with torch.no_grad():
            model(*sample)
    finally:
        for h in hooks:
            h.remove()
    return fed


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
    report = QuantReport(method, w_bits, a_bits, target, calibration_samples=int(args[0].shape[0]))
    _fold_batchnorms(qmodel, report)
    fed = _norm_fed(qmodel, tuple(a[:1] for a in args)) if method == "repq" else set()
    act_observer = observer(act_observer or PRESETS[method][0])
    weight_choice = weight_observer or PRESETS[method][1]
    weight_fit = observer(("minmax" if w_bits >= 8 else "mse") if weight_choice == "auto" else weight_choice)
    symmetric = target == "tensorrt"
    for name, module in list(qmodel.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or any(name.startswith(f"{n}.") for n in report.layers):
            continue
        bits_a, bits_w = (8, 8) if name in keep_8bit else (a_bits, w_bits)
        per_channel = name in fed
        act = UniformQuantizer(bits_a, symmetric=symmetric and not per_channel, axis=-1 if per_channel else None)
        act.observer = act_observer
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
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantLinear) and module.act.axis is not None:
            _reparameterize(name, module, symmetric, report, weight_fit)
    return qmodel, report


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
