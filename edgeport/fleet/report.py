"""The sweep's `report.html`: every variant compared across every device, from the job files.

Per target, one table of median latency and one of energy per inference: a row per model and
variant, a column per device. A measured cell names the node it ran on, its runs and threads,
and why it is not valid where it is not; an estimated cell is marked as the catalog's roofline
estimate, with the device figures it assumed, never as a measurement; a failed job shows its
reason. Then the failed jobs, the nodes that measured (their environment and meters), and the
exports. Every string on the page comes from JSON files and is escaped, and the page runs no
script. Beside edgeport's generator tag it carries `SWEEP_TAG`, by which a sweep knows the
`report.html` it may replace.
"""
from __future__ import annotations

import html
from pathlib import Path

from edgeport.errors import UserError
from edgeport.fleet.plan import ESTIMATE, EXPORT, MEASURE, Plan
from edgeport.fleet.results import DONE, FAILED
from edgeport.runtime.page import GENERATOR_TAG
from edgeport.runtime.report import write_atomically

SWEEP_TAG = "<meta name='edgeport-page' content='sweep'>"  # a page `edgeport sweep` wrote, and may replace
CSP = "default-src 'none'; style-src 'unsafe-inline'"  # styles only: nothing on the page runs or loads

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0 1.5em}"
         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}td.num{text-align:right}"
         ".est{color:#666;font-style:italic}.failed{color:#b00}.where{color:#666;font-size:11px}")


def _text(value) -> str:
    return html.escape(str(value))


def _estimate_basis(estimate: dict) -> str:
    """The device figures an estimate did not take from the vendor, e.g. `peak derived`."""
    unsure = [f"{figure} {source}" for figure, source in estimate["confidence"].items() if source != "vendor"]
    return "device figures: " + ", ".join(unsure) if unsure else "vendor device figures"


def _latency_cell(record: dict | None) -> str:
    if record is None:
        return "<td>—</td>"
    if record["status"] == FAILED:
        return f"<td class='failed'>failed: {_text(record['reason'])}</td>"
    if record["kind"] == ESTIMATE:
        estimate = record["estimate"]
        return (f"<td class='num est'>{estimate['latency_ms']:.4g}<br>estimated (roofline)<br><span class='where'>"
                f"{_text(_estimate_basis(estimate))}</span></td>")
    profile, node = record["profile"], record["node"]
    latency = profile["latency"]
    low, high = latency["median_ci95"]
    validity = "" if latency["valid"] else \
        f"<br><span class='failed'>not valid: {_text('; '.join(latency['problems']))}</span>"
    if node.get("not_the_device"):
        validity += f"<br><span class='failed'>not the device: {_text(node['not_the_device'])}</span>"
    if record.get("shared_node_with"):
        validity += (f"<br><span class='failed'>measured while {len(record['shared_node_with'])} export(s) ran on "
                     f"its node: {_text(', '.join(record['shared_node_with']))}</span>")
    return (f"<td class='num'>{latency['p50']:.4g}<br><span class='where'>95% CI {low:.4g}–{high:.4g}; "
            f"{len(latency['samples_ms'])} runs, threads: {_text(profile['environment'].get('threads', '?'))}; "
            f"measured on node {_text(node['node_id'][:12])}</span>{validity}</td>")


def _energy_cell(record: dict | None) -> str:
    if record is None or record["status"] == FAILED:
        return "<td>—</td>"
    if record["kind"] == ESTIMATE:
        estimate = record["estimate"]
        net = estimate.get("net_energy_mj")  # an earlier edgeport's estimate has only the gross figure
        figure, kind = (net, "net") if net is not None else (estimate["energy_mj"], "gross, idle not subtracted")
        return (f"<td class='num est'>{figure:.4g}<br>estimated ({kind})<br><span class='where'>"
                f"{_text(estimate['energy_provenance'])}</span></td>")
    energy = record["profile"]["energy"]
    if energy["available"]:
        return f"<td class='num'>{energy['net_mj_per_inference']:.4g}<br><span class='where'>" \
               f"{_text(energy['provenance'])}</span></td>"
    return f"<td>not measured: {_text('; '.join(energy['reasons'][:1]) or 'no meter on the node')}</td>"


def _table(headers: list[str], rows: list[str], empty: str = "") -> str:
    """A table; with no rows, one cell across it saying `empty` (every section is always there)."""
    head = "".join(f"<th>{_text(h)}</th>" for h in headers)
    body = "".join(rows) or f"<tr><td colspan='{len(headers)}'>{_text(empty)}</td></tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _matrix(plan: Plan, target: str, by_key: dict[str, dict], cell) -> str:
    rows = []
    for export in (e for e in plan.exports() if e.target == target):
        cells = {job.device: cell(by_key.get(job.key)) for job in plan.device_jobs(export)}
        rows.append(f"<tr><td>{_text(export.model)}</td><td>{_text(export.variant)}</td>"
                    + "".join(cells[d] for d in plan.devices) + "</tr>")
    return _table(["model", "variant", *plan.devices], rows)


