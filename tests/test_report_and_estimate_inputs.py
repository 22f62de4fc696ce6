"""Untrusted inputs to `report` and `estimate`: hostile strings render as text, malformed JSON,
impossible figures and broken ONNX files are refused with a UserError naming the file, nothing is
left half-written, and a folder of profiles from several machines is reported machine by machine."""
import copy
import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import edgeport as ep
from edgeport.cli import main
from edgeport.devices.estimate import estimate
from edgeport.errors import UserError
from edgeport.runtime.page import SORT_SCRIPT
from edgeport.runtime.page import machine_names
from edgeport.runtime.report import SCHEMA, load_reports, write_html

# The last one is also mathtext to matplotlib unless it is switched off.
HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "</svg><script>alert(2)</script>",
           "'><svg onload=alert(3)>", r"$\frac{1}{0}$ <b>bold</b> \\"]
# Every tag the page writes itself (matplotlib's SVG included, and the one sorting script);
# a hostile string that became markup would add another.
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "table", "caption", "thead", "tbody", "tr",
             "th", "td", "div", "p", "span", "pre", "details", "summary", "figure", "figcaption", "script", "svg", "g",
             "defs", "path", "clippath", "use", "rect", "text"}


@pytest.fixture(scope="module")
def profile_dict(tmp_path_factory) -> dict:
    """A real profile of the zoo's CNN, with the op breakdown and the host estimate, as
    `edgeport profile -o` writes it."""
    out = tmp_path_factory.mktemp("artifacts")
    artifact = ep.export("cnn-digits", out=out)["onnx"]
    saved = out / "cnn.profile.json"
    assert main(["profile", str(artifact.path), "--runs", "20", "--warmup", "2", "--no-energy", "-o", str(saved)]) == 0
    return json.loads(saved.read_text())


@pytest.fixture(scope="module")
def estimate_dict(profile_dict) -> dict:
    """An estimate as `estimate --json` writes it (no per-node list)."""
    return {k: v for k, v in profile_dict["estimate"].items() if k != "nodes"}


def poisoned(value):
    """`value` with every string in it replaced by a hostile one (which one varies with its length)."""
    if isinstance(value, str):
        return HOSTILE[len(value) % len(HOSTILE)]
    if isinstance(value, list):
        return [poisoned(v) for v in value]
    if isinstance(value, dict):
        return {k: poisoned(v) for k, v in value.items()}
    return value


def poisoned_profile(profile: dict) -> dict:
    """A profile with hostile strings everywhere, also as the keys of its free-form maps, with
    every hostile string in the fields shown in full and energy shown as measured (for the plot)."""
    data = poisoned(copy.deepcopy(profile))
    data["schema"] = SCHEMA  # the strings that must stay: they mark the file as a profile with an estimate
    data["estimate"]["provenance"] = "estimated:roofline"
    data["label"] = HOSTILE[0]
    data["environment"] = {hostile: hostile for hostile in HOSTILE}
    data["ops"]["by_category"] = {hostile: 1.0 / len(HOSTILE) for hostile in HOSTILE}
    data["latency"]["valid"], data["latency"]["problems"] = False, HOSTILE
    data["energy"] = {**data["energy"], "available": True, "net_mj_per_inference": 1.5,
                      "provenance": "measured:" + HOSTILE[1]}  # a measurement names its meter
    return data


