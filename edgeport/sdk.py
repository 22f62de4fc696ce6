"""The Python API: resolve a model, transform it, export it to each target, verify every artifact.

    import edgeport as ep
    arts = ep.export("vit-digits", targets=["onnx"], out="build/vit")
    print(arts["onnx"].parity.summary())

A model is an `nn.Module`, a zoo name, a `.pt2` file (torch.export) or
`package.module:factory` (weights from `weights=`, read without executing code). Every
backend is found through the registry in `edgeport.export`; nothing here knows one by name.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from edgeport.export import registry as backends
from edgeport.export.onnx import saturation_hint
from edgeport import zoo
from edgeport.core import (NOISE_FLOOR_CAP, NOISE_FLOOR_MULTIPLE, SIDECAR_SUFFIX, Artifact, Example, ExportRequest,
                           KeywordInputs, ParityReport, Source, Staging, TensorSpec, Tolerance, TorchRunner, as_args,
                           check_artifact_name, check_feeds, check_input_size, check_token_ids, draw_input, feeds_from,
                           forward_parameters, image_range, input_names, is_image, random_feeds, second_size_feeds,
                           vocabulary_size)
from edgeport.errors import (BackendUnavailable, CheckFailed, EdgeportError, EdgeportWarning, EverythingLeftFloat,
                             UserError, finite_at_least)
from edgeport.load import load_model, load_weights  # noqa: F401  (part of the SDK)
from edgeport.quant.config import QuantConfig
from edgeport.runtime.report import Profile
from edgeport.snn.convert import from_rest, is_neuron, stateful
from edgeport.transforms.spiking import LibraryRunner, SpikingForm, UnrolledModule, build_form
from edgeport.verify import StreamingRunner, UnrolledSteps, check_finite, compare

log = logging.getLogger(__name__)  # progress of the long steps (INFO)


def parse_input(text: str) -> TensorSpec:
    """An example input's shape and dtype from `1x1x8x8` or `1x16:int64`; the values are drawn
    once the model is known (token ids within its vocabulary, see `edgeport.core.draw_input`)."""
    match = re.fullmatch(r"(\d+(?:x\d+)*)(?::(\w+))?", text.strip())
    if not match:
        raise UserError(f"input shape {text!r} is not like 1x3x224x224 or 1x16:int64")
    dtype_name = match.group(2) or "float32"
    if dtype_name not in SUPPORTED_INPUT_DTYPES:
        raise UserError(f"unsupported dtype {dtype_name!r} in input {text!r}; "
                        f"use one of {', '.join(SUPPORTED_INPUT_DTYPES)}")
    shape = [int(d) for d in match.group(1).split("x")]
    spec = TensorSpec(f"input {text}", shape, dtype_name)
    check_input_size(text, shape, np.dtype(dtype_name))
    return spec


SUPPORTED_INPUT_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def parse_dynamic(specs: Sequence[str]) -> dict[str, dict[int, str]] | None:
    """Dynamic axes from `input_ids:1:sequence` strings, as {input: {axis: symbol}}."""
    axes: dict[str, dict[int, str]] = {}
    for spec in specs:
        match = re.fullmatch(r"(\w+):(\d+):(\w+)", spec.strip())
        if not match:
            raise UserError(f"dynamic axis {spec!r} is not like input_ids:1:sequence")
        axes.setdefault(match.group(1), {})[int(match.group(2))] = match.group(3)
    return axes or None


def _example_args(example, model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Example tensors; shapes given as `TensorSpec`s (from `parse_input`) are drawn here,
    seeded, token ids within the model's vocabulary, images as natural-image-like pixels in
    the range the model's first BatchNorm expects (see `edgeport.core.image_range`)."""
    items = (example,) if isinstance(example, (torch.Tensor, TensorSpec)) else tuple(example)
    if not all(isinstance(a, TensorSpec) for a in items):
        return as_args(items)
    names, rng, vocabulary = input_names(model, len(items)), np.random.default_rng(0), vocabulary_size(model)
    drawn = [torch.from_numpy(draw_input(name, spec.shape, np.dtype(spec.dtype), rng, vocabulary=vocabulary))
             for name, spec in zip(names, items)]
    for index, spec in enumerate(items):
        if is_image(spec.shape, np.dtype(spec.dtype)):
            drawn[index] = torch.from_numpy(draw_input(names[index], spec.shape, np.dtype(spec.dtype), rng,
                                                       image=image_range(model, drawn, index)))
    return tuple(drawn)


def zoo_batches(name: str, batch: int = 1, count: int = 64) -> list[tuple[torch.Tensor, ...]]:
    """The first `count` test images of a zoo model in batches of `batch`."""
    images = zoo.testset(name)[0][:count]
    return [(images[i:i + batch],) for i in range(0, len(images) - len(images) % batch or batch, batch)]


def model_label(model: str | torch.nn.Module, loaded: torch.nn.Module) -> str:
    """What artifacts of `model` are named after: a zoo name, else the loaded module's class."""
    return model if isinstance(model, str) and model in zoo.names() else type(loaded).__name__.lower()


def resolve(model, example=None, weights=None, verify_inputs: Sequence[Example | dict] | None = None,
            example_label: str = "the example") -> Source:
    """The Source of a run: the torch model, its example (a zoo model brings its own), and
    the verification batches — the given ones, a zoo model's test images, or the example plus
    seeded draws like it (labelled as such in every report, the example as `example_label`)."""
    torch_model = load_model(model, weights)
    zoo_name = model if isinstance(model, str) and model in zoo.names() else None
    if example is None:
        if zoo_name is None:
            raise UserError("an example input is needed (e.g. --input 1x3x224x224); only zoo models bring their own")
        example = zoo.example(zoo_name)
    label = model_label(model, torch_model)
    if isinstance(example, dict):
        torch_model, example = by_keyword(torch_model, example)
    source = Source(torch_model, _example_args(example, torch_model), label, example_label=example_label)
    if verify_inputs is not None:
        source.verification = [as_args(calibration_batch(torch_model, b, "verification")) for b in verify_inputs]
        source.verification_label = "given inputs"
    elif zoo_name is not None:
        source.verification = zoo_batches(zoo_name, source.example[0].shape[0])
        source.verification_label = f"{zoo_name} test images"
    return source.with_default_verification()


def by_keyword(model: torch.nn.Module, example: dict[str, torch.Tensor | np.ndarray]
               ) -> tuple[KeywordInputs, tuple[torch.Tensor, ...]]:
    """`model` called by the names of a dict `example` (`KeywordInputs`: its inputs named and
    ordered as the dict's keys, every other parameter of the forward at its default) and the
    example's tensors in that order. Each key must name a parameter of the forward, positional
    or keyword-only; per-token arrays (ids, mask, types, positions) must share one shape."""
    forward = f"{type(model).__name__}.forward"
    if not example:
        raise UserError(f"the example dict is empty: name {forward}'s inputs, e.g. {{'input_ids': ids}}")
    parameters = forward_parameters(model, positional=False)
    unknown = [n for n in example if n not in parameters]
    if unknown:
        raise UserError(f"example input {unknown[0]!r} names no parameter of {forward} "
                        f"(its parameters: {', '.join(parameters) or 'none that a keyword can name'})")
    wrong = {n: type(v).__name__ for n, v in example.items() if not isinstance(v, (torch.Tensor, np.ndarray))}
    if wrong:
        name, kind = next(iter(wrong.items()))
        raise UserError(f"example input {name!r} is a {kind}: each value must be a tensor or numpy array")
    _check_token_aligned(example, "example")
    return KeywordInputs.of(model, list(example)), as_args(tuple(example.values()))


