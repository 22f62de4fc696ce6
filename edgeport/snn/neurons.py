"""Spiking neurons whose state is an explicit argument, never a hidden module attribute.

Every neuron's `forward(x, *state)` returns `(output, *next_state)`; `initial_state(x)` gives
the state before the first step. Keeping the state in the caller's hands is what lets one
model export both unrolled (the caller loops over T) and as a streaming step (the state
becomes graph inputs and outputs). At inference every neuron is a handful of elementwise
ops; surrogate gradients exist only in training mode.

The arithmetic of each class follows its source library operation for operation, so that
the exported graph fires exactly where the library fires:

- `LIF` (SpikingJelly `LIFNode`/`IFNode`, and the zoo): charge, fire on `>=`, reset at once.
- `Leaky`, `Synaptic` (snnTorch): fire on `>`, reset from the previous membrane (delayed).
- `MultiLevel` (I-LIF / QSD IE-LIF): bounded integer spike counts, rounding half up.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class _ATanSpike(torch.autograd.Function):
    """Heaviside forward, arctan surrogate gradient backward."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, alpha: float, strict: bool) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.alpha = alpha
        return (u > 0 if strict else u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (u,) = ctx.saved_tensors
        a = ctx.alpha
        return grad * (a / 2) / (1 + (math.pi / 2 * a * u) ** 2), None, None


def atan_spike(u: torch.Tensor, alpha: float = 2.0, training: bool = False, strict: bool = False) -> torch.Tensor:
    """Spike where `u >= 0` (`u > 0` with `strict`); with `training`, gradients flow through
    the arctan surrogate. At inference: one comparison and a cast."""
    if training:
        return _ATanSpike.apply(u, alpha, strict)
    return (u > 0 if strict else u >= 0).to(u.dtype)


class LIF(nn.Module):
    """Leaky integrate-and-fire, SpikingJelly semantics; `tau=None` is integrate-and-fire.

    Charge: h = v + (x - (v - v_reset)) / tau (decay_input), h = v - (v - v_reset) / tau + x
    (not decay_input), h = v + x (IF), with v_reset taken as 0 in the charge for soft reset.
    Fire: s = [h - threshold >= 0]. Reset: v' = h - s * threshold (soft, `v_reset=None`) or
    v' = s * v_reset + (1 - s) * h (hard). State: (v,), starting at v_reset (0 when soft).
    """

    def __init__(self, tau: float | None = 2.0, threshold: float = 1.0, v_reset: float | None = None,
                 decay_input: bool = True):
        super().__init__()
        self.tau, self.threshold, self.v_reset, self.decay_input = tau, float(threshold), v_reset, decay_input

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.full_like(x, 0.0 if self.v_reset is None else self.v_reset),)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reset_value = 0.0 if self.v_reset is None else self.v_reset
        if self.tau is None:
            h = v + x
        elif self.decay_input:
            h = v + (x - (v - reset_value)) / self.tau
        else:
            h = v - (v - reset_value) / self.tau + x
        s = atan_spike(h - self.threshold, training=self.training)
        v_next = h - s * self.threshold if self.v_reset is None else s * self.v_reset + (1.0 - s) * h
        return s, v_next

    def extra_repr(self) -> str:
        return f"tau={self.tau}, threshold={self.threshold}, v_reset={self.v_reset}, decay_input={self.decay_input}"


