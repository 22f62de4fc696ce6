"""The command line: exit codes, one-line errors, nothing half-written, real files."""
import json
import logging
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import edgeport as ep
from conftest import leftovers
from edgeport.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "edgeport", *args], capture_output=True, text=True, timeout=300)


def test_export_zoo_model_json(out, capsys):
    assert main(["export", "cnn-digits", "-o", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["onnx"]
    assert record["parity"]["passed"] and record["exporter"] == "torch.export"
    assert (out / "cnn-digits.onnx").exists() and (out / "cnn-digits.onnx.edgeport.json").exists()


def test_export_pt2_then_verify_with_real_inputs(tmp_path, out, capsys):
    program = torch.export.export(ep.zoo.load("cnn-digits"), (ep.zoo.example("cnn-digits"),))
    torch.export.save(program, tmp_path / "cnn.pt2")
    assert main(["export", str(tmp_path / "cnn.pt2"), "--input", "1x1x8x8", "-o", str(out), "--name", "cnn"]) == 0
    np.savez(tmp_path / "test.npz", x=ep.zoo.testset("cnn-digits")[0][:20].numpy())
    capsys.readouterr()
    assert main(["verify", str(out / "cnn.onnx"), "--against", "cnn-digits", "--inputs", str(tmp_path / "test.npz"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["samples"] == 20


def test_factory_with_safetensors_weights(tmp_path, out, monkeypatch):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        def tiny():
            return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh())
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(3)
    save_file(torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh()).state_dict(), tmp_path / "w.safetensors")
    assert main(["export", "mymodels:tiny", "--weights", str(tmp_path / "w.safetensors"), "--input", "2x6",
                 "-o", str(out)]) == 0
    assert ep.Artifact.load(out / "sequential.onnx").parity.passed


def test_bad_input_through_the_real_entry_point(tmp_path):
    result = run("export", "cnn-digits", "--input", "1x3x8x8", "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "does not accept" in result.stderr
    debug = run("--debug", "export", "cnn-digits", "--input", "1x3x8x8", "-o", str(tmp_path / "o"))
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_failed_verification_exits_1(tmp_path, out, capsys):
    assert main(["export", "cnn-digits", "-o", str(out)]) == 0
    assert main(["verify", str(out / "cnn-digits.onnx"), "--against", "vit-digits"]) == 1
    assert "fails verification" in capsys.readouterr().err


def test_verify_artifact_without_sidecar(tmp_path, capsys):
    (tmp_path / "x.onnx").write_bytes(b"")
    assert main(["verify", str(tmp_path / "x.onnx"), "--against", "cnn-digits"]) == 2
    assert "sidecar" in capsys.readouterr().err


def test_zoo_listing(capsys):
    assert main(["zoo", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ep.zoo.names()


@pytest.mark.xdist_group("demo")
def test_demo_writes_summary(demo_run):
    folder, printed = demo_run
    summary = json.loads((folder / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == ep.zoo.names()
    for model in summary["models"]:
        assert model["parity_passed"] and model["prediction_agreement_percent"] == 100.0
        assert model["accuracy_percent"]["onnxruntime"] == model["accuracy_percent"]["torch"] > 95
        assert model["latency_ms"]["onnxruntime"]["runs"] == 20
    assert json.loads(printed) == summary
    assert sorted(p.name for p in folder.iterdir()) == summary["files"]  # no staging folder left behind
    # what the run recorded names its artifacts where they lie now, not where they were staged
    assert {Path(e["artifact"]).parent for e in json.loads((folder / "estimates.json").read_text())} == {folder}
    profile = json.loads((folder / "cnn-digits.profile.json").read_text())
    assert profile["artifact"] == profile["estimate"]["artifact"] == str(folder / "cnn-digits.onnx")


def staged_demo(files: dict[str, str], fails: bool = False):
    """A stand-in for the demo's minutes of work (`demo.write_demo`): writes `files` where the
    run writes, then fails like a broken export or returns a summary."""
    def write_demo(folders, runs, progress) -> dict:
        for name, text in files.items():
            (folders.work / name).write_text(text)
        if fails:
            raise ep.UserError("an export failed midway")
        return {"edgeport_demo": "test", "report": str(folders.out / "report.html")}
    return write_demo


@pytest.mark.parametrize("name, text", [("notes.json", "{broken"), ("report.html", "<html>my notes</html>"),
                                        ("summary.json", '{"my": "own summary"}'), ("estimates.json", "[]")])
def test_demo_refuses_a_folder_holding_other_files_before_any_work(tmp_path, monkeypatch, capsys, name, text):
    monkeypatch.setattr("edgeport.demo.write_demo", lambda *args: pytest.fail("the demo started working"))
    (tmp_path / name).write_text(text)
    assert main(["demo", "-o", str(tmp_path), "--json"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and f"{tmp_path / name} is not an earlier edgeport demo's output" in printed.err
    assert leftovers(tmp_path) == [name] and (tmp_path / name).read_text() == text


def test_demo_refuses_an_older_edgeports_demo_output_whose_files_it_cannot_tell_from_yours(tmp_path, capsys):
    (tmp_path / "summary.json").write_text('{"edgeport_demo": "0.1.0"}')
    (tmp_path / "notes.json").write_text("{}")
    assert main(["demo", "-o", str(tmp_path)]) == 2
    assert "its demo output is from an older edgeport" in capsys.readouterr().err
    assert leftovers(tmp_path) == ["notes.json", "summary.json"]


def test_demo_replaces_an_earlier_demo_output_as_a_whole(out, monkeypatch, capsys):
    monkeypatch.setattr("edgeport.demo.write_demo", staged_demo({"report.html": "first", "old.onnx": "x"}))
    assert main(["demo", "-o", str(out), "--json"]) == 0
    assert leftovers(out) == ["old.onnx", "report.html", "summary.json"]
    capsys.readouterr()
    monkeypatch.setattr("edgeport.demo.write_demo", staged_demo({"report.html": "second"}))
    assert main(["demo", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "summary.json").read_text())
    assert leftovers(out) == ["report.html", "summary.json"] and (out / "report.html").read_text() == "second"


def test_a_demo_that_fails_midway_leaves_its_folder_as_it_was(out, monkeypatch):
    monkeypatch.setattr("edgeport.demo.write_demo", staged_demo({"report.html": "partial"}, fails=True))
    assert main(["demo", "-o", str(out)]) == 2
    assert not out.exists()
    monkeypatch.setattr("edgeport.demo.write_demo", staged_demo({"report.html": "first"}))
    assert main(["demo", "-o", str(out), "--json"]) == 0
    monkeypatch.setattr("edgeport.demo.write_demo", staged_demo({"report.html": "partial"}, fails=True))
    assert main(["demo", "-o", str(out)]) == 2
    assert leftovers(out) == ["report.html", "summary.json"] and (out / "report.html").read_text() == "first"


@pytest.mark.xdist_group("demo")
def test_demo_covers_the_spiking_forms(demo_run):
    folder = demo_run[0]
    section = json.loads((folder / "summary.json").read_text())["spiking"]
    for form in ("unrolled", "step"):
        row = section["forms"][form]
        assert row["parity_passed"] and row["identical_predictions_to_torch"]
        assert row["accuracy_percent_onnxruntime"] == section["accuracy_percent_torch"]
        assert (folder / row["coreml"]).is_dir()
    energy = section["energy_per_sample_uj"]["fp32"]
    assert energy["snn-digits"] < energy["snn-digits as ANN"]


def test_a_long_step_logs_each_sub_step_with_the_seconds_since_it_began(monkeypatch, capsys):
    """In a log (stderr not a terminal) a long step announces itself, then each sub-step with
    its elapsed seconds, then its duration: the demo's progress reads this way in CI logs. The
    announcement comes from a timer while the step runs, typically inside an exporter whose
    output `quiet()` swallows: it must not be swallowed with it."""
    from edgeport import cli
    from edgeport.export.onnx import quiet

    monkeypatch.setattr(cli, "LOG_AFTER_S", 0.3)  # fires once the step is inside quiet()
    printed, deadline = "", time.monotonic() + 10
    with cli.progress("demo") as step:
        with quiet():
            while "... demo\n" not in printed and time.monotonic() < deadline:  # the timer's thread
                time.sleep(0.01)
                printed += capsys.readouterr().err
        step("vit-digits: export")
    lines = (printed + capsys.readouterr().err).splitlines()
    assert lines[0] == "... demo"
    assert re.fullmatch(r"\.\.\. demo \[\d+ s\]: vit-digits: export", lines[1]), lines
    assert re.fullmatch(r"\.\.\. demo: done in \d+\.\d s", lines[2]), lines


def test_a_profile_logs_its_sessions_and_a_late_announcement_names_the_sub_step_under_way(monkeypatch, capsys):
    """A profile's steps (each latency session, energy, time per op) are sub-steps in the log;
    a sub-step that began before the step was announced (a first-use host calibration inside
    an estimate) is named on the announcement's line, not lost."""
    from edgeport import cli

    monkeypatch.setattr(cli, "LOG_AFTER_S", 0.0)
    with cli.progress("profiling cnn-digits"):
        ep.profile("cnn-digits", backend="torch", runs=6, warmup=1, sessions=3, energy=False)
    err = capsys.readouterr().err
    for sub_step in ("latency: session 1 of 3", "latency: session 3 of 3", "time per op"):
        assert re.search(rf"\.\.\. profiling cnn-digits \[\d+ s\]: {sub_step}", err), err
    monkeypatch.setattr(cli, "LOG_AFTER_S", 0.3)
    with cli.progress("estimating") as step:
        step("calibrating the host")
        time.sleep(0.6)
    assert capsys.readouterr().err.splitlines()[0] == "... estimating: calibrating the host"


def test_a_long_quantization_logs_each_reconstructed_block(monkeypatch, capsys):
    """Block reconstruction takes minutes on a BERT: inside a CLI step each unit's line (the
    library's INFO records) is a sub-step in the log, and the step leaves the `edgeport`
    logger as it found it."""
    from edgeport import cli
    from edgeport.quant.config import preset

    logger = logging.getLogger("edgeport")
    before = (logger.level, list(logger.handlers))
    monkeypatch.setattr(cli, "LOG_AFTER_S", 0.0)
    with cli.progress("quantizing vit-digits"):
        ep.quantize("vit-digits", config=preset("repq-recon", recon_iters=5))
    lines = [line for line in capsys.readouterr().err.splitlines() if "reconstructed unit" in line]
    assert [re.search(r"unit (\d) of 6, (\S+):", line).groups() for line in lines] == [
        ("1", "patch_embed"), ("2", "blocks.0"), ("3", "blocks.1"), ("4", "blocks.2"), ("5", "blocks.3"), ("6", "head")]
    assert all(re.match(r"\.\.\. quantizing vit-digits \[\d+ s\]: ", line) for line in lines), lines
    assert (logger.level, logger.handlers) == before


def test_verify_says_when_the_file_changed_since_its_export(tmp_path, capsys):
    """The sidecar records each file's sha256 as committed: verify warns on a file edited since
    (one weight nudged, still valid ONNX), then checks it as it is; an untouched file, silently."""
    import onnx
    from onnx import numpy_helper

    artifact = ep.export("cnn-digits", out=tmp_path)["onnx"]
    assert set(artifact.file_sha256) == {"cnn-digits.onnx"} and not artifact.changed_files()
    capsys.readouterr()
    assert main(["verify", str(artifact.path), "--against", "cnn-digits"]) == 0
    assert "warning" not in capsys.readouterr().err
    model = onnx.load(str(artifact.path))
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.001, weight.name))
    onnx.save(model, str(artifact.path))
    assert main(["verify", str(artifact.path), "--against", "cnn-digits"]) == 1
    err = capsys.readouterr().err
    assert "warning: cnn-digits.onnx of cnn-digits.onnx changed since edgeport exported and verified it" in err
    assert "fails verification" in err