def _run_reference(model: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    shapes = ", ".join("x".join(map(str, a.shape)) + f":{str(a.dtype).removeprefix('torch.')}" for a in args)
    try:
        with torch.no_grad():
            model(*args)
    except Exception as error:
        raise UserError(f"the model does not accept input {shapes}: {str(error).splitlines()[0][:200]}") from error


def precision_of(model: torch.nn.Module) -> str:
    """The precision label: "fp32", or "w<bits>a<bits>" for a model from `edgeport.quantize` (its narrowest layer)."""
    from edgeport.quant.ptq import precision_label

    return precision_label(model)


def _runners(artifact: Artifact, model: torch.nn.Module, form: SpikingForm | None, names: list[str]):
    """The (reference, candidate) runner pair that verifies `artifact`: the torch model (or
    the spiking form's torch module) and the artifact's backend runner, a step form driven
    for T steps on both sides alike."""
    candidate = backends.runner_for(artifact)
    if form is None:
        return TorchRunner(model, names), candidate
    reference = TorchRunner(form.module, form.input_names, form.output_names)
    if form.form == "step":
        snn, states = form.describe(), form.state_specs()
        return UnrolledSteps(StreamingRunner(reference, snn, states)), UnrolledSteps(StreamingRunner(candidate, snn,
                                                                                                    states))
    return reference, candidate


def verify_at_second_size(artifact: Artifact, model: torch.nn.Module, args: tuple[torch.Tensor, ...],
                          dynamic_axes: dict[str, dict[int, str]], tolerance: Tolerance | None = None) -> str:
    """Verify an artifact at another size of its dynamic axes than the example's
    (three more, `second_size_feeds`): the export's own verification runs at the example's
    size, where a dynamic axis that the graph pins in fact passes as well. Returns what was
    checked; a failure raises CheckFailed. A size the torch model itself refuses is not one the
    artifact owes: then three fewer, and else the line says that no other size was checked."""
    names, ranges = input_names(model, len(args)), None
    for _ in ("three more", "three fewer"):
        feeds, sizes = second_size_feeds(model, args, names, dynamic_axes, ranges)
        batch = tuple(torch.from_numpy(feeds[0][n]) for n in names)
        try:
            with torch.no_grad():
                model(*batch)
        except Exception:  # the model's own limit (a position table): not the artifact's
            ranges = {symbol: (1, size - 4) for symbol, size in sizes.items()}  # below the example's size
            continue
        shown = ", ".join(f"{symbol}={size}" for symbol, size in sizes.items())
        failed = (f"{artifact.path.name} passes at the example's size but fails at {shown}, a size its dynamic "
                  f"axes promise")
        try:
            report = verify_artifact(artifact, model, [batch], f"seeded inputs at {shown}", tolerance=tolerance)
        except UserError as error:  # inputs drawn here, so it is the artifact's output that disagrees (its shape)
            raise CheckFailed(f"{failed}: {error}") from error
        if report is None:
            return f"not checked here (see notes) at {shown}"
        if not report.passed:
            raise CheckFailed(f"{failed}: {report.failures()[0].describe()}", report)
        return report.summary().splitlines()[0]
    return "not checked at another size: the torch model runs at none (three more or three fewer)"


def _real_inputs_hint(given: Sequence[Example] | None) -> str:
    """What to try when verification on inputs edgeport made up fails: real samples."""
    if given is not None:
        return ""
    return ("; these inputs were made up, and a trained model can amplify inputs unlike its data: verify on real "
            "samples (verify_inputs=..., `edgeport export --verify-inputs data.npz`, or `edgeport verify ARTIFACT "
            "--against MODEL --inputs data.npz`)")


class TorchAtDtype(TorchRunner):
    """The torch model computed in another float dtype (a copy; float32 inputs converted, tensors
    the model creates itself too, outputs returned as float32 or float64): float64 is what every
    fp32 computation approximates, float16 what an fp16 one does."""

    def __init__(self, model: torch.nn.Module, input_names: list[str], output_names: list[str], dtype: torch.dtype):
        super().__init__(copy.deepcopy(model).to(dtype), input_names, output_names)
        self.dtype, self.name = dtype, f"torch-{str(dtype).removeprefix('torch.')}"

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        numpy_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        converted = {n: a.astype(numpy_dtype) if a.dtype == np.float32 else a for n, a in feeds.items()}
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64 if self.dtype == torch.float64 else torch.float32)
        try:
            outputs = super().infer(converted)
        finally:
            torch.set_default_dtype(default)
        return {n: a.astype(np.float32) if a.dtype == np.float16 else a for n, a in outputs.items()}


# The dtype torch computes in for each precision whose failures the noise floor re-judges.
OWN_DTYPE = {"fp32": torch.float32, "fp16": torch.float16}


def _judge_by_noise_floor(report: ParityReport, model: torch.nn.Module, names: list[str],
                          feeds: list[dict[str, np.ndarray]], precision: str) -> None:
    """Re-judge the outputs of an fp32 or fp16 artifact that failed the fixed bound against the
    model's own noise floor at that precision: torch's error computing the model in float32 (or
    float16) against the same model in float64, on the same feeds. An output within
    `NOISE_FLOOR_MULTIPLE` times that error, and within `NOISE_FLOOR_CAP[precision]`, passes
    (reordered arithmetic in a model that amplifies rounding, as deep networks on inputs far
    from their training data do); the rule and both figures go into its tolerance. Where the
    model cannot run in float64 (or float16) the failure stands, saying so."""
    failed = [o for o in report.outputs if not o.passed and o.tolerance.kind == "relative-to-scale"]
    if not failed:
        return
    outputs, cap = [o.name for o in report.outputs], NOISE_FLOOR_CAP[precision]
    try:
        own = compare(TorchAtDtype(model, names, outputs, torch.float64).load(),
                      TorchAtDtype(model, names, outputs, OWN_DTYPE[precision]).load(),
                      feeds, inputs_source=report.inputs_source)
    except Exception as error:  # a model that hard-codes a dtype somewhere cannot run in another
        for output in failed:
            output.tolerance = dataclasses.replace(output.tolerance, why=output.tolerance.why + (
                f"; the noise-floor check could not run the model in float64 and {precision} "
                f"({str(error).splitlines()[0][:120]})"))
        return
    noise = {o.name: o.max_rel_error for o in own.outputs}
    for output in failed:
        floor = noise[output.name]
        bound = min(NOISE_FLOOR_MULTIPLE * floor, cap)
        output.tolerance = Tolerance("relative-to-scale", max_error=max(bound, output.tolerance.max_error), why=(
            f"{precision} within the model's own noise floor: torch {precision} differs from float64 by {floor:.3g} "
            f"of the output scale here; up to {NOISE_FLOOR_MULTIPLE}x that, at most {cap:g}, is allowed (the fixed "
            f"{output.tolerance.max_error:g} failed)" + (
                f"; at this noise {precision} cannot be verified on these inputs" if floor >= cap else "")))
        output.passed = output.max_rel_error <= output.tolerance.max_error


