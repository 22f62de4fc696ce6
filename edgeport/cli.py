"""The `edgeport` command: a thin shell over the SDK, one sub-command per SDK call.

Exit codes: 0 ok, 1 a check failed, 2 bad usage or input, 3 an internal error (a bug).
User errors print one line; `--debug` shows the traceback.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgeport.errors import ENVIRONMENT_PROBLEMS, BackendUnavailable, CheckFailed, EdgeportWarning, UserError
from edgeport.quant.calibrate import OBSERVERS
from edgeport.quant.config import EXPORT_TARGETS, FORM_TIE, PRESETS, TARGETS

# Results (tables, JSON) go to stdout and progress and diagnostics to stderr, as Unix tools
# do. Logs and CI are not terminals and would get 80 columns, too narrow for the tables.
# Markup is off: file names and messages are user text and print literally.
console = Console(width=None if sys.stdout.isatty() else 140, markup=False, highlight=False)
diagnostics = Console(stderr=True, width=None if sys.stderr.isatty() else 140, markup=False, highlight=False)


EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
LOG_AFTER_S = 2.0  # in logs, steps shorter than this print nothing (a bad input fails in one line)


@contextlib.contextmanager
def progress(message: str):
    """A long step: a spinner on a terminal; in logs (not a terminal), a line when it has run
    for `LOG_AFTER_S`, a line per sub-step after that with the seconds since the step began,
    and one when it ends with its duration. Yields a function that reports a sub-step; the
    library's own progress (INFO records of the `edgeport` loggers: each reconstructed block,
    each conv form, ...) is reported as sub-steps too."""
    with _step(message) as report, _library_progress(report):
        yield report


class _SubStepHandler(logging.Handler):
    """Log records as sub-steps of the running step."""

    def __init__(self, report: Callable[[str], object]):
        super().__init__(logging.INFO)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        self.report(record.getMessage())


@contextlib.contextmanager
def _library_progress(report: Callable[[str], object]):
    """While the step runs, the `edgeport` loggers' INFO records go to `report`; the logger's
    level and handlers are left as they were after it."""
    logger = logging.getLogger("edgeport")
    handler, level = _SubStepHandler(report), logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _step(message: str):
    if diagnostics.is_terminal:
        with diagnostics.status(message) as status:
            yield lambda step: status.update(f"{message}: {step}")
        return
    start = time.perf_counter()
    started = threading.Event()
    # the stderr of the step's start: the timer's line would otherwise land in the StringIO an
    # exporter's `quiet()` swaps in for sys.stderr meanwhile, and be lost
    stream = sys.stderr

    def say(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    current = [""]  # the sub-step under way when the step is announced is part of its first line

    def announce() -> None:
        say(f"... {message}" + (f": {current[0]}" if current[0] else ""))
        started.set()

    def report(step: str) -> None:
        current[0] = step
        if started.is_set():
            say(f"... {message} [{time.perf_counter() - start:.0f} s]: {step}")

    timer = threading.Timer(LOG_AFTER_S, announce)
    timer.daemon = True
    timer.start()
    try:
        yield report
    finally:
        timer.cancel()
    if started.is_set():
        say(f"... {message}: done in {time.perf_counter() - start:.1f} s")


def _threads(count: int) -> str:
    """An ONNX Runtime intra-op thread count as words (0 is its default)."""
    return "ONNX Runtime's default threads" if count == 0 else f"{count} thread{'s' * (count != 1)}"


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


JSON_HELP = "Print the results as JSON on stdout (diagnostics stay on stderr)."
WEIGHTS_HELP = ("Weights (safetensors, or a weights-only state_dict) loaded into MODEL: a package.module:factory's, "
                "or a zoo model's own replaced.")


def _load_inputs(path: str | None, artifact=None):
    """Inputs from an .npz file as one batch: one array per model input, in file order where
    np.savez named them arr_0, arr_1, ...; by name otherwise, matched to the inputs of
    `artifact` (an Artifact, or its path) where one is given (a name that is not an input, or
    an input with no array, is refused)."""
    if path is None:
        return None
    import torch

    from edgeport.core import Artifact
    from edgeport.export import registry as backends
    from edgeport.load import load_arrays

    arrays = load_arrays(path)
    if artifact is not None and not all(re.fullmatch(r"arr_\d+", name) for name in arrays):
        opened = artifact if isinstance(artifact, Artifact) else backends.open_artifact(artifact)
        specs = opened.inputs[:1] if opened.settings.get("snn") else opened.inputs  # a step form's states start at rest
        names = [spec.name for spec in specs]
        if set(arrays) != set(names):
            raise UserError(f"{path} holds arrays {sorted(arrays)}; {opened.path.name} takes {names} (name them "
                            f"so, or save them unnamed in that order)")
        arrays = {name: arrays[name] for name in names}
    return [tuple(torch.from_numpy(a) for a in arrays.values())]


def _verification_batches(path: str | None) -> list | None:
    """`export --verify-inputs`: the .npz as one batch, its arrays by name (a dict the export
    matches to the forward's input names, refusing others) unless np.savez named them in order."""
    if path is None:
        return None
    import torch

    from edgeport.load import load_arrays

    arrays = {name: torch.from_numpy(array) for name, array in load_arrays(path).items()}
    if all(re.fullmatch(r"arr_\d+", name) for name in arrays):
        return [tuple(arrays.values())]
    return [arrays]


def _parity_table(artifact) -> Table:
    made = f"{artifact.exporter}, opset {artifact.opset}" if artifact.opset is not None else artifact.exporter
    parity = artifact.parity
    checked = (f"verified: {parity.candidate} against {parity.reference} on {parity.samples} samples "
               f"({parity.inputs_source})" if parity else "numerical parity not checked")
    return _outputs_table(f"{artifact.path}  ({made})", checked, parity)


def _outputs_table(title: str, caption: str, report) -> Table:
    """One row per output of a parity report (none where `report` is None)."""
    table = Table(title=title, caption=caption)
    for column in ("output", "verdict", "max abs", "rel to scale", "cosine", "SQNR dB", "tolerance"):
        table.add_column(column)
    for o in report.outputs if report else []:
        table.add_row(o.name, Text("ok", style="green") if o.passed else Text("FAILED", style="red"), f"{o.max_abs_error:.2e}",
                      f"{o.max_rel_error:.2e}", f"{o.cosine:.6f}", f"{o.sqnr_db:.1f}", o.tolerance.short())
    return table


def backend_options(command):
    """Add one flag per field of every registered backend's `Options` (from the registry), so
    a backend's new option needs no second declaration here. Unset flags pass None: the
    backend's own default applies."""
    from edgeport.export import registry

    for entry in reversed(registry.option_fields().values()):
        meta, default = entry.spec.metadata, entry.spec.default
        kind = click.Choice([str(c) for c in meta["choices"]]) if meta.get("choices") else \
            next((t for t in (int, float) if t.__name__ in str(entry.spec.type)), str)
        shown = "" if default is None else f" [default: {default}]"
        command = click.option(entry.flag, entry.keyword, type=kind, default=None,
                               help=f"{meta['help']} ({', '.join(entry.backends)}).{shown}")(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for every error.")
@click.option("--max-input-bytes", type=click.IntRange(min=1), metavar="BYTES",
              help="Largest input batch edgeport will allocate (default 1 GiB, or EDGEPORT_MAX_INPUT_BYTES).")
@click.version_option(package_name="edgeport")
@click.pass_context
def cli(ctx: click.Context, debug: bool, max_input_bytes: int | None) -> None:
    """edgeport: export trained PyTorch models to edge runtimes, verified.

    MODEL is a zoo name, a .pt2 file (torch.export), or package.module:factory; the current
    folder is on the import path for the latter, and the factory must be a class or function
    defined in that module that returns a torch.nn.Module.
    """
    import edgeport.core

    ctx.obj = {"debug": debug}
    if max_input_bytes:
        edgeport.core.MAX_INPUT_BYTES = max_input_bytes


def dynamic_options(command):
    """`--dynamic-batch` and `--dynamic`, for the commands that export."""
    command = click.option("--dynamic", "dynamic", multiple=True, metavar="INPUT:AXIS:SYMBOL",
                           help="Make one input axis symbolic, e.g. input_ids:1:sequence; repeatable.")(command)
    return click.option("--dynamic-batch", is_flag=True, help="Make axis 0 of every input and output symbolic.")(command)


@cli.command("export")
@click.argument("model")
@click.option("--to", "targets", default="onnx", show_default=True, help="Comma-separated targets.")
@click.option("--input", "inputs", multiple=True, help="Example input shape, e.g. 1x3x224x224 or 1x16:int64; "
              "repeat for several inputs. Zoo models bring their own.")
@click.option("--weights", type=click.Path(), help=WEIGHTS_HELP)
@click.option("-o", "--out", default="build", show_default=True, type=click.Path(), help="Output folder.")
@click.option("--name", help="Artifact file name (default: the model's).")
@dynamic_options
@click.option("--snn-form", type=click.Choice(["unrolled", "step"]),
              help="Spiking models: T steps in one graph, or one step with membranes as inputs/outputs.")
@click.option("--timesteps", type=int, help="Spiking models: T (default: the model's own).")
@click.option("--sequence", is_flag=True, help="Spiking models: the input is (T, B, ...), not one frame repeated.")
@click.option("--snn-outputs", type=click.Choice(["model", "per_step"]), default="model", show_default=True,
              help="Spiking unrolled form: what the model returns, or every step's outputs stacked over time.")
@click.option("--slim", "slim_model", is_flag=True, help="Remove pruned channels and heads first (same function).")
@click.option("--verify-inputs", type=click.Path(), help=".npz with real inputs for verification.")
@click.option("--no-verify", is_flag=True, help="Skip verification (the sidecar then has no parity report).")
@click.option("--json", "as_json", is_flag=True, help="Print the artifacts' records as JSON.")
@backend_options
def export_command(model, targets, inputs, weights, out, name, dynamic_batch, dynamic, snn_form, timesteps, sequence,
                   snn_outputs, slim_model, verify_inputs, no_verify, as_json, **options):
    """Export MODEL (zoo name, .pt2, or package.module:factory) and verify each artifact."""
    from edgeport.sdk import export, parse_dynamic, parse_input

    example = tuple(parse_input(s) for s in inputs) or None
    try:
        with progress(f"exporting {model} to {targets}"):
            artifacts = export(model, example, targets=[t.strip() for t in targets.split(",") if t.strip()],
                               out=out, name=name, weights=weights, verify_inputs=_verification_batches(verify_inputs),
                               check=not no_verify, dynamic_batch=dynamic_batch,
                               dynamic_axes=parse_dynamic(dynamic), snn_form=snn_form, timesteps=timesteps,
                               sequence=sequence, snn_outputs=snn_outputs, slim=slim_model,
                               **{k: v for k, v in options.items() if v is not None})
    except CheckFailed as failed:  # some targets failed: show what was committed, then the failure
        if failed.results:
            _print_artifacts(failed.results, as_json)
        raise
    _print_artifacts(artifacts, as_json)


def _print_artifacts(artifacts, as_json: bool) -> None:
    """Each committed artifact's parity table and notes (or their records as JSON, with the
    targets that failed under "failed")."""
    if as_json:
        failures = getattr(artifacts, "failures", {})
        _emit_json({t: a.to_dict() for t, a in artifacts.items()} | ({"failed": failures} if failures else {}))
        return
    for artifact in artifacts.values():
        _print_artifact(artifact)


def _print_artifact(artifact) -> None:
    """One committed artifact: its parity table and the files written (results, on stdout), its
    notes (diagnostics, on stderr)."""
    console.print(_parity_table(artifact))
    for note in artifact.notes:
        diagnostics.print(f"note: {note}", soft_wrap=True)
    written = list(dict.fromkeys([*(artifact.files or [artifact.path.name]), artifact.sidecar.name]))
    console.print(f"wrote {', '.join(written)} in {artifact.path.parent}", soft_wrap=True)


@cli.command("quantize")
@click.argument("model")
@click.option("--method", type=click.Choice(list(PRESETS)), default="repq", show_default=True,
              help="; ".join(f"{name}: {config.description}" for name, config in PRESETS.items()) + ".")
@click.option("--w-bits", type=int, default=8, show_default=True, help="Weight bits, 2 to 8.")
@click.option("--a-bits", type=int, default=8, show_default=True, help="Activation bits, 2 to 8.")
@click.option("--target", type=click.Choice(list(TARGETS)), help="The runtime to quantize for (default "
              "onnxruntime); tensorrt: symmetric quantizers (zero point 0). Its export target is written too.")
@click.option("--calib", type=click.Path(), help=".npz with the calibration batch: one array per model input, matched "
              "by name (np.savez's arr_0, arr_1, ... in order); zoo models bring their own.")
@click.option("--calibration", type=click.Choice(list(OBSERVERS)),
              help="Activation range calibration (default: the method's own; entropy is KL as in TensorRT).")
@click.option("--weights", type=click.Path(), help=WEIGHTS_HELP)
@click.option("--input", "inputs", multiple=True, help="Example input shape (zoo models bring their own).")
@click.option("--to", "targets", default="onnx", show_default=True, help="Comma-separated export targets.")
@click.option("-o", "--out", default="build", show_default=True, type=click.Path(), help="Output folder.")
@click.option("--name", help="Artifact file name (default: MODEL-METHOD-wNaM).")
@click.option("--sensitivity", is_flag=True,
              help="Rank the layers by the output error each brings when quantized alone (SQNR, least first).")
@click.option("--max-drop", type=float,
              help="Mixed precision: 4, 6 or 8 bits per layer, the fewest whose 1 - cosine to the float output stays "
                   "within this (e.g. 0.005) on calibration samples held out from fitting the map.")
@click.option("--fastest-form", is_flag=True,
              help="Quantize in each conv form (every conv float; grouped and small convs float; every conv "
                   "integer), time each export beside fp32 in ONNX Runtime on this machine (at 1 thread and at ONNX "
                   "Runtime's default, each at its faster), and keep the fastest; "
                   f"forms within {FORM_TIE:.0%} of it are a tie, kept by the export closest to fp32's (ONNX Runtime only).")
@dynamic_options
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@backend_options
def quantize_command(model, method, w_bits, a_bits, target, calib, calibration, weights, inputs, targets, out,
                     name, sensitivity, max_drop, fastest_form, dynamic_batch, dynamic, as_json, **options):
    """Post-training quantization of MODEL, exported as quantized ONNX and verified against the fake-quant model."""
    from dataclasses import asdict

    from edgeport.core import check_artifact_name
    from edgeport.export import registry as backends
    from edgeport.sdk import calibration_batch, load_model, model_label, parse_dynamic, parse_input, quantize

    targets = [t.strip() for t in targets.split(",")]
    for chosen in targets:  # refused now, not after the quantization
        backends.get(chosen)
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"cannot write to output folder {out}: it is a file")
    if target is not None and EXPORT_TARGETS[target] not in targets:
        targets.append(EXPORT_TARGETS[target])
        diagnostics.print(f"note: --target {target} also writes the {EXPORT_TARGETS[target]} target")
    float_model = load_model(model, weights)  # for the calibration's input names and what quantizing cost
    name = check_artifact_name(name) if name else None
    batch = calibration_batch(float_model, _calibration_arrays(calib)) if calib else None
    timing = ", timing each conv form in ONNX Runtime" if fastest_form else ""
    widths = f"4, 6 or 8 bits per layer within 1 - cosine {max_drop}" if max_drop is not None else f"W{w_bits}A{a_bits}"
    with progress(f"quantizing {model} ({method}, {widths}{timing})"):
        qmodel = quantize(model, batch, method, w_bits, a_bits, **({"target": target} if target else {}),
                          weights=weights, act_observer=calibration, report="sensitivity" if sensitivity else None,
                          max_drop=max_drop, fastest_form=fastest_form)
    width = f"w{w_bits}a{a_bits}"
    if max_drop is not None:  # a map that chose one width for every layer is named by it
        chosen = set(qmodel.mixed_precision.widths.values())
        width = "mixed" if len(chosen) > 1 else f"w{min(chosen)}a{min(chosen)}"
    name = name or check_artifact_name(f"{model_label(model, float_model)}-{method}-{width}")
    with progress(f"exporting {model} quantized to {', '.join(targets)}"):
        example = tuple(parse_input(s) for s in inputs) or None
        artifacts = _export_quantized(model, qmodel, example, batch, targets, out, name,
                                      {k: v for k, v in options.items() if v is not None}
                                      | {"dynamic_batch": dynamic_batch, "dynamic_axes": parse_dynamic(dynamic)})
    with progress(f"comparing the quantized {model} with its float model"):
        against_float = _against_float(model, float_model, qmodel, batch, artifacts)
        accuracy = _zoo_accuracy(model, float_model, qmodel)
    if not against_float.passed:  # the artifacts match the quantized model; the quantized model lost this much
        worst = against_float.failures()[0]
        warnings.warn(f"the quantized model misses its width's tolerance against the float model: {worst.describe()}",
                      EdgeportWarning)
    report = asdict(qmodel.quant_report)
    ranking = [asdict(r) for r in getattr(qmodel, "sensitivity", [])]
    mixed = asdict(qmodel.mixed_precision) if hasattr(qmodel, "mixed_precision") else None
    form = asdict(qmodel.conv_form) if fastest_form else None
    if as_json:
        _emit_json({"report": report, "artifacts": {t: a.to_dict() for t, a in artifacts.items()},
                    "against_float": against_float.to_dict()}
                   | ({"accuracy": accuracy} if accuracy else {}) | ({"sensitivity": ranking} if sensitivity else {})
                   | ({"mixed_precision": mixed} if mixed else {}) | ({"conv_form": form} if form else {}))
        return
    for row in ranking:
        console.print(f"  {row['sqnr_db']:7.2f} dB  {row['layer']}")
    if mixed:
        console.print(qmodel.mixed_precision.summary(), markup=False)
    if form:
        timings = ", ".join(f"{name} {ms:.3f} ms ({_threads(form['threads'][name])})"
                            for name, ms in form["p50_ms"].items())
        console.print(f"conv form: {form['chosen']}, {qmodel.conv_form.speedup_vs_fp32:.2f}x fp32 (median batch-1 "
                      f"latency measured here in ONNX Runtime, each at its faster thread count: {timings})")
        for form_name, reason in form["left_out"].items():
            console.print(f"  {form_name}: left out, {reason}")
    console.print(qmodel.quant_report.summary(), soft_wrap=True, highlight=False, markup=False)
    console.print(_outputs_table("what quantizing cost: the quantized model against the float one",
                                 f"on {against_float.samples} samples ({against_float.inputs_source}); each "
                                 f"artifact below matches the quantized model", against_float))
    if accuracy:
        console.print(f"test accuracy on the zoo's {accuracy['test_images']} held-out images: float "
                      f"{accuracy['float_percent']:.2f} %, quantized {accuracy['quantized_percent']:.2f} % "
                      f"({accuracy['quantized_percent'] - accuracy['float_percent']:+.2f} points); their predictions "
                      f"agree on {accuracy['agreement_percent']:.1f} %")
    for artifact in artifacts.values():
        _print_artifact(artifact)


def _against_float(model: str, float_model, qmodel, calibration, artifacts: dict):
    """The quantized model against the float model it came from (`edgeport.verify.quantization_cost`),
    on a zoo model's 64 test images, else on the calibration batch, which its ranges were
    fitted to; the artifacts match the quantized model (their own verification)."""
    from edgeport import zoo
    from edgeport.verify import quantization_cost

    if model in zoo.names():
        args, source = (zoo.testset(model)[0][:64],), "64 test images"
    else:
        args = calibration if isinstance(calibration, tuple) else (calibration,)
        source = "the calibration batch, the samples its ranges were fitted to: new inputs may lose more"
    artifact = next(iter(artifacts.values()))
    return quantization_cost(float_model, qmodel, args, inputs_source=source,
                             output_names=[spec.name for spec in artifact.outputs], precision=artifact.precision)


def _zoo_accuracy(model: str, float_model, qmodel) -> dict | None:
    """For a zoo classifier, the task's view of what quantizing cost: top-1 accuracy (%) of the
    float and of the quantized torch model on every held-out test image, and how often their
    predictions agree (%); None for any other model, whose task edgeport does not know."""
    import torch

    from edgeport import zoo

    if model not in zoo.names():
        return None
    images, labels = zoo.testset(model)
    with torch.no_grad():
        float_pred, quantized_pred = float_model(images).argmax(1), qmodel(images).argmax(1)
    return {"test_images": len(labels), "float_percent": float((float_pred == labels).float().mean() * 100),
            "quantized_percent": float((quantized_pred == labels).float().mean() * 100),
            "agreement_percent": float((float_pred == quantized_pred).float().mean() * 100)}


def _calibration_arrays(path: str):
    """The arrays of a calibration .npz: by input name, or in file order where np.savez named
    them arr_0, arr_1, ... (given positionally)."""
    import torch

    from edgeport.load import load_arrays

    arrays = load_arrays(path)
    if all(re.fullmatch(r"arr_\d+", name) for name in arrays):
        return tuple(torch.from_numpy(a) for a in arrays.values())
    return arrays


def _export_quantized(model, qmodel, example, calibration, targets, out, name, options):
    """Export the quantized model with the backends' `options`. A zoo model is verified on 64
    of its test images; a model without `--input` takes its example from the calibration
    batch's first sample and is verified on the batch (real samples)."""
    from edgeport import zoo
    from edgeport.sdk import export

    inputs, described = None, "given inputs"
    if example is None and model in zoo.names():
        example, inputs = zoo.example(model), [zoo.testset(model)[0][i:i + 1] for i in range(64)]
        described = f"64 {model} test images"
    elif example is None and calibration is not None:
        batch = calibration if isinstance(calibration, tuple) else (calibration,)
        example, inputs, described = tuple(a[:1] for a in batch), [batch], "the calibration batch"
    return export(qmodel, example, targets=targets, out=out, name=name, verify_inputs=inputs,
                  verify_inputs_source=described, **options)


def _localization_table(localization) -> Table:
    """The intermediate tensors around the first departure (the last few where none departs)."""
    table = Table(title=localization.summary())
    for column in ("module", "op", "tensor", "rel to scale", "cosine", "SQNR dB", "verdict"):
        table.add_column(column)
    for row in localization.around_first():
        table.add_row(row.module, f"{row.op} -> {row.candidate_op}", row.name, f"{row.parity.max_rel_error:.2e}",
                      f"{row.parity.cosine:.6f}", f"{row.parity.sqnr_db:.1f}",
                      Text("ok", style="green") if row.parity.passed else Text("DEPARTS", style="red"))
    return table


@cli.command("verify")
@click.argument("artifact", type=click.Path())
@click.option("--against", "model", required=True, help="The torch model: zoo name, .pt2 or package.module:factory.")
@click.option("--weights", type=click.Path(), help=WEIGHTS_HELP)
@click.option("--inputs", type=click.Path(), help=".npz with real inputs (one array per model input).")
@click.option("--localize", is_flag=True, help="Also find the first layer whose output departs from torch "
                                               "(module path, op, error, SQNR).")
@click.option("--json", "as_json", is_flag=True, help="Print the parity report as JSON.")
def verify_command(artifact, model, weights, inputs, localize, as_json):
    """Check an artifact against its torch model on the same inputs; exit 1 if parity fails."""
    from edgeport.core import Artifact
    from edgeport.export.onnx import saturation_hint
    from edgeport.sdk import verify

    art = Artifact.load(artifact)
    with progress(f"verifying {artifact}" + (" and localizing" if localize else "")):
        art.parity = verify(art, model, _load_inputs(inputs, art), weights=weights, localize=localize)
    found = getattr(art.parity, "localization", [])
    if as_json:
        _emit_json({**art.parity.to_dict(), **({"localization": [f.to_dict() for f in found]} if localize else {})})
    else:
        console.print(_parity_table(art))
        for localization in found:
            console.print(_localization_table(localization))
    if not art.parity.passed:
        raise CheckFailed(f"{artifact} fails verification: {art.parity.failures()[0].describe()}"
                          f"{saturation_hint(art)}")


def _written_by_edgeport(path: Path, kind: str) -> bool:
    """Whether the existing file `path` is a `kind` output ("profile", "estimates", "report")
    that edgeport wrote, and so may be replaced by a newer one."""
    from edgeport.runtime.page import GENERATOR_TAG
    from edgeport.runtime.report import SCHEMA

    with path.open("rb") as file:  # the head is enough: a profile with its op breakdown runs to megabytes
        head = file.read(1 << 16).decode("utf-8", errors="replace")
    if kind == "report":  # a sweep's page is the sweep's to rewrite, from its job files
        from edgeport.fleet.report import SWEEP_TAG

        return GENERATOR_TAG in head[:2048] and SWEEP_TAG not in head[:2048]
    if kind == "profile":
        return re.match(r'\s*\{\s*"schema":\s*"' + re.escape(SCHEMA) + '"', head) is not None
    return head.lstrip().startswith("[") and re.search(r'"(energy_)?provenance": "estimated', head) is not None


def _check_output(path: Path, kind: str) -> None:
    """Refuse, before any work, an output path that is a folder, lies in a missing folder, or
    is an existing file that is not an earlier edgeport `kind` output (a model, someone's
    notes, the report's own inputs)."""
    if path.is_dir():
        raise UserError(f"cannot write the {kind} to {path}: it is a folder")
    if not path.parent.is_dir():
        raise UserError(f"cannot write the {kind} to {path}: its folder {path.parent} does not exist")
    if path.exists() and not _written_by_edgeport(path, kind):
        raise UserError(f"refusing to overwrite {path}: it is not an edgeport {kind} file (choose another path)")


@cli.command("profile")
@click.argument("artifact", type=click.Path())
@click.option("--backend", default="onnxruntime", show_default=True)
@click.option("--device", default="host", show_default=True, help="Where to measure: this machine ('host').")
@click.option("--runs", default=200, show_default=True, type=int, help="Timed runs (at least).")
@click.option("--warmup", default=20, show_default=True, type=int, help="Untimed warm-up runs.")
@click.option("--min-duration", default=0.0, show_default=True, type=float, help="Time at least this many seconds.")
@click.option("--threads", type=int, help="Intra-op threads (default: the runtime's).")
@click.option("--inputs", type=click.Path(), help=".npz with real inputs (one array per model input).")
@click.option("--batch-sizes", default="", help="Also measure throughput at these batch sizes, e.g. 1,8,32.")
@click.option("--no-ops", is_flag=True, help="Skip the per-op breakdown.")
@click.option("--no-energy", is_flag=True, help="Skip energy measurement.")
@click.option("-o", "--output", type=click.Path(), help="Write the profile JSON here (for `edgeport report`).")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def profile_command(artifact, backend, device, runs, warmup, min_duration, threads, inputs, batch_sizes, no_ops,
                    no_energy, output, as_json):
    """Measure latency (and energy where a meter exists) of ARTIFACT on this machine."""
    from edgeport.sdk import TORCH_DEVICES, profile

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()] if batch_sizes else []
    except ValueError:
        raise UserError(f"--batch-sizes takes comma-separated integers like 1,8,32, not {batch_sizes!r}") from None
    if output:
        _check_output(Path(output), "profile")
    with progress(f"profiling {artifact}"):
        prof = profile(artifact, backend, device, runs=runs, warmup=warmup, min_duration_s=min_duration,
                       threads=threads, inputs=_load_inputs(inputs, None if backend in TORCH_DEVICES else artifact),
                       ops=not no_ops, energy=not no_energy,
                       batch_sizes=sizes)
    if output:
        prof.save(output)
        (diagnostics if as_json else console).print(f"wrote {output}")
    if as_json:
        _emit_json(prof.to_dict())
        return
    console.print(prof.summary(), highlight=False)
    if prof.ops:
        ops = prof.ops
        table = Table(title=f"time per op category ({ops.backend} profiler, median per node over {ops.runs} runs, "
                            f"scaled to the measured p50; {ops.module_coverage():.0%} traced to an nn.Module)")
        for column in ("category", "share of op time", "ms at p50"):
            table.add_column(column, justify="left" if column == "category" else "right")
        for name, share in ops.by_category().items():
            table.add_row(name, f"{share:.1%}", f"{share * ops.in_ops_fraction * prof.latency.p50:.4f}")
        table.add_row("(between nodes)", "", f"{(1 - ops.in_ops_fraction) * prof.latency.p50:.4f}")
        console.print(table)


