"""Parity between any two runners on the same inputs (Polygraphy's Comparator, in small).

`compare(reference, candidate, batches)` runs both runners on every batch of feeds,
matches outputs by position, and judges each output with a tolerance chosen for its
dtype and the artifact's precision (`edgeport.core.tolerance_for`):

- float32: max abs error <= 1e-4 x the output's scale (max |reference|);
- float16: max abs error <= 1e-2 x scale;
  (an export's fp32 or fp16 output beyond these is judged again against the model's own
  noise floor at that precision: `edgeport.sdk._judge_by_noise_floor`)
- integer-quantized (int8 and narrower): cosine similarity and SQNR, not atol;
- bool and integer outputs (class ids), and outputs whose reference is all 0 and 1 (spikes):
  exactly equal.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from edgeport.core import (TOLERANCES, Artifact, OutputParity, ParityReport, Runner, TensorSpec, Tolerance,
                           feeds_from, input_names, tolerance_for)
from edgeport.errors import UserError


def is_binary(array: np.ndarray) -> bool:
    """Whether every value is 0 or 1 (spike tensors), judged exactly rather than by error size."""
    return array.dtype == np.bool_ or (array.size > 0 and bool(np.isin(array, (0, 1)).all()))


def check_finite(feeds: dict[str, np.ndarray], purpose: str = "verification") -> None:
    """Refuse inputs holding NaN or Inf: parity or latency measured on them is not the model's
    (NaN changes the path through comparisons, top-k and masks); `purpose` names the step."""
    for name, array in feeds.items():
        if np.issubdtype(array.dtype, np.floating):
            nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            if nan or inf:
                raise UserError(f"{purpose} input {name!r} contains {nan} NaN and {inf} Inf values")


TOLERANCE_KINDS = ("relative-to-scale", "cosine", "exact")


def check_tolerance(tolerance: Tolerance) -> None:
    """Refuse a tolerance no output could meet (a NaN or negative bound: every output would
    fail whatever the artifact computes) or one no output could miss (an infinite relative
    bound, or cosine >= -1 with SQNR >= -inf: every output would pass); an unknown `kind`
    too, which was judged as a relative bound of 0."""
    if tolerance.kind not in TOLERANCE_KINDS:
        raise UserError(f"tolerance kind {tolerance.kind!r} is not one of {', '.join(TOLERANCE_KINDS)}")
    if tolerance.kind == "relative-to-scale" and not 0 <= tolerance.max_error < math.inf:
        raise UserError(f"tolerance max_error must be a finite number >= 0 (relative to the output's scale), "
                        f"not {tolerance.max_error}")
    if tolerance.kind == "cosine":
        if not -1 <= tolerance.min_cosine <= 1:
            raise UserError(f"tolerance min_cosine must be between -1 and 1, not {tolerance.min_cosine}")
        if math.isnan(tolerance.min_sqnr_db) or tolerance.min_sqnr_db == math.inf:
            raise UserError(f"tolerance min_sqnr_db must be a number of dB below infinity, not {tolerance.min_sqnr_db}")
        if tolerance.min_cosine == -1 and tolerance.min_sqnr_db == -math.inf:
            raise UserError("tolerance min_cosine -1 with min_sqnr_db -inf passes every output: nothing is checked")


def is_fill(array: np.ndarray) -> np.ndarray:
    """Where a float array holds its dtype's largest magnitude (transformers fill masked
    positions with float32's lowest, -3.4e38): a marker, not a number, so it must agree
    exactly and stays out of the output's scale, where it would allow an error of 3.4e34."""
    if array.dtype.kind != "f":
        return np.zeros(array.shape, dtype=bool)
    return np.isfinite(array) & (np.abs(array) >= np.finfo(array.dtype).max)


def agreeing(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Elementwise exact agreement, in the arrays' own dtypes (float64 cannot tell the int64
    2**60 from 2**60 + 1); infinities of one sign agree, NaN agrees with nothing, and a fill
    value agrees with a lower-precision candidate's own fill or infinity of the same sign."""
    same = reference == candidate
    if candidate.dtype.kind == "f":
        fill = is_fill(reference)
        held = np.isinf(candidate) | (np.abs(candidate) >= np.finfo(candidate.dtype).max)
        same |= fill & held & (np.sign(reference) == np.sign(candidate))
    return same


