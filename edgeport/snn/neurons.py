"""Spiking neurons whose state is an explicit argument, never a hidden module attribute.

Every neuron's `forward(x, *state)` returns `(output, *next_state)`; `initial_state(x)` gives
the state before the first step. Keeping the state in the caller's hands is what lets one
model export both unrolled (the caller loops over T) and as a streaming step (the state
becomes graph inputs and outputs). At inference every neuron is a handful of elementwise
ops; surrogate gradients exist only in training mode.

The arithmetic of each class follows its source library operation for operation, so that
the exported graph fires exactly where the library fires:

- `LIF` (SpikingJelly `LIFNode`/`IFNode`, and the zoo): charge, fire on `>=`, reset at once.
- `ParametricLIF` (SpikingJelly PLIF): `LIF` whose learned decay multiplies, as the library's.
- `Leaky`, `Synaptic`, `RecurrentLeaky`, `RecurrentSynaptic`, `Alpha`, `Lapicque` (snnTorch):
  fire on `>`, reset from the previous membrane (delayed).
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

    def charge(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The membrane after integrating `x`, before firing."""
        reset_value = 0.0 if self.v_reset is None else self.v_reset
        if self.tau is None:
            return v + x
        if self.decay_input:
            return v + (x - (v - reset_value)) / self.tau
        return v - (v - reset_value) / self.tau + x

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.charge(x, v)
        s = atan_spike(h - self.threshold, training=self.training)
        v_next = h - s * self.threshold if self.v_reset is None else s * self.v_reset + (1.0 - s) * h
        return s, v_next

    def extra_repr(self) -> str:
        return f"tau={self.tau}, threshold={self.threshold}, v_reset={self.v_reset}, decay_input={self.decay_input}"


