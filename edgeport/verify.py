"""Parity between any two runners on the same inputs (Polygraphy's Comparator, in small).

`compare(reference, candidate, batches)` runs both runners on every batch of feeds,
matches outputs by position, and judges each output with a tolerance chosen for its
dtype and the artifact's precision (`edgeport.core.tolerance_for`):

- float32: max abs error <= 1e-4 x the output's scale (max |reference|);
- float16: max abs error <= 1e-2 x scale;
- integer-quantized (int8 and narrower): cosine similarity and SQNR, not atol;
- bool and integer outputs (class ids), and outputs whose reference is all 0 and 1 (spikes):
  exactly equal.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgeport.core import (TOLERANCES, Artifact, OutputParity, ParityReport, Runner, TensorSpec, Tolerance,
                           tolerance_for)
from edgeport.errors import UserError


def is_binary(array: np.ndarray) -> bool:
    """Whether every value is 0 or 1 (spike tensors), judged exactly rather than by error size."""
    return array.dtype == np.bool_ or (array.size > 0 and bool(np.isin(array, (0, 1)).all()))


def check_finite(feeds: dict[str, np.ndarray]) -> None:
    """Refuse inputs holding NaN or Inf: parity measured on them means nothing."""
    for name, array in feeds.items():
        if np.issubdtype(array.dtype, np.floating):
            nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            if nan or inf:
                raise UserError(f"verification input {name!r} contains {nan} NaN and {inf} Inf values")


def judge(name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance) -> OutputParity:
    """Compute the error figures of one output and apply `tolerance` to them."""
    if reference.shape != candidate.shape:
        raise UserError(f"output {name!r}: shape {list(candidate.shape)} differs from reference "
                        f"{list(reference.shape)}")
    ref, cand = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    finite = bool(np.isfinite(cand).all()) and bool(np.isfinite(ref).all())
    diff = np.abs(ref - cand) if finite else np.full_like(ref, np.inf)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    noise, signal = float((diff ** 2).sum()), float((ref ** 2).sum())
    if noise == 0:
        sqnr = math.inf
    else:
        sqnr = 10 * math.log10(signal / noise) if finite and signal > 0 else -math.inf
    norms = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    cosine = float(ref @ cand / norms) if finite and norms > 0 else (1.0 if max_abs == 0 else 0.0)
    mismatched = int((diff > 0).sum())
    if tolerance.kind == "exact":
        passed = mismatched == 0
    elif tolerance.kind == "cosine":
        passed = finite and cosine >= tolerance.min_cosine and sqnr >= tolerance.min_sqnr_db
    else:
        passed = finite and max_rel <= tolerance.max_error
    return OutputParity(name, list(reference.shape), max_abs, max_rel, scale, cosine, sqnr, mismatched,
                        tolerance, passed)


def compare(reference: Runner, candidate: Runner, batches: list[dict[str, np.ndarray]],
            precision: str = "fp32", inputs_source: str = "given",
            tolerance: Tolerance | None = None) -> ParityReport:
    """Run both runners on every batch and judge each output; outputs are matched by position.

    `precision` picks the default tolerance per output dtype (see `tolerance_for`);
    `tolerance` overrides it for every float output.
    """
    if not batches:
        raise UserError("verification needs at least one input batch")
    ref_outputs: list[list[np.ndarray]] = []
    cand_outputs: list[list[np.ndarray]] = []
    samples = 0
    for feeds in batches:
        check_finite(feeds)
        ref, cand = reference.infer(feeds), candidate.infer(feeds)
        if len(ref) != len(cand):
            raise UserError(f"{candidate.name} gives {len(cand)} outputs, {reference.name} gives {len(ref)}")
        ref_outputs.append(list(ref.values()))
        cand_outputs.append(list(cand.values()))
        samples += next(iter(feeds.values())).shape[0] if feeds else 1
    report = ParityReport(reference.name, candidate.name, samples, inputs_source)
    for index, name in enumerate(candidate.output_names):
        ref = np.concatenate([r[index].reshape(1, -1) if r[index].ndim == 0 else r[index] for r in ref_outputs])
        cand = np.concatenate([c[index].reshape(1, -1) if c[index].ndim == 0 else c[index] for c in cand_outputs])
        chosen = tolerance if tolerance and np.issubdtype(ref.dtype, np.floating) else None
        if chosen is None and is_binary(ref):
            chosen = TOLERANCES["exact"]  # spikes: one flipped spike is a failure, not an error size
        report.outputs.append(judge(name, ref, cand, chosen or tolerance_for(precision, ref.dtype)))
    return report


class StreamingRunner(Runner):
    """A step-form model (one timestep: `(x_t, *state) -> (*y_t, *state')`) run one step per
    `infer`, its state kept between calls. It wraps any backend's runner, or the torch
    reference, so every step-form model is driven by this one loop.

    `snn` is the form's description (`SpikingForm.describe()`, kept in the sidecar) and
    `state_specs` the state inputs' specs. `reset(batch)` starts every state at the value the
    description records; `set_state` takes states from elsewhere (another device, a
    checkpoint) and checks their shapes.
    """

    def __init__(self, runner: Runner, snn: dict, state_specs: list[TensorSpec]):
        if snn.get("form") != "step":
            raise UserError("not a step-form model (export it with snn_form='step')")
        self.runner, self.snn, self.state_specs = runner, snn, state_specs
        self.name, self.device, self.state = f"{runner.name}-streaming", runner.device, []

    @classmethod
    def open(cls, artifact: str | Path | Artifact, threads: int | None = None) -> "StreamingRunner":
        """The streaming runner of a step-form artifact, on its backend's runner."""
        from edgeport.export.registry import runner_for

        art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
        snn = art.settings.get("snn") or {}
        if snn.get("form") != "step":
            raise UserError(f"{art.path} is not a step-form spiking artifact (export it with snn_form='step')")
        return cls(runner_for(art, threads=threads), snn, [s for s in art.inputs if s.name in snn["state_inputs"]])

    def load(self) -> "StreamingRunner":
        self.runner.load()
        self.input_names = self.runner.input_names[:1]
        self.output_names = list(self.snn["outputs"])
        return self.reset()

    def reset(self, batch: int = 1) -> "StreamingRunner":
        """Every state back to its initial value, for `batch` streams."""
        self.state = [np.full([batch, *spec.shape[1:]], value, dtype=np.float32)
                      for spec, value in zip(self.state_specs, self.snn["initial_state_values"])]
        return self

    def set_state(self, state: list[np.ndarray]) -> None:
        """Replace the state; each tensor must have the shape the step model declares."""
        if len(state) != len(self.state_specs):
            raise UserError(f"the step model has {len(self.state_specs)} state tensors, {len(state)} were given")
        for spec, given in zip(self.state_specs, state):
            expected = list(spec.shape)
            if list(given.shape[1:]) != expected[1:] or (isinstance(expected[0], int) and given.shape[0] != expected[0]):
                raise UserError(f"state {spec.name!r} has shape {list(given.shape)}, the step model needs {expected}")
        self.state = [np.asarray(s, dtype=np.float32) for s in state]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step on `feeds`' (only) input; returns the model outputs, keeps the new state."""
        x = next(iter(feeds.values()))
        results = list(self.runner.infer(dict(zip(self.runner.input_names, [x, *self.state]))).values())
        count = len(self.output_names)
        self.state = results[count:]
        return dict(zip(self.output_names, results[:count]))

    def close(self) -> None:
        self.runner.close()


class UnrolledSteps(Runner):
    """A streaming runner driven for the form's T steps per `infer`: every output and every
    next state stacked over time, (T, B, ...) — what verification compares step by step.
    The input is one frame repeated, or (T, B, ...) for a sequence form."""

    def __init__(self, streaming: StreamingRunner):
        self.streaming, self.name, self.device = streaming, streaming.runner.name, streaming.device

    def load(self) -> "UnrolledSteps":
        self.streaming.load()
        self.input_names = ["x"]
        self.output_names = [*self.streaming.output_names, *self.streaming.snn["state_outputs"]]
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = next(iter(feeds.values()))
        sequence, steps = self.streaming.snn["sequence"], self.streaming.snn["timesteps"]
        self.streaming.reset(x.shape[1] if sequence else x.shape[0])
        per_step = []
        for t in range(steps):
            outputs = self.streaming.infer({"x": x[t] if sequence else x})
            per_step.append([*outputs.values(), *self.streaming.state])
        return {name: np.stack([step[i] for step in per_step]) for i, name in enumerate(self.output_names)}

    def close(self) -> None:
        self.streaming.close()
