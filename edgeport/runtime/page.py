"""The HTML report: one self-contained page with matplotlib plots (inline SVG) and sortable tables.

What a performance engineer comparing variants and devices reads first is the comparison
table (accuracy, latency, throughput, energy, size per variant), then the device plot (one
row per device, so no device hides under another; filled markers are measured, on the row of
the machine that measured them, hollow ones are roofline estimates), then where the time goes
(op categories in milliseconds of the measured p50, per op and per module in sortable
tables), then the latency distributions.

The profiles may come from several machines: each measured figure names the machine its
profile's environment describes (never "this machine": the page may be built elsewhere), each
machine's measurements have their own rows and series, and every environment is shown.

The JSON the page is built from may come from anyone: every string is escaped (matplotlib
escapes its SVG text, the tables use `html.escape`), mathtext is off so a `$` is a dollar,
and the page's Content-Security-Policy lets only its own sorting script run.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
from pathlib import Path

import numpy as np

GENERATOR_TAG = "<meta name='generator' content='edgeport'>"  # how an output path is known to be ours
SORT_SCRIPT = """
for (const table of document.querySelectorAll("table.sortable")) {
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach((th, index) => {
    th.tabIndex = 0;
    const sort = () => {
      const ascending = th.dataset.order !== "ascending";
      heads.forEach(h => h.removeAttribute("data-order"));
      th.dataset.order = ascending ? "ascending" : "descending";
      const key = row => {
        const cell = row.cells[index];
        if (cell && cell.dataset.value !== undefined) {
          const number = parseFloat(cell.dataset.value);
          return Number.isNaN(number) ? Infinity : number;
        }
        return cell ? cell.textContent : "";
      };
      const rows = Array.from(table.tBodies[0].rows);
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        const order = typeof x === "number" && typeof y === "number" ? (x > y) - (x < y) : String(x).localeCompare(String(y));
        return ascending ? order : -order;
      });
      rows.forEach(row => table.tBodies[0].appendChild(row));
    };
    th.addEventListener("click", sort);
    th.addEventListener("keydown", event => { if (event.key === "Enter") sort(); });
  });
}
"""
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SORT_SCRIPT.encode()).digest()).decode()
CSP = f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{SCRIPT_HASH}'"
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1250px;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0 1em} td,th{border:1px solid #ddd;padding:3px 8px;font-size:13px}
th{background:#f4f4f4;cursor:pointer;white-space:nowrap} th[data-order=ascending]::after{content:" \\25B2"}
th[data-order=descending]::after{content:" \\25BC"} td.num{text-align:right;font-variant-numeric:tabular-nums}
.est{font-style:italic;color:#555} .est::before{content:"est. ";font-size:10px;color:#888}
.bad{color:#b00020} .legend{font-size:13px;color:#444} figure.plot{display:inline-block;margin:4px 10px 10px 0}
figure.plot figcaption{font-size:12px;color:#555;max-width:640px} details{margin:.4em 0}
summary{cursor:pointer;font-weight:600}
"""
DEVICE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


# --- machines ------------------------------------------------------------------------------

# what tells machines apart in a profile's environment: processor, core count, GPU and operating
# system; threads and package versions may change from one run to the next on the same machine
MACHINE_FIELDS = ("cpu", "logical_cpus", "gpu", "platform")


def _machine_name(env: dict) -> str:
    """A machine as people know it: its CPU, its logical CPUs and its GPU."""
    parts = [str(env.get("cpu") or "unknown CPU")]
    if type(env.get("logical_cpus")) is int:  # not a bool, which JSON's true would be
        parts.append(f"{env['logical_cpus']} CPUs")
    if env.get("gpu"):
        parts.append(str(env["gpu"]))
    return ", ".join(parts)


def machine_names(profiles: list[dict]) -> list[str]:
    """The machine each profile was measured on, in order, named from its environment.
    Profiles that agree on MACHINE_FIELDS share a name; machines that differ in them but would
    share a name (same CPU, another kernel) are numbered ("..., machine 2")."""
    identities = [json.dumps([p["environment"].get(key) for key in MACHINE_FIELDS]) for p in profiles]
    names: dict[str, str] = {}  # identity -> name
    uses: dict[str, int] = {}  # name -> how many identities bear it
    for identity, profile in zip(identities, profiles):
        if identity not in names:
            name = _machine_name(profile["environment"])
            uses[name] = uses.get(name, 0) + 1
            names[identity] = name if uses[name] == 1 else f"{name}, machine {uses[name]}"
    return [names[identity] for identity in identities]