class TagCollector(HTMLParser):
    """The tags, attribute names and text a browser's parser would see."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attributes, self.text = set(), set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes |= {name for name, _ in attrs}

    def handle_data(self, data):
        self.text.append(data)


def test_hostile_strings_in_every_field_render_as_text(profile_dict, estimate_dict, tmp_path):
    unlabelled = {**poisoned_profile(profile_dict), "label": "", "artifact": f"models/{HOSTILE[2]}"}
    (tmp_path / "hostile.profile.json").write_text(json.dumps(poisoned_profile(profile_dict)))
    (tmp_path / "unlabelled.profile.json").write_text(json.dumps(unlabelled))
    (tmp_path / "estimates.json").write_text(json.dumps([poisoned(copy.deepcopy(estimate_dict))
                                                         | {"provenance": "estimated:roofline"}]))
    (tmp_path / "summary.json").write_text(json.dumps({"note": HOSTILE[0]}))  # not a report file: skipped
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()

    parsed = TagCollector()
    parsed.feed(page)
    assert parsed.tags <= PAGE_TAGS, parsed.tags - PAGE_TAGS
    assert not any(name.startswith("on") for name in parsed.attributes)
    assert page.lower().count("<script") == 1 and f"<script>{SORT_SCRIPT}</script>" in page
    assert "<img" not in page.lower()
    text = "".join(parsed.text)
    for hostile in HOSTILE:
        assert hostile not in page
        assert html.escape(hostile) in page and hostile in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["estimates.json", "hostile.profile.json", "report.html",
                                                         "summary.json", "unlabelled.profile.json"]


class TableCollector(HTMLParser):
    """Every table on a page as a list of rows, each row a {heading: cell text} dict."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: list[list[list[str]]] = []  # per table, per row, the cells' texts
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.rows.append([])
        elif tag == "tr":
            self.rows[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def tables(self) -> list[list[dict[str, str]]]:
        return [[dict(zip(rows[0], row)) for row in rows[1:]] for rows in self.rows]


def page_tables(page: str) -> dict[str, list[dict[str, str]]]:
    """The variants table and the measured table of a report page."""
    collector = TableCollector()
    collector.feed(page)
    tables = collector.tables()
    return {"variants": next(t for t in tables if "p50 ms (measured)" in t[0]),
            "measured": next(t for t in tables if "95% CI of p50" in t[0])}


def as_measured_on_an_orin(profile: dict) -> dict:
    """The profile as a Jetson Orin's own run would have written it: its environment, four times
    the latency, a meter's energy, and the host estimate that run made for the Orin."""
    data = copy.deepcopy(profile)
    data["environment"].update(cpu="ARMv8 Processor rev 1 (v8l) Cortex-A78AE", logical_cpus=6, threads=6,
                               platform="Linux-5.15.148-tegra-aarch64-with-glibc2.35", gpu="Orin (nvgpu)")
    latency = data["latency"]
    latency["samples_ms"] = [sample * 4 for sample in latency["samples_ms"]]
    latency["median_ci95"] = [bound * 4 for bound in latency["median_ci95"]]
    for key in ("p50", "p90", "p99"):
        latency[key] *= 4
    data["energy"] = {"available": True, "provenance": "measured:jetson-ina3221", "net_mj_per_inference": 0.5,
                      "gross_mj_per_inference": 0.7, "idle_w": 3.0, "idle_subtracted": True, "window_s": 2.0,
                      "inferences": 1000, "reasons": []}
    data["estimate"]["latency_ms"] *= 3
    return data


def test_profiles_from_two_machines_are_reported_machine_by_machine(profile_dict, tmp_path, capsys):
    other_threads = copy.deepcopy(profile_dict)  # the same machine, another setting: grouped with it
    other_threads["environment"]["threads"] = profile_dict["environment"]["threads"] + 1
    orin = as_measured_on_an_orin(profile_dict)
    for name, data in (("cnn.profile.json", profile_dict), ("cnn.more-threads.profile.json", other_threads),
                       ("cnn.orin.profile.json", orin)):
        (tmp_path / name).write_text(json.dumps(data, indent=1))
    assert main(["report", str(tmp_path)]) == 0
    assert "(3 profiles from 2 machines, 0 estimates" in capsys.readouterr().out
    here, there = machine_names([profile_dict, orin])
    assert machine_names([other_threads]) == [here]
    assert there == "ARMv8 Processor rev 1 (v8l) Cortex-A78AE, 6 CPUs, Orin (nvgpu)"
    page = (tmp_path / "report.html").read_text()
    assert "this machine" not in page

    tables = page_tables(page)
    for table in tables.values():  # every measured row names its machine, one machine's rows together
        assert [row["machine"] for row in table] == [here, here, there]
    orin_row = tables["variants"][2]
    p50, estimate = orin["latency"]["p50"], orin["estimate"]["latency_ms"]
    assert orin_row["p50 ms (measured)"] == f"{p50:.4g}" and orin_row["net energy mJ"] == "0.5"
    assert orin_row["host estimate ms"] == f"{estimate:.4g}"  # the Orin's own, not this machine's
    assert orin_row["estimate / measured"] == f"{estimate / p50:.2f}"
    assert tables["variants"][0]["host estimate ms"] == f"{profile_dict['estimate']['latency_ms']:.4g}"
    assert tables["measured"][2]["energy"] == "0.5 mJ net (measured:jetson-ina3221)"

    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    devices = html.unescape(re.search(r'<figure class="plot" id="plot-devices-0">.*?</figure>', page, re.S)[0])
    assert f"{here} (measured)" in devices and f"{there} (measured)" in devices  # a row each
    assert f" on {there}" in text and f" on {here}" in text  # the other plots name the machine too
    # every environment, under its machine: this one's twice (two thread counts), the Orin's once
    assert text.count(f"{here}: measured") == 2 and text.count(f"{there}: measured") == 1
    assert "Cortex-A78AE" in text and json.dumps(profile_dict["environment"]["platform"]) in text


def test_an_estimate_file_is_not_paired_with_a_measurement(profile_dict, estimate_dict, tmp_path):
    """Which machine "host" was in an estimate file is not recorded: a profile's own estimate
    (same run, same machine) is the only one set beside its measurement."""
    (tmp_path / "cnn.profile.json").write_text(json.dumps({**profile_dict, "estimate": None}))
    (tmp_path / "cnn.estimate.json").write_text(json.dumps(estimate_dict))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    row = page_tables(page)["variants"][0]
    assert row["host estimate ms"] == "—" and row["estimate / measured"] == "—"
    assert f"{estimate_dict['latency_ms']:.4g}" in page  # still shown, as an estimate of its own


def test_text_utf8_cannot_hold_is_replaced_not_a_crash(profile_dict, tmp_path):
    (tmp_path / "surrogate.profile.json").write_text(json.dumps({**profile_dict, "label": "half \ud800 a pair"}))
    assert main(["report", str(tmp_path)]) == 0
    assert "half ? a pair" in (tmp_path / "report.html").read_text(encoding="utf-8")


def valid_profile(profile: dict, **changes) -> str:
    """The profile as JSON with `changes` made: `a__b=value` sets data["a"]["b"], `=KeyError` deletes it."""
    data = copy.deepcopy(profile)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = data
        for parent in parents:
            target = target[parent]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
    return json.dumps(data)


LATENCY = "a number of milliseconds between a nanosecond (1e-06) and a day"
BATCH = "a whole number from 1 to 999,999,999 (a batch size)"
MALFORMED = {  # file name -> (what it holds, given the real profile and estimate; what the message names)
    "broken.profile.json": (lambda p, e: '{"schema": "edgeport.profile/2", ', "not valid JSON"),
    "list.profile.json": (lambda p, e: json.dumps([p]), "should be an object, not a list"),
    "number.profile.json": (lambda p, e: "42", "should be an object, not a number"),
    "no-latency.profile.json": (lambda p, e: valid_profile(p, latency=KeyError), "no 'latency'"),
    "no-schema.profile.json": (lambda p, e: valid_profile(p, schema=KeyError), "no 'schema'"),
    "other-schema.profile.json": (lambda p, e: valid_profile(p, schema="edgeport.profile/9"), SCHEMA),
    "nan-string.profile.json": (lambda p, e: valid_profile(p, latency__p50="NaN"),
                                f"latency.p50 should be {LATENCY}, not a string"),
    "nan-literal.profile.json": (lambda p, e: valid_profile(p, latency__samples_ms=[1.0, float("nan")]),
                                 f"latency.samples_ms[1] should be {LATENCY}, not NaN"),
    "no-samples.profile.json": (lambda p, e: valid_profile(p, latency__samples_ms=[]), "at least 1"),
    "label-number.profile.json": (lambda p, e: valid_profile(p, label=7), "label should be a string"),
    "ci-triple.profile.json": (lambda p, e: valid_profile(p, latency__median_ci95=[1, 2, 3]), "2 items"),
    "ops-text.profile.json": (lambda p, e: valid_profile(p, ops__by_category={"conv": "most"}), "by_category"),
    "op-without-median.profile.json": (lambda p, e: valid_profile(p, ops__ops=[{"name": "conv"}]),
                                       "ops.ops[0] has no 'op_type'"),
    "memory-text.profile.json": (lambda p, e: valid_profile(p, memory__loaded_mb="lots"),
                                 "memory.loaded_mb should be a finite number"),
    "old-schema.profile.json": (lambda p, e: valid_profile(p, schema="edgeport.profile/1"), SCHEMA),
    "sidecar.edgeport.json": (lambda p, e: json.dumps({"path": "m.onnx", "format": "onnx"}), "no 'precision'"),
    "energy-without-figure.profile.json": (lambda p, e: valid_profile(p, energy__available=True), "available"),
    "negative-p50.profile.json": (lambda p, e: valid_profile(p, latency__p50=-1),
                                  f"latency.p50 should be {LATENCY}, not -1"),
    # figures that cannot be: each one named, where the page used to show them or crash on them
    "batch-word.profile.json": (lambda p, e: valid_profile(p, throughput_per_s={"abc": 5.0}),
                                f"throughput_per_s has a key that is not {BATCH}"),
    "batch-zero.profile.json": (lambda p, e: valid_profile(p, throughput_per_s={"-1": 5.0, "0": 3.0}),
                                f"throughput_per_s has a key that is not {BATCH}"),
    "skipped-batch-word.profile.json": (lambda p, e: valid_profile(p, throughput_skipped={"eight": "too big"}),
                                        f"throughput_skipped has a key that is not {BATCH}"),
    "negative-throughput.profile.json": (lambda p, e: valid_profile(p, throughput_per_s={"1": -5.0}),
                                         "throughput_per_s has a value that is -5, not a positive finite number"),
    "huge-samples.profile.json": (lambda p, e: valid_profile(p, latency__samples_ms=[1e308] * 10),
                                  f"latency.samples_ms[0] should be {LATENCY}, not 1e+308"),
    "tiny-p50.profile.json": (lambda p, e: valid_profile(p, latency__p50=1e-320), f"latency.p50 should be {LATENCY}"),
    "integer-beyond-float.profile.json": (lambda p, e: valid_profile(p, latency__p90=10 ** 400),
                                          f"latency.p90 should be {LATENCY}, not a number"),
    "negative-energy.profile.json": (
        lambda p, e: valid_profile(p, energy__available=True, energy__provenance="measured:rapl",
                                   energy__net_mj_per_inference=-5.0),
        "energy.net_mj_per_inference should be a positive number of millijoules, under a megajoule, not -5"),
    "reversed-interval.profile.json": (lambda p, e: valid_profile(p, latency__median_ci95=[5.0, 3.0]),
                                       "latency.median_ci95 should run from low to high, not from 5 down to 3"),
    "negative-interval.profile.json": (lambda p, e: valid_profile(p, latency__median_ci95=[5.0, -3.0]),
                                       f"latency.median_ci95[1] should be {LATENCY}, not -3"),
    "p99-below-p50.profile.json": (lambda p, e: valid_profile(p, latency__p99=p["latency"]["p50"] / 2),
                                   "latency.p50, p90 and p99 should be in rising order"),
    "accuracy-huge.profile.json": (lambda p, e: valid_profile(p, variant__accuracy_percent=1e300),
                                   "variant.accuracy_percent should be a percentage from 0 to 100, not 1e+300"),
    "negative-op-share.profile.json": (lambda p, e: valid_profile(p, ops__by_category={"conv": -1}),
                                       "ops.by_category has a value that is -1, not a finite number, 0 or more"),
    "negative-own-estimate.profile.json": (lambda p, e: valid_profile(p, estimate__latency_ms=-1),
                                           f"estimate.latency_ms should be {LATENCY}, not -1"),
    "negative-latency.estimate.json": (lambda p, e: json.dumps([{**e, "latency_ms": -1}]),
                                       f"[0].latency_ms should be {LATENCY}, not -1"),
    "free-energy.estimate.json": (lambda p, e: json.dumps({**e, "energy_mj": 0}),
                                  "energy_mj should be a positive number of millijoules, under a megajoule, not 0"),
    "estimate-as-measured.profile.json": (
        lambda p, e: valid_profile(p, energy__available=True, energy__provenance="estimated:tdp",
                                   energy__net_mj_per_inference=4.0), "should name a meter"),
    "claims-schema.json": (lambda p, e: valid_profile(p, backend=None), "backend should be a string, not null"),
    "bad-item.json": (lambda p, e: json.dumps([e, "not an estimate"]), "[1] should be an object"),
    "macs-text.estimate.json": (lambda p, e: json.dumps({**e, "macs": "many"}), "macs should be a finite number"),
    "no-provenance.estimate.json": (lambda p, e: json.dumps({k: v for k, v in e.items() if k != "provenance"}),
                                    "no 'provenance'"),
    "deep.profile.json": (lambda p, e: "[" * 100_000 + "]" * 100_000, "not valid JSON"),
}


def error_lines(stderr: str) -> list[str]:
    """What a command printed on stderr, less the progress lines a slow machine adds ("... reading")."""
    return [line for line in stderr.splitlines() if not line.startswith("... ")]


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_report_json_is_a_user_error_naming_the_file(profile_dict, estimate_dict, tmp_path, name, capsys):
    content, message = MALFORMED[name]
    (tmp_path / "good.profile.json").write_text(json.dumps(profile_dict))
    (tmp_path / name).write_text(content(profile_dict, estimate_dict))
    with pytest.raises(UserError, match=re.escape(name)) as raised:
        load_reports(tmp_path)
    assert message in str(raised.value)
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {raised.value}"]  # one line, no traceback
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("make_input", [lambda folder: folder / "nosuchdir",
                                        lambda folder: folder / "notes.txt"], ids=["missing", "a file"])
def test_report_of_what_is_no_folder_says_so_not_where_it_would_write(tmp_path, capsys, make_input):
    (tmp_path / "notes.txt").write_text("my notes\n")
    given = make_input(tmp_path)
    assert main(["report", str(given)]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {given} is not a folder of profiles"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


def test_undecodable_and_unreadable_report_files_are_user_errors(profile_dict, tmp_path):
    (tmp_path / "binary.profile.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="binary.profile.json is not valid JSON"):
        load_reports(tmp_path)
    (tmp_path / "binary.profile.json").unlink()
    (tmp_path / "folder.profile.json").mkdir()
    with pytest.raises(UserError, match="cannot read .*folder.profile.json"):
        load_reports(tmp_path)


def test_html_into_a_missing_folder_or_onto_a_folder_is_a_user_error(profile_dict, tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "cnn.profile.json").write_text(json.dumps(profile_dict))
    missing = tmp_path / "no-such-folder"
    assert main(["report", str(reports), "--html", str(missing / "report.html")]) == 2
    with pytest.raises(UserError, match=re.escape(f"folder {missing} does not exist")):
        write_html(missing / "report.html", *load_reports(reports))
    assert not missing.exists()
    (tmp_path / "taken.html").mkdir()
    with pytest.raises(UserError, match="taken.html"):
        write_html(tmp_path / "taken.html", *load_reports(reports))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports", "taken.html"]  # no temporary file left
    assert main(["report", str(reports), "--html", str(tmp_path / "report.html")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "reports", "taken.html"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.onnx", b"", "is empty (0 bytes)"),
    ("garbage.onnx", b"this is not a protobuf \x00\xff\x13", "cannot read"),
    ("no-graph.onnx", b"\x08\x07", "holds no ONNX graph"),  # parses as a ModelProto with only ir_version
])
def test_estimate_refuses_unreadable_onnx(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(name)) as raised:
        estimate(path, "host")
    assert message in str(raised.value)
    assert main(["estimate", str(path)]) == 2


def graph_with_ops_the_estimator_lacks(path: Path) -> Path:
    """x -> Relu -> Hardmax -> com.example.Frobnicate -> com.example.Frobnicate -> y, where shape
    inference knows nothing of Frobnicate: the first one's output shape stays unknown."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Hardmax", ["a"], ["b"]),
             helper.make_node("Frobnicate", ["b"], ["c"], domain="com.example"),
             helper.make_node("Frobnicate", ["c"], ["y"], domain="com.example")]
    graph = helper.make_graph(nodes, "unknown-ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(path))
    return path


def test_estimate_names_ops_it_has_no_cost_model_for(tmp_path, profile_dict):
    result = estimate(graph_with_ops_the_estimator_lacks(tmp_path / "odd.onnx"), "host")
    gaps = [line for line in result.assumptions if "no cost model" in line or "shape unknown" in line]
    assert len(gaps) == 2
    assert "Hardmax x1" in gaps[0] and "com.example.Frobnicate x2" in gaps[0] and "Relu" not in gaps[0]
    assert "com.example.Frobnicate x1" in gaps[1] and "priced at zero" in gaps[1] and "Hardmax" not in gaps[1]
    assert json.loads(json.dumps(result.to_dict()))["assumptions"] == result.assumptions
    zoo_assumptions = profile_dict["estimate"]["assumptions"]
    assert not any("no cost model" in line or "shape unknown" in line for line in zoo_assumptions)