def _parse_dims(specs: tuple[str, ...]) -> dict[str, int]:
    """{name: value} from NAME=N strings (`--dim seq=32`)."""
    dims = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        if not name.strip() or not value.strip().isdigit() or not 0 < int(value) < 2 ** 31:
            raise UserError(f"--dim takes NAME=N with a positive integer N below 2^31, like seq=32, not {spec!r}")
        dims[name.strip()] = int(value)
    return dims


@cli.command("estimate")
@click.argument("artifact", type=click.Path())
@click.option("--device", "devices", multiple=True, default=["host"], show_default=True,
              help="Catalog device (repeatable), or 'all'.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N",
              help="Value of a symbolic dimension, e.g. --dim seq=32 (repeatable).")
@click.option("--inputs", type=click.Path(), help=".npz whose arrays' shapes set the symbolic dimensions.")
@click.option("-o", "--output", type=click.Path(), help="Write the estimates as JSON here (for `edgeport report`).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def estimate_command(artifact, devices, dims, inputs, output, as_json):
    """Roofline latency and energy of ARTIFACT on catalog devices (estimates, labelled so)."""
    from edgeport.devices import catalog
    from edgeport.runtime.report import write_atomically
    from edgeport.sdk import SPIKING_WITHOUT_RATES, estimate

    if output:
        _check_output(Path(output), "estimates")
    names = catalog.names() if "all" in devices else list(dict.fromkeys(devices))  # --device host twice: one row
    batch = _load_inputs(inputs, artifact)
    with progress(f"estimating {artifact} on {len(names)} device{'s' if len(names) > 1 else ''}"):
        estimates = [estimate(artifact, d, dims=_parse_dims(dims), inputs=batch[0] if batch else None) for d in names]
    records = [{k: v for k, v in e.to_dict().items() if k != "nodes"} for e in estimates]
    if output:
        write_atomically(Path(output), json.dumps(records, indent=2) + "\n")
        (diagnostics if as_json else console).print(f"wrote {output}")
    assumed = [name for name, source in estimates[0].dims_source.items() if source == "assumed"]
    if assumed:
        diagnostics.print(f"note: symbolic dimension {', '.join(assumed)} has no value and counts as 1; "
                          f"set it with --dim {assumed[0]}=N")
    for e in estimates:  # a peak priced at another precision moves the figure by the ratio of the two
        for line in (a for a in e.assumptions if " lists no " in a and " peak: " in a):
            diagnostics.print(f"note: {line}", soft_wrap=True)
    if SPIKING_WITHOUT_RATES in estimates[0].assumptions:
        diagnostics.print(f"note: the 45 nm figure of {SPIKING_WITHOUT_RATES}", soft_wrap=True)
    if as_json:
        _emit_json(records)
        return
    dims_text = ", ".join(f"{k}={v} ({estimates[0].dims_source[k]})" for k, v in estimates[0].dims.items())
    table = Table(title=f"estimated for {artifact} (roofline; not measured)" + (f"; dims {dims_text}" if dims_text
                                                                                else ""))
    for column in ("device", "latency ms", "energy mJ", "net mJ", "45 nm compute mJ", "MACs", "peak", "bandwidth",
                   "power"):
        table.add_column(column)
    for e in estimates:
        table.add_row(e.device, f"{e.latency_ms:.4g}", f"{e.energy_mj:.4g}", f"{e.net_energy_mj:.4g}",
                      f"{e.compute_energy_45nm_mj:.3g}",
                      f"{e.macs:.3g}", e.confidence["peak"], e.confidence["memory_bandwidth_gbs"],
                      e.confidence["active_w"])
    console.print(table)
    console.print("energy = the device's active power x roofline latency; net = less its idle power over that time, "
                  "as a measurement's net energy is; peak / bandwidth / power: the confidence of "
                  "the catalog figures used (measured, vendor, derived, third-party, assumed); sources: "
                  "`edgeport devices --json`")


@cli.command("devices")
@click.option("--recalibrate", is_flag=True, help="Measure the host again (micro-benchmarks, a few seconds) and "
              "replace its cached calibration.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def devices_command(recalibrate, as_json):
    """The device catalog, each figure with its confidence (the host is measured here and cached)."""
    from dataclasses import asdict

    from edgeport.devices import catalog

    if recalibrate:
        with progress("recalibrating the host"):
            catalog.host(recalibrate=True)
    devices = [catalog.get(n) for n in catalog.names()]
    if as_json:
        _emit_json([asdict(d) for d in devices])
        return
    table = Table(title="devices (peak figures; confidence of peak / bandwidth / power; sources with --json)")
    for column in ("name", "kind", "int8 TOPS", "fp16 TFLOPS", "fp32 TFLOPS", "GB/s", "active W", "confidence",
                   "backends"):
        table.add_column(column)
    for d in devices:
        table.add_row(d.name, d.kind, *(f"{d.peak[p]:.3g}" if p in d.peak else "-" for p in ("int8", "fp16", "fp32")),
                      f"{d.memory_bandwidth_gbs:.4g}", f"{d.active_w:.3g}",
                      " / ".join([d.confidence.get("peak", "assumed") + (f" (int8 {d.confidence['peak_int8']})"
                                                                          if "peak_int8" in d.confidence else "")]
                                 + [d.confidence.get(k, "assumed") for k in ("memory_bandwidth_gbs", "active_w")]),
                      ", ".join(d.backends))
    console.print(table)
    console.print(f"host: {catalog.get('host').sources['node_overhead_us'].split('; ', 1)[1]}")


@cli.command("report")
@click.argument("folder", type=click.Path())
@click.option("--html", "html_path", type=click.Path(), help="Where to write the HTML (default FOLDER/report.html).")
def report_command(folder, html_path):
    """Collect the profile and estimate JSON files in FOLDER into one HTML report with plots."""
    from edgeport.runtime.page import machine_names
    from edgeport.runtime.report import checked_folder, load_reports, write_html

    # FOLDER first: when it is no folder, that is the mistake to name, not the report.html it cannot hold
    checked_folder(folder)
    output = Path(html_path) if html_path else Path(folder) / "report.html"
    _check_output(output, "report")
    with progress(f"reading the profiles and estimates in {folder} and writing the report"):
        reports = load_reports(folder)
        path = write_html(output, *reports)
    machines = len(set(machine_names(reports.profiles)))
    console.print(f"wrote {path} ({len(reports.profiles)} profiles"
                  + (f" from {machines} machines" if machines > 1 else "")
                  + f", {len(reports.estimates)} estimates, {len(reports.artifacts)} artifact records)")


@cli.command("spikes")
@click.argument("model")
@click.option("--weights", type=click.Path(), help=WEIGHTS_HELP)
@click.option("--inputs", type=click.Path(), help=".npz whose first array is a batch of real samples.")
@click.option("--timesteps", type=int, help="T (default: the model's own).")
@click.option("--sequence", is_flag=True, help="The inputs are a [T, B, ...] sequence, not B samples.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def spikes_command(model, weights, inputs, timesteps, sequence, as_json):
    """Firing rates, synaptic operations and energy of a spiking MODEL beside its ANN: the 45 nm
    compute-only estimate and the memory-aware one with its break-even firing rate."""
    from edgeport.sdk import spike_statistics

    batch = _load_inputs(inputs)
    stats = spike_statistics(model, batch[0][0] if batch else None, timesteps, weights=weights, sequence=sequence)
    if not stats.neuron_rates:
        diagnostics.print(f"note: {model} has no spiking neurons: measured as the ANN it is (the SNN figures below are "
                          f"the ANN's)", soft_wrap=True)
    if as_json:
        _emit_json(stats.to_dict())
        return
    table = Table(title=f"{model}: per sample, {stats.samples} samples")
    for column in ("layer", "input", "calls", "input rate", "MACs/call", "SOPs"):
        table.add_column(column)
    for layer in stats.layers:
        table.add_row(layer.name, "spikes" if layer.spike_input else "real", str(layer.calls),
                      f"{layer.input_rate:.3f}", f"{layer.macs_per_call:.3g}", f"{layer.synaptic_ops:.3g}")
    console.print(table)
    console.print("firing rates: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.neuron_rates.items()))
    energy = Table(title="energy per sample, SNN beside the ANN of the same architecture and precision (estimates)")
    for column in ("estimate", "precision", "SNN uJ", "ANN uJ", "break-even input rate", "measured input rate"):
        energy.add_column(column)
    for precision in ("fp32", "fp16", "int8"):
        e = stats.energy(precision)
        energy.add_row("compute only", precision, f"{e['snn_mj'] * 1e3:.4g}", f"{e['ann_mj'] * 1e3:.4g}", "", "")
    for precision in ("fp32", "fp16", "int8"):
        m = stats.memory_energy(precision)
        even = "never" if m["break_even_rate"] is None else f"{m['break_even_rate']:.1%}"
        energy.add_row("memory-aware", precision, f"{m['snn_mj'] * 1e3:.4g}", f"{m['ann_mj'] * 1e3:.4g}", even,
                       f"{m['mean_input_rate']:.1%}")
    console.print(energy)
    console.print(f"compute only: {stats.energy()['provenance']}")
    console.print(f"memory-aware: {stats.memory_energy()['provenance']}")


@cli.command("zoo")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def zoo_command(as_json):
    """List the embedded models with their recorded test accuracy."""
    from edgeport import zoo

    records = [zoo.info(n) for n in zoo.names()]
    if as_json:
        _emit_json(records)
        return
    table = Table(title="edgeport zoo (scikit-learn digits, 360 test images)")
    for column in ("name", "architecture", "parameters", "test accuracy %", "epochs"):
        table.add_column(column)
    for r in records:
        table.add_row(r["name"], r["architecture"], f"{r['parameters']:,}", f"{r['test_accuracy_percent']:.2f}",
                      str(r["epochs"]))
    console.print(table)


@cli.command("demo")
@click.option("-o", "--out", default="edgeport-demo", show_default=True, type=click.Path(), metavar="DIR",
              help="The demo's own folder: new, empty, or an earlier demo's output, which a completed run replaces "
                   "as a whole. A folder holding anything else is refused before any work.")
@click.option("--runs", default=200, show_default=True, type=click.IntRange(min=1), help="Timed runs per runner.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo_command(out, runs, as_json):
    """The whole flow on the zoo: export, verify, accuracy and latency of torch vs ONNX Runtime.

    The run is staged inside DIR and its report is built from its own files only; they land
    in DIR once the whole run has succeeded, so a failure leaves DIR as it was."""
    from edgeport.demo import run_demo

    with progress("demo") as step:
        summary = run_demo(out, runs=runs, progress=step)
    if as_json:
        _emit_json(summary)
        return
    if summary.get("report"):
        console.print(f"report: {summary['report']}")
    table = Table(title=f"edgeport demo — artifacts and summary.json in {out}/")
    for column in ("model", "exporter", "parity", "acc torch %", "acc ORT %", "agree %",
                   "torch p50 ms", "ORT p50 ms"):
        table.add_column(column)
    for m in summary["models"]:
        table.add_row(m["model"], m["exporter"], f"ok ({m['max_rel_error']:.1e})" if m["parity_passed"] else "FAILED",
                      f"{m['accuracy_percent']['torch']:.2f}", f"{m['accuracy_percent']['onnxruntime']:.2f}",
                      f"{m['prediction_agreement_percent']:.1f}", f"{m['latency_ms']['torch']['p50']:.3f}",
                      f"{m['latency_ms']['onnxruntime']['p50']:.3f}")
    console.print(table)
    console.print(f"latency: {summary['latency_method']}")
    quant = Table(title="post-training quantization (RepQ, quantized ONNX through ONNX Runtime)")
    for column in ("model", "variant", "accuracy %", "p50 ms", "parity"):
        quant.add_column(column)
    for row in summary["quantized"]:
        quant.add_row(row["model"], row["variant"], f"{row['accuracy_percent']:.2f}", f"{row['p50_ms']:.4f}",
                      "ok" if row["parity_passed"] else "FAILED")
    console.print(quant)
    converted = summary["coreml"]
    console.print(f"Core ML: {len(converted)} packages ({', '.join(sorted({r['variant'] for r in converted}))}) "
                  f"converted and checked structurally; numerics: {converted[0]['numerics']}")
    slim = summary["slim"]
    console.print("slimming: " + "; ".join(f"{k} {v['accuracy_percent']:.2f}% {v['macs']:,.0f} MACs "
                                            f"p50 {v['p50_ms']:.4f} ms" for k, v in slim.items() if k != "speedup")
                  + f" (speed-up {slim['speedup']:.2f}x, measured)")
    snn = summary["spiking"]
    spiking = Table(title="snn-digits spiking forms (accuracy through ONNX Runtime; torch "
                          f"{snn['accuracy_percent_torch']:.2f}%)")
    for column in ("form", "ONNX", "Core ML", "parity", "accuracy %", "same predictions as torch"):
        spiking.add_column(column)
    for form, row in snn["forms"].items():
        spiking.add_row(form, row["onnx"], row["coreml"], "ok" if row["parity_passed"] else "FAILED",
                        f"{row['accuracy_percent_onnxruntime']:.2f}", "yes" if row["identical_predictions_to_torch"]
                        else "NO")
    console.print(spiking)
    console.print("firing rates: " + ", ".join(f"{k} {v:.3f}" for k, v in snn["firing_rates"].items()))
    for precision, values in snn["energy_per_sample_uj"].items():
        console.print(f"energy {precision}: " + ", ".join(f"{k} {v:.4g} uJ" for k, v in values.items()))
    console.print(f"({snn['energy_provenance']}); Core ML numerics: {snn['forms']['step']['coreml_numerical_check']}")
    for precision, values in snn["memory_aware_energy_per_sample_uj"].items():
        console.print(f"memory-aware energy {precision}: SNN {values['snn-digits']:.4g} uJ, as ANN "
                      f"{values['snn-digits as ANN']:.4g} uJ; break-even input rate {values['break_even_input_rate']:.1%} "
                      f"(measured {values['measured_input_rate']:.1%})")
    console.print(f"({snn['memory_aware_provenance']})")
    lmu = summary["lmu"]
    console.print(f"lmu-digits streamed row by row ({lmu['step']}): {lmu['accuracy_percent_streamed_onnxruntime']:.2f}%, "
                  f"unrolled ({lmu['unrolled']}): {lmu['accuracy_percent_unrolled_onnxruntime']:.2f}%, torch "
                  f"{lmu['accuracy_percent_torch']:.2f}%; streamed = unrolled bit for bit: "
                  f"{'yes' if lmu['streamed_equals_unrolled_bitwise'] else 'NO'}")


def _fleet_counts_table(counts: dict[str, dict[str, int]], title: str) -> Table:
    """Jobs per row (the exports, then each device) in each state."""
    from edgeport.fleet.sweep import STATES

    table = Table(title=title)
    table.add_column("jobs")
    for state in STATES:
        table.add_column(state, justify="right")
    for row, by_state in counts.items():
        table.add_row(row, *(str(by_state[state]) for state in STATES))
    return table


@contextlib.contextmanager
def _sweep_progress():
    """Job states per device while a sweep runs: a live table on a terminal; in logs, a line per
    job that starts, finishes or fails. Yields the sweep's `on_progress` callback."""
    if diagnostics.is_terminal:
        from rich.live import Live

        with Live(console=diagnostics, refresh_per_second=4, transient=True) as live:
            yield lambda event: live.update(_fleet_counts_table(event.counts, "sweep in progress"))
        return

    def log_line(event) -> None:
        if event.state in ("running", "done", "failed"):
            finished = sum(c["done"] + c["failed"] + c["skipped"] for c in event.counts.values())
            total = sum(sum(c.values()) for c in event.counts.values())
            diagnostics.print(f"[{finished}/{total}] {event.state} {event.job.describe()}"
                              + (f": {event.detail}" if event.detail else ""), soft_wrap=True)

    yield log_line


def _comma_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


@cli.command("sweep")
@click.argument("models", nargs=-1, required=True)
@click.option("--variants", default="fp32", show_default=True,
              help="Comma-separated: fp32, slim, snn-unrolled, snn-step, or a quantization preset with bit widths "
                   "such as repq-w8a8.")
@click.option("--to", "targets", default="onnx", show_default=True, help="Comma-separated export targets.")
@click.option("--devices", help="Comma-separated devices (default: host here; with --cluster, every device a node "
                                "advertises). Catalog devices without a node are estimated.")
@click.option("--cluster", metavar="ADDRESS", help="Run on the Ray cluster at HOST:PORT, ray://HOST:PORT or auto "
                                                    "(default: in this process).")
@click.option("-o", "--out", default="fleet", show_default=True, type=click.Path(), help="Results folder.")
@click.option("--input", "inputs", multiple=True, help="Example input shape for non-zoo models, e.g. 1x3x224x224.")
@click.option("--weights", type=click.Path(), help=WEIGHTS_HELP)
@click.option("--calib", type=click.Path(), help="Non-zoo models' quantized variants: .npz with the calibration batch "
                                                 "(about 32 real samples), as `edgeport quantize --calib` takes it.")
@click.option("--runs", default=200, show_default=True, type=click.IntRange(min=1), help="Timed runs per profile.")
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0))
@click.option("--sessions", default=5, show_default=True, type=click.IntRange(min=1),
              help="Fresh runtime sessions the runs are spread over.")
@click.option("--min-duration", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Time each profile at least this many seconds.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads (default: the runtime's).")
@click.option("--no-ops", is_flag=True, help="Skip the per-op breakdown.")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep's jobs and counts as JSON.")
def sweep_command(models, variants, targets, devices, cluster, out, inputs, weights, calib, runs, warmup, sessions,
                  min_duration, threads, no_ops, as_json):
    """Export MODELS in every variant once, and profile each artifact on every device."""
    from edgeport.fleet import sweep

    try:
        with _sweep_progress() as on_progress:
            result = sweep(list(models), _comma_list(variants), _comma_list(devices) or None, out,
                           targets=_comma_list(targets), cluster=cluster, example=list(inputs) or None,
                           weights=weights, calib=_calibration_arrays(calib) if calib else None, runs=runs,
                           warmup=warmup, sessions=sessions, min_duration_s=min_duration, threads=threads,
                           ops=not no_ops, on_progress=on_progress)
    except KeyboardInterrupt:
        diagnostics.print(f"interrupted: the jobs that finished are in {out} (index.jsonl); the same command "
                          "resumes with the rest", soft_wrap=True)
        raise
    if as_json:
        _emit_json(result.to_dict())
    else:
        console.print(_fleet_counts_table(result.counts, f"sweep {'on ' + cluster if cluster else 'in this process'}: "
                                                         f"{result.jobs_run} jobs run in {result.run_s:.1f} s"))
        for job in result.failed:
            console.print(f"failed: {job['file']}: {job['reason']}", soft_wrap=True)
        console.print(f"wrote {result.report} and {result.out / 'index.jsonl'}")
    if result.failed:
        raise CheckFailed(f"{len(result.failed)} of {len(result.jobs)} jobs failed; the same command again retries "
                          "them and skips the finished ones")


@cli.group("fleet")
def fleet_group() -> None:
    """Devices on a Ray cluster: make this machine one (join), list them (status)."""


@fleet_group.command("join", context_settings={"ignore_unknown_options": True})
@click.option("--device", help="The device this machine is, e.g. jetson-orin-nano (a catalog name, or your own).")
@click.option("--address", metavar="HOST:PORT", help="The head of the fleet to join.")
@click.option("--head", is_flag=True, help="Start a new fleet with this machine as its head.")
@click.option("--port", default=6379, show_default=True, type=click.IntRange(1, 65535), help="The head's port.")
@click.option("--units", default=1, show_default=True, type=click.IntRange(min=1),
              help="Measurements the device runs at once (1: timing has the device to itself).")
@click.option("--num-cpus", type=click.IntRange(min=0),
              help="CPUs Ray may schedule here (default for a device: one per unit).")
@click.option("--object-store-memory", type=click.IntRange(min=1), metavar="BYTES", help="Ray object store size.")
@click.option("--temp-dir", type=click.Path(), help="Ray's folder for this node's sockets and logs.")
@click.option("--block", is_flag=True, help="Stay in the foreground until stopped (for a service manager).")
@click.argument("ray_args", nargs=-1, type=click.UNPROCESSED)
def fleet_join_command(device, address, head, port, units, num_cpus, object_store_memory, temp_dir, block, ray_args):
    """Run `ray start` so that this machine joins the fleet advertising its device; arguments
    after `--` go to `ray start` as they are."""
    import os
    import shlex

    from edgeport.fleet.cluster import check_reachable, join_argv

    argv = join_argv(device, address=address, head=head, port=port, units=units, num_cpus=num_cpus,
                     object_store_memory=object_store_memory, temp_dir=temp_dir, block=block, ray_args=ray_args)
    if address is not None:
        check_reachable(address)  # one line in seconds, not Ray's retries and logs
    if device:
        from edgeport.devices.catalog import identity_mismatch

        mismatch = identity_mismatch(device)
        if mismatch:
            warnings.warn(f"this machine is not {device} ({mismatch}): its measurements will say so", EdgeportWarning)
    diagnostics.print(f"edgeport: {shlex.join(argv)}", soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # the node is Ray's from here: its signals, output and exit code


@fleet_group.command("status")
@click.option("--cluster", metavar="ADDRESS", default="auto", show_default=True,
              help="The Ray cluster: HOST:PORT, ray://HOST:PORT or auto.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def fleet_status_command(cluster, as_json):
    """List the nodes of the fleet and the devices they advertise."""
    from dataclasses import asdict

    from edgeport.fleet.cluster import status

    nodes = status(cluster)
    if as_json:
        _emit_json([asdict(n) for n in nodes])
        return
    table = Table(title=f"fleet at {cluster}: {sum(n.alive for n in nodes)} live nodes")
    for column in ("node", "address", "host", "state", "devices (units)", "CPUs", "object store MB"):
        table.add_column(column)
    for n in nodes:
        state = ("alive" if n.alive else "dead") + (", head" if n.head else "")
        table.add_row(n.node_id[:12], n.address, n.hostname, state,
                      ", ".join(f"{d} ({u:g})" for d, u in n.devices.items()) or "-", f"{n.cpus:g}",
                      f"{n.object_store_mb:.0f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    if argv is None:  # the console script, not a caller's process: take SIGTERM over
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if ENVIRONMENT_PROBLEMS:
            raise UserError(ENVIRONMENT_PROBLEMS[0])
        with warnings.catch_warnings():
            warnings.simplefilter("always", EdgeportWarning)
            # torch's own pytree deprecation, raised inside torch when an exported program is
            # copied (verify --localize): nothing a user of the CLI can act on
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            warnings.showwarning = _show_warning
            cli.main(args=args, prog_name="edgeport", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except SystemExit as exiting:
        from edgeport.core import stopped_by

        signum = stopped_by()
        if signum is None:
            raise
        diagnostics.print(f"stopped by {signal.Signals(signum).name}: what finished is kept")
        return 128 + signum
    except click.exceptions.NoArgsIsHelpError as bare:  # `edgeport` alone: the help itself, as a usage error
        diagnostics.print(bare.format_message(), soft_wrap=True, highlight=False, markup=False)
        return EXIT_USAGE
    except click.ClickException as error:  # usage errors: one line too, with where to find help
        command = error.ctx.command_path if getattr(error, "ctx", None) else "edgeport"
        diagnostics.print(Text("error: ", style="red") + Text(f"{_one_line(error.format_message())} "
                                                             f"(see {command} --help)"), soft_wrap=True)
        return EXIT_USAGE
    except click.exceptions.Abort as abort:
        if isinstance(abort.__cause__, KeyboardInterrupt):  # click's form of Ctrl-C: exit as SIGINT's shells expect
            diagnostics.print("interrupted (SIGINT): what finished is kept")
            return 128 + signal.SIGINT
        diagnostics.print("aborted")
        return EXIT_USAGE
    except (UserError, BackendUnavailable, CheckFailed) as error:
        if debug:
            traceback.print_exc()
        diagnostics.print(Text("error: ", style="red") + Text(_one_line(error)), soft_wrap=True)
        return EXIT_CHECK_FAILED if isinstance(error, CheckFailed) else EXIT_USAGE
    except Exception as error:  # a bug: say so, keep the traceback behind --debug
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        diagnostics.print(f"internal error: {type(error).__name__}: {_one_line(error)}{hint}", soft_wrap=True)
        return EXIT_INTERNAL
    return EXIT_OK


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """edgeport's own warnings as one `warning:` line on stderr; a library's as Python shows them."""
    if issubclass(category, EdgeportWarning):
        diagnostics.print(Text("warning: ", style="yellow") + Text(_one_line(message)), soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _one_line(error: BaseException) -> str:
    """An error message as one line (messages quoting a library's error may span several)."""
    return " ".join(str(error).split())[:2000]


def _terminate(signum, frame) -> None:
    """SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C: staging folders are removed."""
    from edgeport.core import stop

    stop(signum)


def console_main() -> None:
    """The console script: exit with `main()`'s code."""
    sys.exit(main())