# --- plots ----------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig, plot_id: str, caption: str) -> str:
    """The figure as inline SVG inside a <figure>, its element ids prefixed by `plot_id` so that
    several figures on one page do not share clip paths or markers."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": plot_id}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\b(id="|xlink:href="#|url\(#)', lambda m: f"{m.group(1)}{plot_id}-", svg)
    return (f'<figure class="plot" id="{plot_id}">{svg}<figcaption>{html.escape(caption)}</figcaption></figure>')


def _plot_style():
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False, "font.size": 9, "axes.grid": True, "grid.alpha": 0.35,
                                  "grid.linestyle": "-", "axes.axisbelow": True})


def _log_axis(axis) -> None:
    """Plain-number tick labels on a log axis (the default ones are mathtext, which is off):
    every decade, and 2 and 5 between them where the axis spans under two decades."""
    from matplotlib.ticker import FuncFormatter

    low, high = sorted(axis.get_view_interval())
    spans_little = low > 0 and high / low < 100

    def minor(value, _position) -> str:
        mantissa = round(value / 10 ** np.floor(np.log10(value)), 6)
        return f"{value:g}" if spans_little and mantissa in (2.0, 5.0) else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def histogram_plot(samples_ms: list[float], title: str, plot_id: str) -> str:
    """Latency histogram of the body of the distribution (up to ten p50-to-p90 spans above the
    p50, at most the 99.5th percentile), p50 and p99 marked, the runs beyond the axis counted:
    a tail of preempted runs would otherwise squash everything into one bar."""
    data = np.asarray(samples_ms)
    p50, p90, p99, p995 = np.percentile(data, [50, 90, 99, 99.5])
    lo = float(data.min())
    hi = float(min(p995, p50 + 10 * max(p90 - p50, 0.02 * p50)))
    beyond = int(np.sum(data > hi))
    with _plot_style():
        fig = _figure(4.6, 2.7)
        ax = fig.add_subplot()
        ax.hist(data[data <= hi], bins=40, range=(lo, hi if hi > lo else lo * 1.01 + 1e-9), color="#4c72b0",
                gid="points")
        ax.axvline(p50, color="#c44e52", linewidth=1.5, label=f"p50 {p50:.4g} ms")
        if p99 <= hi:
            ax.axvline(p99, color="#c44e52", linewidth=1.2, linestyle="--", label=f"p99 {p99:.4g} ms")
        ax.set_xlabel("latency per inference (ms)")
        ax.set_ylabel("runs")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
        if beyond:
            ax.annotate(f"beyond the axis: {beyond} of {len(data)} runs\n(p99 {p99:.4g} ms, max {data.max():.4g} ms)",
                        xy=(0.98, 0.55),
                        xycoords="axes fraction", ha="right", fontsize=8, color="#555")
    return _svg(fig, plot_id, f"{title}: {len(data)} timed runs; the axis ends at {hi:.4g} ms.")


def categories_plot(rows: list[tuple[str, dict[str, float], float]], plot_id: str) -> str:
    """One stacked bar per profile: milliseconds of its measured p50 per op category, and the
    part spent outside any node (the runtime's own work between nodes)."""
    categories = list(dict.fromkeys(c for _, shares, _ in rows for c in shares))
    with _plot_style():
        fig = _figure(7.5, 1.6 + 0.42 * len(rows))
        ax = fig.add_subplot()
        names = [name for name, _, _ in rows]
        left = np.zeros(len(rows))
        colors = DEVICE_COLORS + ["#aec7e8", "#ffbb78"]
        for index, cat in enumerate([*categories, "outside nodes"]):
            widths = np.array([shares.get(cat, 0.0) if cat != "outside nodes" else outside
                               for _, shares, outside in rows])
            ax.barh(names, widths, left=left, color=colors[index % len(colors)] if cat != "outside nodes"
                    else "#dddddd", label=cat, gid="points")
            left += widths
        ax.set_xlabel("milliseconds of the measured p50")
        ax.invert_yaxis()
        fig.legend(loc="outside lower center", ncols=4, fontsize=8)
    return _svg(fig, plot_id, "Where the time goes: per-node medians under the profiler, scaled to the p50 measured "
                              "without it; grey is time between nodes.")


def devices_plot(model: str, points: list[dict], plot_id: str) -> str:
    """Latency and energy per device for every variant of one model: a row per device (the
    machines measured on at the top), a marker shape and colour per variant; filled markers
    are measured, hollow ones estimated. Rows keep devices with equal figures (H100, H200) apart."""
    devices = list(dict.fromkeys(p["device"] for p in points))
    variants = list(dict.fromkeys(p["variant"] for p in points))
    step = 0.6 / max(1, len(variants))
    with _plot_style():
        fig = _figure(9.0, 1.4 + 0.34 * len(devices))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, key, label in ((axes[0], "latency_ms", "latency per inference (ms, log scale)"),
                               (axes[1], "energy_mj", "energy per inference, net of idle (mJ, log scale)")):
            for v_index, variant in enumerate(variants):
                color, marker = DEVICE_COLORS[v_index % len(DEVICE_COLORS)], MARKERS[v_index % len(MARKERS)]
                for measured in (True, False):
                    mine = [p for p in points if p["variant"] == variant and p["measured"] == measured
                            and p.get(key) and p[key] > 0]
                    if not mine:
                        continue
                    ys = [devices.index(p["device"]) - 0.3 + step * (v_index + 0.5) for p in mine]
                    ax.scatter([p[key] for p in mine], ys, marker=marker, s=42, linewidths=1.4,
                               facecolors=color if measured else "none", edgecolors=color, gid="points",
                               label=f"{variant} ({'measured' if measured else 'estimated'})")
            ax.set_xscale("log")
            _log_axis(ax.xaxis)
            ax.set_xlabel(label)
            ax.grid(True, which="minor", axis="x", alpha=0.15)
            ax.set_yticks(range(len(devices)), devices)
            ax.set_ylim(len(devices) - 0.5, -0.5)
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
        fig.suptitle(model, fontsize=10)
    return _svg(fig, plot_id, f"{model}: filled markers are measured, on the row of the machine that measured "
                              "them; hollow ones are roofline estimates for catalog devices (energy = the device's "
                              "active power x latency); a measured row has energy only where a meter exists.")


def tradeoff_plot(rows: list[dict], plot_id: str) -> str:
    """Accuracy against measured latency, one marker per variant and a series per model (per
    model and machine where several machines measured): the trade-off in one view."""
    series = list(dict.fromkeys((r["model"], r["machine"]) for r in rows))
    several_machines = len({machine for _, machine in series}) > 1
    with _plot_style():
        fig = _figure(7.5, 3.4)
        ax = fig.add_subplot()
        for index, (model, machine) in enumerate(series):
            mine = [r for r in rows if (r["model"], r["machine"]) == (model, machine)]
            ax.scatter([r["p50_ms"] for r in mine], [r["accuracy_percent"] for r in mine], s=40,
                       color=DEVICE_COLORS[index % len(DEVICE_COLORS)], marker=MARKERS[index % len(MARKERS)],
                       label=f"{model} on {machine}" if several_machines else model, gid="points")
            for r in mine:
                ax.annotate(r["variant"], (r["p50_ms"], r["accuracy_percent"]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
        ax.set_xlabel("measured p50 latency (ms, log scale)")
        ax.set_ylabel("test accuracy (%)")
        fig.legend(loc="outside right upper", fontsize=8)
    return _svg(fig, plot_id, "Accuracy against measured latency per variant (accuracy as recorded in each profile).")


def throughput_plot(profiles: list[dict], plot_id: str) -> str:
    """Items per second against batch size for profiles measured at several batch sizes."""
    with _plot_style():
        fig = _figure(5.0, 3.0)
        ax = fig.add_subplot()
        for index, p in enumerate(profiles):
            sizes = sorted(p["throughput_per_s"], key=int)
            ax.plot([int(s) for s in sizes], [p["throughput_per_s"][s] for s in sizes], marker="o",
                    color=DEVICE_COLORS[index % len(DEVICE_COLORS)], label=p["plot_name"], gid="points")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({int(b) for p in profiles for b in p["throughput_per_s"]}))
        ax.xaxis.set_major_formatter("{x:g}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("throughput (items/s)")
        ax.legend(fontsize=8)
    return _svg(fig, plot_id, "Throughput measured at each batch size (items per second at the median latency).")


# --- tables ---------------------------------------------------------------------------------

def _cell(value, digits: str = ".4g", estimated: bool = False) -> str:
    """A table cell: numbers right-aligned with a sort key, None as an em dash, text escaped."""
    if value is None:
        return '<td class="num" data-value="">—</td>'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        css = "num est" if estimated else "num"
        return f'<td class="{css}" data-value="{value!r}">{format(value, digits)}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(headers: list[str], rows: list[str], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    cap = f"<caption class='legend'>{html.escape(caption)}</caption>" if caption else ""
    return (f'<table class="sortable">{cap}<thead><tr>{head}</tr></thead><tbody>'
            + "".join(f"<tr>{r}</tr>" for r in rows) + "</tbody></table>")


def _name(profile: dict) -> str:
    return profile.get("label") or Path(profile["artifact"]).name


def _energy_text(energy: dict) -> str:
    if energy["available"]:
        return f"{energy['net_mj_per_inference']:.4g} mJ net ({energy['provenance']})"
    return "not measured: " + ("; ".join(energy["reasons"]) or "no meter")


def _throughput_text(profile: dict) -> str:
    measured = [f"batch {b}: {v:,.0f} items/s" for b, v in sorted(profile.get("throughput_per_s", {}).items(),
                                                          key=lambda kv: int(kv[0]))]
    skipped = [f"batch {b} not measured ({why})" for b, why in profile.get("throughput_skipped", {}).items()]
    return "; ".join(measured + skipped)


def _memory_text(profile: dict) -> str:
    memory = profile.get("memory") or {}
    if memory.get("peak_mb") is None and memory.get("loaded_mb") is None:
        return "—"
    peak = f", peak +{memory['peak_mb']:.1f}" if memory.get("peak_mb") is not None else ""
    return f"+{memory.get('loaded_mb', 0.0):.1f} MB loaded{peak} ({memory.get('method', '').split(':')[0]})"


def measured_table(profiles: list[dict]) -> str:
    rows = []
    for p in profiles:
        lat = p["latency"]
        p50 = lat["p50"]
        verdict = "yes" if lat["valid"] else "; ".join(lat["problems"])
        rows.append(_cell(_name(p)) + _cell(p["machine"]) + _cell(p["backend"]) + _cell(p50)
                    + _cell(f"{lat['median_ci95'][0]:.4g}–{lat['median_ci95'][1]:.4g}") + _cell(lat.get("p90"))
                    + _cell(lat["p99"]) + _cell(lat["p99"] / p50 if p50 else None, ".3g") + _cell(lat["cv"], ".2f")
                    + _cell(len(lat["samples_ms"]), "d") + _cell(_throughput_text(p)) + _cell(_memory_text(p))
                    + (f"<td>{html.escape(verdict)}</td>" if lat["valid"]
                       else f'<td class="bad">{html.escape(verdict)}</td>') + _cell(_energy_text(p["energy"])))
    methods = sorted({(p.get("memory") or {}).get("method", "") for p in profiles} - {""})
    return _table(["artifact", "machine", "backend", "p50 ms", "95% CI of p50", "p90 ms", "p99 ms", "p99/p50", "CV",
                   "runs", "throughput", "session memory", "valid", "energy"], rows,
                  "Session memory: " + " / ".join(methods) if methods else "")


def _host_estimate(estimates: list[dict], artifact: str) -> dict | None:
    return next((e for e in estimates if e["device"] == "host" and Path(e["artifact"]).name == Path(artifact).name),
                None)


def _model_names(profiles: list[dict]) -> dict[str, str]:
    """{source model hash: model name} from the profiles: an artifact record of the same torch
    model (a Core ML package of it) takes the profile's name for it."""
    return {v["source_sha256"]: v["model"] for v in (p.get("variant") or {} for p in profiles)
            if v.get("source_sha256")}


def variant_rows(profiles: list[dict], estimates: list[dict], artifacts: list[dict]) -> list[dict]:
    """One row per variant and machine: from each profile (measured on its machine) and each
    artifact record that is not a profiled variant (a Core ML package, say), with a host
    estimate beside it. A measured row's estimate is the one its profile made in the same run,
    for the same machine: an estimate file does not say which machine "host" was."""
    rows, seen, names = [], set(), _model_names(profiles)
    for p in profiles:
        variant = p.get("variant") or {}
        estimate = p.get("estimate")
        energy = p["energy"]
        rows.append({"model": variant.get("model") or _name(p), "variant": variant.get("variant") or p["backend"],
                     "format": variant.get("format") or p["backend"], "machine": p["machine"],
                     "size_mb": variant.get("size_mb"), "accuracy_percent": variant.get("accuracy_percent"),
                     "p50_ms": p["latency"]["p50"],
                     "tail": p["latency"]["p99"] / p["latency"]["p50"] if p["latency"]["p50"] else None,
                     "throughput": p["latency"]["throughput_per_s"],
                     "host_estimate_ms": estimate["latency_ms"] if estimate else None,
                     "energy_mj": energy["net_mj_per_inference"] if energy["available"] else net_estimate(estimate),
                     "energy_measured": energy["available"], "note": "" if p["latency"]["valid"] else "not valid"})
        seen |= {Path(p["artifact"]).name, (variant.get("source_sha256"), variant.get("variant"), variant.get("format"))}
    for a in artifacts:
        if Path(a["path"]).name in seen or (a.get("source_sha256"), a["variant"], a["format"]) in seen:
            continue
        estimate = _host_estimate(estimates, a["path"])
        rows.append({"model": names.get(a.get("source_sha256"), a["model"]), "variant": a["variant"],
                     "format": a["format"], "machine": None, "size_mb": a.get("size_mb"), "accuracy_percent": None,
                     "p50_ms": None, "tail": None, "throughput": None,
                     "host_estimate_ms": estimate["latency_ms"] if estimate else None,
                     "energy_mj": net_estimate(estimate), "energy_measured": False,
                     "note": a.get("note", "")})
    return rows


def net_estimate(estimate: dict | None) -> float | None:
    """An estimate's energy per inference less idle power (mJ), the figure that stands beside a
    measured net energy; None for an estimate from an edgeport that wrote only the gross one."""
    return estimate.get("net_energy_mj") if estimate else None


def variants_table(rows: list[dict]) -> str:
    body = [_cell(r["model"]) + _cell(r["variant"]) + _cell(r["format"]) + _cell(r["machine"])
            + _cell(r["size_mb"], ".3g") + _cell(r["accuracy_percent"], ".2f") + _cell(r["p50_ms"])
            + _cell(r["tail"], ".3g")
            + _cell(r["throughput"], ",.0f") + _cell(r["host_estimate_ms"], estimated=True)
            + _cell(r["host_estimate_ms"] / r["p50_ms"] if r["host_estimate_ms"] and r["p50_ms"] else None, ".2f")
            + _cell(r["energy_mj"], estimated=not r["energy_measured"]) + _cell(r["note"]) for r in rows]
    return _table(["model", "variant", "format", "machine", "size MB", "accuracy %", "p50 ms (measured)",
                   "p99/p50", "throughput (items/s)", "host estimate ms", "estimate / measured", "net energy mJ",
                   "note"],
                  body, "Italic figures marked 'est.' are roofline estimates; the others were measured on the row's "
                        "machine. A measured row's host estimate is for that machine, made in the same run; a row "
                        "without a machine has no measurement, and its host estimate is for the machine that ran "
                        "`edgeport estimate`.")


def estimates_table(estimates: list[dict]) -> str:
    rows = []
    for e in estimates:
        confidence = e.get("confidence") or {}
        dims = ", ".join(f"{k}={v} ({(e.get('dims_source') or {}).get(k, '')})" for k, v in (e.get("dims") or {}).items())
        rows.append(_cell(Path(e["artifact"]).name) + _cell(e["device"]) + _cell(e["latency_ms"], estimated=True)
                    + _cell(e["energy_mj"], estimated=True) + _cell(net_estimate(e), estimated=True)
                    + _cell(e["compute_energy_45nm_mj"], ".3g", True)
                    + _cell(e["macs"], ".3g") + _cell(dims or "—")
                    + _cell(", ".join(f"{k}: {v}" for k, v in confidence.items()) or "—"))
    return _table(["artifact", "device", "latency ms", "gross energy mJ", "net energy mJ", "45 nm compute mJ", "MACs",
                   "dims",
                   "confidence of the device figures"], rows)


def ops_tables(profile: dict) -> str:
    """Per-op and per-module tables of one profile, inside a <details>."""
    ops = profile["ops"]
    scaled = ops.get("measured_p50_ms") is not None
    op_rows = [_cell(o["name"]) + _cell(o["op_type"]) + _cell(o["category"]) + _cell(o["module"])
               + _cell(o.get("ms_at_p50")) + _cell(o["median_us"], ".3g") + _cell(o["calls_per_run"], ".3g")
               for o in ops.get("ops", [])]
    by_module_ms = ops.get("by_module_ms") or {}
    counts: dict[str, int] = {}
    for o in ops.get("ops", []):
        counts[o["module"]] = counts.get(o["module"], 0) + 1
    module_rows = [_cell(m) + _cell(by_module_ms.get(m)) + _cell(100 * share, ".1f") + _cell(counts.get(m, 0), "d")
                   for m, share in (ops.get("by_module") or {}).items()]
    coverage = ops.get("module_coverage")
    summary = (f"{profile['plot_name']}: {len(op_rows)} ops ({ops['backend']} profiler, {ops['runs']} runs, medians"
               + (f"; {coverage:.0%} of op time traced to an nn.Module" if coverage is not None else "") + ")")
    return (f"<details><summary>{html.escape(summary)}</summary>"
            + _table(["node", "op type", "category", "module", "ms at p50" if scaled else "ms", "median µs",
                      "calls/run"], op_rows)
            + _table(["module", "ms at p50" if scaled else "ms", "share %", "ops"], module_rows) + "</details>")


# --- the page -------------------------------------------------------------------------------

def _encodable(value):
    """`value` with every string made encodable as UTF-8 ("?" for lone surrogates, which JSON
    allows and font rendering does not)."""
    if isinstance(value, str):
        return value.encode("utf-8", errors="replace").decode("utf-8")
    if isinstance(value, list):
        return [_encodable(v) for v in value]
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    return value


def _device_points(profiles: list[dict], estimates: list[dict], artifacts: list[dict]) -> dict[str, list[dict]]:
    """{model: points} for the device plot: each profile on the row of the machine that measured
    it, each estimate on its device's row, variants named from the profiles and artifact records."""
    models = _model_names(profiles)
    names = {Path(a["path"]).name: (models.get(a.get("source_sha256"), a["model"]), a["variant"]) for a in artifacts}
    for p in profiles:
        variant = p.get("variant") or {}
        names[Path(p["artifact"]).name] = (variant.get("model") or _name(p), variant.get("variant") or p["backend"])
    by_model: dict[str, list[dict]] = {}
    for p in profiles:
        model, variant = names[Path(p["artifact"]).name]
        energy = p["energy"]["net_mj_per_inference"] if p["energy"]["available"] else None
        by_model.setdefault(model, []).append({"device": f"{p['machine']} (measured)", "variant": variant,
                                               "measured": True, "latency_ms": p["latency"]["p50"],
                                               "energy_mj": energy})
    for e in estimates:
        model, variant = names.get(Path(e["artifact"]).name, (Path(e["artifact"]).stem, Path(e["artifact"]).stem))
        by_model.setdefault(model, []).append({"device": f"{e['device']} (est.)", "variant": variant, "measured": False,
                                               "latency_ms": e["latency_ms"], "energy_mj": net_estimate(e)})
    return by_model


def _with_machines(profiles: list[dict]) -> list[dict]:
    """The profiles, grouped by the machine that measured them (in order of first appearance),
    each with its `machine` name and the `plot_name` plots give it: the profile's name, and its
    machine where there are several (a plot has no machine column to tell them apart)."""
    names = machine_names(profiles)
    order = list(dict.fromkeys(names))
    several = len(order) > 1
    marked = [{**p, "machine": machine, "plot_name": f"{_name(p)} on {machine}" if several else _name(p)}
              for p, machine in zip(profiles, names)]
    return sorted(marked, key=lambda p: order.index(p["machine"]))


def environments_section(profiles: list[dict]) -> str:
    """Every machine's environment, with the profiles measured in it; a machine whose profiles
    differ in threads or package versions shows each environment they were measured in."""
    groups: dict[tuple[str, str], list[str]] = {}
    for p in profiles:
        groups.setdefault((p["machine"], json.dumps(p["environment"], indent=2)), []).append(_name(p))
    return "".join(f"<p class='legend'>{html.escape(machine)}: measured {html.escape(', '.join(names))}</p>"
                   f"<pre>{html.escape(environment)}</pre>" for (machine, environment), names in groups.items())


def render_html(profiles: list[dict], estimates: list[dict], artifacts: list[dict] | None = None,
                title: str = "edgeport report") -> str:
    """A self-contained HTML page from profile and estimate dicts (their JSON form) and artifact
    records (`{"path", "model", "variant", "format", "size_mb", "note"}`, from sidecars).

    Sections: variant comparison (table and accuracy/latency plot), devices (plot per model,
    estimates table), where the time goes (categories plot, per-op and per-module tables),
    measured latency (table, throughput plot, histograms), the environment of each machine.
    """
    profiles, estimates, artifacts = _encodable([profiles, estimates, artifacts or []])
    profiles = _with_machines(profiles)
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p class='legend'>Each measured figure names the machine it was measured on (each machine's "
             "environment is at the end); figures marked <span class='est'>like this</span> and hollow markers are "
             "roofline estimates (never measurements). Click a column heading to sort.</p>"]
    rows = variant_rows(profiles, estimates, artifacts)
    if rows:
        parts += ["<h2>Variants compared</h2>", variants_table(rows)]
        tradeoff = [r for r in rows if r["accuracy_percent"] is not None and r["p50_ms"]]
        if tradeoff:
            parts.append(tradeoff_plot(tradeoff, "plot-tradeoff"))
    by_model = _device_points(profiles, estimates, artifacts)
    if by_model:
        parts.append("<h2>Latency and energy across devices and variants</h2>")
        parts += [devices_plot(model, points, f"plot-devices-{index}") for index, (model, points)
                  in enumerate(by_model.items())]
        if estimates:
            parts += ["<details><summary>Every estimate, with the dims it used and the confidence of the device "
                      "figures</summary>", estimates_table(estimates), "</details>"]
    profiled = [p for p in profiles if p.get("ops")]
    if profiled:
        parts.append("<h2>Where the time goes</h2>")
        bars = [(p["plot_name"], p["ops"].get("by_category_ms") or {k: v * p["latency"]["p50"]
                                                                    for k, v in p["ops"]["by_category"].items()},
                 p["latency"]["p50"] * (1 - (p["ops"].get("in_ops_fraction") or 1.0))) for p in profiled]
        parts.append(categories_plot(bars, "plot-categories"))
        parts += [ops_tables(p) for p in profiled]
    if profiles:
        parts += ["<h2>Measured latency, throughput, memory and energy</h2>", measured_table(profiles)]
        several = [p for p in profiles if len(p.get("throughput_per_s", {})) > 1]
        if several:
            parts.append(throughput_plot(several, "plot-throughput"))
        parts.append("<div>" + "".join(histogram_plot(p["latency"]["samples_ms"], f"{p['plot_name']} "
                                                      f"({p['backend']})", f"plot-latency-{i}")
                                       for i, p in enumerate(profiles)) + "</div>")
        parts += ["<h2>Environment</h2>", environments_section(profiles)]
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            f"<meta name='viewport' content='width=device-width'>{GENERATOR_TAG}<title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}<script>{SORT_SCRIPT}</script></body></html>")
