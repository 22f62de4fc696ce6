"""The trust boundary: everything edgeport reads from a user's files comes in here.

Models (`.pt2` programs, `package.module:factory`, zoo names), weights (safetensors or
weights-only torch files) and input arrays (`.npz` without pickles). Nothing here runs code
from a file: pickles that need code execution are refused, never loaded.
"""
from __future__ import annotations

import difflib
import importlib
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from edgeport import zoo
from edgeport.core import in_eval_mode
from edgeport.errors import UserError


def _refuse_pickle(path: Path, error: Exception) -> UserError:
    return UserError(f"refusing to load {path}: it is a pickle that needs code execution to load "
                     f"({str(error).splitlines()[0][:160]}); save the model with torch.export (.pt2) or "
                     f"give package.module:factory with safetensors or weights-only state_dict")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors or a weights-only torch file; never executes pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refuse_pickle(path, error) from error
    except Exception as error:
        raise UserError(f"cannot read weights {path}: {str(error).splitlines()[0][:200]}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    return state


def load_model(spec: str | torch.nn.Module, weights: str | Path | None = None) -> torch.nn.Module:
    """Resolve a model given as a module, zoo name, `.pt2` file or `package.module:factory`."""
    if isinstance(spec, torch.nn.Module):
        return in_eval_mode(spec)
    if isinstance(spec, torch.export.ExportedProgram):
        return spec.module()  # already in inference form; it refuses .eval()
    text = str(spec)
    path = Path(text)
    if text in zoo.names():
        model = zoo.load(text)
    elif path.suffix == ".pt2":
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        try:
            program = torch.export.load(str(path))
        except Exception as error:
            raise UserError(f"cannot read {path} as a torch.export program: "
                            f"{str(error).splitlines()[0][:200]}") from error
        if weights is not None:
            raise UserError("a .pt2 file carries its own weights; drop --weights")
        return program.module()
    elif re.fullmatch(r"[\w.]+:\w+", text):
        module_name, factory_name = text.split(":")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as error:
            raise UserError(f"cannot import {text}: {error}") from error
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"{text} returned a {type(model).__name__}, not a torch.nn.Module")
    elif path.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        load_weights(path)  # refuses code-executing pickles; a plain state_dict passes
        raise UserError(f"{path} holds weights, not a model: give the architecture as "
                        f"package.module:factory with --weights {path}, or export a .pt2")
    else:
        close = difflib.get_close_matches(text, zoo.names(), n=2)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"cannot resolve model {text!r}: {hint}give a zoo name ({', '.join(zoo.names())}), "
                        f"a .pt2 file, or package.module:factory")
    if weights is not None:
        try:
            model.load_state_dict(load_weights(weights))
        except RuntimeError as error:
            raise UserError(f"weights {weights} do not fit {text}: {str(error).splitlines()[0][:200]}") from error
    return in_eval_mode(model)


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file by name, in file order; object (pickled) arrays are refused."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"cannot read inputs {path}: {str(error).splitlines()[0][:200]}") from error
    if not arrays:
        raise UserError(f"{path} holds no arrays")
    return arrays
