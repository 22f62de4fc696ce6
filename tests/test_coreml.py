"""Core ML: real coremltools conversion, every package verified numerically (Core ML on macOS,
the MIL interpreter elsewhere), decompositions, flexible shapes, weight compression."""
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import edgeport as ep
import real_models
from edgeport.export.mil import MILInterpreterRunner, MILProgram
from hf_models import ARCHITECTURES

ON_MAC = platform.system() == "Darwin"
# attention masks with new_ones and __and__ (BERT family), diff (GPT-2): no coremltools converter
NEED_DECOMPOSITIONS = {"bert", "roberta", "distilbert", "albert", "electra", "mpnet", "xlm-roberta", "mobilebert",
                       "gpt2"}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_transformers_architectures_verify_at_fp32_and_fp16(name, tmp_path):
    """fp32 within the ONNX tolerance (1e-4 of scale); fp16 within 1e-2 of scale or, for MobileViT
    (whose random weights at init amplify rounding), within 10x the error torch itself makes
    computing the model in fp16, the tolerance saying so."""
    model, example = ARCHITECTURES[name]()
    fp32 = ep.export(model, example, targets=["coreml"], out=tmp_path, name="fp32")["coreml"]
    assert fp32.parity.passed and fp32.parity.candidate == "mil-interpreter (fp32)", fp32.parity.summary()
    assert all(o.max_rel_error <= 1e-4 for o in fp32.parity.outputs)
    if name in NEED_DECOMPOSITIONS:
        assert any(note.startswith("decomposed for Core ML") for note in fp32.notes)
    fp16 = ep.export(model, example, targets=["coreml"], out=tmp_path, name="fp16", coreml_precision="fp16")["coreml"]
    assert fp16.parity.passed and fp16.parity.candidate == "mil-interpreter (fp16)", fp16.parity.summary()
    by_noise_floor = [o for o in fp16.parity.outputs if "noise floor" in o.tolerance.why]
    assert all(o.max_rel_error <= 1e-2 for o in fp16.parity.outputs if o not in by_noise_floor)
    assert (name == "mobilevit") == bool(by_noise_floor), [o.tolerance.why for o in fp16.parity.outputs]
    assert all(o.cosine > 0.999 for o in by_noise_floor)