def verify_artifact(artifact: Artifact, model: torch.nn.Module, batches: Sequence[Example], inputs_source: str, *,
          form: SpikingForm | None = None, tolerance: Tolerance | None = None) -> ParityReport | None:
    """Parity of `artifact` against its torch `model` (or spiking `form`) on `batches`; None,
    with the reason in the artifact's notes, where the artifact's runtime does not run here."""
    names = form.input_names[:1] if form else input_names(model, len(artifact.inputs))
    reference, candidate = _runners(artifact, model, form, names)
    try:
        candidate.load()
    except BackendUnavailable as unavailable:
        artifact.settings.setdefault("verification", {})["numerical"] = f"not checked here: {unavailable.reason}"
        artifact.notes.append(f"numerical parity NOT checked: {unavailable.reason}")
        return None
    specs = [TensorSpec(n, s.shape, s.dtype) for n, s in zip(names, artifact.inputs)]
    feeds = feeds_from(names, batches, specs if form is None else None)
    if form is None:  # a spiking form's feeds hold all T steps; its artifact takes one
        check_feeds(feeds, specs)
    check_token_ids(feeds, vocabulary_size(model))
    for feed in feeds:  # the artifact may name its inputs differently: match them by position
        for artifact_name, torch_name in zip(candidate.input_names, names):
            feed.setdefault(artifact_name, feed[torch_name])
    if isinstance(reference, TorchRunner):
        reference.output_names = list(candidate.output_names)
    try:
        report = compare(reference.load(), candidate, feeds, precision=artifact.precision,
                         inputs_source=inputs_source + (f", {form.timesteps} timesteps" if form else ""),
                         tolerance=tolerance)
        if form is None and tolerance is None and artifact.precision in OWN_DTYPE and not report.passed:
            _judge_by_noise_floor(report, model, names, feeds, artifact.precision)
    finally:
        candidate.close()
    if form is not None and form.converted:  # the converted network against the library's own run
        library = LibraryRunner(model, form)
        converted = TorchRunner(UnrolledModule(form.stepped, form.timesteps, form.sequence, form.outputs), ["x"],
                                library.output_names)
        report.outputs += compare(library, converted.load(), [{"x": f[names[0]]} for f in feeds],
                                  inputs_source=inputs_source).outputs
    return report


def _seeded_example(artifact: Artifact) -> tuple[torch.Tensor, ...]:
    """An example for re-checking `artifact`: shaped as the export's example (the sidecar's
    `example_shapes`; an older sidecar's symbolic axes at 1) and drawn as verification's
    random inputs are (`draw_input`: token ids below the recorded vocabulary, masks over a
    prefix, floats standard normal), so that seeded draws like it exercise the model."""
    specs = artifact.inputs[:1] if artifact.settings.get("snn") else artifact.inputs
    shapes = artifact.settings.get("example_shapes") or [[d if isinstance(d, int) else 1 for d in spec.shape]
                                                         for spec in specs]
    rng = np.random.default_rng(0)
    return tuple(torch.from_numpy(draw_input(spec.name, shape, np.dtype(spec.dtype), rng,
                                             vocabulary=artifact.settings.get("vocabulary")))
                 for spec, shape in zip(specs, shapes))


def verify(artifact: Artifact | str | Path, model: str | torch.nn.Module, inputs: Sequence[Example] | None = None,
           *, weights: str | Path | None = None, tolerance: Tolerance | None = None,
           inputs_source: str = "given inputs", localize: bool = False) -> ParityReport:
    """Run `artifact` and the torch `model` on the same inputs and report per-output parity.

    `inputs` is a sequence of batches (each a tensor or tuple of tensors in the artifact's input
    order, or a dict by input name); with None, a zoo
    model's test images are used, or seeded draws shaped as the export's example was. An
    artifact exported from a dict example calls `model` by those names again. A
    spiking artifact is verified step by step against the same form of `model`.
    `localize=True` also finds where the artifact departs, on the first batch: the report's
    `localization` lists `edgeport.verify.Localization`s (its intermediate tensors against
    torch's, the first beyond tolerance named with its module path; for a model from
    `edgeport.quantize` also each module's fake-quantized output against its float one).
    """
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    changed = art.changed_files()
    if changed:  # an edited graph is still checked (a simplifier's output may be faithful); the user is told
        warnings.warn(f"{', '.join(changed)} of {art.path.name} changed since edgeport exported and verified it "
                      f"(its sha256 differs from the sidecar's record): checking the file as it is now",
                      EdgeportWarning, stacklevel=2)
    snn = art.settings.get("snn")
    example = _seeded_example(art)
    if art.settings.get("keyword_inputs"):  # exported from a dict example: the model is called by those names
        example = dict(zip(art.settings["keyword_inputs"], example))
    source = resolve(model, example, weights, inputs, example_label="a seeded example shaped as the export's")
    example = source.example
    _run_reference(source.model, example)
    if inputs is not None:
        source.verification_label = inputs_source
    form = build_form(source.model, example[0], snn["form"], snn["timesteps"], snn["sequence"],
                      "per_step" if snn.get("returns") == "per_step" else "model") if snn else None
    report = verify_artifact(art, source.model, source.verification, source.verification_label, form=form, tolerance=tolerance)
    if report is None:
        raise BackendUnavailable(art.format, art.notes[-1].removeprefix("numerical parity NOT checked: "))
    if re.fullmatch(r"w\d+a\d+", art.precision) and precision_of(source.model) == "fp32":
        # within the width's tolerance of the float model: what quantizing may cost, not parity
        report.reference = ("the float torch model (a quantization-cost check; the file's parity was checked "
                            "against its fake-quant model at export, and its sha256 since)")
    if localize:
        from edgeport.verify import localize as find_departures

        report.localization = find_departures(art, source.model, source.verification[0])
    return report


def _within_ranks(dynamic_axes: dict[str, dict[int, str]] | None, names: list[str], args: tuple[torch.Tensor, ...]
                 ) -> dict[str, dict[int, str]] | None:
    """`dynamic_axes` with each negative axis of an input in `names` counted from its last (-1
    is the last axis), so that `dynamic_batch`'s axis 0 and a -4 name one axis once; an axis
    beyond the input's rank raises UserError. The exporters index axes from 0: a -1 ended in
    "list index out of range" in the Core ML one. Names of no input are left to the exporter."""
    if not dynamic_axes:
        return dynamic_axes
    shapes = dict(zip(names, (arg.shape for arg in args)))
    counted = dict(dynamic_axes)
    for name, axes in dynamic_axes.items():
        if name not in shapes:
            continue
        rank = len(shapes[name])
        bad = [axis for axis in axes if isinstance(axis, bool) or not isinstance(axis, int) or not -rank <= axis < rank]
        if bad:
            raise UserError(f"dynamic axis {bad[0]!r} of input {name!r} does not exist: it has {rank} axes (0 to "
                            f"{rank - 1}, or -{rank} to -1 from the end), shape {'x'.join(map(str, shapes[name]))}")
        counted[name] = {axis % rank: symbol for axis, symbol in axes.items()}
    return counted


