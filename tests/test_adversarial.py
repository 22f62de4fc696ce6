"""The adversarial matrix: what an attacker or a careless user gives the CLI and the SDK.

Every case runs the real command in a scratch folder and asserts the exit code (2 for bad
input, 1 for a failed check), one `error:` line and no traceback, nothing left in the output
folder, no file outside it created, changed or deleted, and no code run from a file (a
marker file that a malicious payload would create stays absent).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import edgeport as ep
from edgeport.cli import main

MARKER = "code-was-executed"


class Exploit:
    """A pickle payload that creates the marker file when unpickled with code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# --- scratch files the cases refer to as {name} ------------------------------------------------

def _npz(path: Path, **arrays) -> None:
    np.savez(path, **arrays)


def _mymod(tmp: Path) -> None:
    (tmp / "mymod.py").write_text(textwrap.dedent("""
        import torch

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(16, 4)

            def forward(self, x):
                return self.fc(x)

        def build():
            return Tiny()

        def not_a_model():
            return 42

        def raises():
            raise RuntimeError("the factory failed on purpose")

        from os import getcwd  # a re-exported stdlib callable
        from pathlib import Path
        touch_marker = Path("code-was-executed").touch  # would create the marker if called
    """))


def _onnx_with_input(path: Path, dims: list) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def scratch(tmp: Path) -> dict[str, str]:
    """Every file the cases use, made in `tmp`; returns {placeholder: path}."""
    marker = tmp / MARKER
    files = {"tmp": tmp, "out": tmp / "out", "marker": marker}
    _mymod(tmp)
    (tmp / "empty.pt2").write_bytes(b"")
    (tmp / "garbage.pt2").write_bytes(os.urandom(512))
    (tmp / "exploit.pt").write_bytes(pickle.dumps({"weight": Exploit(marker)}))
    (tmp / "exploit.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    torch.save({"fc.weight": torch.zeros(4, 16)}, tmp / "state.pt")
    torch.save({"nope": torch.zeros(3)}, tmp / "wrong_state.pt")
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 50)
    _onnx_with_input(tmp / "huge-input.onnx", [1, 3, 100000, 100000])
    images = ep.zoo.testset("cnn-digits")[0][:4].numpy()
    _npz(tmp / "images.npz", x=images)
    _npz(tmp / "nan.npz", x=np.where(np.arange(images.size).reshape(images.shape) == 0, np.nan, images)
         .astype(np.float32))
    _npz(tmp / "nan-one.npz", x=np.where(np.arange(images[:1].size).reshape(images[:1].shape) == 0, np.nan,
                                          images[:1]).astype(np.float32))
    _npz(tmp / "int-images.npz", x=images.astype(np.int64))
    _npz(tmp / "inf.npz", x=np.where(np.arange(images.size).reshape(images.shape) == 3, np.inf, images)
         .astype(np.float32))
    _npz(tmp / "wrong-shape.npz", x=np.random.default_rng(0).random((4, 1, 9, 9), np.float32))
    _npz(tmp / "wrong-rank.npz", x=np.zeros((4, 64), np.float32))
    _npz(tmp / "two-arrays.npz", x=images, y=images)
    _npz(tmp / "misnamed.npz", pixels=images)
    _npz(tmp / "empty.npz")
    _npz(tmp / "zeros.npz", x=np.zeros((8, 1, 8, 8), np.float32))
    _npz(tmp / "constant.npz", x=np.full((8, 1, 8, 8), 0.5, np.float32))
    _npz(tmp / "scalar.npz", x=np.float32(1.0))
    np.save(tmp / "object.npy", np.array([Exploit(marker)], dtype=object), allow_pickle=True)
    import zipfile
    with zipfile.ZipFile(tmp / "object.npz", "w") as archive:
        archive.write(tmp / "object.npy", "x.npy")
    (tmp / "object.npy").unlink()
    (tmp / "not-npz.npz").write_text("hello")
    (tmp / "a-file").write_text("a user's file")
    (tmp / "reports").mkdir()
    (tmp / "reports" / "bad.profile.json").write_text("{not json")
    (tmp / "list-report").mkdir()
    (tmp / "list-report" / "x.profile.json").write_text("[1, 2, 3]")
    (tmp / "no-reports").mkdir()
    return {k: str(v) for k, v in files.items()}


