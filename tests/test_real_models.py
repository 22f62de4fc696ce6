"""Real models through every path, with default settings: no false failure, no crash.

The set (see `real_models`): six timm image classifiers with random weights, MiniLM, MTCNN's
ONet and RNet and Silero VAD with the weights their packages ship, Silero both as the
network module and as its TorchScript file. Each exports to ONNX and is verified on the
default inputs; the models named in the real-model issue go to Core ML as well, which may
refuse one, but only with a reason. Only an `EdgeportError` may reach the caller. (Core ML
conversion of the image classifiers is left to the backend's own tests: it costs 20-40 s a
model on two cores.)
"""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import edgeport as ep
import real_models
from edgeport.core import IMAGE_RANGES, Source, Tolerance, feeds_from, image_range, natural_images

# Models exported to Core ML too. Each is verified or refused with the reason in one line; the
# refusals are being lifted in the Core ML backend (per-channel PReLU on rank-3 input, an input
# named `state`, int64 token ids, its MIL interpreter check off macOS).
COREML = {"mtcnn_onet", "mtcnn_rnet", "silero_module", "silero_jit", "minilm"}

MODELS = {
    **{name: (lambda name=name: real_models.image_model(name)) for name in real_models.IMAGE_MODELS},
    "minilm": real_models.minilm,
    "mtcnn_onet": lambda: real_models.mtcnn("ONet"),
    "mtcnn_rnet": lambda: real_models.mtcnn("RNet"),
    "silero_module": real_models.silero_module,
    "silero_jit": lambda: (ep.load_model(f"{real_models.silero_file()}:_model"), real_models.silero_example()),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exports_and_verifies_with_default_settings(name, tmp_path):
    model, example = MODELS[name]()
    try:
        artifacts = ep.export(model, example, targets=["onnx", "coreml"] if name in COREML else ["onnx"],
                              out=tmp_path)
        failures = {}
    except ep.CheckFailed as failed:  # one target failed: the other is committed, and why is recorded
        assert failed.results is not None, str(failed)
        artifacts, failures = failed.results, failed.results.failures
    onnx = artifacts["onnx"]
    assert onnx.parity.passed, onnx.parity.summary()
    assert all(o.max_rel_error <= 1e-4 for o in onnx.parity.outputs), onnx.parity.summary()
    if "coreml" in failures:
        assert re.search("core ?ml", failures["coreml"], re.IGNORECASE) and "\n" not in failures["coreml"]
    elif name in COREML:
        coreml = artifacts["coreml"]
        assert coreml.parity is None or coreml.parity.passed, coreml.parity.summary()
    if name in real_models.IMAGE_MODELS:  # what was used, said: the range its first BatchNorm matches best
        expected = image_range(model, (example,), 0, example.numpy())
        assert f"1/f-spectrum images, {expected.name}" in onnx.parity.inputs_source
    if name == "minilm":  # a ModelOutput's names, not output_<i>
        assert [o.name for o in onnx.outputs] == [o.name for o in onnx.parity.outputs] == \
            ["last_hidden_state", "pooler_output"]
    if name == "silero_module":  # profile takes the Artifact export returned
        profile = ep.profile(onnx, runs=5, warmup=1, sessions=1, ops=False, energy=False, idle_s=0)
        assert profile.summary()


def test_state_with_its_batch_on_axis_1_splits_there(tmp_path):
    """Silero's LSTM state is [2, batch, 128]: a batch of 4 streams verifies as 4 feeds of the
    static artifact, the state split along axis 1, not axis 0."""
    model, (audio, state) = real_models.silero_module()
    audio4 = torch.cat([audio, audio.flip(1), audio * 0.1, -audio])
    state4 = torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(0)) * 0.1
    artifact = ep.export(model, (audio, state), out=tmp_path, verify_inputs=[(audio4, state4)])["onnx"]
    assert artifact.parity.passed and artifact.parity.samples == 4
    feeds = feeds_from(["x", "state"], [(audio4, state4)], artifact.inputs)
    assert [f["state"].shape for f in feeds] == [(2, 1, 128)] * 4
    np.testing.assert_array_equal(feeds[2]["state"][:, 0], state4[:, 2].numpy())
    with pytest.raises(ep.UserError, match="the same number of times"):
        feeds_from(["x", "state"], [(audio4, state4[:, :2])], artifact.inputs)
    report = ep.verify(artifact, model, [(audio4, state4)])
    assert report.passed and report.samples == 4
    with pytest.raises(ep.UserError, match="dynamic batch on axis 0.*name that axis"):
        ep.export(model, (audio, state), out=tmp_path / "dynamic", dynamic_batch=True)


