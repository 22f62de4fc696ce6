"""The whole flow on the embedded default: every zoo model exported, verified, compared, timed.

`run_demo(out)` writes the artifacts and `summary.json` into `out` and returns the summary.
Every latency in it is measured here (wall clock around each inference, batch 1); the
environment that produced it is recorded beside it. `out` is the demo's own: new, empty, or
an earlier demo's output, which a completed run replaces as a whole.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeport import __version__, zoo
from edgeport.devices import catalog
from edgeport.runtime.latency import measure
from edgeport.runtime.report import load_reports, write_html
from edgeport.core import STAGING_PREFIX, Runner, Staging, TorchRunner, exit_if_stopped, remove_path
from edgeport.errors import UserError
from edgeport.export.onnx import OnnxRuntimeRunner
from edgeport.verify import StreamingRunner
from edgeport.sdk import estimate, export, profile, quantize, spike_statistics


SUMMARY = "summary.json"  # names the files of its run: what a later run may replace


@dataclass(frozen=True)
class DemoFolders:
    """The demo writes into `work`, a staging folder inside `out`, and its files move to `out`
    only when the whole run has succeeded; what it records (profiles, estimates) names each
    artifact at its place in `out`, where the user finds it."""

    work: Path
    out: Path

    def final(self, path: Path) -> str:
        """Where `path`, a file written in `work`, lies once the run is committed."""
        return str(self.out / path.relative_to(self.work))


def predictions(runner: Runner, images: np.ndarray) -> np.ndarray:
    """Class ids for each image, one inference per image (the artifacts have batch 1)."""
    name = runner.input_names[0]
    return np.array([int(next(iter(runner.infer({name: images[i:i + 1]}).values())).argmax())
                     for i in range(len(images))])


def profile_variant(artifact_path: Path, folders: DemoFolders, runs: int, accuracy_percent: float, **options):
    """Profile an artifact here, record its accuracy, and save the profile beside it as
    `<stem>.profile.json` for the report, naming the artifact where the committed run puts it.
    Returns the Profile."""
    prof = profile(artifact_path, runs=runs, warmup=max(10, runs // 10), **options)
    prof.variant.accuracy_percent = accuracy_percent
    prof.variant.model = max((name for name in zoo.names() if artifact_path.stem.startswith(name)), key=len,
                             default=prof.variant.model)  # a quantized module's own name is its class's
    prof.artifact = folders.final(artifact_path)
    if prof.estimate is not None:
        prof.estimate.artifact = prof.artifact
    prof.save(folders.work / f"{artifact_path.stem}.profile.json")
    return prof


def quant_section(folders: DemoFolders, runs: int, progress: Callable[[str], None]) -> list[dict]:
    """RepQ W8A8 and W4A4 versions of the zoo ViT and CNN as quantized ONNX: accuracy through
    ONNX Runtime and measured latency, beside fp32 (whose profile is the main loop's).
    `progress` hears each model and variant as it starts."""
    rows = []
    for name in ("vit-digits", "cnn-digits"):
        images, labels = (t.numpy() for t in zoo.testset(name))
        for bits in (32, 8, 4):
            label = "fp32" if bits == 32 else f"repq W{bits}A{bits}"
            progress(f"{name} {label}: {'' if bits == 32 else 'quantize, '}export, verify, accuracy, latency")
            model = zoo.load(name) if bits == 32 else quantize(name, method="repq", w_bits=bits, a_bits=bits)
            artifact = export(model, zoo.example(name), out=folders.work,
                              name=f"{name}-{label.replace(' ', '-').lower()}",
                              verify_inputs=[zoo.testset(name)[0][i:i + 1] for i in range(32)])["onnx"]
            runner = OnnxRuntimeRunner(artifact.path).load()
            accuracy = float((predictions(runner, images) == labels).mean() * 100)
            runner.close()
            latency = (profile(artifact.path, runs=runs, ops=False, energy=False) if bits == 32 else
                       profile_variant(artifact.path, folders, runs, accuracy, energy=False)).latency
            rows.append({"model": name, "variant": label, "bits": bits, "artifact": artifact.path.name,
                         "accuracy_percent": accuracy, "p50_ms": latency.p50, "parity_passed": artifact.parity.passed})
    return rows


def coreml_check(artifact) -> str:
    """What checked a Core ML package's numbers: Core ML itself on macOS, the MIL interpreter
    elsewhere (or why nothing could)."""
    if artifact.parity is not None:
        return f"verified: {artifact.parity.candidate} against torch"
    return artifact.settings["verification"].get("numerical", "not checked")


def coreml_section(out: Path, progress: Callable[[str], None]) -> list[dict]:
    """Every zoo model as a Core ML package, fp32 and RepQ W8A8: what converted, and what
    checked its numbers (Core ML on macOS, the MIL interpreter elsewhere). `progress` hears
    each model as it starts."""
    rows = []
    for name in zoo.names():
        progress(f"{name}: Core ML packages, fp32 and RepQ W8A8")
        for variant, model in (("fp32", name), ("W8A8", quantize(name, method="repq"))):
            artifact = export(model, zoo.example(name), targets=["coreml"], out=out,
                              name=f"{name}-{variant.lower()}")["coreml"]
            structure = artifact.settings["verification"]["structure"]
            rows.append({"model": name, "variant": variant, "package": artifact.path.name,
                         "target": artifact.settings["minimum_deployment_target"],
                         "ops": sum(structure["op_histogram"].values()),
                         "numerics": coreml_check(artifact)})
    return rows


def slim_section(folders: DemoFolders, runs: int) -> dict:
    """The pruned zoo CNN exported slimmed (channels physically removed) beside the dense CNN:
    accuracy through ONNX Runtime, MACs and measured latency."""
    images, labels = (t.numpy() for t in zoo.testset("cnn-digits"))
    rows = {}
    for label, name, slim in (("dense", "cnn-digits", False), ("pruned, slimmed", "cnn-digits-pruned", True)):
        artifact = export(name, out=folders.work, name=f"{name}-slim" if slim else None, slim=slim)["onnx"]
        runner = OnnxRuntimeRunner(artifact.path).load()
        accuracy = float((predictions(runner, images) == labels).mean() * 100)
        runner.close()
        prof = profile_variant(artifact.path, folders, runs, accuracy, energy=False) if slim else \
            profile(artifact.path, runs=runs, ops=False, energy=False)
        report = artifact.settings.get("slim")
        rows[label] = {"artifact": artifact.path.name, "accuracy_percent": accuracy, "p50_ms": prof.latency.p50,
                       "median_ci95_ms": prof.latency.median_ci95,
                       "macs": report["macs_after"] if report else estimate(artifact.path, "host").macs}
    rows["speedup"] = rows["dense"]["p50_ms"] / rows["pruned, slimmed"]["p50_ms"]
    return rows


def spiking_section(folders: DemoFolders) -> dict:
    """The zoo SNN in both spiking forms (ONNX and Core ML), its accuracy through ONNX Runtime
    against torch, and its firing rates and the energy they imply beside the ANN CNN: the 45 nm
    compute-only estimate and the memory-aware one with its break-even firing rate (uJ)."""
    images, labels = (t.numpy() for t in zoo.testset("snn-digits"))
    with torch.no_grad():
        torch_pred = zoo.load("snn-digits")(torch.from_numpy(images)).argmax(1).numpy()
    forms = {}
    for form in ("unrolled", "step"):
        arts = export("snn-digits", out=folders.work, targets=["onnx", "coreml"], snn_form=form)
        if form == "unrolled":  # returns the model's own output, the readout averaged over T
            runner = OnnxRuntimeRunner(arts["onnx"].path).load()
            pred = predictions(runner, images)
        else:
            runner = StreamingRunner.open(arts["onnx"].path).load()
            pred = []
            for i in range(len(images)):
                runner.reset()
                pred.append(int(np.mean([runner.infer({"x": images[i:i + 1]})["output_0"] for _ in range(4)],
                                        axis=0).argmax()))
            pred = np.array(pred)
        runner.close()
        if form == "unrolled":  # the form a device runs as one graph: profiled for the report (50 runs)
            profile_variant(arts["onnx"].path, folders, 50, float((pred == labels).mean() * 100), energy=False)
        forms[form] = {"onnx": arts["onnx"].path.name, "coreml": arts["coreml"].path.name,
                       "parity_passed": arts["onnx"].parity.passed,
                       "coreml_numerical_check": coreml_check(arts["coreml"]),
                       "accuracy_percent_onnxruntime": float((pred == labels).mean() * 100),
                       "identical_predictions_to_torch": bool((pred == torch_pred).all())}
    snn_stats, ann_stats = spike_statistics("snn-digits"), spike_statistics("cnn-digits")
    memory_aware = {p: snn_stats.memory_energy(p) for p in ("fp32", "int8")}
    return {"forms": forms, "accuracy_percent_torch": float((torch_pred == labels).mean() * 100),
            "firing_rates": snn_stats.neuron_rates,
            "energy_per_sample_uj": {p: {"snn-digits": snn_stats.energy(p)["snn_mj"] * 1e3,
                                         "snn-digits as ANN": snn_stats.energy(p)["ann_mj"] * 1e3,
                                         "cnn-digits (ANN)": ann_stats.energy(p)["ann_mj"] * 1e3}
                                     for p in ("fp32", "int8")},
            "energy_provenance": snn_stats.energy()["provenance"],
            "memory_aware_energy_per_sample_uj": {
                p: {"snn-digits": e["snn_mj"] * 1e3, "snn-digits as ANN": e["ann_mj"] * 1e3,
                    "break_even_input_rate": e["break_even_rate"], "measured_input_rate": e["mean_input_rate"]}
                for p, e in memory_aware.items()},
            "memory_aware_provenance": memory_aware["fp32"]["provenance"]}


def lmu_section(out: Path) -> dict:
    """The zoo LMU (digits read row by row) in its streaming step form, run one row at a time
    through ONNX Runtime with its memory fed back, beside its unrolled form: accuracy of each
    on the 360 test digits, and whether the streamed logits equal the unrolled ones bit for bit
    at every step."""
    from edgeport.zoo.models import LMU

    model = zoo.load("lmu-digits")
    images, labels = zoo.testset("lmu-digits")
    rows = LMU.rows(images)  # (8 rows, 360, 8 pixels)
    with torch.no_grad():
        torch_pred = model(images).argmax(1).numpy()
    common = dict(out=out, name="lmu-digits", timesteps=model.timesteps, sequence=True,
                  verify_inputs=[rows[:, i:i + 1] for i in range(0, len(images), 12)])
    step = export(model, rows[:, :1], snn_form="step", **common)["onnx"]
    unrolled = export(model, rows[:, :1], snn_form="unrolled", snn_outputs="per_step", **common)["onnx"]
    stream, whole = StreamingRunner.open(step.path).load(), OnnxRuntimeRunner(unrolled.path).load()
    streamed, unrolled_logits = [], []
    for i in range(len(images)):
        stream.reset()
        streamed.append(np.stack([stream.infer({"x": row[i:i + 1].numpy()})["output_0"] for row in rows]))
        unrolled_logits.append(whole.infer({"x": rows[:, i:i + 1].numpy()})["output_0_per_step"])
    stream.close()
    whole.close()
    streamed, unrolled_logits = np.concatenate(streamed, axis=1), np.concatenate(unrolled_logits, axis=1)
    labels = labels.numpy()
    return {"step": step.path.name, "unrolled": unrolled.path.name,
            "parity_passed": step.parity.passed and unrolled.parity.passed,
            "accuracy_percent_torch": float((torch_pred == labels).mean() * 100),
            "accuracy_percent_streamed_onnxruntime": float((streamed[-1].argmax(1) == labels).mean() * 100),
            "accuracy_percent_unrolled_onnxruntime": float((unrolled_logits[-1].argmax(1) == labels).mean() * 100),
            "streamed_equals_unrolled_bitwise": bool(np.array_equal(streamed, unrolled_logits))}


def environment() -> dict:
    """What produced the figures: machine, threads and package versions."""
    import onnxruntime

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "edgeport": __version__}


def earlier_demo_files(out: Path) -> set[str]:
    """The names in `out` (a folder, or nothing yet) that an earlier demo wrote, which this run
    replaces. Anything else there (a user's own report.html, summary.json or notes) is refused
    with a UserError naming it: the demo neither overwrites it nor reads it into its report.
    An earlier demo's files are those its summary.json lists; a staging folder of a running
    export is no one's output."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise UserError(f"cannot write the demo to {out}: it is not a folder")
    names = {path.name for path in out.iterdir() if not path.name.startswith(STAGING_PREFIX)}
    foreign = sorted(names - files_listed_in(out / SUMMARY))
    if foreign:
        raise UserError(f"refusing to write the demo into {out}: {out / foreign[0]} is not an earlier edgeport "
                        f"demo's output (move it away, or choose a new or empty folder with -o)")
    return names


def files_listed_in(summary: Path) -> set[str]:
    """The names an earlier demo's summary.json lists (itself among them); none where `summary`
    is not one: missing, a link, or anyone else's file. An older edgeport's demo, which listed
    nothing, is refused (UserError)."""
    if not summary.is_file() or summary.is_symlink():
        return set()
    try:
        data = json.loads(summary.read_text())
        if not isinstance(data, dict) or "edgeport_demo" not in data:
            return set()
        if "files" not in data:  # before the demo listed its files: they cannot be told from a user's
            raise UserError(f"refusing to write the demo into {summary.parent}: its demo output is from an older "
                            f"edgeport, which did not list its files (remove the folder, or choose another with -o)")
        return set(data["files"])
    except (OSError, ValueError, TypeError):  # unreadable, not JSON, or no list of names
        return set()


def commit(folders: DemoFolders) -> None:
    """Move the run's files from `work` into `out`, replacing the earlier demo's output as a
    whole, summary.json last (it names a complete output). `out` is checked again first: it
    may have gained a user's file during the minutes the run took."""
    earlier = earlier_demo_files(folders.out)
    exit_if_stopped()
    names = sorted((path.name for path in folders.work.iterdir()), key=lambda name: name == SUMMARY)
    for name in earlier - set(names):
        remove_path(folders.out / name)
    for name in names:
        remove_path(folders.out / name)
        os.replace(folders.work / name, folders.out / name)


def catalog_estimates(folders: DemoFolders) -> list[dict]:
    """Every ONNX artifact of this run on every catalog device, without the per-node rows."""
    return [{**{k: v for k, v in estimate(path, device).to_dict().items() if k != "nodes"},
             "artifact": folders.final(path)}
            for path in sorted(folders.work.glob("*.onnx")) for device in catalog.names()]


def run_demo(out: str | Path = "edgeport-demo", runs: int = 200, progress: Callable[[str], None] = lambda s: None
             ) -> dict:
    """Export every zoo model to ONNX, verify it, compare test accuracy and latency of torch
    and ONNX Runtime, profile each artifact (latency, per-op breakdown, energy where a meter
    exists), estimate every ONNX variant on every catalog device, and write artifacts,
    `summary.json` (naming the report and listing every file of the run), `*.profile.json`,
    `estimates.json` and `report.html` to `out`. Latencies in ms.

    `out` must be new, empty, or an earlier demo's output: anything else there is refused
    (UserError) before any work. The run writes into a staging folder inside `out`, and its
    report reads only what the run wrote; its files replace the earlier demo's only once the
    whole run has succeeded, so a failure or a stop leaves `out` as it was."""
    out = Path(out)
    earlier_demo_files(out)  # refuses a folder holding anything else, before any work
    with Staging(out) as staging:
        folders = DemoFolders(work=staging.dir, out=out)
        summary = write_demo(folders, runs, progress)
        summary["files"] = sorted([*(path.name for path in folders.work.iterdir()), SUMMARY])
        (folders.work / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        commit(folders)
    progress(f"report written to {summary['report']}")
    return summary


def write_demo(folders: DemoFolders, runs: int, progress: Callable[[str], None]) -> dict:
    """The whole run, written into `folders.work`: artifacts, profiles, estimates and the
    report (all but summary.json). Returns the summary."""
    models = []
    for name in zoo.names():
        progress(f"{name}: export to ONNX and verify")
        artifact = export(name, out=folders.work)["onnx"]
        images, labels = (t.numpy() for t in zoo.testset(name))
        torch_runner = TorchRunner(zoo.load(name), [s.name for s in artifact.inputs]).load()
        ort_runner = OnnxRuntimeRunner(artifact.path).load()
        progress(f"{name}: accuracy on {len(images)} test images")
        torch_pred, ort_pred = predictions(torch_runner, images), predictions(ort_runner, images)
        progress(f"{name}: latency, {runs} runs each")
        feeds = [{artifact.inputs[0].name: images[i:i + 1]} for i in range(16)]
        latency = {r.name: measure(r, feeds, runs=runs, warmup=max(10, runs // 10)) for r in (torch_runner, ort_runner)}
        ort_runner.close()  # its worker threads must not spin beside the next measurement
        progress(f"{name}: profile")
        profile_variant(artifact.path, folders, runs, float((ort_pred == labels).mean() * 100), label=name,
                        idle_s=0.5, batch_sizes=(1, 8))
        models.append({
            "model": name, "artifact": artifact.path.name, "exporter": artifact.exporter, "opset": artifact.opset,
            "parity_passed": artifact.parity.passed,
            "max_rel_error": max(o.max_rel_error for o in artifact.parity.outputs),
            "accuracy_percent": {"torch": float((torch_pred == labels).mean() * 100),
                                 "onnxruntime": float((ort_pred == labels).mean() * 100)},
            "prediction_agreement_percent": float((torch_pred == ort_pred).mean() * 100),
            "latency_ms": {k: {"p50": v.p50, "p90": v.p90, "p99": v.p99, "mean": v.mean, "cv": v.cv,
                               "median_ci95": v.median_ci95, "runs": len(v.samples_ms)} for k, v in latency.items()},
        })
    quantized = quant_section(folders, runs, progress)
    coreml = coreml_section(folders.work, progress)
    progress("cnn-digits-pruned: slimmed export beside the dense CNN")
    slimmed = slim_section(folders, runs)
    progress("snn-digits: spiking forms (unrolled, step) for ONNX and Core ML, firing rates, energy")
    spiking = spiking_section(folders)
    progress("lmu-digits: streamed row by row through ONNX Runtime beside its unrolled form")
    lmu = lmu_section(folders.work)
    summary = {"edgeport_demo": __version__, "test_images": 360, "spiking": spiking, "lmu": lmu, "slim": slimmed,
               "quantized": quantized, "coreml": coreml,
               "latency_method": "measured: wall clock (perf_counter_ns) around each inference, batch 1, "
                                 "inputs rotated over 16 test images, after warm-up",
               "environment": environment(), "models": models}
    progress("estimates of every ONNX variant on every catalog device, and the report")
    (folders.work / "estimates.json").write_text(json.dumps(catalog_estimates(folders), indent=2) + "\n")
    write_html(folders.work / "report.html", *load_reports(folders.work), title="edgeport demo report")
    summary["report"] = str(folders.out / "report.html")
    return summary
