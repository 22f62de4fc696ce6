"""Profiles and reports: one JSON schema, the folder of them a report is built from, and the page.

A `Profile` holds what was measured on this machine (latency samples and statistics, the
per-op breakdown, throughput per batch size, energy with its provenance, the session's own
memory, the environment), what was profiled (model, variant, format, size, accuracy where
known) and, beside it, the host estimate. Every figure carries its unit and provenance; an
estimate is never printed as a measurement. The page itself is `edgeport.runtime.page`.

The JSON files a report is built from are data, not markup: they may come from another
machine or another person, so every string from them is HTML-escaped on the page, and a
file of the wrong shape is refused, naming the file and the field, before anything is written.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from edgeport.devices.estimate import Estimate
from edgeport.errors import UserError
from edgeport.runtime.latency import LatencyStats
from edgeport.runtime.opprofile import OpProfile

# what "valid" rests on: edgeport's rules, which need far fewer queries than an MLPerf run
VALID = ("valid: enough samples for each percentile, robust CV, drift and tail within bounds; not an MLPerf run, "
         "which asks 60 s and at least 1,000 queries")

SCHEMA = "edgeport.profile/2"  # /2: per-node medians, session memory, variant
UNITS = {"latency": "ms", "energy": "mJ per inference", "power": "W", "memory": "MB", "throughput": "items/s"}


def environment(threads: int | None = None) -> dict:
    """Package versions, CPU/GPU model, threads and driver: what produced the figures."""
    import numpy
    import onnxruntime
    import torch

    from edgeport import __version__
    from edgeport.devices.catalog import cpu_model

    env = {"edgeport": __version__, "python": platform.python_version(), "platform": platform.platform(),
           "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": threads or torch.get_num_threads(),
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        import pynvml

        pynvml.nvmlInit()
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # no NVML here: nothing to record
        pass
    return env


@dataclass
class Energy:
    """Energy per inference with its provenance; `available` False says why in `reasons`."""

    available: bool
    provenance: str  # 'measured:rapl' ... or 'unavailable'
    gross_mj_per_inference: float | None = None
    net_mj_per_inference: float | None = None
    idle_w: float | None = None
    idle_subtracted: bool = False
    window_s: float | None = None
    inferences: int | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class SessionMemory:
    """Memory (MB) that the profiled session itself took: resident memory after loading it minus
    before, and the peak during its runs minus before. `method` says how it was read."""

    method: str
    loaded_mb: float
    peak_mb: float | None  # None where the process's peak could not be reset before the session
    process_peak_mb: float  # the whole process's peak (ru_maxrss): torch and all, for reference


@dataclass
class Variant:
    """What was profiled: the source model, the variant (precision, slimmed, spiking form,
    format), the artifact's size on disk (MB) and its accuracy (%) where someone measured it."""

    model: str
    variant: str
    format: str
    size_mb: float | None = None
    accuracy_percent: float | None = None
    source_sha256: str | None = None  # of the torch model exported: ties other artifacts of it to this one