def exported(tmp: Path, name: str = "cnn-digits") -> None:
    """An exported zoo artifact in tmp/art (for verify/profile cases)."""
    assert main(["export", name, "-o", str(tmp / "art")]) == 0


def sidecar_with_input(tmp: Path, dims: list) -> None:
    exported(tmp)
    sidecar = tmp / "art" / "cnn-digits.onnx.edgeport.json"
    data = json.loads(sidecar.read_text())
    data["inputs"][0]["shape"] = dims
    data["settings"].pop("source")  # not the zoo's test images: feeds drawn to the declared shape
    sidecar.write_text(json.dumps(data))


def user_folder_named_like_the_artifact(tmp: Path) -> None:
    (tmp / "out" / "cnn-digits.onnx").mkdir(parents=True)
    (tmp / "out" / "cnn-digits.onnx" / "thesis.txt").write_text("years of work")


def user_file_named_like_the_artifact(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "cnn-digits.onnx").write_text("not an edgeport file")


def corrupt_sidecar(tmp: Path) -> None:
    exported(tmp)
    (tmp / "art" / "cnn-digits.onnx.edgeport.json").write_text("{")


@dataclass
class Case:
    """One bad input: the command (with {placeholders}), the exit code, a pattern the error
    line must match, and what must be set up first. `keep` are names in the output folder that
    were there before and must be there, unchanged, after."""

    id: str
    argv: list[str]
    message: str
    code: int = 2
    setup: Callable[[Path], None] | None = None
    keep: list[str] = field(default_factory=list)