def test_silero_module_is_the_shipped_network():
    """With the TorchScript file's weights (the safetensors hold another training snapshot),
    the module computes what the shipped TorchScript network does."""
    scripted = ep.load_model(f"{real_models.silero_file()}:_model")
    weights = dict(scripted.named_parameters()) | dict(scripted.named_buffers())
    renamed = {"stft_conv.weight": "stft.forward_basis_buffer", "final_conv.weight": "decoder.decoder.2.weight",
               "final_conv.bias": "decoder.decoder.2.bias",
               **{f"conv{i + 1}.{kind}": f"encoder.{i}.reparam_conv.{kind}" for i in range(4)
                  for kind in ("weight", "bias")},
               **{f"lstm_cell.{kind}": f"decoder.rnn.{kind}" for kind in
                  ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}}
    module = real_models.SileroVad().eval()
    module.load_state_dict({ours: weights[theirs].detach() for ours, theirs in renamed.items()})
    audio, state = real_models.silero_example()
    with torch.no_grad():
        for ours, theirs in zip(module(audio, state), scripted(audio, state)):
            assert float((ours - theirs).abs().max()) <= 1e-5


def test_torchscript_files_load_checked(tmp_path):
    path = real_models.silero_file()
    with pytest.raises(ep.UserError, match=r"forward takes sr: int.*silero_vad\.jit:_model"):
        ep.export(str(path), real_models.silero_example()[0][:, 64:], out=tmp_path)
    with pytest.raises(ep.UserError, match="no submodule 'missing'.*_model, _model_8k"):
        ep.load_model(f"{path}:missing")
    artifact = ep.export(f"{path}:_model", real_models.silero_example(), out=tmp_path)["onnx"]
    assert artifact.exporter == "legacy-torchscript" and "TorchScript module" in artifact.notes[0]
    assert [i.name for i in artifact.inputs] == ["x", "state"] and artifact.parity.passed


class WritesAFile(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, "edgeport-payload-ran.pt")
        return x + 1


def test_torchscript_archive_that_writes_files_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.jit.script(WritesAFile()).save(str(tmp_path / "payload.pt"))  # a TorchScript .pt, not weights
    with pytest.raises(ep.UserError, match="aten::save, an operator that touches files"):
        ep.load_model(str(tmp_path / "payload.pt"))
    assert not (tmp_path / "edgeport-payload-ran.pt").exists()


class Cancelling(nn.Module):
    """The output is the small difference of two large results (weights differing by 1e-3 of
    themselves): fp32 rounding alone is above 1e-4 of the output's scale, in torch too."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(256, 8), nn.Linear(256, 8)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(8, 256, generator=generator))
            self.b.weight.copy_(self.a.weight * (1 + 1e-3 * torch.randn(8, 256, generator=generator)))
            self.b.bias.copy_(self.a.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) - self.b(x)


def test_fp32_is_judged_against_the_models_own_noise_floor(tmp_path):
    model, example = Cancelling().eval(), torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    artifact = ep.export(model, example, out=tmp_path)["onnx"]
    output = artifact.parity.outputs[0]
    assert output.passed and output.max_rel_error > 1e-4  # the fixed bound alone would reject it
    assert "noise floor" in output.tolerance.why and output.tolerance.max_error > 1e-4
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.b.bias.add_(0.05 * float(output.scale))  # an error well above the noise
    report = ep.verify(artifact, wrong, [example])
    assert not report.passed and "noise floor" in report.outputs[0].tolerance.why
    with pytest.raises(ep.CheckFailed, match="verify on real samples.*--verify-inputs"):
        ep.export(model, example, out=tmp_path / "bad", tolerance=Tolerance("relative-to-scale", 1e-12))


@pytest.mark.parametrize("trained_on", [2, 3])  # ImageNet normalization, pixels in [0, 255]
def test_image_inputs_take_the_range_the_first_batchnorm_saw(trained_on):
    model, example = real_models.image_model("resnet18")
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average: the statistics of everything seen
    with torch.no_grad():
        for seed in range(4):
            pixels = natural_images((4, 3, 64, 64), np.random.default_rng(seed))
            model(torch.from_numpy(IMAGE_RANGES[trained_on].present(pixels)).float())
    model.eval()
    chosen = image_range(model, (torch.randn(1, 3, 64, 64),), 0, np.zeros(1))
    assert chosen.name == IMAGE_RANGES[trained_on].name and "BatchNorm" in chosen.why
    source = Source(model, (example,), "resnet").with_default_verification()
    assert IMAGE_RANGES[trained_on].name in source.verification_label


def test_slims_transformers_resnet_that_torch_fx_cannot_trace(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[64, 128], depths=[1, 1],
                                       layer_type="bottleneck")
    model = transformers.ResNetModel(config).eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    for layer in model.modules():
        if type(layer).__name__ == "ResNetBottleNeckLayer":
            for conv_layer in layer.layer[:2]:
                prune.ln_structured(conv_layer.convolution, "weight", amount=0.5, n=2, dim=0)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    slimmed, report = ep.slim(model, images[:1])
    assert report.changed and report.macs_after < 0.75 * report.macs_before, report.summary()
    assert type(slimmed) is type(model) and slimmed.encoder.stages[0].layers[0].layer[0].convolution.out_channels == 8
    with torch.no_grad():
        before, after = model(images).last_hidden_state, slimmed(images).last_hidden_state
    assert float((before - after).abs().max() / before.abs().max()) <= 1e-5
    artifact = ep.export(model, images[:1], out=tmp_path, slim=True)["onnx"]
    assert artifact.parity.passed and artifact.settings["slim"]["macs_after"] == report.macs_after