def judge(name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance) -> OutputParity:
    """Compute the error figures of one output and apply `tolerance` to them.

    Elements that agree exactly (equal infinities and fill values included) add no error;
    any other element that is not a finite number on both sides (NaN in either, an infinity
    against a number) is an error of unbounded size, which fails every tolerance and is
    counted in the verdict's reason. The scale (max |reference|) and the cosine and SQNR are
    taken over the elements that are numbers, so a fill value cannot hide an error."""
    check_tolerance(tolerance)
    if reference.shape != candidate.shape:
        raise UserError(f"output {name!r}: shape {list(candidate.shape)} differs from reference "
                        f"{list(reference.shape)}")
    shape = list(reference.shape)
    reference, candidate = reference.ravel(), candidate.ravel()
    agree = agreeing(reference, candidate)
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    numeric = np.isfinite(ref) & np.isfinite(cand) & ~is_fill(reference) & ~agree
    diff = np.where(agree, 0.0, np.inf)
    diff[numeric] = np.abs(ref[numeric] - cand[numeric])
    if reference.dtype.kind in "biu" and candidate.dtype.kind in "biu":
        diff[~agree] = np.maximum(diff[~agree], 1.0)  # integers that differ differ by 1 at least
    counted = np.isfinite(ref) & ~is_fill(reference)
    scale = float(np.abs(ref[counted]).max()) if counted.any() else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    sized = bool(np.isfinite(diff).all())
    unit = scale if scale > 0 else 1.0  # figures on values / scale: float64 outputs of 1e200 would overflow
    kept = counted & (numeric | agree)
    r, c = ref[kept] / unit, cand[kept] / unit
    noise, signal = float((diff[kept] / unit) @ (diff[kept] / unit)), float(r @ r)
    if noise == 0 and sized:
        sqnr = math.inf
    else:
        sqnr = 10 * math.log10(signal / noise) if sized and signal > 0 else -math.inf
    norms = float(np.linalg.norm(r) * np.linalg.norm(c))
    cosine = float(r @ c / norms) if sized and norms > 0 else (1.0 if max_abs == 0 else 0.0)
    mismatched = int((~agree).sum())
    if tolerance.kind == "exact":
        passed = mismatched == 0
    elif tolerance.kind == "cosine":
        passed = sized and cosine >= tolerance.min_cosine and sqnr >= tolerance.min_sqnr_db
    else:
        passed = max_rel <= tolerance.max_error
    reason = _unsized_reason(reference, candidate, agree)
    if reason:
        tolerance = replace(tolerance, why=f"{tolerance.why}; {reason}")
    return OutputParity(name, shape, max_abs, max_rel, scale, cosine, sqnr, mismatched, tolerance, passed)


def _unsized_reason(reference: np.ndarray, candidate: np.ndarray, agree: np.ndarray) -> str:
    """Why an output's error has no size, in words ('' where every disagreement is between
    two numbers): NaN in the reference proves nothing of the artifact on those inputs."""
    if not reference.size:
        return "the output has no elements: only its shape is compared"
    parts = []
    for side, values in (("the reference", reference), ("the candidate", candidate)):
        if values.dtype.kind == "f":
            nan, inf = int(np.isnan(values).sum()), int((np.isinf(values) & ~agree).sum())
            if nan or inf:
                parts.append(f"{side} has {nan} NaN and {inf} unmatched Inf values")
    if reference.dtype.kind == "f" and np.isnan(reference).any():
        parts.append("the model itself computes no number there on these inputs, so nothing is proven: "
                     "verify on inputs it is defined on")
    fills = int((is_fill(reference) & ~agree).sum())
    if fills:
        parts.append(f"{fills} fill values (the dtype's largest magnitude, a mask) are not matched")
    return "; ".join(parts)


