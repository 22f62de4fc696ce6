"""Slimming: masks baked, channels and heads physically removed, same function, real libraries."""
import re
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import edgeport as ep
from edgeport.cli import main
from edgeport.transforms.slim import BiasMap, bake_masks, slim
from edgeport.zoo.models import ViT
from slim_models import (Branches, BottleneckResNet, DepthwiseChain, SlimmingViT, WidthReshapingAttention,
                         randomize_batchnorm)

IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def pruned_resnet(layers=("conv1", "conv2")) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_batchnorm(BottleneckResNet(widths=(32, 64), blocks=2))
    for block in model.modules():
        if type(block).__name__ == "Bottleneck":
            for name in layers:
                prune.ln_structured(getattr(block, name), "weight", amount=0.5, n=2, dim=0)
    return model


def test_bake_masks_accepts_a_model_straight_from_prune():
    model = pruned_resnet()
    baked = bake_masks(model)
    conv = baked.features[3].conv1
    assert "weight_orig" not in dict(conv.named_parameters()) and not conv._forward_pre_hooks
    assert hasattr(model.features[3].conv1, "weight_mask")  # the user's model keeps its masks
    with torch.no_grad():
        assert torch.equal(baked(IMAGES), model(IMAGES))


def test_residual_network_slims_to_the_same_function(tmp_path):
    model = pruned_resnet()
    slimmed, report = slim(model, IMAGES[:1])
    assert report.changed and report.macs_after < 0.6 * report.macs_before
    assert report.params_after < report.params_before
    with torch.no_grad():
        assert max_rel(model(IMAGES), slimmed(IMAGES)) <= 1e-5
    assert any(isinstance(m, BiasMap) for m in slimmed.modules())  # constants through zero padding, folded exactly
    assert report.fixed_size and "fixed to the example's height and width" in report.summary()
    artifact = ep.export(model, IMAGES[:1], out=tmp_path, slim=True, verify_inputs=[IMAGES[i:i + 1] for i in range(4)])
    art = artifact["onnx"]
    assert art.parity.passed and art.settings["slim"]["macs_after"] == report.macs_after
    with pytest.raises(ep.UserError, match="cannot be dynamic"):  # its file would fail at every other size
        ep.export(model, IMAGES[:1], out=tmp_path / "hw", slim=True, dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}})


def test_a_pruned_model_exported_without_slim_stores_each_weight_once(tmp_path):
    """Straight from torch.nn.utils.prune, a model holds weight_orig and weight_mask and
    multiplies them in forward; its plain export bakes the masks instead (the file as large as
    the dense model's) and says so."""
    model = pruned_resnet()
    artifact = ep.export(model, IMAGES[:1], out=tmp_path / "plain")["onnx"]
    dense = ep.export(bake_masks(model), IMAGES[:1], out=tmp_path / "dense")["onnx"]
    names = [init.name for init in onnx.load(str(artifact.path)).graph.initializer]
    assert artifact.parity.passed and not any("mask" in name or "orig" in name for name in names)
    assert artifact.path.stat().st_size <= 1.01 * dense.path.stat().st_size
    assert any("prune mask(s) multiplied into their weights" in note for note in artifact.notes)


def test_inconsistent_residual_mask_keeps_the_model_and_says_why():
    model = pruned_resnet(layers=("conv3",))  # zeroes channels of the residual stream in one branch only
    slimmed, report = slim(model, IMAGES[:1])
    assert not report.changed and report.macs_after == report.macs_before
    assert any("residual addition" in reason and "not constant" in reason for reason in report.kept)
    with torch.no_grad():
        assert torch.equal(slimmed(IMAGES), model(IMAGES))


class ScaledSum(nn.Module):
    """Two branches summed with torch.add's alpha: a constant channel of the sum is a + 2b."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.add(self.a(x), self.b(x), alpha=2.0))


class OverWidth(nn.Module):
    """A Linear over a conv output's last axis (its width), not its channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.mix = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(32, 5)

    def forward(self, x):
        return self.mix(torch.relu(self.conv(x)))


