"""Untrusted inputs to `report` and `estimate`: hostile strings render as text, malformed JSON and
broken ONNX files are refused with a UserError naming the file, and nothing is left half-written."""
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
    """A real profile of the zoo's CNN, with the op breakdown and the host estimate, as saved JSON."""
    out = tmp_path_factory.mktemp("artifacts")
    artifact = ep.export("cnn-digits", out=out)["onnx"]
    prof = ep.profile(artifact.path, runs=20, warmup=2, sessions=2, energy=False)
    return json.loads(prof.save(out / "cnn.profile.json").read_text())


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


MALFORMED = {  # file name -> (what it holds, given the real profile and estimate; what the message names)
    "broken.profile.json": (lambda p, e: '{"schema": "edgeport.profile/2", ', "not valid JSON"),
    "list.profile.json": (lambda p, e: json.dumps([p]), "should be an object, not a list"),
    "number.profile.json": (lambda p, e: "42", "should be an object, not a number"),
    "no-latency.profile.json": (lambda p, e: valid_profile(p, latency=KeyError), "no 'latency'"),
    "no-schema.profile.json": (lambda p, e: valid_profile(p, schema=KeyError), "no 'schema'"),
    "other-schema.profile.json": (lambda p, e: valid_profile(p, schema="edgeport.profile/9"), SCHEMA),
    "nan-string.profile.json": (lambda p, e: valid_profile(p, latency__p50="NaN"),
                                "latency.p50 should be a positive finite number, not a string"),
    "nan-literal.profile.json": (lambda p, e: valid_profile(p, latency__samples_ms=[1.0, float("nan")]),
                                 "latency.samples_ms[1] should be a positive finite number, not NaN"),
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
                                  "latency.p50 should be a positive finite number"),
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


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_report_json_is_a_user_error_naming_the_file(profile_dict, estimate_dict, tmp_path, name):
    content, message = MALFORMED[name]
    (tmp_path / "good.profile.json").write_text(json.dumps(profile_dict))
    (tmp_path / name).write_text(content(profile_dict, estimate_dict))
    with pytest.raises(UserError, match=re.escape(name)) as raised:
        load_reports(tmp_path)
    assert message in str(raised.value)
    assert main(["report", str(tmp_path)]) == 2
    assert not (tmp_path / "report.html").exists()


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
