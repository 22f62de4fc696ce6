"""The backend registry: target name -> Backend (its options, exporter and runner).

Adding a backend is one module that defines a `Backend` subclass and `BACKEND = ...`, plus
its name in `_MODULES` below.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
from pathlib import Path

from edgeport.core import SIDECAR_SUFFIX, Artifact, Backend, Runner, option_flag, option_keyword
from edgeport.errors import UserError

_MODULES = {"onnx": "edgeport.export.onnx", "coreml": "edgeport.export.coreml", "tensorrt": "edgeport.export.tensorrt",
            "nir": "edgeport.export.nir"}


def names() -> list[str]:
    """Every registered backend name, in registration order."""
    return list(_MODULES)


def get(name: str) -> Backend:
    """The backend registered as `name`; an unknown name gets a suggestion and the list."""
    if name not in _MODULES:
        close = difflib.get_close_matches(name, _MODULES, n=1)
        raise UserError(f"unknown target {name!r}{'; did you mean ' + close[0] + '?' if close else ''}; "
                        f"available: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).BACKEND


def backends() -> list[Backend]:
    """Every registered backend."""
    return [get(name) for name in _MODULES]


def runner_for(artifact: Artifact, threads: int | None = None, profiling: bool = False) -> Runner:
    """An unloaded runner for an artifact, from the backend that provides its format."""
    for backend in backends():
        if artifact.format in backend.formats:
            return backend.runner(artifact, threads=threads, profiling=profiling)
    raise UserError(f"no backend runs {artifact.format!r} artifacts")


def open_artifact(path: str | Path) -> Artifact:
    """The artifact at `path` from its sidecar; a file without one (an ONNX file written by
    another tool) is described by the backend whose suffix it has."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"artifact {path} does not exist")
    if path.with_name(path.name + SIDECAR_SUFFIX).exists() or path.name.endswith(SIDECAR_SUFFIX):
        return Artifact.load(path)
    for backend in backends():
        if path.suffix in backend.suffixes:
            return backend.describe(path)
    return Artifact.load(path)  # says that the sidecar is missing


@dataclasses.dataclass
class OptionField:
    """One backend option as the SDK and CLI offer it: its keyword and flag, its dataclass
    field (type, default, help, choices), and every backend that takes it."""

    keyword: str
    flag: str
    spec: dataclasses.Field
    backends: list[str]


def option_fields() -> dict[str, OptionField]:
    """Every backend option by SDK keyword; one shared by two backends (the opset of ONNX and
    TensorRT) appears once, naming both."""
    fields: dict[str, OptionField] = {}
    for backend in backends():
        for spec in dataclasses.fields(backend.Options):
            keyword = option_keyword(backend, spec)
            entry = fields.setdefault(keyword, OptionField(keyword, option_flag(backend, spec), spec, []))
            entry.backends.append(backend.name)
    return fields


def check_option_keywords(values: dict) -> None:
    """Refuse keywords no backend declares (a typo would otherwise be ignored)."""
    known = option_fields()
    for keyword in values:
        if keyword not in known:
            close = difflib.get_close_matches(keyword, known, n=1)
            raise UserError(f"unknown export option {keyword!r}{'; did you mean ' + close[0] + '?' if close else ''}")


__all__ = ["backends", "check_option_keywords", "get", "names", "open_artifact", "option_fields", "runner_for"]
