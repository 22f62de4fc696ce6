"""Small models trained on scikit-learn's digits, shipped as safetensors: the embedded default.

`names()` lists them; `load(name)` returns the trained module in eval mode;
`calibration(name, n)` gives n training images; `testset(name)` the 360 test images and
labels; `info(name)` the training record (accuracy, epochs, seed, weights hash).
Weights are produced by `python -m edgeport.zoo.train` (deterministic on CPU).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch

from edgeport.errors import UserError
from edgeport.zoo.data import digits_split
from edgeport.zoo.models import ARCHITECTURES

WEIGHTS_DIR = Path(__file__).parent / "weights"
INPUT_SHAPE = (1, 1, 8, 8)  # every zoo model takes one 8x8 grey image per batch item


def names() -> list[str]:
    """The zoo's model names, e.g. ['cnn-digits', 'snn-digits', 'vit-digits']."""
    return sorted(ARCHITECTURES)


def _check(name: str) -> str:
    if name not in ARCHITECTURES:
        close = difflib.get_close_matches(name, names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(names())}"
        raise UserError(f"unknown zoo model {name!r}{hint}")
    return name


def info(name: str) -> dict:
    """The training record written beside the weights: config, accuracy, epochs, seed, hash."""
    return json.loads((WEIGHTS_DIR / f"{_check(name)}.json").read_text())


def build(name: str) -> torch.nn.Module:
    """The architecture of `name` with fresh (untrained) weights, as recorded in its config."""
    config = info(name)["config"]  # checks the name first
    return ARCHITECTURES[name](**config)


def load(name: str) -> torch.nn.Module:
    """The trained model `name` in eval mode on the CPU."""
    from safetensors.torch import load_file

    model = build(name)
    model.load_state_dict(load_file(WEIGHTS_DIR / f"{name}.safetensors"))
    return model.eval()


def calibration(name: str, n: int = 32) -> torch.Tensor:
    """The first `n` training images (float32, (n, 1, 8, 8)), for calibration and examples."""
    _check(name)
    x_train = digits_split()[0]
    if not 0 < n <= len(x_train):
        raise UserError(f"calibration size must be between 1 and {len(x_train)}, not {n}")
    return torch.from_numpy(x_train[:n].copy())


def testset(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out test images (360, 1, 8, 8) float32 and their labels (360,) int64."""
    _check(name)
    _, _, x_test, y_test = digits_split()
    return torch.from_numpy(x_test.copy()), torch.from_numpy(y_test.copy())


def example(name: str) -> torch.Tensor:
    """One real training image shaped like the model's input, (1, 1, 8, 8)."""
    return calibration(name, INPUT_SHAPE[0])