def export(model: str | torch.nn.Module, example: Example | dict[str, torch.Tensor | np.ndarray] | None = None,
           targets: str | Sequence[str] = ("onnx",),
           out: str | Path = "build", *, name: str | None = None, weights: str | Path | None = None,
           verify_inputs: Sequence[Example | dict] | None = None, verify_inputs_source: str = "given inputs",
           check: bool = True,
           dynamic_batch: bool = False, dynamic_axes: dict[str, dict[int, str]] | None = None,
           tolerance: Tolerance | None = None, snn_form: str | None = None, timesteps: int | None = None,
           sequence: bool = False, snn_outputs: str = "model", slim: bool = False, **options
           ) -> dict[str, Artifact]:
    """Export `model` to every target in `targets` under `out`, verifying each artifact.

    `example` is one input batch (a zoo model brings its own): a tensor, a tuple in the
    forward's order, or a dict by parameter name ({"input_ids": ids, "attention_mask": mask}),
    which calls the model by keyword (`by_keyword`): each key a parameter of the forward in any
    position or keyword-only, the artifact's inputs named and ordered as the keys, every other
    parameter at its default. Every artifact is verified
    against the torch model on `verify_inputs` (a sequence of batches, each a tensor, a tuple
    in the forward's order or a dict by its input names; default: a zoo
    model's test images, else the example plus seeded random draws; reports name given batches
    `verify_inputs_source`) unless `check=False`.
    A failed verification raises `CheckFailed` and leaves nothing of that target in `out`;
    with several targets, each that passed is still committed, and the `CheckFailed` raised at
    the end carries them as `error.results` (an `ExportResults`: the committed artifacts and
    `failures`, why each other target failed).
    Spiking models export as `snn_form="unrolled"` (T steps in one graph) or `"step"` (one
    step, membranes as graph inputs and outputs) with `timesteps` T; `sequence=True` takes
    the input as (T, B, ...) instead of one frame repeated. The unrolled form returns what the
    model returns (`snn_outputs="model"`: the zoo SNN's readout, a library network's outputs
    over time) or every step's outputs (`"per_step"`, named `<output>_per_step`); the sidecar's
    `snn.returns` says which. `slim=True` first turns pruning
    into a smaller dense model (see `edgeport.slim`) and verifies the artifact against the
    pruned model.

    `options` are the backends' own (each backend's `Options`; `edgeport export --help` lists
    them): `opset` and `exporter` (ONNX, TensorRT), `int8_weights` (ONNX: "auto", "signed" or
    "unsigned", how a quantized model's 8-bit weights are stored), `coreml_precision` and `coreml_weights`
    ("int8", "int4", "palettize4", "palettize6"), `tensorrt_precision`. Core ML packages are
    checked structurally everywhere and numerically where Core ML runs (macOS); the artifact's
    `settings["verification"]` says which. `targets=["tensorrt"]` writes the verified ONNX as
    `<name>-tensorrt.onnx` (a quantized model's in pure QDQ form) with a readiness report, the
    trtexec command, and the engine where tensorrt and a GPU exist (then verified as well).
    Returns an `ExportResults`, {target: Artifact}.
    """
    if snn_form is None and (timesteps is not None or sequence or snn_outputs != "model"):
        raise UserError("timesteps, sequence and snn_outputs shape a spiking form: give snn_form='unrolled' or "
                        "'step' (--snn-form) with them")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]  # "onnx" or "onnx,coreml", as the CLI takes them
    if not targets:
        raise UserError("no export target given; available: " + ", ".join(backends.names()))
    chosen = [backends.get(t) for t in targets]
    backends.check_option_keywords(options)
    backend_options = {b.name: b.options(options) for b in chosen}
    source = resolve(model, example, weights, verify_inputs)
    if verify_inputs is not None:
        source.verification_label = verify_inputs_source
    torch_model, args = source.model, source.example
    notes = []
    if snn_form is None and stateful(torch_model):
        torch_model = from_rest(torch_model)
        notes.append("a stateful snnTorch or SpikingJelly network: exported and verified from rest (its neurons' "
                     "state cleared at every call, as between samples)")
    if snn_form is None:
        _run_reference(torch_model, args)
    dynamic_axes = _within_ranks(dynamic_axes, input_names(torch_model, len(args)), args)
    if dynamic_batch:
        names = input_names(torch_model, len(args))
        dynamic_axes = {n: {0: "batch", **(dynamic_axes or {}).get(n, {})} for n in names} | \
            {k: v for k, v in (dynamic_axes or {}).items() if k not in names}
    name = check_artifact_name(name or source.label)
    export_model = torch_model
    # a model quantized from a zoo name keeps that name, so that its reports and profiles pair it
    # with the float model and its test images
    settings = {"source": model if isinstance(model, str) else getattr(model, "zoo_name", source.label),
                "example_shapes": [list(a.shape) for a in args]}  # what `verify` re-draws later
    if isinstance(torch_model, KeywordInputs):  # `verify` calls the model by these names again
        settings["keyword_inputs"] = list(torch_model.names)
    if source.vocabulary and any(not a.is_floating_point() for a in args):
        settings["vocabulary"] = source.vocabulary  # profiling draws token ids below it
    if any(is_neuron(m) for m in torch_model.modules()):  # estimates say that they price its synapses as MACs
        settings["spiking"] = True
    from edgeport.transforms.slim import bake_masks, pruned_tensors, slim as make_slim

    masked = pruned_tensors(torch_model)
    if masked and not slim:  # else the file stores weight_orig and weight_mask, and multiplies them
        export_model = bake_masks(torch_model)
        notes.append(f"{len(masked)} torch.nn.utils.prune mask(s) multiplied into their weights (slim=True also "
                     f"removes what they zero)")
    if slim:
        export_model, slim_report = make_slim(torch_model, args)
        spatial = sorted({f"{name} axis {axis}" for name, axes in (dynamic_axes or {}).items() for axis in axes if axis})
        if slim_report.fixed_size and spatial:
            raise UserError(f"slimming fixed the model to the example's height and width ({len(slim_report.fixed_size)} "
                            f"conv(s) add a constant map of that size, e.g. {slim_report.fixed_size[0]}), so "
                            f"{', '.join(spatial)} cannot be dynamic: export without those dynamic axes, or without slim")
        settings["slim"] = dict(slim_report.__dict__)
        notes.append(slim_report.summary())
    form = None
    if snn_form is not None:
        steps = timesteps if timesteps is not None else getattr(torch_model, "timesteps", None)
        if steps is None:
            raise UserError("a spiking export needs timesteps (--timesteps T)")
        form = build_form(torch_model, args[0], snn_form, steps, sequence, snn_outputs)
        settings["snn"] = form.describe()
        name = f"{name}-{snn_form}"
    results, errors = ExportResults(), {}
    for backend in chosen:
        try:
            with Staging(out) as staging:
                request = ExportRequest(form.module if form else export_model, form.args if form else args,
                                        staging.dir, name,
                                        form.input_names if form else input_names(export_model, len(args)),
                                        form.output_names if form else None, precision_of(export_model), dynamic_axes)
                produced = backend.export(request, backend_options[backend.name])
                for artifact in produced:
                    artifact.settings.update(settings)
                    artifact.notes += notes
                    if check:
                        artifact.parity = verify_artifact(artifact, torch_model, source.verification,
                                                          source.verification_label, form=form, tolerance=tolerance)
                        if artifact.parity is not None and not artifact.parity.passed:
                            worst = artifact.parity.failures()[0]
                            raise CheckFailed(f"{backend.name} artifact {artifact.path.name} fails verification: "
                                              f"{worst.describe()}{saturation_hint(artifact)}"
                                              f"{_real_inputs_hint(verify_inputs)}", artifact.parity)
                        if artifact.parity is not None and dynamic_axes and form is None and \
                                "flexible_shapes" not in artifact.settings.get("verification", {}):  # else checked
                            artifact.settings.setdefault("verification", {})["dynamic_axes"] = verify_at_second_size(
                                artifact, torch_model, args, dynamic_axes, tolerance)
                results[backend.name] = staging.commit(*produced)[-1]
        except EdgeportError as error:  # the other targets still run; their verified artifacts stay
            errors[backend.name] = error
            results.failures[backend.name] = str(error)
    if len(errors) == len(chosen) == 1:
        raise next(iter(errors.values()))
    if errors:
        raise CheckFailed(f"{len(errors)} of {len(chosen)} targets failed ({'; '.join(results.failures)}), "
                          f"{', '.join(results) or 'none'} committed: " +
                          "; ".join(f"{target}: {message}" for target, message in results.failures.items()),
                          results=results)
    return results


