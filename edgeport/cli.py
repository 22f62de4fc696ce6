"""The `edgeport` command: a thin shell over the SDK, one sub-command per SDK call.

Exit codes: 0 ok, 1 a check failed, 2 bad usage or input, 3 an internal error (a bug).
User errors print one line; `--debug` shows the traceback.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgeport.errors import BackendUnavailable, CheckFailed, UserError
from edgeport.quant.calibrate import OBSERVERS
from edgeport.quant.config import PRESETS

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
    for `LOG_AFTER_S`, a line per sub-step after that, and one when it ends with its duration.
    Yields a function that reports a sub-step."""
    if diagnostics.is_terminal:
        with diagnostics.status(message) as status:
            yield lambda step: status.update(f"{message}: {step}")
        return
    start = time.perf_counter()
    started = threading.Event()

    def announce() -> None:
        started.set()
        diagnostics.print(f"... {message}")

    timer = threading.Timer(LOG_AFTER_S, announce)
    timer.daemon = True
    timer.start()
    try:
        yield lambda step: started.is_set() and diagnostics.print(f"... {message}: {step}")
    finally:
        timer.cancel()
    if started.is_set():
        diagnostics.print(f"... {message}: done in {time.perf_counter() - start:.1f} s")


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _load_inputs(path: str | None):
    """Inputs from an .npz file (one array per model input, in file order) as one batch."""
    if path is None:
        return None
    import torch

    from edgeport.load import load_arrays

    return [tuple(torch.from_numpy(a) for a in load_arrays(path).values())]


def _parity_table(artifact) -> Table:
    table = Table(title=f"{artifact.path}  ({artifact.exporter}, opset {artifact.opset})")
    for column in ("output", "verdict", "max abs", "rel to scale", "cosine", "SQNR dB", "tolerance"):
        table.add_column(column)
    for o in artifact.parity.outputs if artifact.parity else []:
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


@cli.command("export")
@click.argument("model")
@click.option("--to", "targets", default="onnx", show_default=True, help="Comma-separated targets.")
@click.option("--input", "inputs", multiple=True, help="Example input shape, e.g. 1x3x224x224 or 1x16:int64; "
              "repeat for several inputs. Zoo models bring their own.")
@click.option("--weights", type=click.Path(), help="Weights for package.module:factory (safetensors or weights-only).")
@click.option("-o", "--out", default="build", show_default=True, type=click.Path(), help="Output folder.")
@click.option("--name", help="Artifact file name (default: the model's).")
@click.option("--dynamic-batch", is_flag=True, help="Make axis 0 of every input and output symbolic.")
@click.option("--dynamic", "dynamic", multiple=True, metavar="INPUT:AXIS:SYMBOL",
              help="Make one input axis symbolic, e.g. input_ids:1:sequence; repeatable.")
@click.option("--snn-form", type=click.Choice(["unrolled", "step"]),
              help="Spiking models: T steps in one graph, or one step with membranes as inputs/outputs.")
@click.option("--timesteps", type=int, help="Spiking models: T (default: the model's own).")
@click.option("--sequence", is_flag=True, help="Spiking models: the input is (T, B, ...), not one frame repeated.")
@click.option("--slim", "slim_model", is_flag=True, help="Remove pruned channels and heads first (same function).")
@click.option("--verify-inputs", type=click.Path(), help=".npz with real inputs for verification.")
@click.option("--no-verify", is_flag=True, help="Skip verification (the sidecar then has no parity report).")
@click.option("--json", "as_json", is_flag=True, help="Print the artifacts' records as JSON.")
@backend_options
def export_command(model, targets, inputs, weights, out, name, dynamic_batch, dynamic, snn_form, timesteps, sequence,
                   slim_model, verify_inputs, no_verify, as_json, **options):
    """Export MODEL (zoo name, .pt2, or package.module:factory) and verify each artifact."""
    from edgeport.sdk import export, parse_dynamic, parse_input

    example = tuple(parse_input(s) for s in inputs) or None
    try:
        with progress(f"exporting {model} to {targets}"):
            artifacts = export(model, example, targets=[t.strip() for t in targets.split(",") if t.strip()],
                               out=out, name=name, weights=weights, verify_inputs=_load_inputs(verify_inputs),
                               check=not no_verify, dynamic_batch=dynamic_batch,
                               dynamic_axes=parse_dynamic(dynamic), snn_form=snn_form, timesteps=timesteps,
                               sequence=sequence, slim=slim_model, **{k: v for k, v in options.items() if v is not None})
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
        console.print(_parity_table(artifact))
        for note in artifact.notes:
            console.print(f"note: {note}")
        console.print(f"wrote {artifact.path} and {artifact.sidecar.name}")