EXPORT = ["export", "cnn-digits", "-o", "{out}"]
CASES = [
    # models: names, files, pickles, factories
    Case("unknown model", ["export", "nosuchmodel", "-o", "{out}"], "cannot resolve model 'nosuchmodel'"),
    Case("zoo typo", ["export", "cnn-digit", "-o", "{out}"], "did you mean cnn-digits"),
    Case("missing .pt2", ["export", "{tmp}/nope.pt2", "--input", "1x1x8x8", "-o", "{out}"], "does not exist"),
    Case("empty .pt2", ["export", "{tmp}/empty.pt2", "--input", "1x1x8x8", "-o", "{out}"], "empty.pt2"),
    Case("garbage .pt2", ["export", "{tmp}/garbage.pt2", "--input", "1x1x8x8", "-o", "{out}"], "garbage.pt2"),
    Case("pickle as model", ["export", "{tmp}/exploit.pt", "--input", "1x1x8x8", "-o", "{out}"], "refusing to load"),
    Case("pickle .pkl as model", ["export", "{tmp}/exploit.pkl", "--input", "1x1x8x8", "-o", "{out}"],
         "refusing to load"),
    Case("weights file as model", ["export", "{tmp}/state.pt", "--input", "1x16", "-o", "{out}"],
         "holds weights, not a model"),
    Case("pickle as weights", EXPORT + ["--weights", "{tmp}/exploit.pt"], "refusing to load"),
    Case("missing weights", EXPORT + ["--weights", "{tmp}/nope.safetensors"], "does not exist"),
    Case("weights that do not fit", ["export", "mymod:build", "--input", "1x16", "--weights", "{tmp}/wrong_state.pt",
                                     "-o", "{out}"], "do not fit"),
    Case("os:abort", ["export", "os:abort", "--input", "1x16", "-o", "{out}"], "os:abort"),
    Case("sys:exit", ["export", "sys:exit", "--input", "1x16", "-o", "{out}"], "sys:exit"),
    Case("builtins:print", ["export", "builtins:print", "--input", "1x16", "-o", "{out}"], "builtins:print"),
    Case("os.path:join", ["export", "os.path:join", "--input", "1x16", "-o", "{out}"], "os.path:join"),
    Case("re-exported stdlib callable", ["export", "mymod:getcwd", "--input", "1x16", "-o", "{out}"], "mymod:getcwd"),
    Case("callable that would run code", ["export", "mymod:touch_marker", "--input", "1x16", "-o", "{out}"],
         "mymod:touch_marker"),
    Case("factory returns no module", ["export", "mymod:not_a_model", "--input", "1x16", "-o", "{out}"],
         "not a torch.nn.Module"),
    Case("factory raises", ["export", "mymod:raises", "--input", "1x16", "-o", "{out}"], "failed on purpose"),
    Case("missing factory", ["export", "mymod:nope", "--input", "1x16", "-o", "{out}"], "mymod:nope"),
    Case("missing module", ["export", "nosuchmodule_xyz:build", "--input", "1x16", "-o", "{out}"],
         "nosuchmodule_xyz"),
    Case("factory without example", ["export", "mymod:build", "-o", "{out}"], "an example input is needed"),
    # targets, names, the output folder
    Case("unknown target", EXPORT + ["--to", "onnx,tflite"], "unknown target 'tflite'"),
    Case("empty target list", EXPORT + ["--to", ","], "no export target"),
    Case("name with ..", EXPORT + ["--name", "../escaped"], "not a plain file name"),
    Case("absolute name", EXPORT + ["--name", "{tmp}/abs"], "not a plain file name"),
    Case("name with separator", EXPORT + ["--name", "a/b"], "not a plain file name"),
    Case("name ..", EXPORT + ["--name", ".."], "not a plain file name"),
    Case("name with newline", EXPORT + ["--name", "a\nb"], "not a plain file name"),
    Case("name like a flag", EXPORT + ["--name", "-rf"], "not a plain file name"),
    Case("hidden name", EXPORT + ["--name", ".bashrc"], "not a plain file name"),
    Case("user folder in the way", EXPORT, "refusing to overwrite", setup=user_folder_named_like_the_artifact,
         keep=["cnn-digits.onnx"]),
    Case("user file in the way", EXPORT, "refusing to overwrite", setup=user_file_named_like_the_artifact,
         keep=["cnn-digits.onnx"]),
    Case("output folder is a file", ["export", "cnn-digits", "-o", "{tmp}/a-file/sub"],
         "cannot write to output folder"),
    # example inputs
    Case("zero dimension", ["export", "mymod:build", "--input", "0x16", "-o", "{out}"], "positive"),
    Case("bool input", ["export", "mymod:build", "--input", "1x16:bool", "-o", "{out}"], "does not accept input"),
    Case("complex input", ["export", "mymod:build", "--input", "1x16:complex64", "-o", "{out}"],
         "unsupported dtype 'complex64'"),
    Case("qint8 input", ["export", "mymod:build", "--input", "1x16:qint8", "-o", "{out}"],
         "unsupported dtype 'qint8'"),
    Case("not a dtype", ["export", "mymod:build", "--input", "1x16:banana", "-o", "{out}"],
         "unsupported dtype 'banana'"),
    Case("huge input", ["export", "mymod:build", "--input", "1x3x100000x100000", "-o", "{out}"],
         "over the 1 GiB limit"),
    Case("over-long dimension", ["export", "mymod:build", "--input", "99999999999999999999999x16", "-o", "{out}"],
         "over the 1 GiB limit"),
    Case("shape text", ["export", "mymod:build", "--input", "1by16", "-o", "{out}"], "is not like"),
    Case("wrong input shape", EXPORT + ["--input", "1x3x8x8"], "does not accept input 1x3x8x8"),
    Case("bad dynamic spec", EXPORT + ["--dynamic", "x-1-batch"], "is not like input_ids:1:sequence"),
    Case("dynamic axis of unknown input", EXPORT + ["--dynamic", "y:0:batch"], "unknown inputs"),
    Case("dynamic axis beyond the rank", EXPORT + ["--dynamic", "x:9:foo"], "dynamic axis 9 of input 'x' does not exist"),
    # backend options
    Case("opset too high", EXPORT + ["--opset", "999"], "supported range 13..23"),
    Case("opset too low", EXPORT + ["--opset", "7"], "supported range 13..23"),
    Case("opset negative", EXPORT + ["--opset", "-1"], "supported range 13..23"),
    Case("unknown exporter", EXPORT + ["--exporter", "magic"], "magic"),
    Case("unknown Core ML compression", EXPORT + ["--to", "coreml", "--coreml-weights", "int3"], "int3"),
    # spiking options
    Case("timesteps absurd", ["export", "snn-digits", "--snn-form", "step", "--timesteps", "100000", "-o", "{out}"],
         "timesteps"),
    Case("timesteps zero", ["export", "snn-digits", "--snn-form", "step", "--timesteps", "0", "-o", "{out}"],
         "timesteps"),
    Case("timesteps negative", ["export", "snn-digits", "--snn-form", "unrolled", "--timesteps", "-3", "-o",
                                "{out}"], "timesteps"),
    # verification inputs (.npz)
    Case("missing inputs file", EXPORT + ["--verify-inputs", "{tmp}/nope.npz"], "nope.npz"),
    Case("inputs not an npz", EXPORT + ["--verify-inputs", "{tmp}/not-npz.npz"], "not-npz.npz"),
    Case("empty npz", EXPORT + ["--verify-inputs", "{tmp}/empty.npz"], "holds no arrays"),
    Case("pickled object array", EXPORT + ["--verify-inputs", "{tmp}/object.npz"], "object.npz"),
    Case("NaN in inputs", EXPORT + ["--verify-inputs", "{tmp}/nan.npz"], "1 NaN"),
    Case("verification inputs named for another model", EXPORT + ["--verify-inputs", "{tmp}/misnamed.npz"],
         r"verification arrays \['pixels'\] name no input of the model; its inputs are \['x'\]"),
    Case("inputs of the wrong dtype", EXPORT + ["--verify-inputs", "{tmp}/int-images.npz"], "int64"),
    Case("inputs of the wrong shape", EXPORT + ["--verify-inputs", "{tmp}/wrong-shape.npz"], "wrong-shape|1x9x9|9, 9"),
    Case("inputs of the wrong rank", EXPORT + ["--verify-inputs", "{tmp}/wrong-rank.npz"], "wrong-rank|rank|64"),
    Case("too many input arrays", EXPORT + ["--verify-inputs", "{tmp}/two-arrays.npz"],
         r"verification arrays \[.y.\] name no input of the model"),
    Case("scalar input array", EXPORT + ["--verify-inputs", "{tmp}/scalar.npz"], "scalar|rank|shape"),
    # quantize
    Case("weight bits 1", ["quantize", "cnn-digits", "--w-bits", "1", "-o", "{out}"], "from 2 to 8"),
    Case("weight bits 9", ["quantize", "cnn-digits", "--w-bits", "9", "-o", "{out}"], "from 2 to 8"),
    Case("activation bits 0", ["quantize", "cnn-digits", "--a-bits", "0", "-o", "{out}"], "from 2 to 8"),
    Case("unknown method", ["quantize", "cnn-digits", "--method", "magic", "-o", "{out}"], "magic"),
    Case("unknown calibration", ["quantize", "cnn-digits", "--calibration", "magic", "-o", "{out}"], "magic"),
    Case("missing calibration file", ["quantize", "cnn-digits", "--calib", "{tmp}/nope.npz", "-o", "{out}"],
         "nope.npz"),
    Case("all-zero calibration", ["quantize", "cnn-digits", "--calib", "{tmp}/zeros.npz", "-o", "{out}"],
         "degenerate|zero range"),
    Case("constant calibration", ["quantize", "cnn-digits", "--calib", "{tmp}/constant.npz", "-o", "{out}"],
         "degenerate|zero range"),
    Case("NaN calibration", ["quantize", "cnn-digits", "--calib", "{tmp}/nan.npz", "-o", "{out}"], "NaN"),
    Case("calibration with an Inf", ["quantize", "cnn-digits", "--calib", "{tmp}/inf.npz", "-o", "{out}"], "Inf"),
    Case("calibration the model refuses", ["quantize", "cnn-digits", "--calib", "{tmp}/wrong-rank.npz", "-o",
                                           "{out}"], "does not accept calibration data"),
    Case("factory without calibration", ["quantize", "mymod:build", "--input", "1x16", "-o", "{out}"],
         "needs calibration data"),
    Case("pickled calibration", ["quantize", "cnn-digits", "--calib", "{tmp}/object.npz", "-o", "{out}"],
         "object.npz"),
    # verify
    Case("verify missing artifact", ["verify", "{tmp}/nope.onnx", "--against", "cnn-digits"], "does not exist"),
    Case("verify empty onnx", ["verify", "{tmp}/empty.onnx", "--against", "cnn-digits"], "empty.onnx"),
    Case("verify garbage onnx", ["verify", "{tmp}/garbage.onnx", "--against", "cnn-digits"], "garbage.onnx"),
    Case("verify corrupt sidecar", ["verify", "{tmp}/art/cnn-digits.onnx", "--against", "cnn-digits"],
         "corrupt sidecar", setup=corrupt_sidecar),
    Case("verify against a model of other inputs", ["verify", "{tmp}/art/cnn-digits.onnx", "--against",
                                                    "mymod:build"], "does not accept",
         setup=exported),
    Case("verify against the wrong model", ["verify", "{tmp}/art/cnn-digits.onnx", "--against", "vit-digits"],
         "fails verification", code=1, setup=exported),
    Case("verify with wrong-dtype inputs", ["verify", "{tmp}/art/cnn-digits.onnx", "--against", "cnn-digits",
                                            "--inputs", "{tmp}/int-images.npz"], "int64", setup=exported),
    Case("verify with inputs named for another model", ["verify", "{tmp}/art/cnn-digits.onnx", "--against",
                                                         "cnn-digits", "--inputs", "{tmp}/misnamed.npz"],
         r"holds arrays \['pixels'\]; cnn-digits.onnx takes \['x'\]", setup=exported),
    Case("verify with a markup file name", ["verify", "{tmp}/[link=x]a[/link].onnx", "--against",
                                            "cnn-digits"], re.escape("[link=x]a[/link].onnx")),
    # profile
    Case("profile missing", ["profile", "{tmp}/nope.onnx"], "does not exist"),
    Case("profile empty onnx", ["profile", "{tmp}/empty.onnx"], "empty.onnx"),
    Case("profile garbage onnx", ["profile", "{tmp}/garbage.onnx"], "garbage.onnx"),
    Case("profile absurd threads", ["profile", "{tmp}/art/cnn-digits.onnx", "--threads", "100000"], "threads",
         setup=exported),
    Case("profile zero threads", ["profile", "{tmp}/art/cnn-digits.onnx", "--threads", "0"], "threads",
         setup=exported),
    Case("profile zero runs", ["profile", "{tmp}/art/cnn-digits.onnx", "--runs", "0"], "runs", setup=exported),
    Case("profile negative warm-up", ["profile", "{tmp}/art/cnn-digits.onnx", "--warmup", "-1"], "warm", setup=exported),
    Case("profile batch sizes text", ["profile", "{tmp}/art/cnn-digits.onnx", "--batch-sizes", "abc"], "abc",
         setup=exported),
    Case("profile batch size zero", ["profile", "{tmp}/art/cnn-digits.onnx", "--batch-sizes", "0"], "batch",
         setup=exported),
    Case("profile unknown device", ["profile", "{tmp}/art/cnn-digits.onnx", "--device", "nosuchdevice"],
         "nosuchdevice", setup=exported),
    Case("profile unknown backend", ["profile", "{tmp}/art/cnn-digits.onnx", "--backend", "magic"], "magic",
         setup=exported),
    Case("profile huge declared input", ["profile", "{tmp}/huge-input.onnx"], "over the 1 GiB limit"),
    Case("profile huge sidecar input", ["profile", "{tmp}/art/cnn-digits.onnx"], "over the 1 GiB limit",
         setup=lambda tmp: sidecar_with_input(tmp, [1, 3, 100000, 100000])),
    Case("profile output is a folder", ["profile", "{tmp}/art/cnn-digits.onnx", "--runs", "5", "--no-ops",
                                        "--no-energy", "-o", "{tmp}/no-reports"], "no-reports", setup=exported),
    Case("profile NaN inputs", ["profile", "{tmp}/art/cnn-digits.onnx", "--inputs", "{tmp}/nan-one.npz", "--no-ops"],
         "profiling input 'x' contains 1 NaN", setup=exported),
    Case("profile wrong-shape inputs", ["profile", "{tmp}/art/cnn-digits.onnx", "--inputs", "{tmp}/wrong-shape.npz"],
         "wrong-shape|shape|9", setup=exported),
    Case("profile a markup file name", ["profile", "{tmp}/[/oops].onnx"], re.escape("[/oops].onnx")),
    # estimate, report, spikes, devices
    Case("estimate empty onnx", ["estimate", "{tmp}/empty.onnx"], "empty.onnx"),
    Case("estimate garbage onnx", ["estimate", "{tmp}/garbage.onnx"], "garbage.onnx"),
    Case("estimate unknown device", ["estimate", "{tmp}/huge-input.onnx", "--device", "nosuchdevice"],
         "nosuchdevice"),
    Case("report missing folder", ["report", "{tmp}/nope"], "nope"),
    Case("report malformed JSON", ["report", "{tmp}/reports"], "bad.profile.json"),
    Case("report JSON of the wrong shape", ["report", "{tmp}/list-report"], "x.profile.json"),
    Case("report into a missing folder", ["report", "{tmp}/no-reports", "--html", "{tmp}/nope/r.html"], "nope"),
    Case("spikes without inputs", ["spikes", "mymod:build"], "need inputs"),
    Case("spikes absurd timesteps", ["spikes", "snn-digits", "--timesteps", "100000"], "timesteps"),
    Case("spikes wrong-shape inputs", ["spikes", "snn-digits", "--inputs", "{tmp}/wrong-shape.npz"],
         "does not accept input"),
    Case("spikes NaN inputs", ["spikes", "snn-digits", "--inputs", "{tmp}/nan.npz"], "NaN"),
    Case("timesteps without a spiking form", ["export", "snn-digits", "--timesteps", "5", "-o", "{out}"],
         "snn-form"),
    Case("profile negative min-duration", ["profile", "{tmp}/art/cnn-digits.onnx", "--min-duration", "-1"],
         "min-duration", setup=exported),
    Case("profile NaN min-duration", ["profile", "{tmp}/art/cnn-digits.onnx", "--min-duration", "nan"],
         "min-duration", setup=exported),
    Case("estimate wrong-shape inputs", ["estimate", "{tmp}/art/cnn-digits.onnx", "--inputs", "{tmp}/wrong-shape.npz"],
         "shape", setup=exported),
    Case("estimate a folder", ["estimate", "{tmp}/art"], "is a folder", setup=exported),
    # an output path that holds something else is never replaced
    Case("profile over the model it profiles", ["profile", "{tmp}/art/cnn-digits.onnx", "--runs", "5", "--no-ops",
                                                "--no-energy", "-o", "{tmp}/art/cnn-digits.onnx"],
         "refusing to overwrite", setup=exported),
    Case("estimate over a user file", ["estimate", "{tmp}/art/cnn-digits.onnx", "-o", "{tmp}/garbage.onnx"],
         "refusing to overwrite", setup=exported),
    Case("report over its own input", ["report", "{tmp}/art", "--html", "{tmp}/art/cnn-digits.onnx"],
         "refusing to overwrite", setup=exported),
]