class ExportResults(dict):
    """{target: Artifact} for every target that was exported, verified and committed, and
    `failures`: {target: why} for those that were not (nothing of them is in the folder)."""

    def __init__(self):
        super().__init__()
        self.failures: dict[str, str] = {}


def profile_feeds(artifact: Artifact, inputs: Sequence[Example] | None, count: int = 16, batch: int | None = None
                  ) -> tuple[list[dict[str, np.ndarray]], str]:
    """Feeds for profiling `artifact`: the given inputs, a zoo model's test images, or seeded
    random data shaped like its inputs — the batch axis at `batch` (1 without it), every other
    symbolic axis as the export's example had it (the sidecar's `example_shapes`); token ids
    within the recorded vocabulary, masks over a prefix. An axis with no recorded value is
    refused by name: a text model timed at one token is not its latency. Given inputs larger
    than a static batch of one are split into samples, as verification splits them."""
    specs = artifact.inputs
    if inputs is not None:
        return feeds_from([s.name for s in specs], inputs, specs), "given inputs"
    rows, source = batch or 1, artifact.settings.get("source")
    if source in zoo.names() and len(specs) == 1:
        images = zoo.testset(source)[0].numpy()
        check_input_size(specs[0].name, (rows, *images.shape[1:]), images.dtype)
        # a batch larger than the test set repeats its images: every feed holds `rows` of them
        return ([{specs[0].name: images[(i * rows + np.arange(rows)) % len(images)]} for i in range(count)],
                f"{source} test images")
    batch_symbol = next((s.shape[0] for s in specs if s.shape and not isinstance(s.shape[0], int)), None)
    dims = {d: n for spec, shape in zip(specs, artifact.settings.get("example_shapes") or [])
            for d, n in zip(spec.shape, shape) if not isinstance(d, int) and d != batch_symbol}
    open_axes = [f"{spec.name} axis {axis} ({d!r})" for spec in specs for axis, d in enumerate(spec.shape)
                 if not isinstance(d, int) and d != batch_symbol and d not in dims]
    if open_axes:
        raise UserError(f"{', '.join(open_axes)} is symbolic and the artifact records no example length for it: "
                        f"profiling needs real inputs (inputs=[...], or --inputs data.npz on the command line)")
    shaped = "".join(f", {d}={n} as exported" for d, n in dims.items())
    return (random_feeds(specs, count, batch=rows, dims=dims, vocabulary=artifact.settings.get("vocabulary")),
            f"seeded random inputs{shaped}")


MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))  # more runtime threads than this is a typo, not a setting
TORCH_DEVICES = {"torch": "cpu", "torch-cuda": "cuda"}  # a model profiled eagerly, not an artifact
PROFILE_BACKENDS = ("onnxruntime", *TORCH_DEVICES)


def profile(target: str | Path | Artifact | torch.nn.Module, backend: str = "onnxruntime", device: str = "host", *,
            runs: int = 200, warmup: int = 20, warmup_s: float = 0.0, min_duration_s: float = 0.0,
            threads: int | None = None, sessions: int = 5, inputs: Sequence[Example] | None = None,
            ops: bool = True, energy: bool = True, energy_window_s: float = 1.0, idle_s: float = 1.0,
            batch_sizes: Sequence[int] = (), rapl_root: str | Path = "/sys/class/powercap",
            hwmon_root: str | Path = "/sys/class/hwmon", label: str = "") -> Profile:
    """Measure on this machine: latency statistics (ms), per-op breakdown, energy per inference
    (mJ) where a meter exists, and (for ONNX artifacts) the host's roofline estimate beside it.

    `target` is an artifact (an `Artifact`, or its path; a plain `.onnx` without a sidecar too),
    run by its backend's runner, or, for backend "torch" and "torch-cuda", a model (module, zoo
    name, .pt2, package.module:factory; then `inputs` are needed unless it is a zoo model). The runs are spread over `sessions` fresh sessions, so that the median's
    confidence interval covers session-to-session variation, not only sampling noise.
    `batch_sizes` adds throughput (items/s) at those batch sizes when the batch axis is symbolic;
    a size that cannot be measured (a fixed batch axis, given inputs) is listed with the reason
    in the profile's `throughput_skipped`. The host estimate takes its dims from the feeds.
    """
    from edgeport.devices import catalog
    from edgeport.devices.estimate import ESTIMATED_FORMATS, estimate as roofline
    from edgeport.runtime.opprofile import op_profiler_for, profile_torch
    from edgeport.runtime.profile import profile_runner
    from edgeport.runtime.report import Variant, files_size_mb, variant_label

    if device != "host":
        catalog.get(device)  # an unknown name gets its suggestions first
        raise UserError(f"profiling measures on this machine (device 'host'); for {device} use `estimate`")
    if backend not in PROFILE_BACKENDS:
        raise UserError(f"unknown profiling backend {backend!r}; available: {', '.join(PROFILE_BACKENDS)}")
    if not all(isinstance(n, int) for n in (runs, warmup, sessions)):
        raise UserError(f"runs, warmup and sessions are integers (got {runs!r}, {warmup!r}, {sessions!r})")
    if runs <= 0 or warmup < 0:
        raise UserError(f"runs must be positive and warm-up non-negative (got runs={runs}, warmup={warmup})")
    seconds = {"warmup_s": warmup_s, "min_duration_s (--min-duration)": min_duration_s,
               "energy_window_s": energy_window_s, "idle_s": idle_s}
    wrong = {name: value for name, value in seconds.items() if not finite_at_least(value, 0)}
    if wrong:  # checked before any run: on a machine without a meter a bad energy window would pass unseen
        raise UserError(f"{', '.join(wrong)} must be finite seconds, 0 or more (got "
                        f"{', '.join(repr(v) for v in wrong.values())})")
    if isinstance(target, torch.nn.Module) and backend not in TORCH_DEVICES:
        raise UserError(f"a torch module is profiled eagerly (backend='torch' or 'torch-cuda'); backend "
                        f"{backend!r} runs an exported artifact: export the model first")
    if threads is not None and not 0 < threads <= MAX_THREADS:
        raise UserError(f"threads must be from 1 to {MAX_THREADS} (this machine has {os.cpu_count()} cores), "
                        f"not {threads}")
    if any(not isinstance(b, int) or b <= 0 for b in batch_sizes):
        raise UserError(f"batch sizes must be positive integers, not {list(batch_sizes)}")
    gc.collect()  # sessions the caller dropped still spin until collected
    common = dict(runs=runs, warmup=warmup, warmup_s=warmup_s, min_duration_s=min_duration_s, sessions=sessions,
                  energy=energy, energy_window_s=energy_window_s, idle_s=idle_s, rapl_root=rapl_root,
                  hwmon_root=hwmon_root, threads=threads, label=label, device=device, backend=backend)
    if backend in TORCH_DEVICES:
        model = load_model(target)
        is_zoo = isinstance(target, str) and target in zoo.names()
        if inputs is None and not is_zoo:
            raise UserError("profiling a torch model needs inputs (only zoo models bring their own)")
        names = input_names(model, len(as_args(inputs[0])) if inputs is not None else 1)
        if inputs is None:
            feeds, source = feeds_from(names, zoo_batches(target, count=16)), f"{target} test images"
        else:
            feeds, source = feeds_from(names, inputs), "given inputs"
        for feed in feeds:
            check_finite(feed, "profiling")
        run_on = TORCH_DEVICES[backend]
        model_name = str(target) if isinstance(target, str) else type(model).__name__
        return profile_runner(
            lambda: TorchRunner(model, names, device=run_on).load(), feeds, model_name, source, gpu=run_on == "cuda",
            op_profiler=(lambda: profile_torch(model, names, feeds, runs=min(runs, 50))) if ops and run_on == "cpu"
            else None, variant=Variant(model_name, f"torch eager ({run_on})", "torch"),
            throughput_skipped={size: "other batch sizes are measured for artifacts only" for size in batch_sizes
                                if size != feeds[0][names[0]].shape[0]}, **common)
    artifact = target if isinstance(target, Artifact) else backends.open_artifact(target)
    source_model = artifact.settings.get("source")
    feeds, source = profile_feeds(artifact, inputs)
    check_feeds(feeds, artifact.inputs)
    check_token_ids(feeds, artifact.settings.get("vocabulary"))
    for feed in feeds:
        check_finite(feed, "profiling")
    fixed_batch = next((s.shape[0] for s in artifact.inputs if s.shape and isinstance(s.shape[0], int)), None)
    fed_batch = next(iter(feeds[0].values())).shape[0]
    batch_feeds, skipped = {}, {}
    for size in (b for b in batch_sizes if b != fed_batch):
        if inputs is not None:
            skipped[size] = "inputs were given: they are profiled at their own batch size"
        elif fixed_batch is not None:
            skipped[size] = f"the artifact's batch axis is fixed at {fixed_batch} (export with --dynamic-batch)"
        else:
            batch_feeds[size] = profile_feeds(artifact, None, count=4, batch=size)[0]
    op_profiler = op_profiler_for(artifact.format)
    variant = Variant(source_model or artifact.path.stem,
                      variant_label(artifact.format, artifact.precision, artifact.settings), artifact.format,
                      files_size_mb(artifact.path.parent, artifact.files or [artifact.path.name]),
                      source_sha256=artifact.source_sha256 or None)
    host_estimate = roofline(artifact.path, catalog.host(threads=threads),
                             input_shapes={name: array.shape for name, array in feeds[0].items()}
                             ) if artifact.format in ESTIMATED_FORMATS else None
    return profile_runner(
        lambda: backends.runner_for(artifact, threads=threads, profiling=True).load(), feeds, str(artifact.path),
        source, gpu=False, batch_feeds=batch_feeds, throughput_skipped=skipped, variant=variant,
        op_profiler=(lambda: op_profiler(artifact.path, feeds, runs=min(runs, 50), threads=threads))
        if ops and op_profiler else None, estimate=host_estimate, **common)