@dataclass
class Profile:
    """One artifact measured on this machine with one backend, and estimated for `device`."""

    artifact: str
    backend: str
    device: str
    latency: LatencyStats
    energy: Energy
    inputs_source: str
    memory: SessionMemory
    environment: dict
    ops: OpProfile | None = None
    estimate: Estimate | None = None
    throughput_per_s: dict[int, float] = field(default_factory=dict)  # batch size -> items/s
    throughput_skipped: dict[int, str] = field(default_factory=dict)  # batch size -> why it was not measured
    label: str = ""
    variant: Variant | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["latency"] = {**self.latency.to_dict(), "valid": self.latency.valid}
        data["ops"] = self.ops.to_dict() if self.ops else None
        return {"schema": SCHEMA, "units": UNITS, **data}

    def summary(self) -> str:
        """A few lines for people: median with its interval, percentiles, validity, throughput,
        the session's memory, energy, and the host estimate."""
        lat = self.latency
        lines = [f"{self.label or Path(self.artifact).name} on {self.backend} ({self.device}): "
                 f"p50 {lat.p50:.4f} ms [95% CI {lat.median_ci95[0]:.4f}-{lat.median_ci95[1]:.4f}], "
                 f"p90 {lat.p90:.4f}, p99 {lat.p99:.4f} ({lat.tail_ratio:.1f}x p50), CV {lat.cv:.2f} "
                 f"(robust {lat.robust_cv:.2f}), {len(lat.samples_ms)} runs "
                 f"({VALID if lat.valid else 'NOT valid: ' + '; '.join(lat.problems)})",
                 "throughput: " + "; ".join(
                     [f"batch {b} {v:,.1f} items/s" for b, v in sorted(self.throughput_per_s.items())]
                     + [f"batch {b} not measured: {why}" for b, why in sorted(self.throughput_skipped.items())])]
        mem = self.memory
        lines.append(f"session memory: +{mem.loaded_mb:.1f} MB loaded"
                     + (f", peak +{mem.peak_mb:.1f} MB while running" if mem.peak_mb is not None else "")
                     + f" ({mem.method}; whole process peak {mem.process_peak_mb:.0f} MB)")
        if self.energy.available:
            lines.append(f"energy {self.energy.net_mj_per_inference:.4f} mJ/inference net, "
                         f"{self.energy.gross_mj_per_inference:.4f} gross ({self.energy.provenance})")
        else:
            lines.append(f"energy: not measured ({'; '.join(self.energy.reasons) or 'no meter'})")
        if self.estimate:
            lines.append(self.estimate.summary())
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write the profile's JSON (`edgeport.profile/2`) atomically to `path`; returns it."""
        return write_atomically(Path(path), json.dumps(self.to_dict(), indent=2, default=str) + "\n")


def variant_label(format_name: str, precision: str, settings: dict) -> str:
    """A variant's name from an artifact's format, precision and export settings, e.g. "fp32",
    "w8a8", "slimmed fp32", "SNN unrolled fp32", "Core ML w8a8"."""
    parts = []
    if format_name not in ("onnx", ""):
        parts.append({"coreml": "Core ML", "tensorrt": "TensorRT"}.get(format_name, format_name))
    if settings.get("slim"):
        parts.append("slimmed")
    snn = settings.get("snn")
    if isinstance(snn, dict) and isinstance(snn.get("form"), str):
        parts.append(f"SNN {snn['form']}")
    return " ".join([*parts, precision or "?"])


def files_size_mb(folder: Path, names: list[str]) -> float | None:
    """Size on disk (MB) of the files (or package folders) `names` inside `folder`; names that
    point outside it are not looked at. None if none exists."""
    total, found, root = 0, False, folder.resolve()
    for name in names:
        path = (folder / name).resolve()
        if not path.is_relative_to(root) or not path.exists():
            continue
        found = True
        total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return total / 1e6 if found else None