def snapshot(folder: Path, skip: Path) -> dict[str, str]:
    """Every file under `folder` (outside `skip`) with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if skip not in p.parents and p != skip}


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `mymod:build` is found in the current folder, as users expect
    monkeypatch.syspath_prepend(str(tmp_path))
    places = scratch(tmp_path)
    if case.setup:
        case.setup(tmp_path)
    out = tmp_path / "out"
    kept = {name: snapshot(out, tmp_path / "none").get(name) for name in case.keep}
    before = snapshot(tmp_path, out)
    capsys.readouterr()
    code = main([arg.format(**places) for arg in case.argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == case.code, captured.err
    assert "Traceback" not in captured.err
    errors = [line for line in lines if not line.startswith("... ")]  # progress of a long step may precede
    assert len(errors) == 1 and errors[0].startswith("error:"), lines
    assert re.search(case.message, errors[0]), errors[0]
    assert snapshot(tmp_path, out) == before, "files outside the output folder changed"
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == sorted(case.keep), left
    assert {name: snapshot(out, tmp_path / "none").get(name) for name in case.keep} == kept
    assert not (tmp_path / MARKER).exists(), "a payload's code ran"


def test_a_malformed_limit_in_the_environment_is_one_line_for_every_command():
    """Limits are read at import: a typo there stops the CLI with one line, exit 2, and no
    traceback, even for a command that would not use the limit."""
    environment = {**os.environ, "EDGEPORT_MAX_INPUT_BYTES": "abc"}
    done = subprocess.run([sys.executable, "-m", "edgeport", "zoo"], capture_output=True, text=True, env=environment,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: the environment variable EDGEPORT_MAX_INPUT_BYTES='abc' is not a positive integer "
        "(unset it, or give a limit)"]


def test_sigterm_mid_export_leaves_no_staging_folder(tmp_path):
    """A `timeout` kill (SIGTERM) mid-export unwinds like Ctrl-C: nothing staged is left."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "edgeport", "export", "vit-digits", "--to", "onnx,coreml",
                                "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob(".edgeport-staging-*")):
        time.sleep(0.05)
    assert list(out.glob(".edgeport-staging-*")), "the export never staged anything"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert not list(out.glob(".edgeport-staging-*"))


def test_a_killed_exports_staging_folder_is_swept_by_the_next(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".edgeport-staging-{dead.stdout.strip()}-abc"
    (stale / "half.onnx").parent.mkdir(parents=True)
    (stale / "half.onnx").write_bytes(b"half-written")
    mine = out / f".edgeport-staging-{os.getpid()}-live"  # a live process's folder stays
    mine.mkdir()
    assert main(["export", "cnn-digits", "-o", str(out)]) == 0
    assert not stale.exists() and mine.exists()


def test_a_previous_artifact_is_replaced(tmp_path):
    out = tmp_path / "out"
    assert main(["export", "cnn-digits", "-o", str(out)]) == 0
    first = (out / "cnn-digits.onnx.edgeport.json").read_text()
    assert main(["export", "cnn-digits", "-o", str(out)]) == 0
    assert json.loads((out / "cnn-digits.onnx.edgeport.json").read_text())["created"] >= json.loads(first)["created"]


def test_results_go_to_stdout_and_diagnostics_to_stderr(capsys):
    assert main(["zoo"]) == 0
    captured = capsys.readouterr()
    assert "vit-digits" in captured.out and captured.err == ""
