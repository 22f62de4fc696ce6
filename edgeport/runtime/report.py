"""Profiles and reports: one JSON schema, and a self-contained HTML page with SVG plots.

A `Profile` holds what was measured on this machine (latency samples and statistics, the
per-op breakdown, energy with its provenance, peak memory, the environment) and, beside it,
the estimate for the device asked about. Every figure carries its unit and provenance;
an estimate is never printed as a measurement.

The JSON files a report is built from are data, not markup: they may come from another
machine or another person, so every string from them is HTML-escaped on the page, and a
file of the wrong shape is refused, naming the file and the field, before anything is written.
"""
from __future__ import annotations

import html
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeport.devices.estimate import Estimate
from edgeport.errors import UserError
from edgeport.runtime.latency import LatencyStats
from edgeport.runtime.opprofile import OpProfile

SCHEMA = "edgeport.profile/1"
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
class Profile:
    """One artifact measured on this machine with one backend, and estimated for `device`."""

    artifact: str
    backend: str
    device: str
    latency: LatencyStats
    energy: Energy
    inputs_source: str
    peak_rss_mb: float
    environment: dict
    ops: OpProfile | None = None
    estimate: Estimate | None = None
    throughput_per_s: dict[int, float] = field(default_factory=dict)  # batch size -> items/s
    label: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["latency"] = {**self.latency.to_dict(), "valid": self.latency.valid}
        data["ops"] = self.ops.to_dict() if self.ops else None
        return {"schema": SCHEMA, "units": UNITS, **data}

    def summary(self) -> str:
        """A few lines for people: median with its interval, percentiles, validity, energy."""
        lat = self.latency
        lines = [f"{self.label or Path(self.artifact).name} on {self.backend} ({self.device}): "
                 f"p50 {lat.p50:.4f} ms [95% CI {lat.median_ci95[0]:.4f}-{lat.median_ci95[1]:.4f}], "
                 f"p90 {lat.p90:.4f}, p99 {lat.p99:.4f}, CV {lat.cv:.2f} (robust {lat.robust_cv:.2f}), {len(lat.samples_ms)} runs "
                 f"({'valid' if lat.valid else 'NOT valid: ' + '; '.join(lat.problems)})"]
        if self.energy.available:
            lines.append(f"energy {self.energy.net_mj_per_inference:.4f} mJ/inference net, "
                         f"{self.energy.gross_mj_per_inference:.4f} gross ({self.energy.provenance})")
        else:
            lines.append(f"energy: not measured ({'; '.join(self.energy.reasons) or 'no meter'})")
        if self.estimate:
            lines.append(f"estimate for {self.estimate.device}: {self.estimate.latency_ms:.4f} ms, "
                         f"{self.estimate.energy_mj:.4f} mJ ({self.estimate.energy_provenance})")
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write the profile's JSON (`edgeport.profile/1`) atomically to `path`; returns it."""
        return write_atomically(Path(path), json.dumps(self.to_dict(), indent=2, default=str) + "\n")


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


# --- SVG plots: small, dependency-free, readable -----------------------------------------

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="11"><text x="{width / 2}" y="14" text-anchor="middle" '
            f'font-weight="bold">{html.escape(title)}</text>{"".join(body)}</svg>')