@cli.command("quantize")
@click.argument("model")
@click.option("--method", type=click.Choice(list(PRESETS)), default="repq", show_default=True,
              help="; ".join(f"{name}: {config.description}" for name, config in PRESETS.items()) + ".")
@click.option("--w-bits", type=int, default=8, show_default=True)
@click.option("--a-bits", type=int, default=8, show_default=True)
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt: symmetric quantizers (zero point 0).")
@click.option("--calib", type=click.Path(), help=".npz whose first array is the calibration batch (zoo: its own).")
@click.option("--calibration", type=click.Choice(list(OBSERVERS)),
              help="Activation range calibration (default: the method's own; entropy is KL as in TensorRT).")
@click.option("--weights", type=click.Path(), help="Weights for package.module:factory.")
@click.option("--input", "inputs", multiple=True, help="Example input shape (zoo models bring their own).")
@click.option("--to", "targets", default="onnx", show_default=True, help="Comma-separated export targets.")
@click.option("-o", "--out", default="build", show_default=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def quantize_command(model, method, w_bits, a_bits, target, calib, calibration, weights, inputs, targets, out, as_json):
    """Post-training quantization of MODEL, exported as quantized ONNX and verified against the fake-quant model."""
    from dataclasses import asdict

    from edgeport.sdk import parse_input, quantize

    batch = _load_inputs(calib)
    with progress(f"quantizing {model} ({method}, W{w_bits}A{a_bits})"):
        qmodel = quantize(model, batch[0][0] if batch else None, method, w_bits, a_bits, target=target,
                          weights=weights, act_observer=calibration)
        example = tuple(parse_input(s) for s in inputs) or None
        name = f"{model if not any(c in model for c in '/:') else 'model'}-{method}-w{w_bits}a{a_bits}"
        artifacts = _export_quantized(model, qmodel, example, targets, out, name)
    report = asdict(qmodel.quant_report)
    if as_json:
        _emit_json({"report": report, "artifacts": {t: a.to_dict() for t, a in artifacts.items()}})
        return
    console.print(f"quantized {len(report['layers'])} layers and {len(report['matmuls'])} activation matmuls"
                  f"{' (' + report['matmuls_not_quantized'] + ')' if report['matmuls_not_quantized'] else ''}; "
                  f"reparameterized {len(report['reparameterized'])}; conv-BN folded {len(report['batchnorm_folds'])}")
    for line in report["float_ops"]:
        console.print(f"  runs as float ops: {line}")
    for artifact in artifacts.values():
        console.print(_parity_table(artifact))
        console.print(f"wrote {artifact.path}")


def _export_quantized(model, qmodel, example, targets, out, name):
    """Export the quantized model; a zoo model is verified on 64 of its test images."""
    from edgeport import zoo
    from edgeport.sdk import export

    if example is None and model in zoo.names():
        example, inputs = zoo.example(model), [zoo.testset(model)[0][i:i + 1] for i in range(64)]
    else:
        inputs = None
    return export(qmodel, example, targets=[t.strip() for t in targets.split(",")], out=out, name=name,
                  verify_inputs=inputs)


@cli.command("verify")
@click.argument("artifact", type=click.Path())
@click.option("--against", "model", required=True, help="The torch model: zoo name, .pt2 or package.module:factory.")
@click.option("--weights", type=click.Path(), help="Weights for package.module:factory.")
@click.option("--inputs", type=click.Path(), help=".npz with real inputs (one array per model input).")
@click.option("--json", "as_json", is_flag=True, help="Print the parity report as JSON.")
def verify_command(artifact, model, weights, inputs, as_json):
    """Check an artifact against its torch model on the same inputs; exit 1 if parity fails."""
    from edgeport.core import Artifact
    from edgeport.sdk import verify

    art = Artifact.load(artifact)
    with progress(f"verifying {artifact}"):
        art.parity = verify(art, model, _load_inputs(inputs), weights=weights)
    if as_json:
        _emit_json(art.parity.to_dict())
    else:
        console.print(_parity_table(art))
    if not art.parity.passed:
        raise CheckFailed(f"{artifact} fails verification: {art.parity.failures()[0].describe()}")


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
    from edgeport.sdk import profile

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()] if batch_sizes else []
    except ValueError:
        raise UserError(f"--batch-sizes takes comma-separated integers like 1,8,32, not {batch_sizes!r}") from None
    if output and (Path(output).is_dir() or not Path(output).parent.is_dir()):
        raise UserError(f"cannot write the profile to {output}: " + ("it is a folder" if Path(output).is_dir()
                                                                    else "its folder does not exist"))
    with progress(f"profiling {artifact}"):
        prof = profile(artifact, backend, device, runs=runs, warmup=warmup, min_duration_s=min_duration,
                       threads=threads, inputs=_load_inputs(inputs), ops=not no_ops, energy=not no_energy,
                       batch_sizes=sizes)
    if output:
        prof.save(output)
    if as_json:
        _emit_json(prof.to_dict())
        return
    console.print(prof.summary(), highlight=False)
    if prof.ops:
        table = Table(title="time per op category (onnxruntime profiler)")
        table.add_column("category")
        table.add_column("share", justify="right")
        for name, share in prof.ops.by_category().items():
            table.add_row(name, f"{share:.1%}")
        console.print(table)


