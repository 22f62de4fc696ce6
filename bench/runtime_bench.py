"""Runtime benchmark: profiler overhead, repeatability, estimator error on the host.

1. Overhead: on one ONNX Runtime session, blocks of a bare `session.run` loop (timed with
   perf_counter_ns around each call) alternate with blocks of edgeport's `measure` (the
   profiler's timing loop); the medians of all samples are compared. Target: within 2%.
2. Repeatability: two full `ep.profile` calls (12 sessions, at least 4 s for the zoo ViT and
   12 s for the ViT-S stack: this shared machine changes speed in phases of several seconds,
   and a profile must span them to say anything) on the same artifact; their 95% confidence
   intervals for the median must overlap (whether each median also lies inside the other's
   interval is reported beside it, and so is each profile's validity verdict).
3. Estimator: roofline latency for the host against the measured median. Target within 2x.
   The host is calibrated five times afresh (not from the cache) and every model estimated on
   each calibration: the five estimates of a model must agree within 1.3x.
4. Per-op profile: the op-category shares of cnn-digits from five profiles (target: within 10
   percentage points per category) and, for every model, the share of op time traced to an
   nn.Module path (target: at least 90%).
Models: the zoo (vit-digits for 1 and 2, all of them for 3 and 4) and a ViT-S-like stack (dim
384, 6 blocks, 197 tokens, random weights), batch 1, 2 threads. Writes bench/results/runtime.json.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import edgeport as ep
from edgeport.devices import catalog
from edgeport.devices.estimate import estimate
from edgeport.runtime.latency import measure
from edgeport.runtime.opprofile import profile_onnxruntime
from edgeport.runtime.report import environment
from edgeport.export.onnx import OnnxRuntimeRunner
from edgeport.zoo.models import vit_small_stack

ROOT = Path(__file__).resolve().parent
THREADS = 2


def overhead(path: Path, feeds: list[dict], blocks: int = 10, runs: int = 200) -> dict:
    runner = OnnxRuntimeRunner(path, threads=THREADS).load()
    session, names = runner.session, runner.input_names
    measure(runner, feeds, runs=runs, warmup=50)
    bare, ours = [], []
    for _ in range(blocks):
        for i in range(runs):
            feed = feeds[i % len(feeds)]
            start = time.perf_counter_ns()
            session.run(None, {n: feed[n] for n in names})
            bare.append((time.perf_counter_ns() - start) / 1e6)
        ours += measure(runner, feeds, runs=runs, warmup=0).samples_ms
    runner.close()
    b, o = statistics.median(bare), statistics.median(ours)
    return {"bare_session_run_p50_ms": b, "edgeport_profiler_p50_ms": o, "difference": (o - b) / b,
            "samples_each": len(bare), "target_within": 0.02, "passed": abs(o - b) / b <= 0.02}


def repeatability(path: Path, runs: int, seconds: float, sessions: int = 12) -> dict:
    first, second = (ep.profile(path, runs=runs, warmup=20, threads=THREADS, ops=False, energy=False,
                                sessions=sessions, min_duration_s=seconds).latency for _ in range(2))
    inside = (first.median_ci95[0] <= second.p50 <= first.median_ci95[1]
              and second.median_ci95[0] <= first.p50 <= second.median_ci95[1])
    overlap = first.median_ci95[0] <= second.median_ci95[1] and second.median_ci95[0] <= first.median_ci95[1]
    return {"runs": [len(first.samples_ms), len(second.samples_ms)], "sessions": sessions, "min_seconds": seconds,
            "validity": [first.problems, second.problems], "p50_ms": [first.p50, second.p50],
            "ci95_ms": [first.median_ci95, second.median_ci95],
            "each_median_inside_the_others_ci": inside, "intervals_overlap": overlap, "passed": overlap}


def estimator_error(path: Path, runs: int, recalibrated_ms: list[float]) -> dict:
    """The host estimate against the measured p50, and the spread of the estimates made on
    five fresh calibrations (`recalibrated_ms`)."""
    measured = ep.profile(path, runs=runs, warmup=50, threads=THREADS, ops=False, energy=False).latency.p50
    estimated = ep.estimate(path, "host").latency_ms
    ratio = estimated / measured
    spread = max(recalibrated_ms) / min(recalibrated_ms)
    return {"measured_p50_ms": measured, "estimated_ms": estimated, "ratio": ratio, "target_within_x": 2.0,
            "recalibrated_estimates_ms": recalibrated_ms, "recalibrated_spread": spread,
            "spread_target_within_x": 1.3, "passed": 0.5 <= ratio <= 2.0 and spread <= 1.3}


def recalibrated_estimates(paths: dict[str, Path], times: int = 5) -> dict[str, list[float]]:
    """Each model's host estimate (ms) on `times` fresh calibrations; the last one stays cached."""
    estimates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(times):
        host = catalog.host(recalibrate=True)
        for name, path in paths.items():
            estimates[name].append(estimate(path, host).latency_ms)
    return estimates