class ParametricLIF(LIF):
    """SpikingJelly `ParametricLIFNode` (PLIF): a LIF whose decay 1/tau = sigmoid(w) is learned.

    The library multiplies by the decay instead of dividing by tau, so this charge does too:
    h = v + (x - (v - v_reset)) * q (decay_input), h = v - (v - v_reset) * q + x (not), with
    q = sigmoid(w) computed once in float32 as the library computes it at every step. Fire and
    reset as `LIF`; `tau` (1/q, float64) is kept for formats that take a time constant (NIR).
    """

    def __init__(self, reciprocal_tau: torch.Tensor, threshold: float = 1.0, v_reset: float | None = 0.0,
                 decay_input: bool = True):
        q = torch.as_tensor(reciprocal_tau, dtype=torch.float32).reshape(())
        super().__init__(1.0 / float(q), threshold, v_reset, decay_input)
        self.register_buffer("reciprocal_tau", q)

    def charge(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        reset_value = 0.0 if self.v_reset is None else self.v_reset
        if self.decay_input:
            return v + (x - (v - reset_value)) * self.reciprocal_tau
        return v - (v - reset_value) * self.reciprocal_tau + x


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

    state_count = 1  # state tensors, each starting at 0

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros_like(x) for _ in range(self.state_count))

    def _fire(self, mem: torch.Tensor) -> torch.Tensor:
        return atan_spike(mem - self.threshold, training=self.training, strict=True) * self.graded

    def _immediate_reset(self, mem: torch.Tensor, spk: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        if self.reset_delay or self.reset == "none":
            return mem
        do_reset = spk / self.graded - reset
        return mem - do_reset * self.threshold if self.reset == "subtract" else mem - do_reset * mem

    def previous_reset(self, mem: torch.Tensor) -> torch.Tensor:
        """1 where the previous membrane was above threshold: snnTorch's delayed reset."""
        return atan_spike(mem - self.threshold, strict=True).detach()

    def reset_new_membrane(self, mem: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        """The reset applied to the newly charged membrane, as every snnTorch neuron but `Leaky`
        applies it: "subtract" takes the threshold off, "zero" takes the membrane itself off."""
        if self.reset == "subtract":
            return mem - reset * self.threshold
        return mem - mem * reset if self.reset == "zero" else mem

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reset = self.previous_reset(mem)
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

    state_count = 2

    def __init__(self, alpha: float | torch.Tensor, beta: float | torch.Tensor, **options):
        super().__init__(beta, **options)
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32).clamp(0, 1))

    def forward(self, x: torch.Tensor, syn: torch.Tensor, mem: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reset = self.previous_reset(mem)
        syn_next = self.alpha * syn + x
        mem_next = self.beta * mem + syn_next
        mem_next = self.reset_new_membrane(mem_next, reset)
        spk = self._fire(mem_next)
        return spk, syn_next, self._immediate_reset(mem_next, spk, reset)


class RecurrentLeaky(Leaky):
    """snnTorch `RLeaky`: a `Leaky` whose input also carries its own previous spikes through
    `recurrent` (the library's `nn.Linear`, `nn.Conv2d` or one-to-one weight `V`).

    mem = beta*mem_prev + x + recurrent(spk_prev), then "subtract": - reset*threshold, "zero":
    - reset*(that sum), reset from the previous membrane; fire on `>`. State: (spk, mem), the
    library's argument order, both starting at 0; the library returns (spk, mem).
    """

    state_count = 2

    def __init__(self, beta: float | torch.Tensor, recurrent: nn.Module, **options):
        super().__init__(beta, **options)
        self.recurrent = recurrent

    def forward(self, x: torch.Tensor, spk: torch.Tensor, mem: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reset = self.previous_reset(mem)
        mem_next = self.beta * mem + x + self.recurrent(spk)
        mem_next = self.reset_new_membrane(mem_next, reset)
        spk_next = self._fire(mem_next)
        return spk_next, spk_next, self._immediate_reset(mem_next, spk_next, reset)


class RecurrentSynaptic(Leaky):
    """snnTorch `RSynaptic`: syn = alpha*syn + x + recurrent(spk_prev); mem = beta*mem + syn;
    "subtract": mem - reset*threshold, "zero": mem - mem*reset (the current is kept).

    The reset is always the delayed one: the library's own `reset_delay=False` branch computes
    an immediate reset on its arguments and discards it. State: (spk, syn, mem), starting at 0;
    the library returns (spk, syn, mem).
    """

    state_count = 3

    def __init__(self, alpha: float | torch.Tensor, beta: float | torch.Tensor, recurrent: nn.Module, **options):
        super().__init__(beta, **options)
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32).clamp(0, 1))
        self.recurrent = recurrent

    def forward(self, x: torch.Tensor, spk: torch.Tensor, syn: torch.Tensor, mem: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        reset = self.previous_reset(mem)
        syn_next = self.alpha * syn + x + self.recurrent(spk)
        mem_next = self.beta * mem + syn_next
        mem_next = self.reset_new_membrane(mem_next, reset)
        spk_next = self._fire(mem_next)
        return spk_next, spk_next, syn_next, mem_next


class Alpha(Leaky):
    """snnTorch `Alpha`: an excitatory and an inhibitory current whose difference drives the membrane.

    exc = alpha*exc + x; inh = beta*inh - x; mem = tau_alpha*(exc + inh), tau_alpha =
    log(alpha)/(log(beta) - log(alpha)) + 1 computed once in float32 as the library computes
    it. "subtract": exc -= threshold*reset, inh -= inh*reset, mem -= (-inh_prev)*reset; "zero":
    each of the three -= itself*reset; reset from the previous membrane, fire on `>`.
    State: (syn_exc, syn_inh, mem), starting at 0; the library returns all three.
    """

    state_count = 3

    def __init__(self, alpha: float | torch.Tensor, beta: float | torch.Tensor, **options):
        super().__init__(beta, **options)
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32).clamp(0, 1))
        log_alpha = torch.log(self.alpha)
        self.register_buffer("tau_alpha", log_alpha / (torch.log(self.beta) - log_alpha) + 1)

    def forward(self, x: torch.Tensor, exc: torch.Tensor, inh: torch.Tensor, mem: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        reset = self.previous_reset(mem)
        exc_next = self.alpha * exc + x
        inh_next = self.beta * inh - x
        mem_next = self.tau_alpha * (exc_next + inh_next)
        if self.reset == "subtract":
            exc_next = exc_next - self.threshold * reset
            inh_next = inh_next - inh_next * reset
            mem_next = mem_next - (-inh) * reset
        elif self.reset == "zero":
            exc_next, inh_next, mem_next = (v - v * reset for v in (exc_next, inh_next, mem_next))
        return self._fire(mem_next), exc_next, inh_next, mem_next


class Lapicque(Leaky):
    """snnTorch `Lapicque`: an RC circuit stepped by forward Euler,
    mem = x*R*(1/(R*C))*time_step + (1 - time_step/(R*C))*mem_prev, reset as `Leaky` ("zero"
    subtracts reset*(that sum)); 1/(R*C) and the decay computed once in float32 as the library
    computes them, the input multiplied in the library's order. State: (mem,), starting at 0.
    """

    def __init__(self, resistance: torch.Tensor, capacitance: torch.Tensor, time_step: torch.Tensor, **options):
        resistance, capacitance, time_step = (torch.as_tensor(v) for v in (resistance, capacitance, time_step))
        rc = resistance * capacitance
        super().__init__(torch.exp(-time_step / rc), **options)  # beta, for the record: the charge below is exact
        for name, value in (("resistance", resistance), ("inverse_rc", 1 / rc), ("time_step", time_step),
                            ("decay", 1 - time_step / rc)):
            self.register_buffer(name, value.to(torch.float32))

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reset = self.previous_reset(mem)
        mem_next = x * self.resistance * self.inverse_rc * self.time_step + self.decay * mem
        mem_next = self.reset_new_membrane(mem_next, reset)
        return self._fire(mem_next), mem_next


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


NEURONS = (LIF, Leaky, MultiLevel)  # every other neuron subclasses one of these
