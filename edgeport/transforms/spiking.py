"""Spiking export forms, built on the step protocol (`edgeport.snn.convert`):

- *unrolled*: T timesteps in one static graph; input x (the same frame every step, direct
  coding) or a sequence (T, B, ...). By default it returns what the model itself returns:
  `model(x)` for a model with its own step protocol and T-step forward (the zoo SNN's readout
  averaged over T), each output stacked over time (T, B, ...) for a converted snnTorch or
  SpikingJelly network (what a multi-step network returns, and what a single-step one gives
  run T times). `outputs="per_step"` returns every step's outputs stacked instead, named
  `<output>_per_step`;
- *step*: one timestep, `(x_t, *state) -> (*y_t, *state')`, every membrane a named graph
  input and output (`v_lif1` in, `v_lif1_next` out), so a device runs one step at a time and
  feeds the state back.

Verification drives both forms the same way (`edgeport.verify.UnrolledSteps` runs a step
form for T steps), so the one comparator judges every timestep: spikes (outputs whose
reference values are all 0 or 1) must be identical, membranes within float tolerance.
A network converted from snnTorch or SpikingJelly is also compared with the library's own
run (`LibraryRunner`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeport.core import Runner, TensorSpec
from edgeport.errors import UserError, limit_from_environment
from edgeport.snn.convert import SteppedNetwork, as_stepped, library_reference, state_names

FORMS = ("unrolled", "step")
OUTPUTS = ("model", "per_step")  # what the unrolled form returns
# An unrolled graph grows with T and verification runs T steps per sample: past this a
# request is a typo more often than a model (raise it with EDGEPORT_MAX_TIMESTEPS).
MAX_TIMESTEPS = limit_from_environment("EDGEPORT_MAX_TIMESTEPS", 1000)


class StepModule(nn.Module):
    """`forward(x_t, *state)` is one step of the stepped model (what the step form exports)."""

    def __init__(self, stepped: nn.Module):
        super().__init__()
        self.stepped = stepped

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.stepped.step(x, *state))


class ModelOutput(nn.Module):
    """`forward(x)` is the model's own forward, which runs its T steps itself (the unrolled
    form of a step-protocol model that returns a readout over time)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnrolledModule(nn.Module):
    """`forward(x)` runs T steps from the initial state and stacks each output over time.

    `sequence=False` feeds the same x at every step; `sequence=True` takes x as (T, B, ...).
    """

    def __init__(self, stepped: nn.Module, timesteps: int, sequence: bool, outputs: int):
        super().__init__()
        self.stepped, self.timesteps, self.sequence, self.outputs = stepped, timesteps, sequence, outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = self.stepped.initial_state(x[0] if self.sequence else x)
        per_step = []
        for t in range(self.timesteps):
            result = self.stepped.step(x[t] if self.sequence else x, *state)
            per_step.append(result[:self.outputs])
            state = result[self.outputs:]
        return tuple(torch.stack([step[i] for step in per_step]) for i in range(self.outputs))


@dataclass
class SpikingForm:
    """What to export for one form: the module, its example arguments and I/O names."""

    form: str
    module: nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    stepped: nn.Module
    timesteps: int
    sequence: bool
    outputs: int  # model outputs per step (the rest of a step's results are states)
    returns: str = "model"  # the unrolled form's outputs: the model's own, or every step's ("per_step")

    def describe(self) -> dict:
        """What a device needs to run the artifact: the form, T, and each state's start value."""
        states = self.args[1:] if self.form == "step" else ()
        return {"form": self.form, "timesteps": self.timesteps, "sequence": self.sequence,
                "returns": self.returns if self.form == "unrolled" else "step",
                "outputs": self.output_names[:self.outputs],
                "state_inputs": self.input_names[1:] if self.form == "step" else [],
                "state_outputs": self.output_names[self.outputs:],
                "initial_state_values": [_start_value(s) for s in states]}

    def state_specs(self) -> list[TensorSpec]:
        """The state inputs of the step form (batch first), as the artifact declares them."""
        if self.form != "step":
            return []
        return [TensorSpec(n, list(a.shape), str(a.dtype).removeprefix("torch."))
                for n, a in zip(self.input_names[1:], self.args[1:])]

    @property
    def converted(self) -> bool:
        """Whether the network was converted from snnTorch or SpikingJelly (then the library's
        own run is a second reference)."""
        return isinstance(self.stepped, SteppedNetwork)