def op_profile_checks(path: Path, feeds: list[dict], repeats: int) -> dict:
    """Category shares over `repeats` op profiles (largest spread in percentage points) and the
    share of op time traced to an nn.Module."""
    profiles = [profile_onnxruntime(path, feeds, runs=50, threads=THREADS) for _ in range(repeats)]
    shares = [p.by_category() for p in profiles]
    spread = {c: 100 * (max(s.get(c, 0.0) for s in shares) - min(s.get(c, 0.0) for s in shares))
              for c in set().union(*shares)}
    coverage = min(p.module_coverage() for p in profiles)
    row = {"module_coverage": coverage, "coverage_target": 0.9, "passed": coverage >= 0.9}
    if repeats > 1:
        row |= {"profiles": repeats, "category_shares": shares, "largest_spread_points": max(spread.values()),
                "spread_target_points": 10, "passed": coverage >= 0.9 and max(spread.values()) <= 10}
    return row


def main() -> None:
    torch.set_num_threads(THREADS)
    results = {"benchmark": "runtime", "environment": environment(THREADS), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        zoo_artifacts = {}
        for name in ep.zoo.names():
            try:
                zoo_artifacts[name] = ep.export(name, out=tmp)["onnx"]
            except Exception as error:  # a zoo entry that does not load is a result too, not a crash
                results["models"][name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
                print(name, results["models"][name], flush=True)
        paths = {name: artifact.path for name, artifact in zoo_artifacts.items()}
        stack = vit_small_stack()
        paths["vit-s-stack"] = ep.export(stack, torch.randn(1, 1, 224, 224), out=tmp, name="vit-s-stack")["onnx"].path
        feeds = {name: [{artifact.inputs[0].name: ep.zoo.testset(name)[0][i:i + 1].numpy()} for i in range(16)]
                 for name, artifact in zoo_artifacts.items()}
        generator = np.random.default_rng(0)
        feeds["vit-s-stack"] = [{"x": generator.random((1, 1, 224, 224), dtype=np.float32)} for _ in range(8)]
        recalibrated = recalibrated_estimates(paths)
        for name, path in paths.items():
            runs = 300 if name == "vit-s-stack" else 1000
            row = {"estimator": estimator_error(path, runs, recalibrated[name]),
                   "op_profile": op_profile_checks(path, feeds[name], repeats=5 if name == "cnn-digits" else 1)}
            if name in ("vit-digits", "vit-s-stack"):
                row["overhead"] = overhead(path, feeds[name], blocks=6, runs=runs // 5 if name == "vit-s-stack" else 200)
                row["repeatability"] = repeatability(path, runs, seconds=12.0 if name == "vit-s-stack" else 4.0)
            results["models"][name] = row
            print(name, json.dumps(row), flush=True)
    results["all_passed"] = all("error" not in row and all(part["passed"] for part in row.values())
                                for row in results["models"].values())
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "runtime.json").write_text(json.dumps(results, indent=2) + "\n")
    print("all targets met:", results["all_passed"])


if __name__ == "__main__":
    main()
