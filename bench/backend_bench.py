"""Backend benchmark: Core ML conversion and numerical verification, coremltools' documented
path against edgeport, and what the MIL interpreter costs.

1. The 17 `transformers` architectures of the export tests (small configs, random weights):
   coremltools 9.0 as its documentation shows it for torch.export (export, then
   `run_decompositions()` with PyTorch's default core-ATen table, then `ct.convert`, here at
   fp32 compute so the numbers can be judged at the fp32 tolerance) against
   `edgeport.export(..., targets=["coreml"])` at fp32 and fp16. Every package that converts is
   also run by the MIL interpreter against torch: converted is not the same as correct.
2. Every zoo model in every Core ML form edgeport offers (fp32, fp16, int8 / int4 /
   palettized weights, the spiking forms, W8A8 from edgeport.quantize): whether it converts
   and verifies, the export's seconds against the seconds `edgeport.verify` takes to check it
   through the interpreter, and for each weight compression the accuracy on the zoo test set
   (all of it, through the interpreter) against fp32's, next to the size of the weights.
Writes bench/results/backends.json.
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import edgeport as ep
from edgeport.core import TorchRunner, input_names
from edgeport.export.mil import MILInterpreterRunner
from edgeport.export.onnx import quiet

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
WEIGHT_FILE = Path("Data/com.apple.CoreML/weights/weight.bin")


def first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def raw_coremltools(model, example, folder: Path) -> dict:
    """coremltools' documented torch.export path; the package, if any, checked by the interpreter."""
    import coremltools as ct

    from edgeport.verify import compare

    try:
        with quiet():
            program = torch.export.export(model, tuple(example)).run_decompositions()
            mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                                 compute_precision=ct.precision.FLOAT32)
            mlmodel.save(str(folder / "raw.mlpackage"))
    except Exception as error:  # whatever coremltools raises is the result
        return {"converted": False, "error": first_line(error)}
    names = input_names(model, len(example))
    runner = MILInterpreterRunner(folder / "raw.mlpackage").load()
    feed = {n: a.numpy() for n, a in zip(names, example)}
    feed.update(zip(runner.input_names, feed.values()))  # coremltools may rename an input
    report = compare(TorchRunner(model, names, runner.output_names).load(), runner, [feed])
    return {"converted": True, "verified": report.passed,
            "max_rel_error": max(o.max_rel_error for o in report.outputs)}


def ours(model, example, folder: Path, **options) -> dict:
    """edgeport's export (verified on export) and how long it took."""
    start = time.perf_counter()
    try:
        artifact = ep.export(model, example, targets=["coreml"], out=folder, **options)["coreml"]
    except ep.EdgeportError as error:
        return {"converted": "fails verification" in str(error), "verified": False, "error": first_line(error),
                "seconds": time.perf_counter() - start}
    return {"converted": True, "verified": bool(artifact.parity and artifact.parity.passed),
            "checked_by": artifact.parity.candidate if artifact.parity else artifact.settings["verification"]
            .get("numerical"), "max_rel_error": max(o.max_rel_error for o in artifact.parity.outputs)
            if artifact.parity else None, "seconds": time.perf_counter() - start}


