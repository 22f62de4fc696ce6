"""Fleet runs: one sweep in this process, the same on a real local Ray cluster, nodes killed mid-sweep.

The cluster is real (`edgeport.fleet.localcluster`): a head and two worker nodes, each started
by `edgeport fleet join --block` as a process group of its own, each worker advertising a
different device, one CPU and a 100 MiB object store each; later tests join more nodes. The
finalizer kills exactly those processes, never every Ray process of the machine.
"""
import copy
import json
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

import edgeport as ep
from edgeport.cli import main
from edgeport.errors import CheckFailed, UserError
from edgeport.fleet.cluster import cluster_nodes
from edgeport.fleet.jobs import ArtifactBundle, materialize
from edgeport.devices.catalog import identity_mismatch
from edgeport.fleet.localcluster import LocalCluster, free_port
from edgeport.fleet.plan import EXPORT, MEASURE, Job, make_plan, parse_variant, resolve_models
from edgeport.fleet.report import SWEEP_TAG
from edgeport.fleet.results import Results
from edgeport.fleet.sweep import profile_settings

# Ray clusters and Ctrl-C'd subprocesses, timed: alone, after the parallel pass (`make test`). Under
# four busy processes on two cores, one Ctrl-C'd sweep printed "interrupted" and still ended by SIGINT
pytestmark = pytest.mark.serial

MODELS = ["cnn-digits", "cnn-digits-pruned"]  # the two cheapest zoo models to export
VARIANTS = ["fp32", "repq-w8a8"]
DEVICES = ["jetson-orin-nano", "raspberry-pi-5"]
QUICK_PROFILE = {"runs": 20, "warmup": 2, "sessions": 2, "ops": False}