def estimate(artifact: str | Path | Artifact, device: str = "host", *, dims: dict[str, int] | None = None,
             inputs: Example | dict[str, np.ndarray] | None = None, firing_rates: dict[str, float] | None = None):
    """Roofline latency (ms) and energy (mJ, estimated) of one inference of an ONNX artifact on a
    catalog device (`edgeport.devices.estimate.Estimate`).

    Symbolic dimensions take their values from `dims` ({"seq": 32}), else from the shapes of
    `inputs` (one batch: {input name: array}, or tensors in the model's input order); a batch
    axis left open counts as 1 and the estimate says so, any other axis left open is a UserError.
    The dims used are in `Estimate.dims` and `dims_source`. `firing_rates` ({input tensor:
    fraction of spikes}) turns MACs into accumulates for the 45 nm energy figure.
    """
    from edgeport.devices.estimate import estimate as roofline

    path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
    if path.is_dir():
        raise UserError(f"{path} is a folder; estimate reads one ONNX file (a Core ML package's model "
                        f"is estimated from its ONNX export)")
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist")
    shapes = None
    if inputs is not None:
        specs = backends.open_artifact(path).inputs
        if isinstance(inputs, dict):
            feed = {name: np.asarray(value) for name, value in inputs.items()}
            unknown = sorted(set(feed) - {spec.name for spec in specs})
            if unknown:
                raise UserError(f"inputs {unknown} name no input of {path.name} "
                                f"(its inputs: {', '.join(spec.name for spec in specs)})")
        else:
            feed = feeds_from([spec.name for spec in specs], [inputs])[0]
        check_feeds([feed], specs)
        shapes = {name: array.shape for name, array in feed.items()}
    result = roofline(path, device, dims=dims, firing_rates=firing_rates, input_shapes=shapes)
    if isinstance(artifact, Artifact):
        settings = artifact.settings
    else:
        settings = Artifact.load(path).settings if path.with_name(path.name + SIDECAR_SUFFIX).is_file() else {}
    if not firing_rates and settings.get("spiking"):
        result.assumptions.append(SPIKING_WITHOUT_RATES)
    return result


# what an estimate of a spiking model says without firing rates (the CLI repeats it as a note)
SPIKING_WITHOUT_RATES = ("a spiking model without firing_rates: every synaptic operation priced as a MAC "
                         "(ep.spike_statistics measures the rates; `edgeport spikes` prices them)")


def spike_statistics(model: str | torch.nn.Module, inputs: torch.Tensor | None = None, timesteps: int | None = None,
                     *, weights: str | Path | None = None, sequence: bool = False):
    """Firing rates per neuron layer, synaptic operations per weight layer, and the energy they
    imply beside the ANN of the same architecture, as two labelled estimates (mJ per sample):
    `stats.energy(precision)`, compute only (45 nm SOP/MAC, as papers print it), and
    `stats.memory_energy(precision)`, with weight and membrane memory traffic and the
    break-even firing rate against the same-precision ANN (see `edgeport.snn.stats`).

    `inputs` is a batch of real samples (default: 32 calibration images of a zoo model), or
    with `sequence=True` a [T, B, ...] sequence of them; the model runs `timesteps` steps
    (default: its `timesteps` attribute; without either, its forward runs whatever steps it
    runs, a snnTorch or SpikingJelly network from rest on a copy, as between samples). A model
    without spiking neurons is measured as an ANN (all MACs).
    """
    from edgeport.snn.stats import spike_statistics as measure_spikes

    torch_model = load_model(model, weights)
    if stateful(torch_model):
        torch_model = from_rest(torch_model)
    if inputs is None:
        if not (isinstance(model, str) and model in zoo.names()):
            raise UserError("spike statistics need inputs (a batch of real samples); only zoo models bring their own")
        inputs = zoo.calibration(model, 32)
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise UserError("spike statistics inputs contain NaN or Inf values: firing rates on them mean nothing")
    if sequence and inputs.dim() < 2:
        raise UserError(f"a sequence is [T, B, ...]; these inputs have shape {list(inputs.shape)}")
    batch = int(inputs.shape[1] if sequence else inputs.shape[0])
    # a wrong shape or dtype is named here, not deep in a conv
    _run_reference(torch_model, (inputs[:, :1] if sequence else inputs[:1],))
    steps = timesteps if timesteps is not None else getattr(torch_model, "timesteps", None)
    if steps is None:
        return measure_spikes(torch_model, inputs, batch)
    form = build_form(torch_model, inputs, "unrolled", steps, sequence, outputs="per_step")  # any T
    return measure_spikes(form.module, inputs, batch)


def slim(model: str | torch.nn.Module, example: Example | None = None, *, weights: str | Path | None = None):
    """A smaller dense model computing the same function as the pruned `model`, and the
    report (channels and heads removed, MACs and parameters before and after, what was kept
    and why, unstructured sparsity and what each backend does with it).

    Masks from `torch.nn.utils.prune` are baked first; a model with nothing to remove comes
    back unchanged with a report that says so.
    """
    from edgeport.transforms.slim import slim as make_slim

    source = resolve(model, example, weights)
    torch_model, args = source.model, source.example
    _run_reference(torch_model, args)
    return make_slim(torch_model, args)


