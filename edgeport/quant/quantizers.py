"""Quantizers as small modules: uniform affine (per tensor or per channel, symmetric or
asymmetric, 2 to 8 bits) and log-sqrt2 for post-softmax attention.

A quantizer is fitted once (`fit`, or lazily on the first tensor it sees while calibrating)
and then fake-quantizes: x -> (clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale,
rounding half to even as ONNX QuantizeLinear does. Codes live in int8 ranges (signed) or
uint8 ranges (unsigned) narrowed to the bit width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edgeport.errors import UserError


def check_bits(bits: int) -> int:
    """`bits`, if it is a width the quantizers support (2 to 8); a UserError otherwise."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UserError(f"bit widths must be integers from 2 to 8, not {bits!r}")
    return bits


def _live(quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    live = getattr(quantizer, "live", None)
    return live if live is not None and live.shape == x.shape and bool(live.any()) else None


def calibration_rows(quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows of calibration tensor `x` (channels last) that the model's output reads, as
    (rows, channels), where `quantizer` has the mask of x's elements it reads (`live`, from
    `edgeport.quant.live`); x itself otherwise."""
    live = _live(quantizer, x)
    return x if live is None else x[live.any(-1)]


def calibration_values(quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What `quantizer` fits its range on of calibration tensor `x`: the elements the model's
    output reads where it has their mask (all of them, flat, per tensor: a transposed key's
    padded columns too; the rows with any, per channel along the last axis); x otherwise."""
    live = _live(quantizer, x)
    if live is None or getattr(quantizer, "axis", None) not in (None, -1, x.ndim - 1):
        return x
    return x[live] if getattr(quantizer, "axis", None) is None else x[live.any(-1)]


@dataclass(frozen=True)
class UniformQParams:
    """A uniform quantizer's parameters, as exporters read them: a code c stands for
    (c - zero_point) * scale, codes in the int8 range (`signed`) or the uint8 one, narrowed
    to `bits`; one scale and zero point for the tensor (`axis` None) or one per channel
    along `axis`."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool
    axis: int | None


@dataclass(frozen=True)
class LogSqrt2QParams:
    """A log-sqrt2 quantizer's parameters: a code q stands for scale * 2^(-q/2); in the
    `strict` encoding the top code stands for exact zero."""

    scale: float
    bits: int
    strict: bool


class UniformQuantizer(nn.Module):
    """Uniform affine fake-quantizer; `axis` None is per tensor, an int is per channel.

    Symmetric quantizers use signed codes [-2^(b-1), 2^(b-1) - 1] with zero point 0 (what
    TensorRT needs; the scale maps the largest magnitude to 2^(b-1) - 1); asymmetric ones use
    [0, 2^b - 1] with an integer zero point. `observer` (a function of the tensor returning
    per-channel (low, high)) fits the quantizer lazily on the first tensor it sees.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None):
        super().__init__()
        self.bits, self.symmetric, self.axis = check_bits(bits), symmetric, axis
        self.qmin, self.qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
        self.observer = None
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.fitted, self.enabled = False, True

    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Fit scale and zero point to cover [low, high] (tensors, one value per channel)."""
        low, high = torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))
        if self.symmetric:
            scale = torch.maximum(high, -low) / self.qmax
            zero = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = (high - low) / (self.qmax - self.qmin)
            zero = (self.qmin - torch.round(low / scale.clamp(min=1e-12))).clamp(self.qmin, self.qmax).to(torch.int32)
        self.scale = scale.clamp(min=1e-8).float().detach()
        self.zero_point = zero.detach()
        self.fitted = True

    def fit(self, x: torch.Tensor) -> None:
        """Fit to a calibration tensor with the quantizer's observer; a NaN or Inf in it (which
        the model computed from the calibration data) is refused: no range covers it, and one
        range over the batch would carry it into every sample."""
        if not bool(torch.isfinite(x).all()):
            raise UserError(f"the model computes NaN or Inf from the calibration data (in a {list(x.shape)} tensor a "
                            f"quantizer observes): check the batch, e.g. for a sample whose attention mask is all zeros")
        self.set_range(*self.observer(calibration_values(self, x.detach()), self))

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None or t.ndim == 0:
            return t
        shape = [1] * x.ndim
        shape[self.axis] = -1
        return t.reshape(shape)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x (as floats), clamped to the bit width."""
        scale, zero = self._view(self.scale, x), self._view(self.zero_point, x)
        return torch.clamp(torch.round(x / scale) + zero, self.qmin, self.qmax)

    def centered_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integers x stands for once quantized (codes less the zero point, as floats): its
        fake-quantized value is these times the scale."""
        return self.codes(x) - self._view(self.zero_point, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fitted and self.observer is not None:
            self.fit(x)
        if not (self.enabled and self.fitted):
            return x
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis % x.ndim, self.qmin,
                                                      self.qmax)

    def qparams(self) -> UniformQParams:
        """The fitted scale, zero point and code range, for exporters."""
        return UniformQParams(self.scale.clone(), self.zero_point.clone(), self.bits, self.qmin < 0, self.axis)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, axis={self.axis}, fitted={self.fitted}"


class LogSqrt2Quantizer(nn.Module):
    """Log-sqrt2 quantizer for attention probabilities A in [0, 1] (RepQ-ViT).

    q = round(-2 log2(A / s)); A_hat = s * 2^(-q/2). In the `strict` encoding code 2^b - 1
    is reserved for exact zero, so b bits hold every state: q >= 2^b - 1 maps to 0.
    """

    def __init__(self, bits: int = 4, strict: bool = True):
        super().__init__()
        self.bits, self.strict = check_bits(bits), strict
        self.register_buffer("scale", torch.ones(()))
        self.fitted, self.enabled = False, True

    @classmethod
    def from_qparams(cls, params: LogSqrt2QParams) -> LogSqrt2Quantizer:
        """A fitted quantizer with these parameters."""
        quantizer = cls(params.bits, params.strict)
        quantizer.scale, quantizer.fitted = torch.tensor(params.scale, dtype=torch.float32), True
        return quantizer

    def fit(self, a: torch.Tensor) -> None:
        """Scale = the largest probability seen, so code 0 holds it unclipped."""
        self.scale = calibration_values(self, a.detach()).max().float().clamp(min=1e-8)
        self.fitted = True

    def qparams(self) -> LogSqrt2QParams:
        """The fitted scale and encoding, for exporters."""
        return LogSqrt2QParams(float(self.scale), self.bits, self.strict)

    @property
    def top_code(self) -> int:
        return 2 ** self.bits - (2 if self.strict else 1)

    def codes(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes clamped to [0, top], mask of elements that quantize to exact zero)."""
        q = torch.round(-2 * torch.log2(a.clamp(min=1e-30) / self.scale))
        zero = q > self.top_code if self.strict else q >= 2 ** self.bits
        return q.clamp(0, self.top_code), zero

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if not (self.enabled and self.fitted):
            return a
        q, zero = self.codes(a)
        return torch.where(zero, torch.zeros_like(a), self.scale * torch.exp2(-q / 2))

    def shift_form(self, a: torch.Tensor) -> torch.Tensor:
        """The inference form: s * 2^(-ceil(q/2)) * (1 + (sqrt2 - 1) * (q mod 2)), every value
        a power of two times s or sqrt2*s; equal to `forward` (RepQ-ViT's reparameterization)."""
        q, zero = self.codes(a)
        value = self.scale * torch.exp2(-torch.ceil(q / 2)) * (1 + (math.sqrt(2) - 1) * torch.remainder(q, 2))
        return torch.where(zero, torch.zeros_like(a), value)
