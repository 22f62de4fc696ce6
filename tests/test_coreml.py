"""Core ML: real coremltools conversion, structural checks, decompositions, weight compression."""
import platform

import pytest
import torch
from torch import nn

import edgeport as ep
from hf_models import ARCHITECTURES

ON_MAC = platform.system() == "Darwin"


@pytest.mark.parametrize("name", ["bert", "gpt2", "distilbert", "vit"])
def test_transformers_that_raw_coremltools_rejects_convert(name, tmp_path):
    """BERT-family attention masks use new_ones and __and__, GPT-2 uses diff: coremltools 9.0
    has no converter for them; PyTorch's decompositions do."""
    model, example = ARCHITECTURES[name]()
    artifact = ep.export(model, example, targets=["coreml"], out=tmp_path)["coreml"]
    structure = artifact.settings["verification"]["structure"]
    assert structure["reloaded"] and structure["outputs"] == ["output_0", "output_1"][:len(structure["outputs"])]
    if name != "vit":
        assert any(note.startswith("decomposed for Core ML") for note in artifact.notes)


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


@pytest.mark.parametrize("mode, op, target", [("int8", "constexpr_affine_dequantize", "iOS16"),
                                              ("int4", "constexpr_blockwise_shift_scale", "iOS18"),
                                              ("palettize4", "constexpr_lut_to_dense", "iOS16")])
def test_weight_compression_modes(mode, op, target, tmp_path):
    artifact = ep.export("vit-digits", targets=["coreml"], out=tmp_path, coreml_weights=mode)["coreml"]
    assert artifact.settings["verification"]["structure"]["op_histogram"][op] >= 16
    assert artifact.settings["minimum_deployment_target"] == target and artifact.settings["target_reason"]


def test_fp16_compute_and_bad_options(tmp_path):
    artifact = ep.export("cnn-digits", targets=["coreml"], out=tmp_path, coreml_precision="fp16")["coreml"]
    assert artifact.settings["compute_precision"] == "fp16"
    with pytest.raises(ep.UserError, match="coreml_weights .* 'int3' is not one of int8, int4"):
        ep.export("cnn-digits", targets=["coreml"], out=tmp_path, coreml_weights="int3")
    with pytest.raises(ep.UserError, match="coreml_precision .* 'bf16' is not one of fp32, fp16"):
        ep.export("cnn-digits", targets=["coreml"], out=tmp_path, coreml_precision="bf16")


@pytest.mark.needs_macos
@pytest.mark.skipif(not ON_MAC, reason="needs macOS: coremltools predicts only there")
def test_predictions_match_torch_on_macos(tmp_path):
    artifact = ep.export("vit-digits", targets=["coreml"], out=tmp_path, coreml_precision="fp16")["coreml"]
    assert artifact.parity is not None and artifact.parity.passed


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_models_convert_with_activation_qdq_and_compressed_weights(bits, tmp_path):
    qmodel = ep.quantize("vit-digits", w_bits=bits, a_bits=bits)
    artifact = ep.export(qmodel, ep.zoo.example("vit-digits"), targets=["coreml"], out=tmp_path)["coreml"]
    histogram = artifact.settings["verification"]["structure"]["op_histogram"]
    assert histogram["quantize"] == histogram["dequantize"] == 18 + 16  # every quantized layer's input, both operands of 8 attention matmuls
    weights_op = "constexpr_affine_dequantize" if bits == 8 else "constexpr_blockwise_shift_scale"
    assert histogram[weights_op] == 18 and artifact.precision == f"w{bits}a8"
    assert artifact.settings["minimum_deployment_target"] == ("iOS17" if bits == 8 else "iOS18")
    if bits == 4:  # what Core ML cannot express is listed
        assert any("4-bit activations run as 8-bit" in note for note in artifact.notes)