def test_the_fp16_noise_floor_does_not_admit_a_planted_fault(tmp_path):
    """MobileViT's fp16 package passes only by the noise-floor rule; the same package against the
    model with two output channels of one middle conv swapped must still fail."""
    import copy

    model, example = ARCHITECTURES["mobilevit"]()
    package = ep.export(model, example, targets=["coreml"], out=tmp_path, coreml_precision="fp16")["coreml"].path
    planted = copy.deepcopy(model)
    convs = [m for m in planted.modules() if isinstance(m, nn.Conv2d) and m.out_channels > 1 and m.groups == 1]
    weight = convs[len(convs) // 2].weight.data
    weight[[0, 1]] = weight[[1, 0]]
    report = ep.verify(package, planted, [example])
    assert not report.passed, report.summary()


class Ranked(nn.Module):
    def forward(self, x):
        return torch.kthvalue(x, 2, dim=1).values


class HasKth(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.rank = nn.Linear(5, 5), Ranked()

    def forward(self, x):
        return self.rank(self.proj(x))


def test_an_op_without_converter_or_decomposition_is_named_with_its_module(tmp_path):
    with pytest.raises(ep.ExportError, match=r"kthvalue in rank"):
        ep.export(HasKth(), torch.randn(2, 5), targets=["coreml"], out=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("name", ["ONet", "RNet"])
def test_mtcnn_prelu_with_per_channel_alpha_converts_and_verifies(name, tmp_path):
    """coremltools refuses PReLU with per-channel alpha on ONet's and RNet's rank-2 dense
    layers; it is decomposed to where(x > 0, x, alpha * x) and the package verified."""
    model, image = real_models.mtcnn(name)
    artifact = ep.export(model, image, targets=["coreml"], out=tmp_path)["coreml"]
    assert any("prelu (per-channel alpha below rank 4)" in note for note in artifact.notes)
    assert artifact.parity.passed and all(o.max_rel_error <= 1e-4 for o in artifact.parity.outputs)


def test_a_renamed_input_is_mapped_not_rejected(tmp_path):
    """Silero VAD's `state` is a reserved word in MIL, so coremltools names it
    `state_workaround`; the artifact maps the model's name to the package's and verifies."""
    model, example = real_models.silero_module()
    artifact = ep.export(model, example, targets=["coreml"], out=tmp_path)["coreml"]
    assert artifact.settings["input_names"] == {"state": "state_workaround"}
    assert [spec.name for spec in artifact.inputs] == ["x", "state_workaround"] and artifact.parity.passed
    runner = MILInterpreterRunner(artifact.path, artifact.settings["input_names"]).load()
    by_model_name = runner.infer({"x": example[0].numpy(), "state": example[1].numpy()})
    with torch.no_grad():
        probability, _ = model(*example)
    assert np.allclose(by_model_name["output_0"], probability.numpy(), atol=1e-6)


def test_a_dynamic_sequence_becomes_a_flexible_shape_verified_at_two_lengths(tmp_path):
    model, example = real_models.minilm()
    axes = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    artifact = ep.export(model, example, targets=["coreml"], out=tmp_path, dynamic_axes=axes)["coreml"]
    assert [spec.shape for spec in artifact.inputs] == [[2, "sequence"], [2, "sequence"]]
    assert artifact.settings["flexible_ranges"] == {"sequence": [1, 512]}  # MiniLM's 512 positions
    # an ML Program declares no output shape where it follows a flexible input: the sidecar does
    assert [spec.shape for spec in artifact.outputs][:2] == [[2, "sequence", 384], [2, 384]]
    second = artifact.settings["verification"]["flexible_shapes"]
    assert second["sizes"] == {"sequence": 19} and second["checked"].endswith("passed")
    assert artifact.parity.passed  # and at the example's 16 tokens
    assert artifact.settings["verification"]["structure"]["package_inputs"] == {"input_ids": "int32",
                                                                                "attention_mask": "int32"}


def test_a_dynamic_batch_from_an_example_of_one_reaches_down_to_one(tmp_path):
    artifact = ep.export("cnn-digits", targets=["coreml"], out=tmp_path, dynamic_batch=True)["coreml"]
    assert artifact.inputs[0].shape == ["batch", 1, 8, 8] and artifact.outputs[0].shape == ["batch", 10]
    assert artifact.settings["flexible_ranges"]["batch"][0] == 1 and artifact.parity.passed
    assert artifact.settings["verification"]["flexible_shapes"]["sizes"] == {"batch": 4}


class FixesItsLength(nn.Module):
    def forward(self, x):
        return x.reshape(2, 8) * 2


def test_a_dynamic_axis_the_model_fixes_is_refused_clearly(tmp_path):
    with pytest.raises(ep.ExportError, match="dynamic axes .* kept"):
        ep.export(FixesItsLength(), torch.randn(1, 16), targets=["coreml"], out=tmp_path,
                  dynamic_axes={"x": {1: "length"}})


def test_a_quantized_bert_style_encoder_converts_and_verifies(tmp_path):
    """ep.quantize(BERT) used to fail with `new_ones` on the traced path: the quantized form
    now goes through torch.export and the same decompositions as fp32."""
    model, example = ARCHITECTURES["bert"]()
    qmodel = ep.quantize(model, example)
    artifact = ep.export(qmodel, example, targets=["coreml"], out=tmp_path)["coreml"]
    histogram = artifact.settings["verification"]["structure"]["op_histogram"]
    assert artifact.exporter == "torch.export" and histogram["quantize"] == histogram["dequantize"] > 0
    assert artifact.precision == "w8a8" and artifact.parity.passed, artifact.parity.summary()
    assert any("new_ones" in note for note in artifact.notes)


@pytest.mark.parametrize("mode, op, target", [("int8", "constexpr_affine_dequantize", "iOS16"),
                                              ("int4", "constexpr_blockwise_shift_scale", "iOS18"),
                                              ("palettize4", "constexpr_lut_to_dense", "iOS16")])
def test_weight_compression_modes(mode, op, target, tmp_path):
    artifact = ep.export("cnn-digits", targets=["coreml"], out=tmp_path, coreml_weights=mode)["coreml"]
    assert artifact.settings["verification"]["structure"]["op_histogram"][op] >= 3
    assert artifact.settings["minimum_deployment_target"] == target and artifact.settings["target_reason"]
    assert artifact.parity.passed


def test_fp16_compute_and_bad_options(tmp_path):
    artifact = ep.export("cnn-digits", targets=["coreml"], out=tmp_path, coreml_precision="fp16")["coreml"]
    assert artifact.settings["compute_precision"] == "fp16" and MILProgram(artifact.path).precision == "fp16"
    with pytest.raises(ep.UserError, match="coreml_weights .* 'int3' is not one of int8, int4"):
        ep.export("cnn-digits", targets=["coreml"], out=tmp_path, coreml_weights="int3")
    with pytest.raises(ep.UserError, match="coreml_precision .* 'bf16' is not one of fp32, fp16"):
        ep.export("cnn-digits", targets=["coreml"], out=tmp_path, coreml_precision="bf16")


@pytest.mark.needs_macos
@pytest.mark.skipif(not ON_MAC, reason="needs macOS: coremltools predicts only there")
def test_predictions_match_torch_on_macos(tmp_path):
    artifact = ep.export("vit-digits", targets=["coreml"], out=tmp_path, coreml_precision="fp16")["coreml"]
    assert artifact.parity is not None and artifact.parity.passed and artifact.parity.candidate == "coreml"


def test_a_quantized_cnn_keeps_its_conv_output_quantizers(tmp_path):
    """An 8-bit conv's result is quantized too (the pattern ONNX Runtime runs as QLinearConv);
    the Core ML form keeps those quantizers, so the package equals the fake-quant model, not
    merely comes close to it."""
    qmodel = ep.quantize("cnn-digits")
    artifact = ep.export(qmodel, ep.zoo.example("cnn-digits"), targets=["coreml"], out=tmp_path)["coreml"]
    histogram = artifact.settings["verification"]["structure"]["op_histogram"]
    assert histogram["quantize"] == histogram["dequantize"] == 4 + 4 + 1  # conv inputs, conv outputs, the linear's input
    assert artifact.parity.passed and max(o.max_rel_error for o in artifact.parity.outputs) < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_models_convert_with_activation_qdq_and_compressed_weights(bits, tmp_path):
    qmodel = ep.quantize("vit-digits", w_bits=bits, a_bits=bits)
    artifact = ep.export(qmodel, ep.zoo.example("vit-digits"), targets=["coreml"], out=tmp_path)["coreml"]
    histogram = artifact.settings["verification"]["structure"]["op_histogram"]
    # every quantized layer's input, both operands of 8 attention matmuls, and at 8 bits the
    # patch-embedding conv's output (the QLinearConv pattern)
    assert histogram["quantize"] == histogram["dequantize"] == 18 + 16 + (bits == 8)
    weights_op = "constexpr_affine_dequantize" if bits == 8 else "constexpr_blockwise_shift_scale"
    assert histogram[weights_op] == 18 and artifact.precision == f"w{bits}a8"
    assert artifact.settings["minimum_deployment_target"] == ("iOS17" if bits == 8 else "iOS18")
    assert artifact.parity.passed
    if bits == 4:  # what Core ML cannot express is listed
        assert any("4-bit activations run as 8-bit" in note for note in artifact.notes)


def test_cli_verify_of_a_package_keeps_coremltools_import_noise_off_stderr(tmp_path):
    """A fresh process's first import of coremltools, by the runner's load, warns of untested
    torch and scikit-learn versions and logs each native proxy missing off macOS: none of it
    reaches the user, as none does on export."""
    package = ep.export("cnn-digits", targets=["coreml"], out=tmp_path)["coreml"].path
    verified = subprocess.run([sys.executable, "-m", "edgeport", "verify", str(package), "--against", "cnn-digits"],
                              capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0, verified.stderr
    noise = [line for line in verified.stderr.splitlines() if "libcoremlpython" in line
             or "has not been tested" in line or "scikit-learn version" in line]
    assert not noise, verified.stderr


class GhostModule(nn.Module):
    """GhostNet's block: a primary and a cheap depthwise half concatenated, then cut to the
    output width; when that is all of it, torch.export leaves `aten.alias`, which coremltools
    has no converter for (timm's ghostnet and swin took the tracing fallback, and with dynamic
    axes could not convert at all)."""

    def __init__(self):
        super().__init__()
        self.primary, self.cheap = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], dim=1)[:, :8]


def test_a_whole_tensor_slice_converts_through_torch_export(tmp_path):
    torch.manual_seed(0)
    program = torch.export.export(GhostModule().eval(), (torch.randn(1, 3, 8, 8),)).run_decompositions({})
    assert torch.ops.aten.alias.default in {n.target for n in program.graph.nodes}  # what this test is about
    artifact = ep.export(GhostModule().eval(), torch.randn(1, 3, 8, 8), targets=["coreml"], out=tmp_path)["coreml"]
    assert artifact.exporter == "torch.export" and not any("failed" in note for note in artifact.notes)
    assert artifact.parity.passed, artifact.parity.summary()


class ReturnsOneTensorTwice(nn.Module):
    """A snnTorch Lapicque step returns its membrane as an output and as its next state: one
    tensor, two outputs. coremltools named both outputs alike and verification crashed with
    an IndexError."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return y.relu(), y, y, x


def test_a_tensor_returned_twice_becomes_distinct_outputs(tmp_path):
    artifact = ep.export(ReturnsOneTensorTwice().eval(), torch.randn(2, 4), targets=["coreml"],
                         out=tmp_path)["coreml"]
    assert [o.name for o in artifact.outputs] == ["output_0", "output_1", "output_2", "output_3"]
    assert artifact.exporter == "torch.export" and artifact.parity.passed, artifact.parity.summary()
    assert [o.name for o in artifact.parity.outputs] == ["output_0", "output_1", "output_2", "output_3"]


def test_a_spiking_step_whose_output_is_its_state_verifies(tmp_path):
    """snnTorch's Lapicque neuron followed by a Leaky that returns (spikes, membrane), as its
    tutorials build them: in the step form that membrane is both an output and the next state.
    The package's outputs were named alike and verification asked for a state it was not given."""
    snntorch = pytest.importorskip("snntorch", reason="snntorch is in the dev extra")

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), snntorch.Lapicque(R=5.1, C=5e-3, time_step=1e-3, init_hidden=True),
                        nn.Linear(32, 10), snntorch.Leaky(beta=0.8, init_hidden=True, output=True))
    artifact = ep.export(net, torch.rand(1, 64), targets=["coreml"], out=tmp_path, snn_form="step",
                         timesteps=4)["coreml"]
    assert artifact.parity.passed, artifact.parity.summary()
    assert len({o.name for o in artifact.outputs}) == len(artifact.outputs) == 4