@cli.command("estimate")
@click.argument("artifact", type=click.Path())
@click.option("--device", "devices", multiple=True, default=["host"], show_default=True,
              help="Catalog device (repeatable), or 'all'.")
@click.option("--json", "as_json", is_flag=True)
def estimate_command(artifact, devices, as_json):
    """Roofline latency and energy of ARTIFACT on catalog devices (estimates, labelled so)."""
    from edgeport.devices import catalog
    from edgeport.sdk import estimate

    names = catalog.names() if "all" in devices else list(devices)
    estimates = [estimate(artifact, d) for d in names]
    if as_json:
        _emit_json([{k: v for k, v in e.to_dict().items() if k != "nodes"} for e in estimates])
        return
    table = Table(title=f"estimated for {artifact} (roofline; not measured)")
    for column in ("device", "latency ms", "energy mJ", "45 nm compute mJ", "MACs"):
        table.add_column(column)
    for e in estimates:
        table.add_row(e.device, f"{e.latency_ms:.4g}", f"{e.energy_mj:.4g}", f"{e.compute_energy_45nm_mj:.3g}",
                      f"{e.macs:.3g}")
    console.print(table)
    console.print("energy = the device's active power x roofline latency; sources: `edgeport devices --json`")


@cli.command("devices")
@click.option("--json", "as_json", is_flag=True)
def devices_command(as_json):
    """The device catalog (the host is measured by micro-benchmarks here)."""
    from dataclasses import asdict

    from edgeport.devices import catalog

    devices = [catalog.get(n) for n in catalog.names()]
    if as_json:
        _emit_json([asdict(d) for d in devices])
        return
    table = Table(title="devices (peak figures; sources with --json)")
    for column in ("name", "kind", "int8 TOPS", "fp16 TFLOPS", "fp32 TFLOPS", "GB/s", "active W", "backends"):
        table.add_column(column)
    for d in devices:
        table.add_row(d.name, d.kind, *(f"{d.peak[p]:.3g}" if p in d.peak else "-" for p in ("int8", "fp16", "fp32")),
                      f"{d.memory_bandwidth_gbs:.4g}", f"{d.active_w:.3g}", ", ".join(d.backends))
    console.print(table)


