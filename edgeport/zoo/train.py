"""Train the zoo models on digits and write their weights and training records.

Deterministic on CPU: fixed seed, fixed split, 2 threads, deterministic algorithms.
Run `python -m edgeport.zoo.train [name ...]`; it rewrites `weights/<name>.safetensors`
and `weights/<name>.json` (config, epochs, seed, test accuracy, seconds, sha256).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time

import torch
from torch import nn

from edgeport.zoo import WEIGHTS_DIR, names
from edgeport.zoo.data import digits_split
from edgeport.zoo.models import ARCHITECTURES

SEED = 0
RECIPES = {  # epochs and peak learning rate; AdamW + OneCycle, batch 64
    "vit-digits": {"config": {}, "epochs": 40, "lr": 3e-3, "weight_decay": 0.05},
    "cnn-digits": {"config": {}, "epochs": 20, "lr": 1e-2, "weight_decay": 1e-4},
    "snn-digits": {"config": {}, "epochs": 20, "lr": 5e-3, "weight_decay": 1e-4},
    "lmu-digits": {"config": {}, "epochs": 40, "lr": 1e-2, "weight_decay": 1e-4},
    # half of every conv's output channels zeroed by L2 magnitude, then fine-tuned with the masks on
    "cnn-digits-pruned": {"config": {}, "epochs": 5, "lr": 2e-3, "weight_decay": 1e-4, "prune_from": "cnn-digits",
                          "prune_amount": 0.5},
}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def train(name: str) -> dict:
    """Train `name` from scratch and return its training record (weights are written too)."""
    recipe = RECIPES[name]
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(name, recipe)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _train(name: str, recipe: dict) -> dict:
    from safetensors.torch import save_file

    x_train, y_train, x_test, y_test = (torch.from_numpy(a.copy()) for a in digits_split())
    model = ARCHITECTURES[name](**recipe["config"])
    if "prune_from" in recipe:
        import torch.nn.utils.prune as prune
        from safetensors.torch import load_file

        model.load_state_dict(load_file(WEIGHTS_DIR / f"{recipe['prune_from']}.safetensors"))
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                prune.ln_structured(module, "weight", amount=recipe["prune_amount"], n=2, dim=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    batch, epochs = 64, recipe["epochs"]
    steps = epochs * ((len(x_train) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"], total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(x_train), generator=generator).split(batch):
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    if "prune_from" in recipe:
        from edgeport.transforms.slim import bake_masks

        model = bake_masks(model).eval()
    WEIGHTS_DIR.mkdir(exist_ok=True)
    weights = WEIGHTS_DIR / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    record = {
        "name": name, "architecture": type(model).__name__, "config": recipe["config"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dataset": "scikit-learn digits, stratified split 1437 train / 360 test, seed 0",
        "epochs": epochs, "lr": recipe["lr"], "weight_decay": recipe["weight_decay"], "seed": SEED,
        **{k: recipe[k] for k in ("prune_from", "prune_amount") if k in recipe},
        "test_accuracy_percent": round(accuracy(model, x_test, y_test), 2),
        "train_seconds": round(seconds, 1), "torch": torch.__version__,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (WEIGHTS_DIR / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    for model_name in sys.argv[1:] or names():
        print(json.dumps(train(model_name)))