def histogram_svg(samples: list[float], title: str, unit: str = "ms", bins: int = 30) -> str:
    """Histogram of samples up to their 99th percentile (the rest in the last bin), median marked."""
    width, height, left, bottom = 420, 220, 40, 30
    ordered = sorted(samples)
    lo, hi = ordered[0], ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    span = (hi - lo) or 1e-9
    counts = [0] * bins
    for s in samples:
        counts[max(0, min(bins - 1, int((s - lo) / span * bins)))] += 1
    top, plot_w, plot_h = max(counts), width - left - 10, height - bottom - 25
    bar_w = plot_w / bins
    body = [f'<rect x="{left + i * bar_w:.1f}" y="{25 + plot_h * (1 - c / top):.1f}" width="{bar_w - 1:.1f}" '
            f'height="{plot_h * c / top:.1f}" fill="{PALETTE[0]}"/>' for i, c in enumerate(counts)]
    median = ordered[len(ordered) // 2]
    mx = left + (median - lo) / span * plot_w
    body.append(f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="25" y2="{25 + plot_h}" stroke="{PALETTE[3]}"/>')
    body.append(f'<text x="{left}" y="{height - 8}">{lo:.4g}</text><text x="{width - 10}" y="{height - 8}" '
                f'text-anchor="end">p99 {hi:.4g} {unit}</text><text x="{mx + 4:.1f}" y="34" '
                f'fill="{PALETTE[3]}">p50 {median:.4g}</text>')
    return _svg(width, height, body, title)


def bars_svg(values: dict[str, float], title: str, unit: str = "%", scale: float = 100.0) -> str:
    """Horizontal bars, largest first (e.g. the share of time per op category)."""
    items = list(values.items())[:12]
    width, row = 420, 18
    height = 30 + row * len(items)
    top = max((v for _, v in items), default=1) or 1
    body = []
    for i, (label, value) in enumerate(items):
        y = 25 + i * row
        body.append(f'<text x="150" y="{y + 12}" text-anchor="end">{html.escape(label[:24])}</text>'
                    f'<rect x="155" y="{y + 2}" width="{200 * value / top:.1f}" height="{row - 4}" '
                    f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{160 + 200 * value / top:.1f}" y="{y + 12}">'
                    f'{value * scale:.3g}{unit}</text>')
    return _svg(width, height, body, title)


def scatter_svg(points: list[tuple[float, float, str, str]], title: str, xlabel: str, ylabel: str,
                log: bool = True, connect: bool = False) -> str:
    """Points (x, y, label, series), log-log by default; `connect` joins each series in x order."""
    width, height, left, bottom = 520, 320, 60, 40
    points = [p for p in points if p[0] > 0 and p[1] > 0] if log else points
    if not points:
        return _svg(width, 60, ['<text x="10" y="40">no data</text>'], title)
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    xs, ys = [f(p[0]) for p in points], [f(p[1]) for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pw, ph = width - left - 140, height - bottom - 30

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (f(x) - x0) / (x1 - x0) * pw, 25 + ph - (f(y) - y0) / (y1 - y0) * ph

    series = list(dict.fromkeys(p[3] for p in points))
    body = [f'<rect x="{left}" y="25" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>']
    for s_index, name in enumerate(series):
        color = PALETTE[s_index % len(PALETTE)]
        members = sorted((p for p in points if p[3] == name), key=lambda p: p[0])
        if connect and len(members) > 1:
            path = " ".join(f"{px(p[0], p[1])[0]:.1f},{px(p[0], p[1])[1]:.1f}" for p in members)
            body.append(f'<polyline points="{path}" fill="none" stroke="{color}"/>')
        for x, y, label, _ in members:
            cx, cy = px(x, y)
            body.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{color}"><title>{html.escape(label)}: '
                        f'{x:.4g}, {y:.4g}</title></circle>')
        body.append(f'<rect x="{width - 130}" y="{30 + 16 * s_index}" width="10" height="10" fill="{color}"/>'
                    f'<text x="{width - 115}" y="{39 + 16 * s_index}">{html.escape(name[:18])}</text>')
    for value, anchor, x, y in ((x0, "start", left, height - 20), (x1, "end", left + pw, height - 20)):
        body.append(f'<text x="{x}" y="{y}" text-anchor="{anchor}">{10 ** value if log else value:.3g}</text>')
    body.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
    body.append(f'<text x="{left - 4}" y="{25 + ph}" text-anchor="end">{10 ** y0 if log else y0:.3g}</text>'
                f'<text x="{left - 4}" y="32" text-anchor="end">{10 ** y1 if log else y1:.3g}</text>'
                f'<text x="12" y="{25 + ph / 2}" transform="rotate(-90 12 {25 + ph / 2})" text-anchor="middle">'
                f'{html.escape(ylabel)}</text>')
    return _svg(width, height, body, title)


def render_html(profiles: list[dict], estimates: list[dict], accuracy: list[dict] | None = None,
                title: str = "edgeport report") -> str:
    """A self-contained HTML page from profile and estimate dicts (their JSON form).

    `accuracy` rows are {"model", "variant", "bits", "accuracy_percent"} for the accuracy vs
    bit width plot. Every string from the dicts is HTML-escaped, in text and in SVG alike,
    and the page has no script, so hostile values show as text.
    """
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if profiles:
        parts.append("<h2>Measured on this machine</h2><table><tr><th>artifact</th><th>backend</th><th>p50 ms</th>"
                     "<th>95% CI</th><th>p99 ms</th><th>CV</th><th>valid</th><th>energy</th></tr>")
        for p in profiles:
            lat, energy = p["latency"], p["energy"]
            energy_text = (f"{energy['net_mj_per_inference']:.4g} mJ net ({energy['provenance']})"
                           if energy["available"] else "not measured: " + "; ".join(energy["reasons"]))
            parts.append(f"<tr><td>{html.escape(p['label'] or Path(p['artifact']).name)}</td>"
                         f"<td>{html.escape(p['backend'])}</td>"
                         f"<td>{lat['p50']:.4f}</td><td>{lat['median_ci95'][0]:.4f}–{lat['median_ci95'][1]:.4f}</td>"
                         f"<td>{lat['p99']:.4f}</td><td>{lat['cv']:.2f}</td>"
                         f"<td>{'yes' if lat['valid'] else html.escape('; '.join(lat['problems']))}</td>"
                         f"<td>{html.escape(energy_text)}</td></tr>")
        parts.append("</table><div class='plots'>")
        for p in profiles:
            name = p["label"] or Path(p["artifact"]).name
            parts.append(histogram_svg(p["latency"]["samples_ms"], f"{name}: latency distribution ({p['backend']})"))
            if p.get("ops"):
                parts.append(bars_svg(p["ops"]["by_category"], f"{name}: time per op category"))
        parts.append("</div>")
    points = [(e["latency_ms"], e["energy_mj"], e["artifact"], e["device"]) for e in estimates]
    points += [(p["latency"]["p50"], p["energy"]["net_mj_per_inference"], p["artifact"], "measured")
               for p in profiles if p["energy"]["available"]]
    if points:
        parts.append("<h2>Latency vs energy across devices and variants</h2>")
        parts.append(scatter_svg(points, "latency vs energy per inference", "latency (ms)", "energy (mJ)"))
        parts.append("<p>Device points are <b>estimated</b> (roofline latency x the device's active power; the "
                     "catalog names each number's source). Points in the series 'measured' come from a meter.</p>")
        parts.append("<table><tr><th>artifact</th><th>device</th><th>est. latency ms</th><th>est. energy mJ</th>"
                     "<th>45 nm compute mJ</th><th>MACs</th></tr>")
        for e in estimates:
            parts.append(f"<tr><td>{html.escape(Path(e['artifact']).name)}</td><td>{html.escape(e['device'])}</td>"
                         f"<td>{e['latency_ms']:.4g}</td><td>{e['energy_mj']:.4g}</td>"
                         f"<td>{e['compute_energy_45nm_mj']:.3g}</td><td>{e['macs']:.3g}</td></tr>")
        parts.append("</table>")
    if accuracy:
        parts.append("<h2>Accuracy vs bit width</h2>")
        parts.append(scatter_svg([(r["bits"], r["accuracy_percent"], r["variant"], r["model"]) for r in accuracy],
                                 "accuracy vs bit width", "bits", "accuracy (%)", log=False, connect=True))
    if profiles:
        parts.append("<h2>Environment</h2><pre>" + html.escape(json.dumps(profiles[0]["environment"], indent=2))
                     + "</pre>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ddd;padding:3px 8px;font-size:13px}.plots svg{margin:6px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


# --- Reading report folders: the shape each file must have --------------------------------
# A shape is one of the scalar names below, a dict (an object with those keys; a Nullable key
# may be left out), a tuple (a list of exactly those items), ListOf, MapOf, Nullable or Exactly.
# Only the fields the page reads are checked; other keys pass through.

TEXT, FLAG, FINITE, OBJECT = "a string", "true or false", "a finite number", "an object"
_SCALARS = {TEXT: lambda v: isinstance(v, str), FLAG: lambda v: isinstance(v, bool),
            FINITE: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            OBJECT: lambda v: isinstance(v, dict)}


@dataclass(frozen=True)
class ListOf:
    """A list of `item`s, at least `min_length` of them."""

    item: Any
    min_length: int = 0


@dataclass(frozen=True)
class MapOf:
    """An object with any keys whose every value is `value`."""

    value: Any


@dataclass(frozen=True)
class Nullable:
    """`shape` or null; as an object's key, it may also be left out."""

    shape: Any


@dataclass(frozen=True)
class Exactly:
    """This one string (a schema or provenance tag)."""

    value: str


PROFILE_SHAPE = {
    "schema": Exactly(SCHEMA), "artifact": TEXT, "backend": TEXT, "label": TEXT, "environment": OBJECT,
    "latency": {"p50": FINITE, "p99": FINITE, "cv": FINITE, "median_ci95": (FINITE, FINITE), "valid": FLAG,
                "problems": ListOf(TEXT), "samples_ms": ListOf(FINITE, min_length=1)},
    "energy": {"available": FLAG, "provenance": TEXT, "net_mj_per_inference": Nullable(FINITE),
               "reasons": ListOf(TEXT)},
    "ops": Nullable({"by_category": MapOf(FINITE)})}
ESTIMATE_SHAPE = {"provenance": Exactly("estimated:roofline"), "artifact": TEXT, "device": TEXT,
                  "latency_ms": FINITE, "energy_mj": FINITE, "compute_energy_45nm_mj": FINITE, "macs": FINITE}


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
    (e.g. `latency.samples_ms[3] should be a finite number, not a string`), or None."""
    here = where or "the file"
    if isinstance(shape, str):
        return None if _SCALARS[shape](value) else f"{here} should be {shape}, not {_describe(value)}"
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
        return next((f"{here} has a value that is {_describe(v)}, not {shape.value}" for v in value.values()
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


def checked_profile(data: Any, path: Path) -> dict:
    """`data` if it is a profile the page can render; otherwise a UserError naming `path` and the field."""
    problem = shape_problem(data, PROFILE_SHAPE)
    if not problem and data["energy"]["available"] and data["energy"]["net_mj_per_inference"] is None:
        problem = "energy.net_mj_per_inference should be a finite number when energy.available is true"
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


def load_reports(folder: str | Path) -> tuple[list[dict], list[dict]]:
    """Every profile and estimate in `folder`, as dicts checked to have what the page reads.

    A file is a profile if it is named `*.profile.json` or says `"schema": "edgeport.profile/1"`,
    and holds estimates if it is named `*.estimate.json` or holds an object (or a list with an
    object) saying `"provenance": "estimated:roofline"`. Other `*.json` files (a demo's
    summary) are skipped, but must be valid JSON. Anything malformed is a UserError naming
    the file and what is wrong.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of profiles")
    profiles, estimates = [], []
    for path in sorted(folder.glob("*.json")):
        data = read_json(path)
        if path.name.endswith(".profile.json") or _claims(data, "schema", SCHEMA):
            profiles.append(checked_profile(data, path))
        elif path.name.endswith(".estimate.json") or _claims(data, "provenance", "estimated:roofline") or (
                isinstance(data, list) and any(_claims(d, "provenance", "estimated:roofline") for d in data)):
            estimates += checked_estimates(data, path)
    if not profiles and not estimates:
        raise UserError(f"no profiles (*.json with schema {SCHEMA}) or estimates in {folder}")
    return profiles, estimates


def write_html(path: str | Path, profiles: list[dict], estimates: list[dict], accuracy: list[dict] | None = None,
               title: str = "edgeport report") -> Path:
    """Render the report and write it atomically to `path` (a missing folder is a UserError);
    returns the path."""
    return write_atomically(Path(path), render_html(profiles, estimates, accuracy, title))
