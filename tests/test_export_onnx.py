"""ONNX export: real torch exporters, real onnx checker, real ONNX Runtime; no mocks."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import edgeport as ep
from edgeport.export import onnx as onnx_export
from conftest import leftovers


@pytest.mark.parametrize("name", ["cnn-digits", "snn-digits", "vit-digits"])
def test_zoo_model_exports_and_verifies_on_test_images(name, out):
    artifact = ep.export(name, out=out)["onnx"]
    assert artifact.exporter == "torch.export" and artifact.opset == 20
    parity = artifact.parity
    assert parity.passed and parity.samples == 64 and "test images" in parity.inputs_source
    assert all(o.max_rel_error <= 1e-4 for o in parity.outputs)
    model = onnx.load(str(artifact.path))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["edgeport.precision"] == "fp32" and props["edgeport.exporter"] == "torch.export"
    assert props["edgeport.source_sha256"] == artifact.source_sha256 == onnx_export.source_sha256(ep.zoo.load(name))
    sidecar = json.loads(artifact.sidecar.read_text())
    assert sidecar["format"] == "onnx" and sidecar["parity"]["passed"] and sidecar["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert ep.Artifact.load(artifact.path).parity.passed
    assert leftovers(out) == sorted([artifact.path.name, artifact.sidecar.name])


def test_dynamic_batch_runs_any_batch(out):
    artifact = ep.export("vit-digits", out=out, dynamic_batch=True)["onnx"]
    assert artifact.inputs[0].shape[0] == "batch" and artifact.outputs[0].shape[0] == "batch"
    images = ep.zoo.testset("vit-digits")[0][:5]
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": images.numpy()})[0]
    with torch.no_grad():
        expected = ep.zoo.load("vit-digits")(images).numpy()
    assert logits.shape == (5, 10) and np.abs(logits - expected).max() < 1e-4 * np.abs(expected).max()


def test_a_dynamic_axis_the_model_fixes_is_refused_by_name(out, capfd):
    """A learned 16x16 position map fixes height and width: torch.export says so, and the
    legacy exporter, which would write them symbolic anyway (a file that passes at 16x16 and
    fails at every other size), is not tried."""
    class PositionMap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.position = nn.Conv2d(3, 4, 3, padding=1), nn.Parameter(torch.randn(1, 4, 16, 16))

        def forward(self, x):
            return (self.conv(x) + self.position).mean((2, 3))

    with pytest.raises(ep.UserError, match=r"fixes the size of a dynamic axis: x axis 2 is always 16, x axis 3 is "
                                           r"always 16"):
        ep.export(PositionMap().eval(), torch.randn(1, 3, 16, 16), out=out, dynamic_axes={"x": {2: "h", 3: "w"}})
    assert leftovers(out) == [] and capfd.readouterr().out == ""


def test_opset_below_18_takes_the_legacy_exporter(out):
    artifact = ep.export("cnn-digits", out=out, opset=17)["onnx"]
    assert artifact.exporter == "legacy-torchscript" and artifact.opset == 17
    assert any("opset 17" in note for note in artifact.notes)
    assert artifact.parity.passed


def test_large_models_use_external_data(out, monkeypatch):
    monkeypatch.setattr(onnx_export, "SINGLE_FILE_LIMIT", 10_000)  # the real limit needs a 2 GB model
    artifact = ep.export("cnn-digits", out=out)["onnx"]
    assert artifact.settings["external_data"] and (out / "cnn-digits.onnx.data").exists()
    assert artifact.path.stat().st_size < (out / "cnn-digits.onnx.data").stat().st_size / 5
    assert artifact.parity.passed and artifact.files == ["cnn-digits.onnx.data", "cnn-digits.onnx"]


class DataDependent(nn.Module):
    """torch.export cannot trace a branch on a tensor's value; the legacy tracer can."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        if y.sum() > -1e9:
            return torch.relu(y)
        return y


def test_fallback_to_legacy_is_recorded_and_verified(out):
    artifact = ep.export(DataDependent(), torch.randn(2, 4), out=out)["onnx"]
    assert artifact.exporter == "legacy-torchscript"
    assert any(note.startswith("torch.export failed") for note in artifact.notes)
    assert artifact.parity.passed


class Spectral(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x).real


class HasEig(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.spectral = Spectral()

    def forward(self, x):
        return self.spectral(self.proj(x))


def test_unexportable_model_names_op_and_module_path(out):
    with pytest.raises(ep.ExportError) as caught:
        ep.export(HasEig(), torch.randn(2, 3, 3), out=out)
    message = str(caught.value)
    assert "aten.linalg_eig" in message and "spectral (Spectral)" in message
    assert leftovers(out) == []


def test_failed_verification_leaves_nothing(out):
    model = ep.zoo.load("cnn-digits")
    tight = ep.Tolerance("relative-to-scale", max_error=1e-12, why="impossibly tight, for the test")
    with pytest.raises(ep.CheckFailed, match="output_0"):
        ep.export(model, ep.zoo.example("cnn-digits"), out=out, tolerance=tight)
    assert leftovers(out) == []


def test_wrong_input_shape_is_a_user_error(out):
    with pytest.raises(ep.UserError, match="does not accept input 1x3x8x8"):
        ep.export(ep.zoo.load("cnn-digits"), torch.zeros(1, 3, 8, 8), out=out)
    assert leftovers(out) == []


def test_unknown_target(out):
    with pytest.raises(ep.UserError, match="unknown target 'onxx'; did you mean onnx"):
        ep.export("cnn-digits", targets=["onxx"], out=out)


class CutToTracedLength(nn.Module):
    """Keeps as many positions as the traced input had: `int(x.shape[1])` becomes a constant in
    the legacy exporter's graph, which still declares the axis dynamic."""

    def forward(self, x):
        return x[:, :int(x.shape[1])] * 2


def test_a_dynamic_axis_the_graph_pins_fails_verification_at_another_size(out):
    """The export's verification at the example's size passes whatever the graph pins; a second
    size, which the dynamic axis promises, shows the pinned one and leaves nothing behind."""
    with pytest.raises(ep.CheckFailed, match=r"passes at the example's size but fails at seq=8"):
        ep.export(CutToTracedLength(), torch.randn(1, 5, 3), out=out, dynamic_axes={"x": {1: "seq"}},
                  exporter="legacy-torchscript")
    assert leftovers(out) == []
    model = ep.zoo.load("cnn-digits")
    artifact = ep.export(model, ep.zoo.example("cnn-digits"), out=out, dynamic_batch=True)["onnx"]
    assert artifact.settings["verification"]["dynamic_axes"] == \
        "parity onnxruntime vs torch on 4 samples (seeded inputs at batch=4): passed"