Calibration = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor | np.ndarray]


def calibration_batch(model: torch.nn.Module, calib: Calibration, purpose: str = "calibration"
                      ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A calibration batch (or a batch for another `purpose`, e.g. "verification") as the
    model's positional arguments: a tensor or tuple as given; a dict (numpy arrays or tensors)
    matched to the forward's parameters by name, which must be its first inputs (`input_ids`,
    `attention_mask` of a BERT)."""
    if not isinstance(calib, dict):
        return calib
    if not calib:
        raise UserError(f"the {purpose} set is empty")
    names = [n for n in input_names(model, 64) if not re.fullmatch(r"input_\d+", n)]  # the forward's own names
    unknown = [n for n in calib if n not in names]
    if unknown:
        raise UserError(f"{purpose} arrays {unknown} name no input of the model; its inputs are {names}")
    first = names[:len(calib)]
    if set(first) != set(calib):
        raise UserError(f"{purpose} arrays {sorted(calib)} must be the model's first {len(calib)} inputs "
                        f"({', '.join(first)})")
    _check_token_aligned(calib, purpose)
    return tuple(torch.as_tensor(calib[n]) for n in first)


# inputs that hold one entry per token of `input_ids` ([batch, sequence]) in Hugging Face models
PER_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _check_token_aligned(arrays: dict, purpose: str) -> None:
    """Refuse per-token arrays ([batch, sequence] ids, mask, types, positions) of different
    shapes: a Hugging Face model in eager mode may still run on a mask shorter than its ids,
    and the mismatch would surface only at export, as torch.export's broadcast error."""
    shapes = {n: tuple(np.shape(arrays[n])) for n in PER_TOKEN_INPUTS if n in arrays and np.ndim(arrays[n]) == 2}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {'x'.join(map(str, shape))}" for n, shape in shapes.items())
        raise UserError(f"{purpose} arrays {listed} must have one shape, [batch, sequence]: each holds one entry "
                        f"per token")


@dataclasses.dataclass
class FormChoice:
    """The conv form `quantize(..., fastest_form=True)` kept (`chosen`, a key of
    `edgeport.quant.config.CONV_FORMS`), each verified form's and the fp32 export's median
    batch-1 latency on this machine (`p50_ms`, ms, ONNX Runtime CPU, timed interleaved) at the
    faster of FORM_THREADS' intra-op thread counts (`threads`, 0: ONNX Runtime's default, one per
    physical core), and why any form was left out (`left_out`: it quantized no layer, or its
    export failed verification)."""

    chosen: str
    p50_ms: dict[str, float]
    threads: dict[str, int]
    left_out: dict[str, str]

    @property
    def speedup_vs_fp32(self) -> float:
        """fp32 latency over the chosen form's (above 1: the quantized model is faster here)."""
        return self.p50_ms["fp32"] / self.p50_ms[self.chosen]

    @property
    def caveat(self) -> str | None:
        """What to tell the user where the kept form ran slower than the fp32 export here by more
        than FORM_TIE (None otherwise): quantizing did not pay on this machine at batch 1."""
        from edgeport.quant.config import FORM_TIE

        if self.p50_ms[self.chosen] <= self.p50_ms["fp32"] * (1 + FORM_TIE):
            return None
        return (f"the quantized form kept ({self.chosen}, {self.p50_ms[self.chosen]:.3f} ms) runs slower than "
                f"its fp32 export ({self.p50_ms['fp32']:.3f} ms) at batch 1 on this machine: here ONNX Runtime's "
                f"integer kernels do not pay for the quantize and dequantize around them; deploy the fp32 model "
                f"here, or time the quantized one at the batch and input size you serve")


# the form timing: interleaved blocks of runs at batch 1, enough to order forms 10 % apart
FORM_TIMING_BLOCKS, FORM_TIMING_RUNS = 4, 20
# ...at each of these intra-op thread counts (0: ONNX Runtime's default), each export keeping its
# faster: at batch 1 a small model's ops do microseconds of work, and thread hand-offs cost a
# graph of more, smaller ops more (EfficientFormerV2-S0 at 64x64, the quant bench on a 2-vCPU
# Intel Xeon at 49de079: fp32 1.62 ms at 1 thread, 2.17 at 2; every conv integer 1.07x fp32 at
# 1 thread, 0.96x at 2; on an AMD EPYC at a4bcff9 1.04x and 0.89x)
FORM_THREADS = (1, 0)


def _fastest_form(model: torch.nn.Module, calib, config: QuantConfig) -> tuple[torch.nn.Module, FormChoice]:
    """`model` quantized in each conv form of `CONV_FORMS` (until one leaves no conv float:
    the rest are the same model), each that leaves other convs float than the ones before it
    exported and verified on the calibration batch, and the one ONNX Runtime runs fastest here
    at batch 1 (timed interleaved beside the fp32 export, each at the faster of FORM_THREADS)
    returned with the timings; of forms within FORM_TIE of the fastest, the one whose exported
    outputs on the calibration samples (batch 1) are closest to the fp32 export's (cosine)."""
    import tempfile

    from edgeport.quant.config import CONV_FORMS, EXPORT_TARGETS, FORM_TIE
    from edgeport.quant.ptq import quantize as run_ptq
    from edgeport.runtime.latency import interleaved_medians
    from edgeport.verify import compare

    batch = as_args(calib)
    example, target = tuple(a[:1] for a in batch), EXPORT_TARGETS[config.target]
    qmodels, left_out, float_convs = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"fp32": export(model, example, targets=(target,), out=tmp, name="fp32",
                                    verify_inputs=[example])[target]}
        for number, (form, fields) in enumerate(CONV_FORMS.items()):
            log.info("quantizing form %d of %d: %s", number + 1, len(CONV_FORMS), form)
            try:
                qmodel, qmodel.quant_report = run_ptq(model, calib, dataclasses.replace(config, **fields))
            except EverythingLeftFloat as error:  # a model of convs only, every one of them float
                left_out[form] = str(error)
                continue
            kept_float = qmodel.quant_report.convs_kept_float
            if kept_float in float_convs:
                continue  # the convs it leaves float are the previous form's: the same model
            float_convs.append(kept_float)
            if not kept_float:
                form = list(CONV_FORMS)[-1]  # no conv left float: it is the every-conv-integer model
            try:
                artifacts[form] = export(qmodel, example, targets=(target,), out=tmp, name=f"form{number}",
                                         verify_inputs=[batch])[target]
                qmodels[form] = qmodel
            except CheckFailed as error:
                left_out[form] = str(error)
            if not kept_float:
                break
        if not qmodels:
            raise CheckFailed(f"no conv form of the quantized model verified: {'; '.join(left_out.values())}")
        log.info("timing %s beside fp32 in ONNX Runtime", ", ".join(qmodels))
        runners = {(name, threads): backends.runner_for(artifact, threads=threads).load()
                   for name, artifact in artifacts.items() for threads in FORM_THREADS}
        names = [spec.name for spec in artifacts["fp32"].inputs]
        feed = {name: a.detach().numpy() for name, a in zip(names, example)}
        try:
            timed = interleaved_medians(runners, feed, blocks=FORM_TIMING_BLOCKS, runs=FORM_TIMING_RUNS)
            threads = {name: min(FORM_THREADS, key=lambda count: timed[name, count]) for name in artifacts}
            p50_ms = {name: timed[name, count] for name, count in threads.items()}
            fastest = min(p50_ms[form] for form in qmodels)
            tied = [form for form in qmodels if p50_ms[form] <= fastest * (1 + FORM_TIE)]
            chosen = tied[0]
            if len(tied) > 1:  # the fidelity of what runs: each tied export against the fp32 one
                samples = [{name: a[i:i + 1].detach().numpy() for name, a in zip(names, batch)} for i in range(len(batch[0]))]
                chosen = max(tied, key=lambda form: min(
                    output.cosine for output in compare(runners["fp32", threads["fp32"]], runners[form, threads[form]],
                                           samples).outputs))
        finally:
            for runner in runners.values():
                runner.close()
    return qmodels[chosen], FormChoice(chosen, p50_ms, threads, left_out)