def compare(reference: Runner, candidate: Runner, batches: list[dict[str, np.ndarray]],
            precision: str = "fp32", inputs_source: str = "given",
            tolerance: Tolerance | None = None) -> ParityReport:
    """Run both runners on every batch and judge each output; outputs are matched by position.

    `precision` picks the default tolerance per output dtype (see `tolerance_for`);
    `tolerance` overrides it for every float output.
    """
    if not batches:
        raise UserError("verification needs at least one input batch")
    if tolerance is not None:
        check_tolerance(tolerance)  # before the runs: a bad bound is known without them
    ref_outputs: list[list[np.ndarray]] = []
    cand_outputs: list[list[np.ndarray]] = []
    names: list[str] = []
    samples = 0
    for feeds in batches:
        check_finite(feeds)
        ref, cand = reference.infer(feeds), candidate.infer(feeds)
        if len(ref) != len(cand):
            raise UserError(f"{candidate.name} gives {len(cand)} outputs, {reference.name} gives {len(ref)}")
        ref_outputs.append(list(ref.values()))
        cand_outputs.append(list(cand.values()))
        names = names or list(cand)  # the outputs it gave, not the names it declares: none is left unjudged
        samples += _batch_size(feeds)
    if not names:
        raise UserError(f"{candidate.name} and {reference.name} give no outputs: there is nothing to compare")
    report = ParityReport(reference.name, candidate.name, samples, inputs_source)
    for index, name in enumerate(names):
        ref, cand, shape = _joined(name, [r[index] for r in ref_outputs], [c[index] for c in cand_outputs])
        chosen = tolerance if tolerance and np.issubdtype(ref.dtype, np.floating) else None
        if chosen is None and is_binary(ref):
            chosen = TOLERANCES["exact"]  # spikes: one flipped spike is a failure, not an error size
        parity = judge(name, ref, cand, chosen or tolerance_for(precision, ref.dtype))
        parity.shape = shape
        report.outputs.append(parity)
    return report


def _batch_size(feeds: dict[str, np.ndarray]) -> int:
    """The samples in one batch of feeds: its first input's leading axis (1 for a scalar input
    or no inputs)."""
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def quantization_cost(float_model, qmodel, args: tuple, *, output_names: Sequence[str] = (),
                      precision: str | None = None, inputs_source: str = "given inputs") -> ParityReport:
    """Each output of the quantized torch model `qmodel` against the float model's on the
    batch `args`, judged with the tolerance of `precision` (e.g. "w8a8"; None: the widths in
    `qmodel.quant_report`): what quantizing cost, which an export's verification (against the
    fake-quant model) does not show. Outputs are named by `output_names` (else output_<i>). Where the
    model takes an `attention_mask` of 0s and 1s, an output laid out like it (batch, tokens,
    ...) is judged on the positions it keeps: a padded position's output is computed but
    means nothing, and its error would swamp the rest (all-MiniLM-L6-v2 at W8A8, calibrated on
    8 sentences padded to 16 tokens, 39 % of them padding: last_hidden_state cosine 0.77 over
    every position, 0.998 over the real tokens)."""
    import torch

    from edgeport.core import flatten_outputs

    if precision is None:
        widths = getattr(qmodel, "quant_report", None)
        precision = f"w{widths.w_bits}a{widths.a_bits}" if widths is not None else "w8a8"
    with torch.no_grad():
        reference, candidate = flatten_outputs(float_model(*args)), flatten_outputs(qmodel(*args))
    named = dict(zip(input_names(float_model, len(args)), args))
    mask = named.get("attention_mask")
    mask = mask.bool() if mask is not None and mask.ndim == 2 and bool(((mask == 0) | (mask == 1)).all()) else None
    masked = [mask is not None and tuple(ref.shape[:2]) == tuple(mask.shape) for ref in reference]
    source = inputs_source + ("; token outputs on the positions the attention mask keeps" if any(masked) else "")
    report = ParityReport("float torch", "quantized torch", int(args[0].shape[0]), source)
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        if masked[index]:
            ref, cand = ref[mask], cand[mask]
        ref, cand = (t.float().numpy() if t.is_floating_point() else t.numpy() for t in (ref, cand))
        name = output_names[index] if index < len(output_names) else f"output_{index}"
        report.outputs.append(judge(name, ref, cand, tolerance_for(precision, ref.dtype)))
    return report