def _row(values) -> str:
    return "<tr>" + "".join(f"<td>{_text(v)}</td>" for v in values) + "</tr>"


def _failed_table(failed: list[dict]) -> str:
    return _table(["job", "reason"], [
        f"<tr><td>{_text(' '.join((r['kind'], r['model'], r['variant'], r['target'], r['device'])))}</td>"
        f"<td class='failed'>{_text(r['reason'])}</td></tr>" for r in failed], "none")


def _nodes_table(measuring: list[dict]) -> str:
    """One row per node that measured: its device, host, environment and energy meter."""
    by_node = {r["node"]["node_id"]: r for r in measuring if r["kind"] == MEASURE and r["status"] == DONE}
    rows = []
    for node_id, r in by_node.items():
        env, node = r["profile"]["environment"], r["node"]
        meter = node["energy_meter"] or "none: " + "; ".join(map(str, node.get("energy_meter_unavailable", [])))
        rows.append(_row((r["device"], node.get("not_the_device") or "yes", node_id, node["hostname"],
                          env.get("cpu", "?"), env.get("gpu", "-"), env.get("onnxruntime", "?"), env.get("torch", "?"),
                          env.get("threads", "?"), meter)))
    return _table(["device", "is the device", "node", "host", "CPU", "GPU", "onnxruntime", "torch", "threads",
                   "energy meter"], rows,
                  "none: every figure above is an estimate")


def _exports_table(exports: list[dict]) -> str:
    rows = [_row((r["model"], r["variant"], r["target"], r["artifact"]["file"], r["artifact"]["exporter"],
                  r["artifact"]["precision"], r["artifact"]["parity"], r["artifact"]["bytes"],
                  r["node"]["node_id"][:12], f"{r['seconds']:.1f}")) for r in exports if r["status"] == DONE]
    return _table(["model", "variant", "target", "artifact", "exporter", "precision", "parity", "bytes", "node",
                   "seconds"], rows, "none")


def render(plan: Plan, records: list[dict], title: str = "edgeport sweep") -> str:
    """The page for the jobs of `plan`, from their result files' content (`records`)."""
    by_key = {r["key"]: r for r in records}
    kinds = {job.device: job.kind for job in plan.jobs if job.kind != EXPORT}
    measured = [d for d in plan.devices if kinds[d] == MEASURE]
    estimated = [d for d in plan.devices if kinds[d] == ESTIMATE]
    failed = [by_key[j.key] for j in plan.jobs if j.key in by_key and by_key[j.key]["status"] == FAILED]
    parts = [f"<h1>{_text(title)}</h1>",
             f"<p>{len(records)} of {len(plan.jobs)} jobs finished, {len(failed)} failed. Measured on the nodes "
             f"advertising: {_text(', '.join(measured) or 'none')}. Estimated from the device catalog (roofline "
             f"latency x active power; no node is that device): {_text(', '.join(estimated) or 'none')}.</p>"]
    for target in plan.targets:
        parts += [f"<h2>Median latency per inference (ms), {_text(target)}</h2>", _matrix(plan, target, by_key,
                                                                                         _latency_cell),
                  f"<h2>Energy per inference (mJ, net of idle power), {_text(target)}</h2>",
                  _matrix(plan, target, by_key, _energy_cell)]
    measuring = [by_key[j.key] for j in plan.jobs if j.kind == MEASURE and j.key in by_key]
    exports = [by_key[e.key] for e in plan.exports() if e.key in by_key]
    parts += ["<h2>Failed jobs</h2>", _failed_table(failed), "<h2>Nodes that measured</h2>", _nodes_table(measuring),
              "<h2>Exports (each once, verified against torch)</h2>", _exports_table(exports)]
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">{GENERATOR_TAG}{SWEEP_TAG}"
            f"<title>{_text(title)}</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def check_report_path(path: Path) -> Path:
    """`path` if the sweep may write its page there: refused, before any job, where it is a
    folder or a file an earlier sweep did not write (someone's notes, an `edgeport report` page)."""
    if path.is_dir():
        raise UserError(f"cannot write the sweep's page to {path}: it is a folder")
    if path.is_file():
        with path.open("rb") as file:  # the tags sit in the head
            head = file.read(2048).decode("utf-8", errors="replace")
        if SWEEP_TAG not in head:
            raise UserError(f"refusing to overwrite {path}: an earlier sweep did not write it (move it away, or "
                            "choose another results folder)")
    return path


def write_report(path: Path, plan: Plan, records: list[dict], title: str = "edgeport sweep") -> Path:
    """Render the sweep's page and write it atomically to `path`; returns it."""
    return write_atomically(path, render(plan, records, title))