class Leaky(nn.Module):
    """snnTorch `Leaky`: mem = beta * mem + x, minus the reset of the previous membrane.

    reset = [mem_prev - threshold > 0]; "subtract": mem = beta*mem_prev + x - reset*threshold;
    "zero": mem = beta*((1 - reset)*mem_prev) + x; "none": no reset. Fire: [mem - thr > 0] x
    graded factor. `reset_delay=False` also applies the current spike's reset at once.
    State: (mem,), starting at 0.
    """

    def __init__(self, beta: float | torch.Tensor, threshold: float | torch.Tensor = 1.0, reset: str = "subtract",
                 reset_delay: bool = True, graded_spikes_factor: float | torch.Tensor = 1.0):
        super().__init__()
        if reset not in ("subtract", "zero", "none"):
            raise ValueError(f"reset must be 'subtract', 'zero' or 'none', not {reset!r}")
        self.register_buffer("beta", torch.as_tensor(beta, dtype=torch.float32).clamp(0, 1))
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32))
        self.register_buffer("graded", torch.as_tensor(graded_spikes_factor, dtype=torch.float32))
        self.reset, self.reset_delay = reset, reset_delay

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.zeros_like(x),)

    def _fire(self, mem: torch.Tensor) -> torch.Tensor:
        return atan_spike(mem - self.threshold, training=self.training, strict=True) * self.graded

    def _immediate_reset(self, mem: torch.Tensor, spk: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        if self.reset_delay or self.reset == "none":
            return mem
        do_reset = spk / self.graded - reset
        return mem - do_reset * self.threshold if self.reset == "subtract" else mem - do_reset * mem

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reset = atan_spike(mem - self.threshold, strict=True).detach()
        if self.reset == "zero":
            mem = (1 - reset) * mem
        mem_next = self.beta * mem + x
        if self.reset == "subtract":
            mem_next = mem_next - reset * self.threshold
        spk = self._fire(mem_next)
        return spk, self._immediate_reset(mem_next, spk, reset)


class Synaptic(Leaky):
    """snnTorch `Synaptic`: syn = alpha*syn + x; mem = beta*mem + syn, reset as `Leaky`, except
    that the "zero" reset clears the whole new membrane (mem = mem_new - mem_new*reset).
    State: (syn, mem), both starting at 0."""

    def __init__(self, alpha: float | torch.Tensor, beta: float | torch.Tensor, **options):
        super().__init__(beta, **options)
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32).clamp(0, 1))

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(x), torch.zeros_like(x)

    def forward(self, x: torch.Tensor, syn: torch.Tensor, mem: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reset = atan_spike(mem - self.threshold, strict=True).detach()
        syn_next = self.alpha * syn + x
        mem_next = self.beta * mem + syn_next
        if self.reset == "subtract":
            mem_next = mem_next - reset * self.threshold
        elif self.reset == "zero":
            mem_next = mem_next - mem_next * reset
        spk = self._fire(mem_next)
        return spk, syn_next, self._immediate_reset(mem_next, spk, reset)


class _RoundHalfUp(torch.autograd.Function):
    """floor(x + 0.5) forward (what the papers' code does), straight-through backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x + 0.5)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


class MultiLevel(nn.Module):
    """Integer-spike neuron (I-LIF / QSD-Transformer IE-LIF): counts 0..levels, rounded half up.

    With `tau`: h = (1 - 1/tau) * v + x; count = floor(clamp(h / threshold, 0, levels) + 0.5);
    v' = h - count * threshold (soft reset). With `tau=None` it is stateless, as QSD's released
    classifier: count = floor(clamp(x / threshold, 0, levels) + 0.5). The output is the count
    times `scale` (QSD uses 1/levels). Round half up, not to even: ONNX gets Floor(x + 0.5).
    State: (v,) with tau, none without.
    """

    def __init__(self, levels: int = 4, threshold: float = 1.0, tau: float | None = None, scale: float = 1.0):
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be at least 1, not {levels}")
        self.levels, self.threshold, self.tau, self.scale = levels, float(threshold), tau, float(scale)

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return () if self.tau is None else (torch.zeros_like(x),)

    def _count(self, h: torch.Tensor) -> torch.Tensor:
        clipped = torch.clamp(h / self.threshold, 0, self.levels)
        return _RoundHalfUp.apply(clipped) if self.training else torch.floor(clipped + 0.5)

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.tau is None:
            return (self._count(x) * self.scale,)
        h = (1 - 1 / self.tau) * state[0] + x
        count = self._count(h)
        return count * self.scale, h - count * self.threshold

    def extra_repr(self) -> str:
        return f"levels={self.levels}, threshold={self.threshold}, tau={self.tau}, scale={self.scale}"


NEURONS = (LIF, Leaky, Synaptic, MultiLevel)
