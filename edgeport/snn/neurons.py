"""Spiking neurons whose state is an explicit argument, never a hidden module attribute.

A neuron's `forward(x, v)` returns `(spike, v_next)`. Keeping the membrane `v` in the
caller's hands is what lets one model export both unrolled (the caller loops over T) and
as a streaming step (the membrane becomes a graph input and output).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class _ATanSpike(torch.autograd.Function):
    """Heaviside forward (fires on >= 0), arctan surrogate gradient backward."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.alpha = alpha
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (u,) = ctx.saved_tensors
        a = ctx.alpha
        return grad * (a / 2) / (1 + (math.pi / 2 * a * u) ** 2), None


def atan_spike(u: torch.Tensor, alpha: float = 2.0, training: bool = False) -> torch.Tensor:
    """Spike where `u >= 0`; with `training`, gradients flow through the arctan surrogate.

    At inference this is one comparison and a cast, which every backend runs natively.
    """
    if training:
        return _ATanSpike.apply(u, alpha)
    return (u >= 0).to(u.dtype)


class LIF(nn.Module):
    """Leaky integrate-and-fire neuron, SpikingJelly semantics (decay_input, fire on >=).

    Charge: h = v + (x - v) / tau. Fire: s = [h - threshold >= 0]. Reset by subtraction
    (v' = h - s * threshold) when `reset="subtract"`, to zero (v' = h * (1 - s)) when
    `reset="zero"`. Membranes are in the same (unitless) units as the input current.
    """

    def __init__(self, tau: float = 2.0, threshold: float = 1.0, reset: str = "subtract"):
        super().__init__()
        if reset not in ("subtract", "zero"):
            raise ValueError(f"reset must be 'subtract' or 'zero', not {reset!r}")
        self.tau, self.threshold, self.reset = float(tau), float(threshold), reset

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = v + (x - v) / self.tau
        s = atan_spike(h - self.threshold, training=self.training)
        v_next = h - s * self.threshold if self.reset == "subtract" else h * (1 - s)
        return s, v_next

    def extra_repr(self) -> str:
        return f"tau={self.tau}, threshold={self.threshold}, reset={self.reset}"