def quantize(model: str | torch.nn.Module, calib: Calibration | None = None, method: str = "repq", w_bits: int = 8,
             a_bits: int = 8, *, target: str = "onnxruntime", weights: str | Path | None = None,
             keep_8bit: Sequence[str] = (), act_observer: str | None = None,
             config: QuantConfig | None = None, report: str | None = None,
             max_drop: float | None = None,
             metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
             fastest_form: bool = False) -> torch.nn.Module:
    """A fake-quantized copy of `model` (post-training, `method` a preset of
    `edgeport.quant.config.PRESETS`: "minmax", "percentile", "repq", the low-bit ones built on it such
    as "repq-gptq", "repq-recon", "repq-adalog"), calibrated on `calib`
    (a batch of real samples: a tensor, a tuple of the model's inputs, or a dict of them by input
    name; a zoo model brings 32 training images). `ep.export` turns it
    into quantized ONNX (QuantizeLinear and integer matmuls for ONNX Runtime, pure QDQ for the
    `tensorrt` target); `target="tensorrt"` makes it symmetric. Layers named in `keep_8bit`
    stay at 8 bits; `act_observer` ("minmax", "percentile", "mse", "entropy", "dualclip") overrides the
    method's activation calibration. `config`, a `QuantConfig`, says all of that at once (and
    more) in place of those arguments, which must then keep their defaults. The pipeline's
    report is the returned module's `quant_report` attribute; a model given by zoo name keeps the
    name as its `zoo_name`, which its exports record as their source. `report="sensitivity"` also
    measures each layer quantized alone (`edgeport.quant.sensitivity.layer_sensitivity`:
    output SQNR, least first) into its `sensitivity` attribute; `max_drop` chooses 4, 6 or 8
    bits per layer, the fewest whose 1 - cosine to the float output stays within it on
    calibration samples held out from calibrating the map (cross-validated, `choose_widths`),
    the choice in its `mixed_precision` attribute.
    `metric(reference, output)`, given the flattened float64 outputs of the float and the
    quantized model, is the task's loss: `max_drop` then bounds it instead of 1 - cosine, and
    the sensitivity report scores each layer with it too.
    `fastest_form=True` (ONNX Runtime, convs) quantizes in each conv form of
    `edgeport.quant.config.CONV_FORMS` (every conv float; grouped and small convs float; every
    conv integer),
    exports and verifies each, and keeps the one ONNX Runtime runs fastest on this machine at
    batch 1, each timed at 1 intra-op thread and at ONNX Runtime's default and judged at its
    faster (forms within FORM_TIE of it are a tie, which goes to the export whose outputs on
    the calibration samples are closest to the fp32 export's), the timings beside fp32 in its
    `conv_form` attribute (a `FormChoice`): which
    integer conv kernels pay depends on the model and the CPU, so time them where the model
    will run. Where the form kept ran slower than fp32 beyond a tie it warns (`EdgeportWarning`).
    """
    from edgeport.quant.config import preset, target_caveat
    from edgeport.quant.ptq import quantize as run_ptq

    arguments = {"method": method, "w_bits": w_bits, "a_bits": a_bits, "target": target,
                 "keep_8bit": tuple(keep_8bit), "act_observer": act_observer}
    if config is None:
        config = preset(method, **{k: v for k, v in arguments.items() if k != "method"})
    elif arguments != _PRESET_ARGUMENT_DEFAULTS:
        raise UserError("config= replaces method, w_bits, a_bits, target, keep_8bit and act_observer: "
                        "pass either the config or those arguments")
    torch_model = load_model(model, weights)
    if calib is None:
        if not (isinstance(model, str) and model in zoo.names()):
            raise UserError("quantization needs calibration data (about 32 real samples); only zoo models bring their own")
        calib = zoo.calibration(model, 32)
    calib = calibration_batch(torch_model, calib)
    caveat = target_caveat(config)
    if caveat:
        warnings.warn(caveat, EdgeportWarning, stacklevel=2)
    if report not in (None, "sensitivity"):
        raise UserError(f"unknown quantization report {report!r}; the one there is: sensitivity")
    if max_drop is not None and metric is None and not 0 < max_drop < 1:
        raise UserError(f"max_drop is a loss of cosine similarity between 0 and 1, not {max_drop!r}")
    from edgeport.quant.sensitivity import choose_widths, layer_sensitivity

    if max_drop is not None and (config.w_bits, config.a_bits) != (8, 8):
        raise UserError(f"max_drop chooses each layer's width (4, 6 or 8 bits) itself: it takes no w_bits or a_bits "
                        f"(given W{config.w_bits}A{config.a_bits})")
    if max_drop is not None and not config.runs_every_width:
        raise UserError("max_drop chooses 4, 6 or 8 bits per layer, widths ONNX Runtime runs; TensorRT runs INT8 "
                        "activations only: quantize for it at one width (W8A8, or W4A8)")
    if fastest_form and (max_drop is not None or not config.has_conv_forms):
        raise UserError("fastest_form times ONNX Runtime's CPU kernels for one uniform width: it takes neither "
                        "max_drop nor the tensorrt target (TensorRT times its own kernels when it builds)")
    if fastest_form and not any(isinstance(m, torch.nn.Conv2d) for m in torch_model.modules()):
        raise UserError(f"fastest_form chooses which convs run as integer kernels; {type(torch_model).__name__} has "
                        f"no Conv2d: quantize it without it")
    if fastest_form:
        qmodel, qmodel.conv_form = _fastest_form(torch_model, calib, config)
        if qmodel.conv_form.caveat:
            warnings.warn(qmodel.conv_form.caveat, EdgeportWarning, stacklevel=2)
    elif max_drop is None:
        qmodel, qmodel.quant_report = run_ptq(torch_model, calib, config)
    else:
        qmodel, qmodel.mixed_precision = choose_widths(torch_model, calib, config, max_drop,
                                                       *((metric,) if metric is not None else ()))
        choice = qmodel.mixed_precision
        if not choice.met:
            warnings.warn(f"max_drop {max_drop:g} is not met even at uniform 8 bits: {choice.loss_name} "
                          f"{choice.bounded_drop:.3g}"
                          f"{'' if choice.held_out_drop is None else ' cross-validated'}; the model is W8A8",
                          EdgeportWarning, stacklevel=2)
    if isinstance(model, str) and model in zoo.names():
        qmodel.zoo_name = model
    if report == "sensitivity":
        qmodel.sensitivity = layer_sensitivity(torch_model, qmodel, calib if isinstance(calib, tuple) else (calib,),
                                               metric)
    return qmodel


_PRESET_ARGUMENT_DEFAULTS = {name: (tuple(p.default) if name == "keep_8bit" else p.default)
                             for name, p in inspect.signature(quantize).parameters.items()
                             if name in ("method", "w_bits", "a_bits", "target", "keep_8bit", "act_observer")}