def test_a_negative_dynamic_axis_counts_from_the_end(tmp_path):
    artifacts = ep.export("cnn-digits", targets=["coreml", "onnx"], out=tmp_path, dynamic_axes={"x": {-1: "width"}})
    assert artifacts["coreml"].inputs[0].shape == [1, 1, 8, "width"] and artifacts["coreml"].parity.passed
    assert artifacts["coreml"].settings["verification"]["flexible_shapes"]["checked"].endswith("passed")
    assert artifacts["onnx"].inputs[0].shape == [1, 1, 8, "width"] and artifacts["onnx"].parity.passed
    # with dynamic_batch, -4 is the batch axis itself, named once
    batch = ep.export("cnn-digits", out=tmp_path / "batch", dynamic_batch=True, dynamic_axes={"x": {-4: "n"}})["onnx"]
    assert batch.inputs[0].shape == ["n", 1, 8, 8]


@pytest.mark.parametrize("target", ["coreml", "onnx"])
@pytest.mark.parametrize("axis", [4, -5, "2"])
def test_a_dynamic_axis_beyond_the_rank_is_refused_in_one_line(tmp_path, target, axis):
    with pytest.raises(ep.UserError, match=rf"dynamic axis {axis!r} of input 'x' does not exist: it has 4 axes"):
        ep.export("cnn-digits", targets=[target], out=tmp_path, dynamic_axes={"x": {axis: "depth"}})
    assert list(tmp_path.iterdir()) == []
