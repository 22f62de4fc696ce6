"""Export + verify time against a bare `torch.onnx.export`, and the exporter sweep.

Part 1: for each zoo model, the median over REPEATS interleaved runs of (a) a bare
`torch.onnx.export(dynamo=True)` call and (b) `edgeport.export` (the same exporter plus
full check, shape inference, metadata, ONNX Runtime load and verification on 64 test
images). Target: the verification overhead (b - a) stays under 2x the bare export (a).
Part 2: 17 common `transformers` architectures (small configs, random weights) through
each exporter path alone and through edgeport's fallback.
Writes bench/results/export.json. Run: `python bench/export_bench.py` (about 2 minutes).
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import edgeport as ep
from edgeport.export.onnx import quiet

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
REPEATS = 5


def bare_export(model: torch.nn.Module, example: torch.Tensor, folder: Path) -> None:
    with quiet():
        torch.onnx.export(model, (example,), str(folder / "bare.onnx"), dynamo=True, external_data=False)


def time_zoo() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bare_export(ep.zoo.load("cnn-digits"), ep.zoo.example("cnn-digits"), folder)  # first-export cost
        for name in ep.zoo.names():
            model, example = ep.zoo.load(name), ep.zoo.example(name)
            bare, ours = [], []
            for _ in range(REPEATS):
                start = time.perf_counter()
                bare_export(model, example, folder)
                bare.append(time.perf_counter() - start)
                start = time.perf_counter()
                ep.export(name, out=folder / "ours")
                ours.append(time.perf_counter() - start)
            b, o = statistics.median(bare), statistics.median(ours)
            rows.append({"model": name, "bare_export_s": round(b, 3), "edgeport_export_verify_s": round(o, 3),
                         "ratio": round(o / b, 2), "verification_overhead_x_bare": round((o - b) / b, 2),
                         "target_overhead_below_x": 2.0, "passed": (o - b) / b < 2.0})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def sweep_transformers() -> list[dict]:
    from hf_models import ARCHITECTURES

    rows = []
    for name, build in ARCHITECTURES.items():
        model, example = build()
        row = {"architecture": name}
        for route in ("torch.export", "legacy-torchscript", "auto"):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    artifact = ep.export(model, example, out=tmp, exporter=route)["onnx"]
                    row[route] = {"ok": True, "path": artifact.exporter,
                                  "max_rel_error": max(o.max_rel_error for o in artifact.parity.outputs)}
                except ep.EdgeportError as error:
                    row[route] = {"ok": False, "error": str(error)[:200]}
        rows.append(row)
        print(json.dumps({k: (v if k == "architecture" else v["ok"]) for k, v in row.items()}), flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(2)
    zoo_rows = time_zoo()
    sweep = sweep_transformers()
    counts = {route: sum(not r[route]["ok"] for r in sweep) for route in ("torch.export", "legacy-torchscript", "auto")}
    result = {
        "benchmark": "export", "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "method": f"median of {REPEATS} interleaved runs, wall clock, 2 torch threads",
        "zoo": zoo_rows, "all_zoo_passed": all(r["passed"] for r in zoo_rows),
        "transformers_sweep": {"architectures": len(sweep), "failures_per_path": counts, "rows": sweep},
    }
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"transformers: failures per path {counts} of {len(sweep)}")
    print(f"zoo overhead target met: {result['all_zoo_passed']}")


if __name__ == "__main__":
    main()
