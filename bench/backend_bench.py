"""Backend benchmark: Core ML conversion success, raw coremltools against edgeport.

1. The 17 common `transformers` architectures of the export tests (small configs, random
   weights): raw coremltools 9.0 as its documentation shows it (torch.export, then
   `run_decompositions({})`, then `ct.convert`), against `edgeport.export(..., targets=["coreml"])`
   (which decomposes the ops coremltools lacks and falls back to tracing).
2. Every zoo model in every Core ML form edgeport offers: fp32, fp16, int8 / int4 /
   palettized weights, the spiking forms (unrolled, step), and W8A8 (edgeport.quantize).
Off macOS only structure is checked (coremltools cannot predict on Linux). Writes
bench/results/backends.json.
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

import edgeport as ep
from edgeport.export.onnx import quiet

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))


def raw_coremltools(model, example) -> str | None:
    import coremltools as ct

    try:
        with quiet():
            program = torch.export.export(model, tuple(example)).run_decompositions({})
            ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17)
        return None
    except Exception as error:
        return str(error).splitlines()[0][:160]


def ours(model, example, **options) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ep.export(model, example, targets=["coreml"], out=tmp, **options)
            return None
        except ep.EdgeportError as error:
            return str(error)[:200]


def main() -> None:
    from hf_models import ARCHITECTURES

    rows = []
    for name, build in ARCHITECTURES.items():
        model, example = build()
        row = {"architecture": name, "raw_coremltools_error": raw_coremltools(model, example),
               "edgeport_error": ours(model, example)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    forms = {"fp32": {}, "fp16": {"coreml_precision": "fp16"}, "int8 weights": {"coreml_weights": "int8"},
             "int4 weights": {"coreml_weights": "int4"}, "palettized 4-bit weights": {"coreml_weights": "palettize4"}}
    zoo_rows = []
    for name in ep.zoo.names():
        for form, options in forms.items():
            zoo_rows.append({"model": name, "form": form, "error": ours(name, None, **options)})
        if name == "snn-digits":
            for snn_form in ("unrolled", "step"):
                zoo_rows.append({"model": name, "form": f"spiking {snn_form}",
                                 "error": ours(name, None, snn_form=snn_form)})
        quantized = ep.quantize(name, method="repq")
        zoo_rows.append({"model": name, "form": "W8A8", "error": ours(quantized, ep.zoo.example(name))})
        print(json.dumps(zoo_rows[-1]), flush=True)
    result = {
        "benchmark": "backends", "machine": platform.platform(), "coremltools": __import__("coremltools").__version__,
        "torch": torch.__version__,
        "transformers": {"architectures": len(rows),
                         "raw_coremltools_converted": sum(r["raw_coremltools_error"] is None for r in rows),
                         "edgeport_converted": sum(r["edgeport_error"] is None for r in rows), "rows": rows},
        "zoo_forms": {"converted": sum(r["error"] is None for r in zoo_rows), "total": len(zoo_rows), "rows": zoo_rows},
        "numerical_check": "structural only: Core ML predicts on macOS alone" if platform.system() != "Darwin"
        else "predictions compared with torch"}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "backends.json").write_text(json.dumps(result, indent=2) + "\n")
    t = result["transformers"]
    print(f"transformers: raw coremltools {t['raw_coremltools_converted']}/{t['architectures']}, "
          f"edgeport {t['edgeport_converted']}/{t['architectures']}; zoo forms "
          f"{result['zoo_forms']['converted']}/{result['zoo_forms']['total']}")


if __name__ == "__main__":
    main()