def _start_value(state: torch.Tensor) -> float | list:
    """Where a state starts, for one sample (its batch axis dropped): one number where every
    element starts alike, which keeps the sidecar small, else the values themselves (a NIR
    graph's neurons at rest, v_leak per neuron, may differ)."""
    one = state[0] if state.dim() else state
    if not one.numel():
        return 0.0
    first = one.flatten()[0]
    return float(first) if bool((one == first).all()) else one.tolist()


def _runs_own_timesteps(model: nn.Module, stepped: nn.Module, timesteps: int, sequence: bool) -> bool:
    """Whether `model(x)` is the model's own T-step run on the unrolled form's input: a model
    with its own step protocol, a frame input, and the same T."""
    return stepped is model and not sequence and getattr(model, "timesteps", None) == timesteps


def build_form(model: nn.Module, example: torch.Tensor, form: str, timesteps: int, sequence: bool = False,
               outputs: str = "model") -> SpikingForm:
    """The exportable module for `form`; `example` is one step's input, or (T, B, ...) with
    `sequence`. `outputs` picks what the unrolled form returns: "model" (what the model
    returns, see the module docstring) or "per_step" (every step's outputs over time)."""
    if form not in FORMS:
        raise UserError(f"unknown spiking form {form!r}; choose one of {', '.join(FORMS)}")
    if outputs not in OUTPUTS:
        raise UserError(f"unknown spiking outputs {outputs!r}; choose one of {', '.join(OUTPUTS)}")
    if not isinstance(timesteps, int) or not 0 < timesteps <= MAX_TIMESTEPS:
        raise UserError(f"timesteps must be an integer from 1 to {MAX_TIMESTEPS} (EDGEPORT_MAX_TIMESTEPS raises the "
                        f"limit), not {timesteps!r}")
    if sequence and example.shape[0] != timesteps:
        raise UserError(f"a sequence input has T first: shape {list(example.shape)} does not start with {timesteps}")
    step_example = example[0] if sequence else example
    stepped = as_stepped(model, step_example)
    with torch.no_grad():
        state = stepped.initial_state(step_example)
        count = len(stepped.step(step_example, *state)) - len(state)
    names = state_names(stepped, len(state))
    output_names = [f"output_{i}" for i in range(count)]
    if form == "step":
        return SpikingForm(form, StepModule(stepped).eval(), (step_example, *state), ["x", *names],
                           output_names + [f"{n}_next" for n in names], stepped, timesteps, sequence, count)
    if outputs == "model" and _runs_own_timesteps(model, stepped, timesteps, sequence):
        with torch.no_grad():
            returned = model(example)
        returned = len(returned) if isinstance(returned, (tuple, list)) else 1
        return SpikingForm(form, ModelOutput(model).eval(), (example,), ["x"], [f"output_{i}" for i in range(returned)],
                           stepped, timesteps, sequence, count, outputs)
    if outputs == "model" and stepped is model and getattr(model, "timesteps", timesteps) != timesteps:
        raise UserError(f"{type(model).__name__} runs its own {model.timesteps} timesteps; an unrolled form of "
                        f"{timesteps} returns every step's outputs: ask for outputs='per_step'")
    if outputs == "per_step":
        output_names = [f"{name}_per_step" for name in output_names]
    return SpikingForm(form, UnrolledModule(stepped, timesteps, sequence, count).eval(), (example,), ["x"],
                       output_names, stepped, timesteps, sequence, count, outputs)


class LibraryRunner(Runner):
    """The original snnTorch / SpikingJelly network run the library's own way for T steps:
    each model output stacked over time, (T, B, ...), like the unrolled form's."""

    def __init__(self, model: nn.Module, form: SpikingForm):
        self.model, self.form, self.name = model, form, "library"
        self.input_names = ["x"]
        self.output_names = [f"conversion/output_{i}" for i in range(form.outputs)]

    def load(self) -> "LibraryRunner":
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(next(iter(feeds.values())))
        steps = [x[t] if self.form.sequence else x for t in range(self.form.timesteps)]
        per_step = library_reference(self.model, steps)
        return {name: np.stack([step[i].numpy() for step in per_step]) for i, name in enumerate(self.output_names)}