@cli.command("report")
@click.argument("folder", type=click.Path())
@click.option("--html", "html_path", type=click.Path(), help="Where to write the HTML (default FOLDER/report.html).")
def report_command(folder, html_path):
    """Collect the profile and estimate JSON files in FOLDER into one HTML report with plots."""
    from edgeport.runtime.report import load_reports, write_html

    if html_path and not Path(html_path).parent.is_dir():
        raise UserError(f"cannot write {html_path}: the folder {Path(html_path).parent} does not exist")
    profiles, estimates = load_reports(folder)
    path = write_html(html_path or Path(folder) / "report.html", profiles, estimates)
    console.print(f"wrote {path} ({len(profiles)} profiles, {len(estimates)} estimates)")


@cli.command("spikes")
@click.argument("model")
@click.option("--weights", type=click.Path(), help="Weights for package.module:factory.")
@click.option("--inputs", type=click.Path(), help=".npz whose first array is a batch of real samples.")
@click.option("--timesteps", type=int, help="T (default: the model's own).")
@click.option("--json", "as_json", is_flag=True)
def spikes_command(model, weights, inputs, timesteps, as_json):
    """Firing rates, synaptic operations and 45 nm energy of a spiking MODEL beside its ANN."""
    from edgeport.sdk import spike_statistics

    batch = _load_inputs(inputs)
    stats = spike_statistics(model, batch[0][0] if batch else None, timesteps, weights=weights)
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
    for precision in ("fp32", "fp16", "int8"):
        e = stats.energy(precision)
        console.print(f"{precision}: SNN {e['snn_mj'] * 1e3:.4g} uJ vs ANN {e['ann_mj'] * 1e3:.4g} uJ per sample")
    console.print(f"({stats.energy()['provenance']})")


@cli.command("zoo")
@click.option("--json", "as_json", is_flag=True)
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
@click.option("-o", "--out", default="edgeport-demo", show_default=True, type=click.Path())
@click.option("--runs", default=200, show_default=True, type=click.IntRange(min=1), help="Timed runs per runner.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo_command(out, runs, as_json):
    """The whole flow on the zoo: export, verify, accuracy and latency of torch vs ONNX Runtime."""
    from edgeport.demo import run_demo

    with progress("demo") as step:
        summary = run_demo(out, runs=runs, progress=step)
    if as_json:
        _emit_json(summary)
        return
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    if argv is None:  # the console script, not a caller's process: take SIGTERM over
        signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=args, prog_name="edgeport", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:  # usage errors: one line too, with where to find help
        command = error.ctx.command_path if getattr(error, "ctx", None) else "edgeport"
        diagnostics.print(Text("error: ", style="red") + Text(f"{_one_line(error.format_message())} "
                                                             f"(see {command} --help)"), soft_wrap=True)
        return EXIT_USAGE
    except click.exceptions.Abort:
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
        diagnostics.print(f"internal error: {type(error).__name__}: {_one_line(error)} (run with --debug for the "
                          f"traceback)", soft_wrap=True)
        return EXIT_INTERNAL
    return EXIT_OK


def _one_line(error: BaseException) -> str:
    """An error message as one line (messages quoting a library's error may span several)."""
    return " ".join(str(error).split())[:2000]


def _terminate(signum, frame) -> None:
    """SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C: staging folders are removed."""
    raise SystemExit(128 + signum)


def console_main() -> None:
    """The console script: exit with `main()`'s code."""
    sys.exit(main())
