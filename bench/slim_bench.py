"""Slimming benchmark: ONNX Runtime latency of the masked export against the slimmed export.

1. A bottleneck ResNet (stem, 3 stages of 2 bottlenecks, 64/128/256 channels, 3x96x96
   input) with half of the channels inside every bottleneck (conv1 and conv2 outputs)
   zeroed by `torch.nn.utils.prune.ln_structured`. Target: slimmed >= 1.6x faster.
2. `transformers`' ResNetModel in the ResNet-50 layout (random weights, BatchNorm statistics
   like a trained network's, 3x128x128 input) with the same pruning of every bottleneck's
   first two convolutions (with their BatchNorm channels): a model torch.fx cannot trace.
   Target: >= 1.6x, and the slimmed ONNX within 1e-5 of the output scale of the masked model.
3. The ViT-S-like stack (dim 384, 6 blocks, 197 tokens) with half of every MLP's hidden
   units zeroed. Target: >= 1.25x.
4. The zoo's pruned CNN on the 360 digits test images: the slimmed model's outputs against
   the pruned model's (target: max abs error <= 1e-5 of the output scale), and its accuracy.
Latency: median of interleaved blocks, batch 1, 2 threads. Writes bench/results/slim.json.
Run: `PYTHONPATH=. .venv/bin/python bench/slim_bench.py` (or `make bench`).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.utils.prune as prune

import edgeport as ep
from edgeport.runtime.latency import interleaved_medians
from edgeport.runtime.report import environment
from edgeport.export.onnx import OnnxRuntimeRunner
from edgeport.zoo.models import vit_small_stack

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
from slim_models import BottleneckResNet, randomize_batchnorm  # noqa: E402

THREADS = 2


def case(name: str, model: torch.nn.Module, example: torch.Tensor, target: float, folder: Path) -> dict:
    masked = ep.export(model, example, out=folder, name=f"{name}-masked")["onnx"]
    slimmed = ep.export(model, example, out=folder, name=f"{name}-slim", slim=True)["onnx"]
    runners = {k: OnnxRuntimeRunner(p, threads=THREADS, spinning=False).load()
               for k, p in (("masked", masked.path), ("slim", slimmed.path))}
    medians = interleaved_medians(runners, {masked.inputs[0].name: example.numpy()}, blocks=8, runs=40)
    for runner in runners.values():
        runner.close()
    report = slimmed.settings["slim"]
    row = {"model": name, "masked_p50_ms": medians["masked"], "slim_p50_ms": medians["slim"],
           "speedup": medians["masked"] / medians["slim"], "target_speedup": target,
           "mac_ratio": report["macs_after"] / report["macs_before"],
           "parity_max_rel_error": max(o.max_rel_error for o in slimmed.parity.outputs),
           "parity_inputs": slimmed.parity.inputs_source, "channels_removed": sum(report["removed"].values())}
    row["passed"] = row["speedup"] >= target and slimmed.parity.passed and row["parity_max_rel_error"] <= 1e-5
    print(json.dumps(row), flush=True)
    return row


def pruned_transformers_resnet50() -> torch.nn.Module:
    """transformers' ResNetModel, ResNet-50 layout, half of every bottleneck's first two
    convolutions' output channels zeroed by ln_structured."""
    import transformers

    torch.manual_seed(0)
    model = randomize_batchnorm(transformers.ResNetModel(transformers.ResNetConfig()))
    for layer in model.modules():
        if type(layer).__name__ == "ResNetBottleNeckLayer":
            for conv_layer in layer.layer[:2]:
                prune.ln_structured(conv_layer.convolution, "weight", amount=0.5, n=2, dim=0)
    return model


def main() -> None:
    torch.set_num_threads(THREADS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        resnet = randomize_batchnorm(BottleneckResNet(widths=(64, 128, 256), blocks=2))
        for block in resnet.modules():
            if type(block).__name__ == "Bottleneck":
                prune.ln_structured(block.conv1, "weight", amount=0.5, n=2, dim=0)
                prune.ln_structured(block.conv2, "weight", amount=0.5, n=2, dim=0)
        rows.append(case("bottleneck-resnet", resnet, torch.randn(1, 3, 96, 96), 1.6, folder))
        rows.append(case("transformers-resnet50", pruned_transformers_resnet50(), torch.rand(1, 3, 128, 128), 1.6,
                         folder))
        vit = vit_small_stack()
        for block in vit.blocks:
            prune.ln_structured(block.mlp[0], "weight", amount=0.5, n=2, dim=0)
        rows.append(case("vit-s-mlp-half", vit, torch.randn(1, 1, 224, 224), 1.25, folder))
    images, labels = ep.zoo.testset("cnn-digits-pruned")
    slimmed, report = ep.slim("cnn-digits-pruned")
    with torch.no_grad():
        pruned_out, slim_out = ep.zoo.load("cnn-digits-pruned")(images), slimmed(images)
    parity = float((pruned_out - slim_out).abs().max() / pruned_out.abs().max())
    zoo_row = {"model": "cnn-digits-pruned", "inputs": "360 digits test images", "max_rel_error": parity,
               "target": 1e-5, "accuracy_percent": float((slim_out.argmax(1) == labels).float().mean() * 100),
               "dense_accuracy_percent": ep.zoo.info("cnn-digits")["test_accuracy_percent"],
               "mac_ratio": report.macs_after / report.macs_before, "passed": parity <= 1e-5}
    print(json.dumps(zoo_row))
    result = {"benchmark": "slim", "environment": environment(THREADS), "latency": rows, "zoo_parity": zoo_row,
              "method": "ONNX Runtime CPU, batch 1, 2 threads, median of 8 interleaved blocks of 40 runs",
              "all_passed": all(r["passed"] for r in rows) and zoo_row["passed"]}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "slim.json").write_text(json.dumps(result, indent=2) + "\n")
    print("all targets met:", result["all_passed"])


if __name__ == "__main__":
    main()