def test_constants_follow_torch_add_alpha_and_a_linear_over_another_axis_keeps_them():
    torch.manual_seed(0)
    model = ScaledSum().eval()
    with torch.no_grad():
        for conv in (model.a, model.b):
            conv.weight[::2] = 0  # the same output channels of both branches: constants a + 2b
    slimmed, report = slim(model, IMAGES[:1])
    assert report.removed == {"a": 4, "b": 4}
    with torch.no_grad():
        assert max_rel(model(IMAGES), slimmed(IMAGES)) <= 1e-5
    model = OverWidth().eval()
    with torch.no_grad():
        model.conv.weight[::2] = 0
    slimmed, report = slim(model, IMAGES[:1])
    assert not report.changed and any("another axis" in reason for reason in report.kept), report.kept
    with torch.no_grad():
        assert torch.equal(slimmed(IMAGES), model(IMAGES))


def test_input_channel_pruning_of_resnet18_removes_the_channels_no_layer_reads():
    """`ln_structured(..., dim=1)` zeroes a conv's input channels. conv2's come from conv1
    through bn1 and ReLU alone: conv1 and bn1 lose them. conv1's are the residual stream, which
    the residual addition carries on to layers that read them: they stay, and the report says why.
    timm's resnet18 is torchvision's block for block (torchvision cannot be imported beside torch here)."""
    from real_models import timm, trained_like

    torch.manual_seed(0)
    model = trained_like(timm().create_model("resnet18", pretrained=False, num_classes=10)).eval()
    blocks = {name: block for name, block in model.named_modules() if type(block).__name__ == "BasicBlock"}
    for block in blocks.values():
        prune.ln_structured(block.conv1, "weight", amount=0.5, n=2, dim=1)
        prune.ln_structured(block.conv2, "weight", amount=0.5, n=2, dim=1)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    slimmed, report = slim(model, images[:1])
    halves = {f"{name}.conv1": block.conv2.in_channels // 2 for name, block in blocks.items()}
    assert report.removed == halves and "removed 960 channels" in report.summary()
    block = slimmed.get_submodule("layer2.1")
    assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == 64
    assert block.conv1.in_channels == 128
    with torch.no_grad():
        assert max_rel(model(images), slimmed(images)) <= 1e-5
    kept = Counter()
    for reason in report.kept:
        count, _, rest = reason.partition(" ignored input channel(s) of ")
        kept[rest.partition(" ")[0]] += int(count)
        assert "reads them too" in rest, reason
    assert kept == {f"{name}.conv1": block.conv1.in_channels // 2 for name, block in blocks.items()}
    # layer1.0's input feeds its conv1 and the residual addition only
    assert all(re.search(r"through add_\b", reason) for reason in report.kept if " of layer1.0.conv1 " in reason)


def test_vit_mlp_input_pruning_removes_the_hidden_units():
    torch.manual_seed(0)
    model = ViT(dim=64, depth=2, heads=4).eval()
    for block in model.blocks:
        prune.ln_structured(block.mlp[2], "weight", amount=0.5, n=2, dim=1)  # fc2's inputs: fc1's outputs after GELU
    images = ep.zoo.testset("vit-digits")[0][:16]
    slimmed, report = slim(model, images[:1])
    assert report.removed == {"blocks.0.mlp.0": 128, "blocks.1.mlp.0": 128} and not report.kept
    assert slimmed.blocks[0].mlp[2].in_features == 128
    with torch.no_grad():
        assert max_rel(model(images), slimmed(images)) <= 1e-5


def test_ignored_channels_leave_both_branches_of_a_sum_but_stay_in_the_model_input():
    torch.manual_seed(0)
    model = ScaledSum().eval()
    with torch.no_grad():
        model.head.weight[:, ::2] = 0  # no layer reads the sum's even channels
        model.a.weight[:, 0] = 0
        model.b.weight[:, 0] = 0  # nor the input's first channel, which is the model's own
    slimmed, report = slim(model, IMAGES[:1])
    assert report.removed == {"a": 4, "b": 4} and slimmed.head.in_channels == 4 and slimmed.a.in_channels == 3
    assert report.kept == [f"1 ignored input channel(s) of {layer} (all-zero weights): they come from x (model input "
                           f"or parameter), which cannot lose a channel" for layer in ("a", "b")]
    with torch.no_grad():
        assert max_rel(model(IMAGES), slimmed(IMAGES)) <= 1e-5


def test_nothing_to_remove():
    model = randomize_batchnorm(BottleneckResNet(widths=(16,), blocks=1))
    slimmed, report = slim(model, IMAGES[:1])
    assert not report.changed and "nothing to remove" in report.summary()
    with torch.no_grad():
        assert torch.equal(slimmed(IMAGES), model(IMAGES))


def test_vit_mlp_units_and_attention_heads():
    torch.manual_seed(0)
    model = ViT(dim=64, depth=2, heads=4).eval()
    for block in model.blocks:
        prune.ln_structured(block.mlp[0], "weight", amount=0.5, n=2, dim=0)
        rows = torch.ones(192, 1)
        rows[128 + 16:128 + 32] = 0  # head 1's values: its output is zero whatever it attends to
        prune.custom_from_mask(block.attn.qkv, "weight", rows.expand(192, 64))
        prune.custom_from_mask(block.attn.qkv, "bias", rows.flatten())
    images = ep.zoo.testset("vit-digits")[0][:16]
    slimmed, report = slim(model, images[:1])
    assert report.removed == {"blocks.0.attn": 1, "blocks.1.attn": 1, "blocks.0.mlp.0": 128, "blocks.1.mlp.0": 128}
    assert slimmed.get_submodule("blocks.0.attn").heads == 3
    with torch.no_grad():
        assert max_rel(model(images), slimmed(images)) <= 1e-5


def test_timm_vit_attention_heads_are_removed_or_kept_with_the_reason():
    """timm's Attention reshapes its heads' output to `attn_dim`: it shrinks with the heads. With
    scale_attn_norm a LayerNorm over every head's output follows them, and the heads stay."""
    from real_models import timm

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for scale_norm, removed in ((False, 2), (True, 0)):
        torch.manual_seed(0)
        model = timm().create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                                    num_classes=10, scale_attn_norm=scale_norm).eval()
        for block in model.blocks:
            prune.custom_from_mask(block.attn.qkv, "weight", (torch.arange(576) // 64 != 6)[:, None].float().expand(576, 192))
            prune.custom_from_mask(block.attn.qkv, "bias", (torch.arange(576) // 64 != 6).float())
        slimmed, report = slim(model, images[:1])
        assert sum(report.removed.values()) == removed
        assert bool(report.kept) == scale_norm and (not scale_norm or "scale_norm" in report.kept[0])
        with torch.no_grad():
            assert max_rel(model(images), slimmed(images)) <= 1e-5


def test_heads_of_an_attention_that_reshapes_to_its_input_width_are_kept_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(64), WidthReshapingAttention()).eval()
    dead = (torch.arange(192) // 16 != 9).float()  # head 1 of the values
    prune.custom_from_mask(model[1].qkv, "weight", dead[:, None].expand(192, 64))
    prune.custom_from_mask(model[1].qkv, "bias", dead)
    tokens = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))
    slimmed, report = slim(model, tokens[:1])
    assert not report.removed and any("does not run with fewer heads" in reason for reason in report.kept)
    with torch.no_grad():
        assert torch.equal(slimmed(tokens), model(tokens))


@pytest.mark.parametrize("bias, removable", [(-5.0, True), (5.0, False)])
def test_depthwise_passes_only_zero_channels(bias, removable):
    torch.manual_seed(0)
    model = randomize_batchnorm(DepthwiseChain())
    prune.ln_structured(model.expand, "weight", amount=0.25, n=2, dim=0)
    with torch.no_grad():
        model.bn1.bias.fill_(bias)  # -5: the pruned channels are 0 after ReLU; +5: a constant a depthwise conv smears
    x = torch.randn(2, 8, 6, 6)
    slimmed, report = slim(model, x)
    assert report.changed == removable
    if removable:
        assert slimmed.get_submodule("depthwise").groups == 24
    else:
        assert "zero padding" in report.kept[0]
    with torch.no_grad():
        assert max_rel(model(x), slimmed(x)) <= 1e-5


def test_concatenated_branches():
    torch.manual_seed(0)
    model = Branches().eval()
    prune.ln_structured(model.b, "weight", amount=0.5, n=2, dim=0)
    slimmed, report = slim(model, IMAGES[:1])
    assert report.removed == {"b": 4} and slimmed.get_submodule("merge").in_channels == 12
    with torch.no_grad():
        assert max_rel(model(IMAGES), slimmed(IMAGES)) <= 1e-5


def test_torch_pruning_residual_network_and_vit_mlp(tmp_path):
    tp = pytest.importorskip("torch_pruning", reason="torch-pruning is in the dev extra")
    model = randomize_batchnorm(BottleneckResNet(widths=(32, 64), blocks=1))
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MagnitudePruner(model, IMAGES[:1], importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before
    art = ep.export(model, IMAGES[:1], out=tmp_path, slim=True)["onnx"]
    assert art.parity.passed and "nothing to remove" in art.notes[-1]

    torch.manual_seed(0)
    vit = ViT(dim=64, depth=2, heads=4).eval()
    pruner = tp.pruner.MagnitudePruner(vit, ep.zoo.example("vit-digits"), importance=tp.importance.MagnitudeImportance(),
                                       pruning_ratio=0.5, root_module_types=[nn.Linear],
                                       ignored_layers=[vit.head, vit.patch_embed] + [b.attn for b in vit.blocks]
                                       + [b.mlp[2] for b in vit.blocks], unwrapped_parameters=[])
    pruner.step()  # Torch-Pruning shrinks each MLP's hidden layer
    assert [b.mlp[0].out_features for b in vit.blocks] == [128, 128]
    art = ep.export(vit, ep.zoo.example("vit-digits"), out=tmp_path, name="vit-tp")["onnx"]
    assert art.parity.passed


@pytest.mark.parametrize("slimmer", ["aggregate", "topk"])
def test_token_slimming_models_export_with_dynamic_batch(slimmer, tmp_path):
    torch.manual_seed(0)
    model = SlimmingViT(slimmer).eval()
    images = ep.zoo.testset("vit-digits")[0]
    art = ep.export(model, images[:2], out=tmp_path, dynamic_batch=True,
                    verify_inputs=[images[i:i + 8] for i in range(0, 32, 8)])["onnx"]
    assert art.parity.passed and art.inputs[0].shape[0] == "batch"
    logits = ort.InferenceSession(str(art.path)).run(None, {"x": images[:5].numpy()})[0]
    with torch.no_grad():
        assert np.abs(logits - model(images[:5]).numpy()).max() <= 1e-4 * float(model(images[:5]).abs().max())


def test_unstructured_sparsity_is_reported_not_removed():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with torch.no_grad():
        # 2:4 pattern, no input column all zero (that would be an ignored channel, removed)
        model[2].weight.copy_(torch.tensor([[1.0, 0, 2, 0, 0, 3, 4, 0], [0, 1.0, 0, 2, 3, 0, 0, 4]] * 2))
    _, report = slim(model, torch.randn(1, 16))
    assert not report.changed
    layers = report.sparsity["layers"]
    assert layers["0"]["zero_fraction"] == 0.5 and layers["2"]["two_four_pattern"]
    assert "2:4" in report.sparsity["backends"]["tensorrt"] and "dense" in report.sparsity["backends"]["onnxruntime-cpu"]
    # a conv's groups of four run along its input channels at each kernel tap, not along the taps
    along_channels, along_taps = nn.Conv2d(8, 4, 2), nn.Conv2d(4, 4, 2)
    with torch.no_grad():
        along_channels.weight.copy_(torch.tensor([1.0, 0, 2, 0, 0, 3, 4, 0])[None, :, None, None].expand(4, 8, 2, 2))
        along_taps.weight.copy_(torch.tensor([[1.0, 0], [0, 2]])[None, None].expand(4, 4, 2, 2))
    layers = slim(nn.Sequential(along_channels, nn.ReLU(), along_taps).eval(), torch.randn(1, 8, 6, 6))[1].sparsity["layers"]
    assert layers["0"]["two_four_pattern"] and not layers["2"]["two_four_pattern"]


def test_cli_export_slim_of_the_pruned_zoo_cnn(tmp_path, capsys):
    assert main(["export", "cnn-digits-pruned", "--slim", "-o", str(tmp_path), "--json"]) == 0
    import json

    record = json.loads(capsys.readouterr().out)["onnx"]
    assert record["parity"]["passed"] and record["settings"]["slim"]["macs_after"] < 0.3 * record["settings"]["slim"][
        "macs_before"]