def transformers_rows() -> list[dict]:
    from hf_models import ARCHITECTURES

    rows = []
    for name, build in ARCHITECTURES.items():
        model, example = build()
        with tempfile.TemporaryDirectory() as tmp:
            row = {"architecture": name, "raw_coremltools": raw_coremltools(model, example, Path(tmp)),
                   "edgeport_fp32": ours(model, example, Path(tmp), name="fp32"),
                   "edgeport_fp16": ours(model, example, Path(tmp), name="fp16", coreml_precision="fp16")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


ZOO_FORMS = {"fp32": {}, "fp16": {"coreml_precision": "fp16"}, "int8 weights": {"coreml_weights": "int8"},
             "int4 weights": {"coreml_weights": "int4"}, "palettized 6-bit": {"coreml_weights": "palettize6"},
             "palettized 4-bit": {"coreml_weights": "palettize4"}}
COMPRESSED = ("int8 weights", "int4 weights", "palettized 6-bit", "palettized 4-bit")


def test_accuracy(package: Path, name: str) -> float:
    """Top-1 accuracy (%) of a zoo model's package on its whole test set, through the interpreter."""
    images, labels = (t.numpy() for t in ep.zoo.testset(name))
    runner = MILInterpreterRunner(package).load()
    predictions = [next(iter(runner.infer({runner.input_names[0]: images[i:i + 1]}).values())).argmax()
                   for i in range(len(images))]
    return float((np.array(predictions) == labels).mean() * 100)


def zoo_row(name: str, form: str, model, example, folder: Path, **options) -> dict:
    """One zoo form: export (unchecked) and check (edgeport.verify, through the interpreter)
    timed separately; for the image forms the test-set accuracy and the weight file's size."""
    row: dict = {"model": name, "form": form}
    start = time.perf_counter()
    try:
        artifact = ep.export(model, example, targets=["coreml"], out=folder, name=name, check=False, **options)
    except ep.EdgeportError as error:
        return {**row, "converted": False, "error": first_line(error)}
    artifact = artifact["coreml"]
    row.update(converted=True, export_seconds=time.perf_counter() - start)
    start = time.perf_counter()
    try:
        images = None if "snn_form" in options else [(image,) for image in ep.zoo.testset(name)[0][:64].split(1)]
        report = ep.verify(artifact, model, images)
        row.update(verified=report.passed, checked_by=report.candidate,
                   worst=min(report.outputs, key=lambda o: o.passed).describe())
    except ep.EdgeportError as error:
        row.update(verified=False, error=first_line(error))
    row["verify_seconds"] = time.perf_counter() - start
    if "snn_form" not in options:
        row["accuracy_percent"] = test_accuracy(artifact.path, name)
        row["weights_bytes"] = (artifact.path / WEIGHT_FILE).stat().st_size
    print(json.dumps(row), flush=True)
    return row


def zoo_rows() -> list[dict]:
    rows = []
    for name in ep.zoo.names():
        example = ep.zoo.example(name)
        with tempfile.TemporaryDirectory() as tmp:
            for form, options in ZOO_FORMS.items():
                rows.append(zoo_row(name, form, name, example, Path(tmp) / form.replace(" ", "-"), **options))
            if name == "snn-digits":
                for snn_form in ("unrolled", "step"):
                    rows.append(zoo_row(name, f"spiking {snn_form}", name, example, Path(tmp) / snn_form,
                                        snn_form=snn_form))
            rows.append(zoo_row(name, "W8A8", ep.quantize(name, method="repq"), example, Path(tmp) / "w8a8"))
    for row in rows:  # the accuracy cost and the size saved, against the same model's fp32 package
        fp32 = next(r for r in rows if r["model"] == row["model"] and r["form"] == "fp32")
        if "accuracy_percent" in row and "accuracy_percent" in fp32:
            row["accuracy_cost_points"] = fp32["accuracy_percent"] - row["accuracy_percent"]
            row["size_of_fp32"] = row["weights_bytes"] / fp32["weights_bytes"]
    return rows


def main() -> None:
    torch.set_num_threads(2)
    transformers, zoo = transformers_rows(), zoo_rows()
    count = lambda rows, key, field: sum(bool(r[key].get(field)) for r in rows)  # noqa: E731
    result = {
        "benchmark": "backends", "machine": platform.platform(), "processor": platform.processor() or "unknown",
        "command": "python bench/backend_bench.py", "coremltools": __import__("coremltools").__version__,
        "torch": torch.__version__,
        "transformers": {
            "architectures": len(transformers),
            "raw_coremltools_path": "torch.export.export -> run_decompositions() -> ct.convert (fp32 compute)",
            "raw_coremltools_converted": count(transformers, "raw_coremltools", "converted"),
            "raw_coremltools_verified": count(transformers, "raw_coremltools", "verified"),
            "edgeport_fp32_verified": count(transformers, "edgeport_fp32", "verified"),
            "edgeport_fp16_verified": count(transformers, "edgeport_fp16", "verified"),
            "rows": transformers},
        "zoo_forms": {"converted": sum(r.get("converted", False) for r in zoo),
                      "verified": sum(r.get("verified", False) for r in zoo), "total": len(zoo), "rows": zoo},
        "numerical_check": "MIL interpreter (edgeport.export.mil) against torch" if platform.system() != "Darwin"
        else "Core ML predictions against torch"}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "backends.json").write_text(json.dumps(result, indent=2) + "\n")
    t = result["transformers"]
    print(f"transformers: raw coremltools converted {t['raw_coremltools_converted']}/{t['architectures']} "
          f"(verified {t['raw_coremltools_verified']}); edgeport verified fp32 {t['edgeport_fp32_verified']}, "
          f"fp16 {t['edgeport_fp16_verified']}; zoo forms verified {result['zoo_forms']['verified']}/"
          f"{result['zoo_forms']['total']}")


if __name__ == "__main__":
    main()
