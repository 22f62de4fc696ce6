"""GPU check for a lent GPU machine: latency (CUDA events) and NVML energy through the torch
CUDA runner, fp32 and fp16, for the zoo models and a ViT-S-like stack; and the roofline
estimate of each on the catalog entry for this GPU, beside the measured energy.

Run on the GPU machine from the repository root, without installing (its torch differs):
    PYTHONPATH=. python3 bench/gpu_check.py            # writes $OUT/gpu_check.json
Rehearse here (no GPU) with `--device cpu`: the same code path on the CPU, no NVML.
About 2 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import edgeport as ep
from edgeport.runtime.report import environment
from edgeport.zoo.models import vit_small_stack


def models() -> dict[str, tuple[torch.nn.Module, np.ndarray]]:
    """name -> (model, a batch of real or seeded inputs)."""
    zoo = {name: (ep.zoo.load(name), ep.zoo.testset(name)[0][:16].numpy()) for name in ep.zoo.names()}
    stack = vit_small_stack()
    zoo["vit-s-stack"] = (stack, np.random.default_rng(0).random((16, 1, 224, 224), dtype=np.float32))
    return zoo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--window", type=float, default=2.0, help="energy window per configuration (s)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on the GPU machine, or rehearse with --device cpu", file=sys.stderr)
        return 2
    backend = "torch-cuda" if args.device == "cuda" else "torch"
    gpu_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    catalog_entry = "h200-sxm" if "H200" in gpu_name else "h100-sxm"
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, images) in models().items():
            onnx_path = ep.export(model, torch.from_numpy(images[:1]), out=tmp, name=name, check=False)["onnx"].path
            estimate = ep.estimate(onnx_path, catalog_entry)
            for precision in ("fp32", "fp16"):
                dtype = torch.float16 if precision == "fp16" else torch.float32
                model_p = model.to(dtype)
                inputs = [torch.from_numpy(images[i:i + 1]).to(dtype) for i in range(len(images))]
                start = time.perf_counter()
                prof = ep.profile(model_p, backend=backend, inputs=inputs, runs=args.runs, warmup=50, sessions=3,
                                  ops=False, energy_window_s=args.window, idle_s=1.0, label=f"{name} {precision}")
                row = {"model": name, "precision": precision, "batch": 1,
                       "latency_ms": {"p50": prof.latency.p50, "p99": prof.latency.p99,
                                      "ci95": prof.latency.median_ci95, "valid": prof.latency.valid,
                                      "timing": "CUDA events" if args.device == "cuda" else "wall clock"},
                       "energy": prof.energy.__dict__,
                       "estimate_" + catalog_entry: {"latency_ms": estimate.latency_ms, "energy_mj": estimate.energy_mj,
                                                     "provenance": estimate.energy_provenance},
                       "seconds": round(time.perf_counter() - start, 1)}
                if prof.energy.available and prof.energy.net_mj_per_inference:
                    row["estimated_over_measured_energy"] = estimate.energy_mj / prof.energy.net_mj_per_inference
                rows.append(row)
                print(json.dumps(row), flush=True)
            model.to(torch.float32)
    result = {"benchmark": "gpu_check", "device": gpu_name, "catalog_entry": catalog_entry,
              "environment": environment(), "rows": rows}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
