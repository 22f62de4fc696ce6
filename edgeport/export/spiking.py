"""Spiking export forms, built on the step protocol (`edgeport.snn.convert`):

- *unrolled*: T timesteps in one static graph; input x (the same frame every step, direct
  coding) or a sequence (T, B, ...); every output stacked over time, (T, B, ...);
- *step*: one timestep, `(x_t, *state) -> (*y_t, *state')`, every membrane a named graph
  input and output (`v_lif1` in, `v_lif1_next` out), so a device runs one step at a time and
  feeds the state back.

Parity is checked per timestep against the torch model on real inputs: spikes (outputs
whose reference values are all 0 or 1) must be identical, membranes within float tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeport.errors import UserError
from edgeport.export.verify import ParityReport, is_binary, judge, tolerance_for
from edgeport.runtime.runners import Runner
from edgeport.snn.convert import as_stepped, state_names

FORMS = ("unrolled", "step")


class StepModule(nn.Module):
    """`forward(x_t, *state)` is one step of the stepped model (what the step form exports)."""

    def __init__(self, stepped: nn.Module):
        super().__init__()
        self.stepped = stepped

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.stepped.step(x, *state))


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

    def describe(self) -> dict:
        """What a device needs to run the artifact: the form, T, and each state's start value."""
        states = self.args[1:] if self.form == "step" else ()
        return {"form": self.form, "timesteps": self.timesteps, "sequence": self.sequence,
                "outputs": self.output_names[:self.outputs],
                "state_inputs": self.input_names[1:] if self.form == "step" else [],
                "state_outputs": self.output_names[self.outputs:],
                "initial_state_values": [float(s.flatten()[0]) if s.numel() else 0.0 for s in states]}


def build_form(model: nn.Module, example: torch.Tensor, form: str, timesteps: int, sequence: bool = False
               ) -> SpikingForm:
    """The exportable module for `form`; `example` is one step's input, or (T, B, ...) with `sequence`."""
    if form not in FORMS:
        raise UserError(f"unknown spiking form {form!r}; choose one of {', '.join(FORMS)}")
    if not isinstance(timesteps, int) or timesteps <= 0:
        raise UserError(f"timesteps must be a positive integer, not {timesteps!r}")
    if sequence and example.shape[0] != timesteps:
        raise UserError(f"a sequence input has T first: shape {list(example.shape)} does not start with {timesteps}")
    step_example = example[0] if sequence else example
    stepped = as_stepped(model, step_example)
    with torch.no_grad():
        state = stepped.initial_state(step_example)
        outputs = len(stepped.step(step_example, *state)) - len(state)
    names = state_names(stepped, len(state))
    outputs_names = [f"output_{i}" for i in range(outputs)]
    if form == "step":
        return SpikingForm(form, StepModule(stepped).eval(), (step_example, *state), ["x", *names],
                           outputs_names + [f"{n}_next" for n in names], stepped, timesteps, sequence, outputs)
    return SpikingForm(form, UnrolledModule(stepped, timesteps, sequence, outputs).eval(), (example,), ["x"],
                       outputs_names, stepped, timesteps, sequence, outputs)


def run_steps(runner: Runner, form: SpikingForm, x: np.ndarray) -> list[list[np.ndarray]]:
    """Run a step-form runner T times on `x`, feeding the state back; per step, all results."""
    with torch.no_grad():
        first = torch.from_numpy(x[0] if form.sequence else x)
        state = [s.numpy() for s in form.stepped.initial_state(first)]
    names = runner.input_names
    results = []
    for t in range(form.timesteps):
        feeds = dict(zip(names, [x[t] if form.sequence else x, *state]))
        out = list(runner.infer(feeds).values())
        results.append(out)
        state = out[form.outputs:]
    return results


def compare_steps(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]], names: list[str],
                  reference_name: str, candidate_name: str, inputs_source: str) -> ParityReport:
    """Per-output parity over all timesteps; binary outputs (spikes) must match exactly."""
    samples = int(np.asarray(reference[0][0]).shape[0]) if reference and reference[0] else 0
    report = ParityReport(reference_name, candidate_name, samples, inputs_source + f", {len(reference)} timesteps")
    for i, name in enumerate(names):
        ref = np.stack([np.asarray(step[i]) for step in reference])
        cand = np.stack([np.asarray(step[i]) for step in candidate])
        tolerance = tolerance_for("fp32", np.dtype(np.bool_) if is_binary(ref) else ref.dtype)
        report.outputs.append(judge(name, ref, cand, tolerance))
    return report


def torch_steps(form: SpikingForm, x: np.ndarray) -> list[list[np.ndarray]]:
    """The torch step model run T times on `x`; per step, all results (outputs, then states)."""
    results = []
    with torch.no_grad():
        frames = torch.from_numpy(x)
        state = form.stepped.initial_state(frames[0] if form.sequence else frames)
        for t in range(form.timesteps):
            out = form.stepped.step(frames[t] if form.sequence else frames, *state)
            results.append([o.numpy() for o in out])
            state = out[form.outputs:]
    return results


def _merge(per_batch: list[list[list[np.ndarray]]]) -> list[list[np.ndarray]]:
    """Per-batch lists of per-step results, joined along the batch axis."""
    return [[np.concatenate([batch[t][i] for batch in per_batch]) for i in range(len(per_batch[0][t]))]
            for t in range(len(per_batch[0]))]


def verify_spiking(runner: Runner, form: SpikingForm, original: nn.Module, batches: list[np.ndarray],
                   inputs_source: str) -> ParityReport:
    """Run the exported form (a loaded runner) against the torch step model, timestep by
    timestep, on every batch; for a converted library network, also check the converted
    torch model against the library's own run (`conversion/` outputs)."""
    from edgeport.snn.convert import SteppedNetwork, library_reference

    try:
        reference = _merge([torch_steps(form, x) for x in batches])
        if form.form == "step":
            candidate = _merge([run_steps(runner, form, x) for x in batches])
        else:
            outputs = [list(runner.infer({"x": x}).values()) for x in batches]
            candidate = [[np.concatenate([o[i][t] for o in outputs]) for i in range(form.outputs)]
                         for t in range(form.timesteps)]
            reference = [step[:form.outputs] for step in reference]
        names = runner.output_names if form.form == "step" else runner.output_names[:form.outputs]
        report = compare_steps(reference, candidate, names, "torch", runner.name, inputs_source)
    finally:
        runner.close()
    if isinstance(form.stepped, SteppedNetwork):
        library = _merge([[list(map(lambda o: o.numpy(), step)) for step in library_reference(
            original, [torch.from_numpy(x[t] if form.sequence else x) for t in range(form.timesteps)])]
            for x in batches])
        converted = [step[:form.outputs] for step in _merge([torch_steps(form, x) for x in batches])]
        library_report = compare_steps(library, converted, [f"conversion/output_{i}" for i in range(form.outputs)],
                                       "library", "converted", inputs_source)
        report.outputs += library_report.outputs
    return report