def edgeport_command(*args: str, **popen) -> subprocess.Popen:
    # a shell starts a background job with SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored: the Ctrl-C below would then never reach a suite run as `make test &`
    return subprocess.Popen([sys.executable, "-m", "edgeport", *args],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes, one per device; this process is the driver."""
    from edgeport.fleet.cluster import connect, require_ray

    local = LocalCluster(num_cpus=1, object_store_bytes=100 * 2 ** 20)
    try:
        local.start_head()
        for name, device in zip(("jetson", "pi"), DEVICES):
            local.join(name, device)
        connect(local.address)
        local.wait_for(set(DEVICES))
        yield local
    finally:
        require_ray().shutdown()
        local.stop()


class ReportStructure(HTMLParser):
    """A report's skeleton: its headings, every table's header row, and the (model, variant)
    that label each row about a model. Rows about nodes and failures are left out: which exist
    depends on where the sweep ran."""

    def __init__(self, page: str):
        super().__init__()
        self.skeleton: list[tuple] = []
        self._tag, self._cells, self._header = "", [], False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "tr":
            self._cells, self._header = [], False
        self._header |= tag == "th"

    def handle_endtag(self, tag):
        if tag == "tr" and self._header:
            self.skeleton.append(("header", tuple(self._cells)))
        elif tag == "tr" and self._cells[:1] and self._cells[0] in MODELS:
            self.skeleton.append(("row", tuple(self._cells[:2])))

    def handle_data(self, data):
        if self._tag in ("h1", "h2"):
            self.skeleton.append((self._tag, data))
        elif self._tag in ("th", "td"):
            self._cells.append(data)
        self._tag = ""


def index_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> Path:
    """`edgeport sweep` without --cluster, interrupted with Ctrl-C after its first jobs, then run
    again to the end: the results folder."""
    out = tmp_path_factory.mktemp("in-process") / "sweep"
    args = ["sweep", *MODELS, "--variants", ",".join(VARIANTS), "--devices", ",".join(DEVICES), "-o", str(out),
            "--runs", "20", "--sessions", "2", "--no-ops"]
    first = edgeport_command(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "index.jsonl").is_file() or len(index_lines(out)) < 3:
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130 and "interrupted (SIGINT)" in stderr, stderr
    interrupted = index_lines(out)
    for entry in interrupted:  # every line whole, every file it names there and whole
        assert json.loads((out / entry["file"]).read_text())["key"] == entry["key"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".edgeport-staging-" in p.name]
    again = subprocess.run([sys.executable, "-m", "edgeport", *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"{12 - len(interrupted)} jobs run" in again.stdout
    assert "done export cnn-digits" in again.stderr or "done export cnn-digits-pruned" in again.stderr
    return out


def test_bad_sweeps_fail_in_one_line_before_any_job(tmp_path, capsys):
    cases = [(["sweep", "cnn-digits", "--variants", "repq-w9a8"], "bit"),
             (["sweep", "cnn-digits", "--variants", "int3"], "unknown variant 'int3'"),
             (["sweep", "cnn-digits", "--devices", "jetson-orin-nan"], "did you mean jetson-orin-nano"),
             (["sweep", "cnn-digits", "--devices", "Bad Name"], "is not plain"),
             (["sweep", "cnn-digits", "--to", "onx"], "did you mean onnx"),
             (["sweep", "cnn-digits", "--threads", "100000"], "threads must be from 1 to"),
             (["sweep", "cnn-digits", "--min-duration", "inf"], "minimum duration of a profile is from 0 to 3600"),
             (["sweep", "cnn-digits", "--min-duration", "1e308"], "minimum duration of a profile is from 0 to 3600"),
             (["sweep", "cnn-digits", "--cluster", "not an address"], "is not HOST:PORT"),
             (["sweep", "cnn-digits", "--cluster", f"127.0.0.1:{free_port()}"], "cannot reach a Ray cluster"),
             (["fleet", "join", "--device", "jetson-orin-nano"], "--address HEAD:PORT"),
             (["fleet", "join", "--head", "--device", "host"], "'host' names the machine"),
             (["fleet", "join", "--head", "--units", "2"], "needs --device")]
    for args, message in cases:
        assert main([*args, "-o", str(tmp_path / "out")] if args[0] == "sweep" else args) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "out").exists()


OWN_MODELS = """
import torch
from torch import nn


def tiny():
    torch.manual_seed(0)  # the same weights at every load: a rerun finds its jobs by the model's sha256
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


def tiny2():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))
"""


@pytest.fixture
def own_models(tmp_path, monkeypatch) -> Path:
    """`mods:tiny` and `mods:tiny2`, two factories of one class (nn.Sequential), found in the
    current folder as a user's would be, and `calib.npz`, 32 samples for both."""
    import numpy as np

    (tmp_path / "mods.py").write_text(OWN_MODELS)
    np.savez(tmp_path / "calib.npz", np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype("float32"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_sweeps_of_own_models_that_could_not_finish_fail_before_any_job(own_models, capsys):
    cases = [(["mods:tiny"], "tiny needs an example input"),
             (["mods:tiny", "--input", "1x3x8x8", "--variants", "fp32,repq-w8a8"],
              "repq-w8a8 of tiny needs calibration data"),
             (["mods:tiny", "--input", "1x3x8x8", "--variants", "repq-w8a8", "--calib", "missing.npz"], "missing.npz")]
    for args, message in cases:
        assert main(["sweep", *args, "-o", "out"]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (own_models / "out").exists()
    model = ep.load_model("mods:tiny")
    with pytest.raises(UserError, match="are the same model"):  # one model's jobs under two names
        ep.sweep([model, copy.deepcopy(model)], out=own_models / "out", example=["1x3x8x8"])
    sources = resolve_models(["mods:tiny", "mods:tiny2", "mods:tiny", "cnn-digits"])
    assert [s.label for s in sources] == ["tiny", "tiny2", "cnn-digits"]  # named by factory, each once


def test_a_folder_the_sweep_did_not_write_is_left_as_it_was(tmp_path, capsys):
    notes, index = tmp_path / "notes", tmp_path / "index"
    notes.mkdir()
    (notes / "report.html").write_text("<html>our own notes</html>")
    index.mkdir()
    (index / "index.jsonl").write_text('{"mine": 1}\n')
    for out, message in ((notes, "refusing to overwrite"), (index, "malformed index")):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert main(["sweep", "cnn-digits", "-o", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no jobs/ or artifacts/ left behind


def test_a_measurement_is_keyed_by_its_profile_settings():
    sources = resolve_models(["cnn-digits"])
    variants, settings = [parse_variant("fp32")], profile_settings(20, 2, 2, 0.0, None, False, True)

    def keys(**changed) -> dict[str, str]:
        plan = make_plan(sources, variants, ["onnx"], ["host", "jetson-orin-nano"], {"host"}, False,
                         settings | changed)
        return {job.kind: job.key for job in plan.jobs}

    assert keys() == keys(runs=20)
    assert keys(runs=2000)[MEASURE] != keys()[MEASURE] and keys(threads=1)[MEASURE] != keys()[MEASURE]
    assert {kind: key for kind, key in keys(runs=2000).items() if kind != MEASURE} == \
        {kind: key for kind, key in keys().items() if kind != MEASURE}  # the export and estimate stand


def test_a_sweep_of_zoo_and_own_models_names_each_and_says_how_it_measured(own_models, capsys):
    """A zoo model keeps its own example beside --input; two factories of one class keep their
    names; a model named twice runs once; quantized variants of the own models calibrate on
    --calib; each cell says its runs and threads, and why it is not valid (20 runs are too few
    for a p99); other settings measure again, and the page says which."""
    args = ["sweep", "cnn-digits", "mods:tiny", "mods:tiny2", "cnn-digits", "--input", "1x3x8x8", "--calib",
            "calib.npz", "--variants", "fp32,repq-w8a8", "-o", "out", "--sessions", "1", "--no-ops", "--json"]
    assert main([*args, "--runs", "20"]) == 0, capsys.readouterr().err
    first = json.loads(capsys.readouterr().out)
    assert first["jobs_run"] == 12 and first["counts"]["export"]["done"] == 6
    page = (own_models / "out" / "report.html").read_text()
    assert SWEEP_TAG in page and "<meta name='generator' content='edgeport'>" in page
    rows = {tuple(re.findall(r"<td>([^<]*)</td>", row)[:2]) for row in re.findall(r"<tr><td>[^<]*</td><td>[^<]*</td>"
                                                                                   r"<td class='num'>", page)}
    assert rows == {(model, variant) for model in ("cnn-digits", "tiny", "tiny2") for variant in ("fp32", "repq-w8a8")}
    assert page.count("20 runs, threads: ") == 6 and page.count("not valid: 20 samples are too few for p99") == 6
    assert main([*args, "--runs", "25", "--threads", "1"]) == 0, capsys.readouterr().err
    again = json.loads(capsys.readouterr().out)
    assert again["jobs_run"] == 6 and again["counts"]["export"]["skipped"] == 6  # measured again, not exported
    page = (own_models / "out" / "report.html").read_text()
    assert page.count("25 runs, threads: 1;") == 6 and "20 runs" not in page
    # the sweep's page is the sweep's: `edgeport report` on its folder does not replace it
    assert main(["report", "out"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and (own_models / "out" / "report.html").read_text() == page
    check_shared_nodes_are_told(own_models / "out", again["jobs"])


def check_shared_nodes_are_told(out: Path, entries: list[dict]) -> None:
    """In this process one job runs at a time, so no measurement ran beside an export; moved
    onto one node at one time, a measurement and an export of that folder are marked, in the
    file the sweep amends and on the page; on another node, or one after the other, they are not."""
    from edgeport.fleet.report import write_report
    from edgeport.fleet.sweep import mark_shared_nodes, ran_beside

    records = [json.loads((out / e["file"]).read_text()) for e in entries]
    timed = [r for r in records if r["kind"] in (EXPORT, MEASURE)]
    assert timed and all(0 < r["wall_clock_s"][0] <= r["wall_clock_s"][1] for r in timed)
    assert not any(ran_beside(a, b) for a in timed for b in timed if a is not b)
    assert not any("shared_node_with" in r for r in records)
    measured = next(r for r in records if r["kind"] == MEASURE and r["model"] == "cnn-digits")
    exported = next(r for r in records if r["kind"] == EXPORT)
    plan = make_plan(resolve_models(["cnn-digits"]), [parse_variant("fp32")], ["onnx"], ["host"], {"host"}, False,
                     profile_settings(20, 2, 1, 0.0, None, False, True))
    measure_job, export_job = (next(j for j in plan.jobs if j.kind == kind) for kind in (MEASURE, EXPORT))
    start, end = measured["wall_clock_s"]
    for node, window, told in ((measured["node"], [start - 1, start + 0.001], True),
                               ({**exported["node"], "node_id": "another-node"}, [start - 1, end + 1], False),
                               (measured["node"], [start - 1, start], False)):
        beside = {**copy.deepcopy(measured), "key": measure_job.key}  # the plan's job, for the page
        export = {**copy.deepcopy(exported), "node": node, "wall_clock_s": window}
        marked = mark_shared_nodes(export_job, export, [(measure_job, beside)])
        assert (marked == [(measure_job, beside)]) == told and ("shared_node_with" in beside) == told
        if told:
            assert beside["shared_node_with"] == [export_job.key]
            Results(out).amend(measure_job, beside)
            assert json.loads((out / "jobs" / measure_job.file_name).read_text())["shared_node_with"] == \
                [export_job.key]
            page = write_report(out / "told.html", plan, [beside]).read_text()
            assert f"measured while 1 export(s) ran on its node: {export_job.key}" in page
    listed = next(e["file"] for e in entries if e["key"] == measured["key"])
    (out / listed).write_text(json.dumps({**measured, "shared_node_with": "an export"}))
    with pytest.raises(UserError, match="shared_node_with should be a list"):
        Results(out).records()


def test_exports_fail_with_the_reason_where_every_cpu_is_held_by_an_agent():
    """The README's setup before it had an export node (the head and a worker, each a device
    with one CPU) waited forever: each agent holds its node's CPU and no export could start.
    The executor counts the CPUs agents leave free, and says what to do where none are (the
    nodes as Ray reports them, read from these records instead of a live cluster)."""
    from edgeport.fleet.cluster import Node, RayExecutor, _Agent
    from edgeport.fleet.plan import EXPORT_ROW

    def executor(head_cpus: float) -> RayExecutor:
        made = object.__new__(RayExecutor)
        made._nodes = [Node("a", "127.0.0.1", "jetson", True, True, {"jetson-orin-nano": 1}, head_cpus, 0, 100),
                       Node("b", "127.0.0.2", "pi", True, False, {"raspberry-pi-5": 1}, 1, 0, 100)]
        made._refreshed, made._exports_apart = time.monotonic(), False
        made._agents = [_Agent("jetson-orin-nano", "a", None), _Agent("raspberry-pi-5", "b", None)]
        return made

    assert executor(head_cpus=2).capacity(EXPORT_ROW) == 1
    held = executor(head_cpus=1)
    assert held.capacity(EXPORT_ROW) == 0
    assert "join a node without --device" in held.lost({EXPORT_ROW})[EXPORT_ROW]


def test_a_missing_ray_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where Ray is not installed
    assert main(["fleet", "status", "--cluster", "auto"]) == 2
    assert "pip install 'edgeport[fleet]'" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"edgeport\[fleet\]"):
        ep.sweep(["cnn-digits"], cluster="auto")


def test_artifacts_are_checked_on_arrival(tmp_path):
    bundle = ArtifactBundle("m.onnx", {"m.onnx": b"graph", "m.onnx.edgeport.json": b"{}"})
    recorded = bundle.digests()
    damaged = ArtifactBundle("m.onnx", {"m.onnx": b"grapH", "m.onnx.edgeport.json": b"{}"})
    with pytest.raises(CheckFailed, match="m.onnx arrived damaged: m.onnx is sha256"):
        materialize(damaged, tmp_path, recorded)
    escaping = ArtifactBundle("m.onnx", {"../m.onnx": b"graph"})
    with pytest.raises(UserError):
        materialize(escaping, tmp_path, escaping.digests())
    assert not list(tmp_path.iterdir()) and not (tmp_path.parent / "m.onnx").exists()


def test_the_index_survives_a_cut_line_and_a_lost_append(tmp_path):
    job = Job("estimate", "cnn-digits", "ab" * 32, "fp32", "onnx", "raspberry-pi-5")
    results = Results(tmp_path)
    results.record(job, "done", seconds=0.01,
                   estimate={"latency_ms": 0.1, "energy_mj": 0.2, "energy_provenance": "estimated:roofline",
                             "confidence": {"peak": "vendor"}})
    with open(tmp_path / "index.jsonl", "a") as index:
        index.write('{"key": "half a li')  # the process died mid-append
    assert Results(tmp_path).finished(job)["file"] == f"jobs/{job.file_name}"
    assert (tmp_path / "index.jsonl").read_text().endswith("}\n")
    (tmp_path / "index.jsonl").unlink()  # died between the job file and its line
    assert Results(tmp_path).finished(job) is not None and len(index_lines(tmp_path)) == 1
    measured = Job(MEASURE, job.model, job.model_sha256, job.variant, job.target, job.device, "p0123456789")
    assert Results(tmp_path).finished(measured) is None  # a node of the device joined since
    assert parse_variant("repq-w4a4").w_bits == 4


def test_in_process_sweep_resumes_after_ctrl_c(in_process):
    records = [json.loads((in_process / e["file"]).read_text()) for e in index_lines(in_process)]
    latest = {r["key"]: r for r in records}
    assert len(latest) == 12 and all(r["status"] == "done" for r in latest.values())
    estimates = [r for r in latest.values() if r["kind"] == "estimate"]
    assert len(estimates) == 8 and {r["device"] for r in estimates} == set(DEVICES)
    assert all(r["estimate"]["provenance"] == "estimated:roofline" for r in estimates)
    page = (in_process / "report.html").read_text()
    assert page.count("estimated (roofline)") == 8 and "measured on node" not in page
    # energy cells set each estimate's net figure, as a measured cell sets its net energy
    nets = {f"{r['estimate']['net_energy_mj']:.4g}<br>estimated (net)" for r in estimates}
    assert all(net in page for net in nets) and page.count("estimated (net)") == 8
    assert all(0 < r["estimate"]["net_energy_mj"] < r["estimate"]["energy_mj"] for r in estimates)


def test_cluster_sweep_measures_each_device_on_the_node_advertising_it(cluster, in_process, tmp_path):
    nodes = cluster.wait_for(set(DEVICES))
    result = ep.sweep(MODELS, VARIANTS, DEVICES, tmp_path / "cluster", cluster=cluster.address, **QUICK_PROFILE)
    assert not result.failed and result.jobs_run == 12
    records = [json.loads((result.out / j["file"]).read_text()) for j in result.jobs]
    measured = [r for r in records if r["kind"] == MEASURE]
    assert len(measured) == 8
    for r in measured:  # each device's profiles ran on the node advertising it, as that node reported
        assert r["node"]["node_id"] == nodes[r["device"]] and r["node"]["device"] == r["device"]
        assert r["profile"]["environment"]["onnxruntime"] and r["profile"]["latency"]["p50"] > 0
        # nodes on this machine stand in for an Arm board and a Jetson: their records say so
        assert r["node"]["not_the_device"] == identity_mismatch(r["device"]) and (
            platform.machine() == "aarch64" or f"this node is {platform.machine()}" in r["node"]["not_the_device"])
    exports = [r for r in records if r["kind"] == EXPORT]
    no_device = {n.node_id for n in cluster_nodes() if n.alive and not n.devices}  # the head
    assert len(exports) == 4 and {r["node"]["node_id"] for r in exports} <= no_device  # the devices only measure
    assert not any("shared_node_with" in r for r in measured)  # so no measurement ran beside an export
    assert all(r["wall_clock_s"][0] <= r["wall_clock_s"][1] for r in measured + exports)
    for r in exports:  # the committed artifact is what the export hashed
        artifact = ep.Artifact.load(next(result.out.glob(f"artifacts/*/{r['artifact']['file']}")))
        assert artifact.parity.passed
    page = (result.out / "report.html").read_text()
    assert all(f"<th>{d}</th>" in page for d in DEVICES) and page.count("measured on node") == 8
    assert page.count("not the device: ") == sum(bool(r["node"]["not_the_device"]) for r in measured)
    for device in DEVICES:
        assert page.count(f"node {nodes[device][:12]}") >= 4
    in_process_page = (in_process / "report.html").read_text()
    assert ReportStructure(page).skeleton == ReportStructure(in_process_page).skeleton
    in_process_records = [json.loads((in_process / e["file"]).read_text()) for e in index_lines(in_process)]
    assert sorted((r["model"], r["variant"], r["target"], r["device"]) for r in records) == \
        sorted({(r["model"], r["variant"], r["target"], r["device"]) for r in in_process_records})
    status = subprocess.run([sys.executable, "-m", "edgeport", "fleet", "status", "--cluster", cluster.address,
                             "--json"], capture_output=True, text=True, timeout=120)
    listed = {d: n["node_id"] for n in json.loads(status.stdout) if n["alive"] for d in n["devices"]}
    assert listed == nodes


def test_sigterm_stops_a_cluster_sweep_as_ctrl_c_does(cluster, tmp_path):
    """Ray's driver installs its own SIGTERM handler (a raw dump, exit 134); the CLI's comes back
    after connecting: the running jobs are stopped, what finished stays whole, and the exit
    code is the signal's."""
    out = tmp_path / "term"
    sweep = edgeport_command("sweep", "cnn-digits", "--variants", "fp32", "--devices", DEVICES[0], "-o", str(out),
                             "--cluster", cluster.address, "--runs", "200000", "--sessions", "2", "--no-ops",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "index.jsonl").is_file() or not index_lines(out):  # the export is done: the measure runs
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
        time.sleep(0.2)
    time.sleep(2)
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=120)
    # Ray's wait turns the handler's SystemExit(143) into SystemExit(1): the CLI keeps the code
    assert sweep.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in stderr, stderr
    assert "SIGTERM received" not in stderr, stderr
    for entry in index_lines(out):
        assert json.loads((out / entry["file"]).read_text())["key"] == entry["key"]


def test_a_worker_killed_mid_sweep_loses_nothing_and_a_rerun_completes(cluster, tmp_path):
    out = tmp_path / "fault"
    second_jetson_job_started = threading.Event()

    def watch(event):
        jetson = event.counts[DEVICES[0]]
        if event.job.device == DEVICES[0] and event.state == "running" and jetson["done"] == 1:
            second_jetson_job_started.set()

    sweep = {"models": ["cnn-digits"], "variants": VARIANTS, "devices": DEVICES, "out": out,
             "cluster": cluster.address, "min_duration_s": 2.0, **QUICK_PROFILE}
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=ep.sweep(**sweep, on_progress=watch)))
    thread.start()
    assert second_jetson_job_started.wait(timeout=300)
    time.sleep(1.0)  # its task reaches the node
    cluster.kill("jetson")
    thread.join(timeout=300)
    result = outcome["result"]
    assert {j["status"] for j in result.jobs} <= {"done", "failed"} and len(result.jobs) == 6
    failed = result.failed
    assert len(failed) == 1 and failed[0]["device"] == DEVICES[0] and failed[0]["reason"]
    assert "jetson-orin-nano" in failed[0]["reason"] or "died" in failed[0]["reason"]
    finished = {j["file"]: (out / j["file"]).read_bytes() for j in result.jobs if j["status"] == "done"}
    assert len(finished) == 5
    cluster.join("jetson-2", DEVICES[0])
    nodes = cluster.wait_for(set(DEVICES))
    rerun = ep.sweep(**sweep)
    assert not rerun.failed and rerun.jobs_run == 1
    assert {f: (out / f).read_bytes() for f in finished} == finished  # nothing finished was redone or lost
    redone = json.loads((out / failed[0]["file"]).read_text())
    assert redone["status"] == "done" and redone["node"]["node_id"] == nodes[DEVICES[0]]


def test_a_job_whose_node_dies_is_retried_on_another_node_with_its_device(cluster, in_process, tmp_path):
    """Two nodes advertise the same device; the first to start a measurement dies a second into
    it: the job runs again on the other node and is done there; no finished result is lost."""
    device, twins = DEVICES[1], ("pi", "pi-2")
    cluster.join(twins[1], device)
    cluster.wait_for({device}, nodes_each=2)
    out = tmp_path / "retry"
    shutil.copytree(in_process, out)  # exported already: the sweep has only the two measurements to run
    finished = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    outcome = {}
    sweep = {"models": MODELS[:1], "variants": VARIANTS, "devices": [device], "out": out, "cluster": cluster.address,
             "min_duration_s": 2.0, **QUICK_PROFILE}
    thread = threading.Thread(target=lambda: outcome.update(result=ep.sweep(**sweep)))
    thread.start()
    deadline = time.monotonic() + 240
    while not (measuring := [name for name in twins if "ray::DeviceAgent.run" in cluster.workers(name).values()]):
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.1)
    time.sleep(1.0)  # into the profile, which takes 4 s or more
    cluster.kill(measuring[0])
    thread.join(timeout=300)
    result = outcome["result"]
    assert not result.failed and result.jobs_run == 2
    survivor = [n.node_id for n in cluster_nodes() if n.alive and device in n.devices]
    assert len(survivor) == 1
    measured = [json.loads((out / job["file"]).read_text()) for job in result.jobs if job["kind"] == MEASURE]
    assert len(measured) == 2  # the killed node's job done too, on the node left (it had finished none)
    assert all(r["status"] == "done" and r["node"]["node_id"] == survivor[0] for r in measured), measured
    remeasured = {out / job["file"] for job in result.jobs if job["kind"] == MEASURE}  # were estimates
    for path, data in finished.items():  # nothing else finished was lost or redone; the index only grew
        if path.name == "index.jsonl":
            assert path.read_bytes().startswith(data)
        elif path not in remeasured and path.name != "report.html":
            assert path.read_bytes() == data, path