def write_atomically(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder, renamed into place,
    so that a reader never sees half a file and a failed write leaves nothing behind.
    A missing or unwritable folder is a UserError naming it."""
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist")
    # JSON may carry lone surrogates ("\ud800"), which UTF-8 cannot hold: a "?" in their place
    # beats a crash halfway through the file
    payload = text.encode("utf-8", errors="replace")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers do not collide
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror or error}") from error
    return path


# --- Reading report folders: the shape each file must have --------------------------------
# A shape is one of the scalar names below, a dict (an object with those keys; a Nullable key
# may be left out), a tuple (a list of exactly those items), ListOf, MapOf, Nullable or Exactly.
# Only the fields the page reads are checked; other keys pass through.

TEXT, FLAG, FINITE, OBJECT = "a string", "true or false", "a finite number", "an object"
POSITIVE = "a positive finite number"  # a throughput
NON_NEGATIVE = "a finite number, 0 or more"  # a share, a count, a size: none of them is negative
# a latency: no inference takes under a nanosecond (a call alone takes longer) or a day; the
# bounds also keep the page's arithmetic on samples (histogram ranges, p99/p50) finite
MILLISECONDS = "a number of milliseconds between a nanosecond (1e-06) and a day"
MILLIJOULES = "a positive number of millijoules, under a megajoule"  # per inference: never free
PERCENT = "a percentage from 0 to 100"
FRACTION = "a fraction from 0 to 1"
BATCH_SIZE = "a whole number from 1 to 999,999,999 (a batch size)"
MS_PER_NANOSECOND, MS_PER_DAY, MJ_PER_MEGAJOULE = 1e-6, 86_400_000, 1e9
_SCALARS = {TEXT: lambda v: isinstance(v, str), FLAG: lambda v: isinstance(v, bool),
            # an integer literal beyond a float's range ("1" and 400 zeros) is a number JSON allows
            # and math.isfinite cannot take: it is compared, not converted
            FINITE: lambda v: (isinstance(v, float) and math.isfinite(v)) or (
                isinstance(v, int) and not isinstance(v, bool) and abs(v) <= sys.float_info.max),
            OBJECT: lambda v: isinstance(v, dict),
            # JSON object keys are strings: a batch size is one written in ASCII digits
            BATCH_SIZE: lambda v: isinstance(v, str) and re.fullmatch("[1-9][0-9]{0,8}", v) is not None}
_SCALARS[POSITIVE] = lambda v: _SCALARS[FINITE](v) and v > 0
_SCALARS[NON_NEGATIVE] = lambda v: _SCALARS[FINITE](v) and v >= 0
_SCALARS[MILLISECONDS] = lambda v: _SCALARS[FINITE](v) and MS_PER_NANOSECOND <= v < MS_PER_DAY
_SCALARS[MILLIJOULES] = lambda v: _SCALARS[POSITIVE](v) and v < MJ_PER_MEGAJOULE
_SCALARS[PERCENT] = lambda v: _SCALARS[FINITE](v) and 0 <= v <= 100
_SCALARS[FRACTION] = lambda v: _SCALARS[FINITE](v) and 0 <= v <= 1
_RANGES = {POSITIVE, NON_NEGATIVE, MILLISECONDS, MILLIJOULES, PERCENT, FRACTION}  # numbers within bounds


@dataclass(frozen=True)
class ListOf:
    """A list of `item`s, at least `min_length` of them."""

    item: Any
    min_length: int = 0


@dataclass(frozen=True)
class MapOf:
    """An object whose every key is `key` (a scalar shape) and every value is `value`."""

    value: Any
    key: str = TEXT


@dataclass(frozen=True)
class Nullable:
    """`shape` or null; as an object's key, it may also be left out."""

    shape: Any


@dataclass(frozen=True)
class Exactly:
    """This one string (a schema or provenance tag)."""

    value: str


MAYBE_NUMBER = Nullable(FINITE)
MAYBE_NON_NEGATIVE = Nullable(NON_NEGATIVE)
OP_SHAPE = {"name": TEXT, "op_type": TEXT, "category": TEXT, "module": TEXT, "median_us": NON_NEGATIVE,
            "calls_per_run": NON_NEGATIVE, "ms_at_p50": MAYBE_NON_NEGATIVE}
ESTIMATE_SHAPE = {"provenance": Exactly("estimated:roofline"), "artifact": TEXT, "device": TEXT,
                  "latency_ms": MILLISECONDS, "energy_mj": MILLIJOULES, "net_energy_mj": Nullable(MILLIJOULES),
                  "compute_energy_45nm_mj": NON_NEGATIVE,
                  "macs": NON_NEGATIVE, "dims": Nullable(MapOf(FINITE)), "dims_source": Nullable(MapOf(TEXT)),
                  "confidence": Nullable(MapOf(TEXT))}
PROFILE_SHAPE = {
    "schema": Exactly(SCHEMA), "artifact": TEXT, "backend": TEXT, "label": TEXT, "environment": OBJECT,
    "latency": {"p50": MILLISECONDS, "p90": MILLISECONDS, "p99": MILLISECONDS, "cv": NON_NEGATIVE,
                "median_ci95": (MILLISECONDS, MILLISECONDS), "valid": FLAG, "problems": ListOf(TEXT),
                "samples_ms": ListOf(MILLISECONDS, min_length=1), "throughput_per_s": POSITIVE},
    "energy": {"available": FLAG, "provenance": TEXT, "net_mj_per_inference": Nullable(MILLIJOULES),
               "reasons": ListOf(TEXT)},
    "throughput_per_s": Nullable(MapOf(POSITIVE, key=BATCH_SIZE)),
    "throughput_skipped": Nullable(MapOf(TEXT, key=BATCH_SIZE)),
    "memory": Nullable({"method": TEXT, "loaded_mb": FINITE, "peak_mb": MAYBE_NUMBER}),
    "variant": Nullable({"model": TEXT, "variant": TEXT, "format": TEXT, "size_mb": MAYBE_NON_NEGATIVE,
                         "accuracy_percent": Nullable(PERCENT), "source_sha256": Nullable(TEXT)}),
    "estimate": Nullable(ESTIMATE_SHAPE),
    "ops": Nullable({"backend": TEXT, "runs": NON_NEGATIVE, "by_category": MapOf(NON_NEGATIVE),
                     "by_module": MapOf(NON_NEGATIVE), "ops": ListOf(OP_SHAPE),
                     "by_category_ms": Nullable(MapOf(NON_NEGATIVE)), "by_module_ms": Nullable(MapOf(NON_NEGATIVE)),
                     "in_ops_fraction": Nullable(FRACTION), "module_coverage": Nullable(FRACTION),
                     "measured_p50_ms": Nullable(MILLISECONDS)})}
SIDECAR_SUFFIX = ".edgeport.json"
SIDECAR_SHAPE = {"path": TEXT, "format": TEXT, "precision": TEXT, "settings": OBJECT, "files": ListOf(TEXT),
                 "source_sha256": Nullable(TEXT)}


def _shown(value: Any, shape: Any) -> str:
    """How a message names a `value` that is not `shape`: a number out of the range `shape` asks
    for as itself (no markup, and it says which reading is wrong), anything else by its kind."""
    return f"{value:g}" if shape in _RANGES and _SCALARS[FINITE](value) else _describe(value)


def _describe(value: Any) -> str:
    """A JSON value's kind, never its text: an error message must not replay what a hostile
    file says (markup, terminal escape sequences) to the terminal."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("nan", "NaN").replace("inf", "Infinity")
    kinds = {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def shape_problem(value: Any, shape: Any, where: str = "") -> str | None:
    """What is wrong with JSON `value` against `shape`, with the path to the field
    (e.g. `memory.loaded_mb should be a finite number, not a string`), or None."""
    here = where or "the file"
    if isinstance(shape, str):
        return None if _SCALARS[shape](value) else f"{here} should be {shape}, not {_shown(value, shape)}"
    if isinstance(shape, Exactly):
        return None if value == shape.value else f"{here} should be {shape.value!r}"
    if isinstance(shape, Nullable):
        return None if value is None else shape_problem(value, shape.shape, where)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{here} should be {OBJECT}, not {_describe(value)}"
        for key, inner in shape.items():
            if key not in value and not isinstance(inner, Nullable):
                return f"{here} has no {key!r}"
            problem = shape_problem(value.get(key), inner, f"{where}.{key}" if where else key)
            if problem:
                return problem
        return None
    if isinstance(shape, MapOf):
        if not isinstance(value, dict):
            return f"{here} should be {OBJECT}, not {_describe(value)}"
        if any(shape_problem(k, shape.key) for k in value):  # the key's text is not replayed (see _describe)
            return f"{here} has a key that is not {shape.key}"
        return next((f"{here} has a value that is {_shown(v, shape.value)}, not {shape.value}" for v in value.values()
                     if shape_problem(v, shape.value)), None)
    items, fixed = (shape, True) if isinstance(shape, tuple) else ((), False)
    if not isinstance(value, list):
        return f"{here} should be a list, not {_describe(value)}"
    if fixed and len(value) != len(items):
        return f"{here} should hold {len(items)} items, not {len(value)}"
    if not fixed and len(value) < shape.min_length:
        return f"{here} should hold at least {shape.min_length} item(s), not {len(value)}"
    for index, item in enumerate(value):
        problem = shape_problem(item, items[index] if fixed else shape.item, f"{where}[{index}]")
        if problem:
            return problem
    return None


def read_json(path: Path) -> Any:
    """The JSON value in `path`; a UserError naming the file if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from error
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise UserError(f"{path} is not valid JSON: {error}") from error


def _consistency_problem(profile: dict) -> str | None:
    """What a well-shaped profile says that cannot be so (an interval upside down, a p99
    below the p50, energy claimed without a meter's figure), or None."""
    latency, energy = profile["latency"], profile["energy"]
    low, high = latency["median_ci95"]
    if low > high:
        return f"latency.median_ci95 should run from low to high, not from {low:g} down to {high:g}"
    if not latency["p50"] <= latency["p90"] <= latency["p99"]:
        return "latency.p50, p90 and p99 should be in rising order (percentiles of one set of samples)"
    if energy["available"] and energy["net_mj_per_inference"] is None:
        return "energy.net_mj_per_inference should be a finite number when energy.available is true"
    if energy["available"] and not energy["provenance"].startswith("measured:"):
        return "energy.provenance should name a meter (measured:...) when energy.available is true"
    return None


def checked_profile(data: Any, path: Path) -> dict:
    """`data` if it is a profile the page can render; otherwise a UserError naming `path` and the field."""
    problem = shape_problem(data, PROFILE_SHAPE) or _consistency_problem(data)
    if problem:
        raise UserError(f"malformed profile {path}: {problem}")
    return data


def checked_estimates(data: Any, path: Path) -> list[dict]:
    """The estimates in `data` (one object or a list of them, as `estimate --json` writes);
    a UserError naming `path`, the item and the field if any is malformed."""
    problem = shape_problem(data, ListOf(ESTIMATE_SHAPE) if isinstance(data, list) else ESTIMATE_SHAPE)
    if problem:
        raise UserError(f"malformed estimate {path}: {problem}")
    return data if isinstance(data, list) else [data]


def _claims(data: Any, key: str, value: str) -> bool:
    return isinstance(data, dict) and data.get(key) == value


def checked_artifact(data: Any, path: Path) -> dict:
    """An artifact record for the report from a sidecar: model, variant, format, size on disk
    and what could not be checked here; a UserError naming `path` if the sidecar is malformed."""
    problem = shape_problem(data, SIDECAR_SHAPE)
    if problem:
        raise UserError(f"malformed artifact sidecar {path}: {problem}")
    settings = data["settings"]
    numerical = settings.get("verification", {}).get("numerical") if isinstance(settings.get("verification"),
                                                                                dict) else None
    source = settings.get("source")
    return {"path": data["path"], "model": source if isinstance(source, str) else Path(data["path"]).stem,
            "variant": variant_label(data["format"], data["precision"], settings), "format": data["format"],
            "size_mb": files_size_mb(path.parent, data["files"]), "source_sha256": data.get("source_sha256"),
            "note": numerical if isinstance(numerical, str) and numerical.startswith("not") else ""}


class Reports(NamedTuple):
    """What a report folder holds, each item checked to have what the page reads."""

    profiles: list[dict]
    estimates: list[dict]
    artifacts: list[dict]  # from sidecars: variants that may have no profile (a Core ML package)


def checked_folder(folder: str | Path) -> Path:
    """`folder` if it is a folder (of profiles, `load_reports` will see); a UserError otherwise."""
    if not Path(folder).is_dir():
        raise UserError(f"{folder} is not a folder of profiles")
    return Path(folder)


def load_reports(folder: str | Path) -> Reports:
    """Every profile, estimate and artifact sidecar in `folder`, as dicts checked to have what
    the page reads.

    A file is a profile if it is named `*.profile.json` or says `"schema": "edgeport.profile/2"`,
    holds estimates if it is named `*.estimate.json` or holds an object (or a list with an
    object) saying `"provenance": "estimated:roofline"`, and is an artifact record if named
    `*.edgeport.json`. Other `*.json` files (a demo's summary) are skipped, but must be valid
    JSON. Anything malformed is a UserError naming the file and what is wrong.
    """
    folder = checked_folder(folder)
    reports = Reports([], [], [])
    for path in sorted(folder.glob("*.json")):
        data = read_json(path)
        if path.name.endswith(SIDECAR_SUFFIX):
            reports.artifacts.append(checked_artifact(data, path))
        elif path.name.endswith(".profile.json") or _claims(data, "schema", SCHEMA):
            reports.profiles.append(checked_profile(data, path))
        elif path.name.endswith(".estimate.json") or _claims(data, "provenance", "estimated:roofline") or (
                isinstance(data, list) and any(_claims(d, "provenance", "estimated:roofline") for d in data)):
            reports.estimates.extend(checked_estimates(data, path))
    if not reports.profiles and not reports.estimates:
        raise UserError(f"no profiles (*.json with schema {SCHEMA}) or estimates in {folder}")
    return reports


def write_html(path: str | Path, profiles: list[dict], estimates: list[dict], artifacts: list[dict] | None = None,
               title: str = "edgeport report") -> Path:
    """Render the report (see `edgeport.runtime.page.render_html`) and write it atomically to
    `path` (a missing folder is a UserError); returns the path."""
    from edgeport.runtime.page import render_html

    return write_atomically(Path(path), render_html(profiles, estimates, artifacts, title))