def _joined(name: str, references: list[np.ndarray], candidates: list[np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One output of every batch joined for judging: along the batch axis where the batches'
    other axes agree, else element by element (batches of different sequence lengths), each
    batch's shapes checked first. Returns (reference, candidate, shape), a varying axis -1."""
    for reference, candidate in zip(references, candidates):  # before scalars are reshaped: () is not (1, 1)
        if reference.shape != candidate.shape:
            raise UserError(f"output {name!r}: shape {list(candidate.shape)} differs from reference "
                            f"{list(reference.shape)}")
    references = [r.reshape(1, -1) if r.ndim == 0 else r for r in references]
    candidates = [c.reshape(1, -1) if c.ndim == 0 else c for c in candidates]
    if len({r.shape[1:] for r in references}) == 1:
        reference, candidate = np.concatenate(references), np.concatenate(candidates)
        return reference, candidate, list(reference.shape)
    ranks = {r.ndim for r in references}
    shape = [-1] * max(ranks)
    if len(ranks) == 1:
        shape = [sum(r.shape[0] for r in references)] + [
            sizes.pop() if len(sizes := {r.shape[axis] for r in references}) == 1 else -1
            for axis in range(1, ranks.pop())]
    return (np.concatenate([r.ravel() for r in references]), np.concatenate([c.ravel() for c in candidates]), shape)


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
        self.name = f"{self.runner.name}-streaming"
        self.input_names = self.runner.input_names[:1]
        self.output_names = list(self.snn["outputs"])
        return self.reset()

    def reset(self, batch: int = 1) -> "StreamingRunner":
        """Every state back to its initial value (one number, or one per element), for `batch` streams."""
        self.state = [np.broadcast_to(np.asarray(value, dtype=np.float32), [batch, *spec.shape[1:]]).copy()
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
        self.name = self.streaming.runner.name  # a runner may name itself fully once loaded (its precision)
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


# --- localization: the first layer whose output departs ------------------------------------------
#
# Where an artifact departs from torch, which layer did it first? The artifact's intermediate
# tensors are compared with the torch model's: an ONNX file's every node output (exposed as
# graph outputs), a Core ML package's every op output (from the MIL interpreter), each named as
# the torch.export graph names its nodes; torch's side is that graph run node by node, each
# node carrying the `nn.Module` path that called it. A quantized torch model is localized on its
# own as well: each module's output with fake quantization against the same module with every
# quantizer bypassed, so the table shows which layer int8 (or int4) broke.


@dataclass
class LayerError:
    """One intermediate tensor compared: the torch module that computed it and its op (with
    any the candidate folded into it, a BatchNorm into its conv), the tensor's name in the
    candidate and the candidate's op, and the error figures and verdict."""

    module: str
    op: str
    name: str
    candidate_op: str
    parity: OutputParity


@dataclass
class Localization:
    """Intermediate tensors compared, in the order the candidate computes them; `first` is the
    first beyond its tolerance (None where none departs) and `unmatched` counts the candidate's
    tensors torch has no counterpart for (internal to a fused or decomposed op)."""

    subject: str
    rows: list[LayerError]
    unmatched: int = 0

    @property
    def first(self) -> LayerError | None:
        return next((row for row in self.rows if not row.parity.passed), None)

    def around_first(self, before: int = 3, after: int = 3) -> list[LayerError]:
        """The rows that lead up to the first departure and follow it (the last ones without one)."""
        if self.first is None:
            return self.rows[-before:]
        index = self.rows.index(self.first)
        return self.rows[max(0, index - before):index + after + 1]

    def summary(self) -> str:
        first = self.first
        if not self.rows:  # nothing to judge is not a clean bill
            return (f"{self.subject}: no intermediate tensor of the artifact pairs with one of the model's by name, "
                    f"so none was compared (is this the model it was exported from?)")
        if first is None:
            return f"{self.subject}: no intermediate departs beyond tolerance ({len(self.rows)} compared)"
        return (f"{self.subject}: first departure at {first.module} ({first.op}; {first.candidate_op} "
                f"{first.name!r}): rel {first.parity.max_rel_error:.3g}, SQNR {first.parity.sqnr_db:.1f} dB "
                f"[{first.parity.tolerance.short()}]")

    def to_dict(self) -> dict:
        return {"subject": self.subject, "unmatched": self.unmatched, "first": self.first and asdict(self.first),
                "rows": [asdict(row) for row in self.rows]}


@dataclass
class GraphNode:
    """One op node of a torch.export graph run on an input: its output (the first of several),
    the module path that called it, its ATen op, and the op nodes it reads, by name."""

    value: np.ndarray
    module: str
    op: str
    inputs: list[str]


def graph_node_outputs(model, args: tuple, output_names: Sequence[str] = ()) -> dict[str, GraphNode]:
    """{node name: GraphNode} of every op node of `model`'s torch.export graph (lowered to
    ATen) run on `args`, in the order the graph runs them. A `getitem` of an op's output tuple
    is charged to that op (its module and op): Python's indexing computes nothing. The node
    behind the graph's i-th output is also listed under `output_names[i]`: an exporter names
    its graph outputs `output_0` or as the model does, so the last layer had no counterpart."""
    import operator

    import torch

    program = torch.export.export(model, tuple(args)).run_decompositions({})
    found: dict[str, GraphNode] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            tensor = value[0] if isinstance(value, (tuple, list)) and value else value
            if node.op == "call_function" and isinstance(tensor, torch.Tensor):
                computing = node.args[0] if node.target is operator.getitem else node
                stack = computing.meta.get("nn_module_stack") or {}
                path = (next(reversed(stack.values()))[0] if stack else "") or "<root>"
                found[node.name] = GraphNode(tensor.detach().cpu().numpy(), path, str(computing.target),
                                             [n.name for n in node.all_input_nodes])
            return value

    module = program.module()
    with torch.no_grad():
        Recorder(module).run(*args)
    returned = next(node for node in module.graph.nodes if node.op == "output").args[0]
    returned = returned if isinstance(returned, (tuple, list)) else [returned]
    for alias, node in zip(output_names, returned):
        if isinstance(node, torch.fx.Node) and node.name in found:
            found[alias] = found[node.name]
    return found


def nodes_behind(name: str, graph: dict[str, GraphNode], exposed: set[str]) -> list[str]:
    """`name` and the op nodes upstream of it whose outputs are not in `exposed`, in graph
    order: what a candidate that exposes only `exposed` computes within its tensor `name` (a
    conv the exporter fused a BatchNorm into yields the BatchNorm's output, not the conv's)."""
    behind, pending = set(), [name]
    while pending:
        current = pending.pop()
        if current not in behind:
            behind.add(current)
            pending += [n for n in graph[current].inputs if n in graph and n not in exposed]
    return [n for n in graph if n in behind]


def describe_nodes(nodes: list[GraphNode]) -> tuple[str, str]:
    """(module, op) labels for the torch nodes one candidate tensor stands for: the first
    module, the others it folds in noted after it, and every distinct op in graph order."""
    modules = list(dict.fromkeys(node.module for node in nodes))
    module = modules[0] + (f" (+ {', '.join(modules[1:])} folded in)" if len(modules) > 1 else "")
    return module, " + ".join(dict.fromkeys(node.op for node in nodes))


def onnx_intermediates(path: Path, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """(value name, op type, value) of every node output of an ONNX file, in graph order: the
    file is run once with each of them exposed as a graph output."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    produced = [(value, node.op_type) for node in proto.graph.node for value in node.output if value]
    listed = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=value) for value, _ in produced if value not in listed)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, {i.name: feeds[i.name] for i in session.get_inputs()})))
    return [(value, op_type, values[value]) for value, op_type in produced]


def artifact_intermediates(artifact: Artifact, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """(name, op type, value) of every intermediate tensor of the artifact on `feeds`: from its
    runner where the runner exposes them (`intermediates`, as the MIL interpreter does), else
    from the format's own means (an ONNX file's node outputs)."""
    from edgeport.export.registry import runner_for

    runner = runner_for(artifact)
    if hasattr(runner, "intermediates"):
        runner.load()
        try:
            return [(o.name, o.op_type, o.value) for o in runner.intermediates(feeds)]
        finally:
            runner.close()
    if artifact.format == "onnx":
        return onnx_intermediates(artifact.path, feeds)
    raise UserError(f"{artifact.format} artifacts expose no intermediate tensors to localize with")


def _judge_intermediate(name: str, reference: np.ndarray, candidate: np.ndarray, precision: str) -> OutputParity:
    """`judge` on one intermediate, the reference first stored as the candidate stores it (a
    float32 mask of -3.4e38 is -inf in an fp16 program, which `judge` counts as agreeing). The
    elements that agree exactly stay in the scale: zeroing them judged a tensor whose large
    values agree bit for bit by its smallest, where one ulp is a large relative error."""
    reference = reference.astype(candidate.dtype) if candidate.dtype.kind == reference.dtype.kind == "f" else reference
    tolerance = TOLERANCES["exact"] if reference.dtype.kind in "biu" else tolerance_for(precision, reference.dtype)
    return judge(name, reference, candidate.astype(reference.dtype, copy=False), tolerance)


def localize_artifact(artifact: Artifact, model, feeds: dict[str, np.ndarray], names: list[str]) -> Localization:
    """Compare every intermediate tensor of `artifact` on one feed with the torch model's node
    of the same name, in the artifact's order, each judged by the artifact precision's
    tolerance (integer and bool tensors exactly). Each row names every torch module and op the
    tensor stands for, those whose outputs the artifact has no tensor for included."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)
    reference = graph_node_outputs(model, args, [spec.name for spec in artifact.outputs])
    intermediates = [(name, op_type, np.asarray(value))
                     for name, op_type, value in artifact_intermediates(artifact, feeds)]
    paired = [(name, op_type, value) for name, op_type, value in intermediates
              if name in reference and reference[name].value.shape == value.shape
              and reference[name].value.dtype.kind in "biuf"]
    exposed = {name for name, _, _ in paired}
    rows = []
    for name, op_type, value in paired:
        behind = nodes_behind(name, reference, exposed)
        exposed.update(behind)  # a node charged to this tensor is not charged to a later one as well
        module, op = describe_nodes([reference[n] for n in behind])
        rows.append(LayerError(module, op, name, op_type,
                               _judge_intermediate(name, reference[name].value, value, artifact.precision)))
    return Localization(f"{artifact.path.name} vs torch", rows, len(intermediates) - len(paired))


def localize_quantization(model, args: tuple) -> Localization:
    """Each module's output of a model from `edgeport.quantize` with fake quantization against
    the same module with every quantizer bypassed (the float computation), on `args`, in the
    order the modules finish; judged by the model precision's tolerance (int8: cosine and SQNR)."""
    import torch

    from edgeport.quant.adalog import AdaLogQuantizer
    from edgeport.quant.ptq import precision_label
    from edgeport.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer

    quantizers = (UniformQuantizer, LogSqrt2Quantizer, AdaLogQuantizer)

    def module_outputs(bypass: bool) -> dict[str, tuple[np.ndarray, str]]:
        outputs: dict[str, tuple[np.ndarray, str]] = {}

        def record(path):
            def hook(module, inputs, output):
                if isinstance(output, torch.Tensor):
                    outputs.setdefault(path, (output.detach().cpu().numpy(), type(module).__name__))
            return hook

        handles = [m.register_forward_hook(lambda module, inputs, output: inputs[0]) for m in model.modules()
                   if bypass and isinstance(m, quantizers)]
        handles += [m.register_forward_hook(record(path)) for path, m in model.named_modules()
                    if path and not isinstance(m, quantizers)]
        try:
            with torch.no_grad():
                model(*args)
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    quantized, floating = module_outputs(bypass=False), module_outputs(bypass=True)
    precision = precision_label(model)
    rows = [LayerError(path, kind, path, kind,
                       judge(path, floating[path][0], value, tolerance_for(precision, value.dtype)))
            for path, (value, kind) in quantized.items() if path in floating and value.dtype.kind == "f"]
    return Localization(f"{type(model).__name__} fake-quant ({precision}) vs float", rows)


def localize(artifact: Artifact, model, batch) -> list[Localization]:
    """Where `artifact` departs from the torch `model`, on one verification `batch` (a tensor or
    tuple): its intermediate tensors against torch's (`localize_artifact`), and for a model from
    `edgeport.quantize` also its fake-quantized modules against their float computation
    (`localize_quantization`)."""
    import torch

    from edgeport.quant.ptq import QUANTIZED_MODULES

    if artifact.settings.get("snn"):
        raise UserError("localization compares one forward pass; spiking forms are verified step by step only")
    names = input_names(model, len(artifact.inputs))
    specs = [TensorSpec(n, s.shape, s.dtype) for n, s in zip(names, artifact.inputs)]
    feeds = feeds_from(names, [batch], specs)[0]
    found = [localize_artifact(artifact, model, feeds, names)]
    if any(isinstance(m, QUANTIZED_MODULES) for m in model.modules()):
        found.append(localize_quantization(model, tuple(torch.from_numpy(feeds[n]) for n in names)))
    return found
