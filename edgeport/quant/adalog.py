"""AdaLog: a logarithmic quantizer whose base is searched per tensor (Wu et al., ECCV 2024),
for attention probabilities and for the input of the Linear after a GELU.

A code c stands for scale * base^(-c) - shift with log2(base) = q / R: the base is chosen
by the integer q, not fixed at sqrt2 (log-sqrt2 is q / R = 1/2). Its inference form needs no
power of a real base: c * q = R * whole + frac splits the value into a power of two (a shift)
and one of R fractions 2^(-frac / R), each stored on a fixed-point grid of 2^(b+1) - 2 steps
(the paper's table), so `forward` computes exactly that form and the exported float ops
compute the same values. The top code stands for exact zero (b bits hold every state). A
post-GELU input gets `shift` = -min, which makes it non-negative; the -shift after the
quantizer is a constant the next Linear could take into its bias (bias reparameterization).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeport.quant.quantizers import calibration_rows, check_bits

R = 37  # log2(base) = q / R: R fractions of an octave (the paper's choice)
Q_RANGE = (2, 74)  # log2(base) from 0.05 to 2: sqrt2 (18.5) and 2 (37) inside
Q_COARSE_STEP = 4  # q searched every 4, then each neighbour of the best: a third of the trials
SCALE_FACTORS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # of the largest value, for inputs whose top may clip
SAMPLE_ROWS = 256  # positions of a Linear's input its search compares on


@dataclass(frozen=True)
class AdaLogQParams:
    """An AdaLog quantizer's parameters: a code c < 2^bits - 1 stands for
    scale * 2^(-c q / R) (its fraction from the fixed-point table) - shift; the top code for -shift."""

    scale: float
    shift: float
    q: int
    bits: int


class AdaLogQuantizer(nn.Module):
    """Per-tensor AdaLog fake-quantizer of `bits` (2 to 8); see the module docstring. `fit`
    searches q (and, for a Linear's input, the scale) for the smallest error."""

    axis = None  # per tensor, as the pipeline asks of a Linear's input quantizer

    def __init__(self, bits: int = 4, shift: float = 0.0, search_scale: bool = False):
        super().__init__()
        self.bits, self.shift, self.q, self.search_scale = check_bits(bits), float(shift), 18, search_scale
        self.register_buffer("scale", torch.ones(()))
        steps = 2 ** (bits + 1) - 2
        self.register_buffer("table", torch.round(torch.exp2(-torch.arange(R) / R) * steps) / steps)
        self.fitted, self.enabled = False, True

    @classmethod
    def from_qparams(cls, params: AdaLogQParams) -> AdaLogQuantizer:
        """A fitted quantizer with these parameters."""
        quantizer = cls(params.bits, params.shift)
        quantizer.scale, quantizer.q, quantizer.fitted = torch.tensor(params.scale), params.q, True
        return quantizer

    @property
    def top_code(self) -> int:
        return 2 ** self.bits - 2

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor, q: int) -> torch.Tensor:
        code = torch.round(-torch.log2((x + self.shift).clamp(min=1e-30) / scale) * (R / q))
        zero = code > self.top_code
        exponent = code.clamp(0, self.top_code) * q
        whole = torch.floor(exponent / R)
        value = scale * torch.exp2(-whole) * self.table[(exponent - whole * R).long()]
        value = torch.where(zero, torch.zeros_like(value), value)
        return value - self.shift if self.shift else value

    def fit(self, x: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Choose q (and the scale, where `search_scale`) whose quantized `x` gives the smallest
        mean squared error after `project` (the consumer: the matmul with the other operand,
        the Linear's weight; identity without one)."""
        project = project or (lambda t: t)
        x = x.detach()
        reference, top = project(x), (x + self.shift).max().float().clamp(min=1e-8)

        def error(scale: torch.Tensor, q: int) -> float:
            return float(((project(self._quantize(x, scale, q)) - reference) ** 2).mean())

        low, high = Q_RANGE
        scales = [top * factor for factor in (SCALE_FACTORS if self.search_scale else (1.0,))]
        best = min((error(scale, q), i, q) for i, scale in enumerate(scales)
                   for q in range(low, high + 1, Q_COARSE_STEP))
        _, i, coarse = best
        nearby = range(max(low, coarse - Q_COARSE_STEP + 1), min(high, coarse + Q_COARSE_STEP - 1) + 1)
        _, _, q = min(best, *((error(scales[i], q), i, q) for q in nearby if q != coarse))
        self.scale, self.q, self.fitted = scales[i].detach(), q, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.enabled and self.fitted):
            return x
        return self._quantize(x, self.scale, self.q)

    def qparams(self) -> AdaLogQParams:
        """The fitted parameters, for exporters."""
        return AdaLogQParams(float(self.scale), self.shift, self.q, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log2(base)={self.q}/{R}, shift={self.shift:g}, fitted={self.fitted}"


def gelu_neighbours(model: nn.Module, sample: tuple[torch.Tensor, ...]) -> tuple[set[str], set[str]]:
    """Paths of the Linear layers whose output is exactly a GELU module's input (a transformer's
    FFN first layer) and of those whose input is exactly a GELU module's output (its second
    layer), from one forward pass: nn.GELU and the GELU modules of `transformers`
    (GELUActivation and kin, matched by class name)."""
    linear_outputs, gelu_outputs = {}, set()
    feeding, fed = set(), set()
    names = {m: n for n, m in model.named_modules()}
    kept: list[torch.Tensor] = []  # alive for the pass: a freed tensor's id can be reused

    def after_linear(linear, args, out):
        linear_outputs[id(out)] = names[linear]
        kept.append(out)
        if id(args[0]) in gelu_outputs:
            fed.add(names[linear])

    def around_gelu(gelu, args, out):
        if id(args[0]) in linear_outputs:
            feeding.add(linear_outputs[id(args[0])])
        gelu_outputs.add(id(out))
        kept.append(out)

    hooks = [m.register_forward_hook(around_gelu if "GELU" in type(m).__name__ else after_linear)
             for m in model.modules() if isinstance(m, nn.Linear) or "GELU" in type(m).__name__]
    try:
        with torch.no_grad():
            model(*sample)
    finally:
        for h in hooks:
            h.remove()
    return feeding, fed


def gelu_fed(model: nn.Module, sample: tuple[torch.Tensor, ...]) -> set[str]:
    """Paths of the Linear layers whose input is exactly a GELU module's output (`gelu_neighbours`)."""
    return gelu_neighbours(model, sample)[1]


def choose_input_quantizer(layer: nn.Module, x: torch.Tensor) -> None:
    """Give a post-GELU QuantLinear (`layer`, its input quantizer not yet fitted) an AdaLog
    input quantizer where it reproduces the layer's output better (mean squared error, on at
    most SAMPLE_ROWS positions of its first calibration input `x`) than the uniform one it
    has; AdaLog's scale and base are searched on the same error. Called before the
    uniform quantizer fits, so an outlier migration still runs where AdaLog is not taken.
    Not at 8 bits, where the uniform grid loses little and runs as an integer kernel."""
    if layer.act.fitted or layer.act.bits >= 8:
        return
    rows = calibration_rows(layer.act, layer.quantizer_input(x.detach())).flatten(0, -2)
    rows = rows[::-(-len(rows) // SAMPLE_ROWS)]
    weight = layer.wq(layer.inner.weight)
    reference = F.linear(rows, layer.inner.weight)
    adalog = AdaLogQuantizer(layer.act.bits, shift=float((-rows.min()).clamp(min=0)), search_scale=True)
    adalog.fit(rows, lambda t: F.linear(t, weight))
    uniform = _fitted_copy(layer.act, rows)
    errors = [float(((F.linear(quantizer(rows), weight) - reference) ** 2).mean()) for quantizer in (uniform, adalog)]
    if errors[1] < errors[0]:
        adalog.live = getattr(layer.act, "live", None)
        layer.act = adalog


def _fitted_copy(quantizer: nn.Module, x: torch.Tensor) -> nn.Module:
    quantizer = copy.deepcopy(quantizer)
    quantizer.fit(x)
    return quantizer
