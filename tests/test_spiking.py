"""Spiking models: real snnTorch and SpikingJelly networks, exported in both forms, checked
spike for spike at every timestep against the libraries' own runs."""
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import edgeport as ep
from edgeport.cli import main
from edgeport.export.onnx import OnnxRuntimeRunner
from edgeport.verify import StreamingRunner
from edgeport.snn import MultiLevel
from edgeport.snn.stats import LayerStats, SpikeStats, sdt_energy, sram_access_pj

warnings.filterwarnings("ignore", category=UserWarning)
snn = pytest.importorskip("snntorch", reason="snntorch is in the dev extra")
sj = pytest.importorskip("spikingjelly.activation_based", reason="spikingjelly is installed by the Makefile")
from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402

T = 5
DIGITS = ep.zoo.testset("cnn-digits")[0][:6].flatten(1) * 3  # real images as input currents


def driven(net: nn.Module) -> nn.Module:
    """Random weights scaled up so that every layer, the output included, really spikes."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(4)
    return net


def leaky_net(**options):
    torch.manual_seed(0)
    return driven(nn.Sequential(nn.Linear(64, 32), snn.Leaky(beta=0.9, init_hidden=True, **options), nn.Linear(32, 10),
                         snn.Leaky(beta=0.8, init_hidden=True, output=True, **options)))


def synaptic_net(**options):
    torch.manual_seed(0)
    return driven(nn.Sequential(nn.Linear(64, 32), snn.Synaptic(alpha=0.7, beta=0.9, init_hidden=True, **options),
                                nn.Linear(32, 10), snn.Leaky(beta=0.8, threshold=0.5, init_hidden=True, **options)))


def jelly_net(step_mode="s", **options):
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(64, 32), neuron.LIFNode(tau=2.0, **options), layer.Linear(32, 10),
                        neuron.IFNode(v_reset=None))
    functional.set_step_mode(net, step_mode)
    return driven(net)


def jelly_conv_net():
    torch.manual_seed(0)
    return driven(nn.Sequential(layer.Conv2d(1, 8, 3, padding=1), neuron.LIFNode(tau=2.0), layer.MaxPool2d(2),
                                layer.Flatten(), layer.Linear(8 * 16, 10), neuron.LIFNode(tau=3.0, v_reset=None)))


def recurrent_net(kind: str, **options):
    """snnTorch's recurrent and alpha neurons as its tutorials build them, followed by a Leaky."""
    torch.manual_seed(0)
    first = {"rleaky": lambda: snn.RLeaky(beta=0.9, linear_features=32, init_hidden=True, **options),
             "rleaky-one-to-one": lambda: snn.RLeaky(beta=0.9, V=0.5, all_to_all=False, init_hidden=True, **options),
             "rsynaptic": lambda: snn.RSynaptic(alpha=0.8, beta=0.9, linear_features=32, init_hidden=True, **options),
             "alpha": lambda: snn.Alpha(alpha=0.9, beta=0.8, init_hidden=True, **options),
             "lapicque": lambda: snn.Lapicque(R=5.1, C=5e-3, time_step=1e-3, init_hidden=True, **options)}[kind]()
    return driven(nn.Sequential(nn.Linear(64, 32), first, nn.Linear(32, 10),
                                snn.Leaky(beta=0.8, init_hidden=True, output=True)))


def plif_net(step_mode="m"):
    """A multi-step SpikingJelly net written as its examples write them: convolutions folded over
    T by SeqToANNContainer, PLIF neurons with a learned time constant (moved off its start)."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.SeqToANNContainer(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
                        neuron.ParametricLIFNode(init_tau=2.0, detach_reset=True),
                        layer.SeqToANNContainer(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10)),
                        neuron.ParametricLIFNode(init_tau=3.0, v_reset=None))
    functional.set_step_mode(net, step_mode)
    with torch.no_grad():
        net[1].w.add_(0.3)
    return driven(net)


NETS = {
    "snntorch-rleaky": lambda: recurrent_net("rleaky"),
    "snntorch-rleaky-one-to-one-zero": lambda: recurrent_net("rleaky-one-to-one", reset_mechanism="zero"),
    "snntorch-rsynaptic": lambda: recurrent_net("rsynaptic"), "snntorch-alpha": lambda: recurrent_net("alpha"),
    "snntorch-alpha-subtract": lambda: recurrent_net("alpha", reset_mechanism="subtract"),
    "snntorch-lapicque": lambda: recurrent_net("lapicque"),
    "spikingjelly-plif-seq-to-ann": plif_net,
    "snntorch-leaky-subtract": leaky_net, "snntorch-leaky-zero": lambda: leaky_net(reset_mechanism="zero"),
    "snntorch-leaky-no-delay": lambda: leaky_net(reset_delay=False), "snntorch-synaptic": synaptic_net,
    "snntorch-synaptic-zero": lambda: synaptic_net(reset_mechanism="zero"),
    "spikingjelly-single-step": jelly_net, "spikingjelly-hard-reset": lambda: jelly_net(v_reset=-0.1, decay_input=False),
    "spikingjelly-multi-step": lambda: jelly_net("m"), "spikingjelly-conv": jelly_conv_net,
}


def rate_coded(images: torch.Tensor, steps: int = T, seed: int = 0) -> torch.Tensor:
    """Rate coding as SpikingJelly's examples do it: at each step a pixel spikes with its
    intensity as probability; (T, B, ...) of 0/1."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand((steps, *images.shape), generator=generator) < images).float()


def inputs_for(name):
    if name == "spikingjelly-conv":
        images = ep.zoo.testset("cnn-digits")[0][:6] * 3
        return images[:1], [images[i:i + 1] for i in range(6)], False
    if name == "spikingjelly-plif-seq-to-ann":
        sequences = [rate_coded(ep.zoo.testset("cnn-digits")[0][i:i + 1], seed=i) for i in range(6)]
        return sequences[0], sequences, True
    if name == "spikingjelly-multi-step":
        return torch.stack([DIGITS[:1]] * T), [torch.stack([DIGITS[i:i + 1]] * T) for i in range(6)], True
    return DIGITS[:1], [DIGITS[i:i + 1] for i in range(6)], False


@pytest.mark.parametrize("form", ["unrolled", "step"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_library_network_exports_spike_exact(name, form, tmp_path):
    example, batches, sequence = inputs_for(name)
    artifact = ep.export(NETS[name](), example, out=tmp_path, snn_form=form, timesteps=T, sequence=sequence,
                         verify_inputs=batches)["onnx"]
    report = artifact.parity
    assert report.passed, report.summary()
    spikes = [o for o in report.outputs if o.tolerance.kind == "exact"]
    assert spikes and all(o.mismatched == 0 for o in spikes)
    conversion = [o for o in report.outputs if o.name.startswith("conversion/")]
    assert conversion and all(o.passed for o in conversion)  # converted torch == the library's own run
    assert artifact.settings["snn"]["form"] == form
    if form == "step":
        assert len(artifact.settings["snn"]["state_inputs"]) >= 2
    # the output spikes are neither all zero nor all one over the run
    if form == "step":
        streaming = StreamingRunner.open(artifact.path).load()
        spikes = np.stack([streaming.infer({"x": (example[t] if sequence else example).numpy()})["output_0"]
                           for t in range(T)])
    else:
        spikes = OnnxRuntimeRunner(artifact.path).load().infer({"x": example.numpy()})["output_0"]
    assert 0 < spikes.mean() < 1


def test_step_form_reproduces_the_unrolled_output_exactly(tmp_path):
    for model, example in (("snn-digits", None), (leaky_net(), DIGITS[:1])):
        step = ep.export(model, example, out=tmp_path, snn_form="step", timesteps=T)["onnx"]
        unrolled = ep.export(model, example, out=tmp_path, snn_form="unrolled", timesteps=T,
                             snn_outputs="per_step")["onnx"]
        x = (ep.zoo.example("snn-digits") if example is None else example).numpy()
        streaming = StreamingRunner.open(step.path).load()
        steps = [streaming.infer({"x": x}) for _ in range(T)]
        whole = OnnxRuntimeRunner(unrolled.path).load().infer({"x": x})
        for index, name in enumerate(streaming.output_names):
            assert np.array_equal(np.stack([s[name] for s in steps]), list(whole.values())[index])


def test_unrolled_zoo_snn_returns_the_models_own_output(tmp_path):
    """The unrolled graph returns model(x), the readout averaged over T (not the last layer at
    every step), within fp32 tolerance on all 360 test images, and classifies them as torch does;
    per-step outputs are an option, named as such in the artifact."""
    artifact = ep.export("snn-digits", out=tmp_path, snn_form="unrolled")["onnx"]
    assert [o.name for o in artifact.outputs] == ["output_0"] and artifact.settings["snn"]["returns"] == "model"
    images, labels = ep.zoo.testset("snn-digits")
    runner = OnnxRuntimeRunner(artifact.path).load()
    onnx_out = np.concatenate([runner.infer({"x": images[i:i + 1].numpy()})["output_0"] for i in range(len(images))])
    with torch.no_grad():
        torch_out = ep.zoo.load("snn-digits")(images).numpy()
    assert onnx_out.shape == torch_out.shape == (360, 10)
    assert np.abs(onnx_out - torch_out).max() <= 1e-4 * np.abs(torch_out).max()
    onnx_accuracy, torch_accuracy = ((out.argmax(1) == labels.numpy()).mean() for out in (onnx_out, torch_out))
    assert onnx_accuracy == torch_accuracy
    assert torch_accuracy == pytest.approx(ep.zoo.info("snn-digits")["test_accuracy_percent"] / 100, abs=1e-4)
    per_step = ep.export("snn-digits", out=tmp_path, snn_form="unrolled", snn_outputs="per_step")["onnx"]
    assert [o.name for o in per_step.outputs] == ["output_0_per_step"]
    assert per_step.settings["snn"]["returns"] == "per_step"
    steps = OnnxRuntimeRunner(per_step.path).load().infer({"x": images[:1].numpy()})["output_0_per_step"]
    assert steps.shape == (4, 1, 10) and np.allclose(steps.mean(0), torch_out[:1], atol=1e-5)
    with pytest.raises(ep.UserError, match="runs its own 4 timesteps; .* outputs='per_step'"):
        ep.export("snn-digits", out=tmp_path, snn_form="unrolled", timesteps=6)


def spikingjelly_model_zoo(module: str):
    """A module of SpikingJelly's `activation_based.model`. Its ResNets import torchvision only
    for `load_state_dict_from_url`, which pretrained weights need; torchvision does not install
    beside this torch, so the import sees a stand-in holding torch's own function of that name
    (the one torchvision re-exports) and the stand-in is gone again before anything else runs."""
    import importlib
    import sys
    import types

    stand_in, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision._internally_replaced_utils")
    utils.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    stand_in._internally_replaced_utils = utils
    missing = "torchvision" not in sys.modules
    if missing:
        sys.modules.update({"torchvision": stand_in, "torchvision._internally_replaced_utils": utils})
    try:
        return importlib.import_module(f"spikingjelly.activation_based.model.{module}")
    finally:
        if missing:
            del sys.modules["torchvision"], sys.modules["torchvision._internally_replaced_utils"]


def jelly_resnet(name: str) -> nn.Module:
    """`sew_resnet18` / `spiking_resnet18` from SpikingJelly's model zoo, multi-step, IF neurons,
    at 8x8 input, its batch norms' statistics set by a few training-mode passes over rate-coded
    digits (as training would) so that spikes reach the last block."""
    module = spikingjelly_model_zoo(name.rpartition("18")[0].removesuffix("_"))
    torch.manual_seed(0)
    options = {"cnf": "ADD"} if name == "sew_resnet18" else {}
    net = getattr(module, name)(num_classes=10, spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(),
                                detach_reset=True, **options)
    functional.set_step_mode(net, "m")
    images = ep.zoo.calibration("cnn-digits", 64).expand(-1, 3, -1, -1)
    net.train()
    for batch in range(4):  # forward passes with gradients on: the neurons keep non-leaf state, as after training
        net(rate_coded(images[batch * 16:(batch + 1) * 16], seed=batch))
    return net.eval()


@pytest.mark.parametrize("name", ["sew_resnet18", "spiking_resnet18"])
def test_spikingjelly_model_zoo_resnets_export_spike_exact(name, tmp_path):
    """Every neuron's membrane after every step matches the library's within 1e-6 (relative):
    a flipped spike would move it by the threshold, 1.0, so no spike differs anywhere."""
    net = jelly_resnet(name)
    images = ep.zoo.testset("cnn-digits")[0][:2].expand(-1, 3, -1, -1)
    sequences = [rate_coded(images[i:i + 1], seed=10 + i) for i in range(2)]
    for form in ("unrolled", "step"):
        artifact = ep.export(net, sequences[0], out=tmp_path, snn_form=form, timesteps=T, sequence=True,
                             verify_inputs=sequences, exporter="legacy-torchscript")["onnx"]
        report = artifact.parity
        assert report.passed, report.summary()
        assert all(o.max_rel_error <= 1e-6 for o in report.outputs)
        if form == "step":
            membranes = [o for o in report.outputs if o.name.endswith("_next")]
            assert len(membranes) > 15 and sum(o.scale > 0 for o in membranes) > 15  # the blocks really charge


def test_models_that_already_ran_forward_export(tmp_path):
    """Exported as users export: after forward passes with gradients on, every library neuron
    holding state that is part of an autograd graph. The user's model is left as it was."""
    image = ep.zoo.testset("cnn-digits")[0][:1]
    for make, example, sequence, form in ((leaky_net, DIGITS[:1], False, "unrolled"),
                                          (lambda: recurrent_net("rsynaptic"), DIGITS[:1], False, "step"),
                                          (jelly_net, DIGITS[:1], False, "step"),
                                          (plif_net, rate_coded(image), True, "unrolled")):
        model = make().train()
        model(example)  # one training-mode step: state now needs grad
        held = [t for m in model.modules() for t in (*m._buffers.values(), *getattr(m, "_memories", {}).values())
                if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        assert held, make
        artifact = ep.export(model, example, out=tmp_path, snn_form=form, timesteps=T, sequence=sequence)["onnx"]
        assert artifact.parity.passed, artifact.parity.summary()
        after = [t for m in model.modules() for t in (*m._buffers.values(), *getattr(m, "_memories", {}).values())
                 if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        assert all(a is b for a, b in zip(held, after))  # the user's state untouched


class TutorialNet(nn.Module):
    """snnTorch's tutorial network (tutorial 5, and each neuron's docstring for the other
    kinds): the forward takes the neurons' initial state from the library's initialiser, runs
    its own loop over `steps`, hands each neuron its state (`spk, mem = lif(cur, mem)`) and
    returns the last layer's spikes and membranes stacked over time."""

    def __init__(self, kind: str = "leaky", steps: int = T, readout: str = "stacked"):
        super().__init__()
        self.kind, self.steps, self.readout = kind, steps, readout
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)
        self.lif1 = {"leaky": lambda: snn.Leaky(beta=0.95), "synaptic": lambda: snn.Synaptic(alpha=0.8, beta=0.9),
                     "rleaky": lambda: snn.RLeaky(beta=0.9, linear_features=32)}[kind]()
        self.lif2 = snn.Leaky(beta=0.95)

    def forward(self, x: torch.Tensor):
        mem2 = self.lif2.init_leaky()
        if self.kind == "synaptic":
            syn1, mem1 = self.lif1.init_synaptic()
        elif self.kind == "rleaky":
            spk1, mem1 = self.lif1.reset_mem()
        else:
            mem1 = self.lif1.init_leaky()
        spk2_rec, mem2_rec = [], []
        for _ in range(self.steps):
            cur1 = self.fc1(x)
            if self.kind == "synaptic":
                spk1, syn1, mem1 = self.lif1(cur1, syn1, mem1)
            elif self.kind == "rleaky":
                spk1, mem1 = self.lif1(cur1, spk1, mem1)
            else:
                spk1, mem1 = self.lif1(cur1, mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk2_rec.append(spk2)
            mem2_rec.append(mem2)
        if self.readout == "spike count":
            return torch.stack(spk2_rec).sum(0)
        return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)


def tutorial_net(kind: str = "leaky", **options) -> TutorialNet:
    torch.manual_seed(0)
    net = driven(TutorialNet(kind, **options))
    net(DIGITS[:1])  # run before export, as users do: the neurons now hold the last call's state
    return net


@pytest.mark.parametrize("form", ["unrolled", "step"])
@pytest.mark.parametrize("kind", ["leaky", "synaptic", "rleaky"])
def test_snntorch_tutorial_net_with_its_own_time_loop_exports_spike_exact(kind, form, tmp_path):
    """The forward's own loop is the time axis: the unrolled form is that loop, the step form
    one iteration of it with the membranes as graph inputs and outputs; both give snnTorch's
    own run of the forward, spike for spike, on every input."""
    net = tutorial_net(kind)
    artifact = ep.export(net, DIGITS[:1], out=tmp_path, snn_form=form, timesteps=T,
                         verify_inputs=[DIGITS[i:i + 1] for i in range(6)])["onnx"]
    report = artifact.parity
    assert report.passed, report.summary()
    conversion = [o for o in report.outputs if o.name.startswith("conversion/")]
    assert len(conversion) == 2 and conversion[0].tolerance.kind == "exact" and conversion[0].max_abs_error == 0
    with torch.no_grad():
        library_spikes, library_membranes = net(DIGITS[:1])
    assert 0 < library_spikes.mean() < 1  # the output layer really spikes
    if form == "step":
        assert artifact.settings["snn"]["state_inputs"] == {"leaky": ["mem_lif1", "mem_lif2"],
                                                            "synaptic": ["syn_lif1", "mem_lif1", "mem_lif2"],
                                                            "rleaky": ["spk_lif1", "mem_lif1", "mem_lif2"]}[kind]
        streaming = StreamingRunner.open(artifact.path).load()
        outputs = [streaming.infer({"x": DIGITS[:1].numpy()}) for _ in range(T)]
        spikes, membranes = (np.stack([o[name] for o in outputs]) for name in ("output_0", "output_1"))
        assert len(onnx.load(str(artifact.path)).graph.node) < 40  # one iteration, not the whole loop
    else:
        spikes, membranes = OnnxRuntimeRunner(artifact.path).load().infer({"x": DIGITS[:1].numpy()}).values()
    assert np.array_equal(spikes, library_spikes.numpy())
    assert np.allclose(membranes, library_membranes.numpy(), rtol=0, atol=1e-5)


def test_snntorch_tutorial_net_refusals_name_the_pattern(tmp_path):
    """A loop of another length than the export's, or a forward that returns something other
    than a neuron's results over time (from which no single step can be cut), is refused in
    one line saying so."""
    with pytest.raises(ep.UserError, match=f"runs its own loop of {T} timesteps on one input: export it with "
                                           f"timesteps={T}"):
        ep.export(tutorial_net(), DIGITS[:1], out=tmp_path, snn_form="unrolled", timesteps=T + 2)
    with pytest.raises(ep.UserError, match="TutorialNet.forward runs its own loop of 5 timesteps and returns an output "
                                           ".0. that is not a neuron's results stacked over time"):
        ep.export(tutorial_net(readout="spike count"), DIGITS[:1], out=tmp_path, snn_form="step", timesteps=T)


def test_spike_statistics_of_an_snntorch_net_with_its_own_time_loop():
    """The library neurons of a forward that loops over time itself are measured as they are,
    and the same figures come from its unrolled conversion."""
    net = tutorial_net()
    stats = ep.spike_statistics(net, DIGITS)
    assert set(stats.neuron_rates) == {"lif1", "lif2"} and all(0 < r < 1 for r in stats.neuron_rates.values())
    assert stats.neuron_steps == {"lif1": T, "lif2": T} and stats.neuron_sizes == {"lif1": 32, "lif2": 10}
    assert [(layer.name, layer.spike_input, layer.calls) for layer in stats.layers] == [("fc1", False, T),
                                                                                        ("fc2", True, T)]
    converted = ep.spike_statistics(net, DIGITS, timesteps=T)
    assert converted.neuron_rates == stats.neuron_rates and converted.energy("int8") == stats.energy("int8")


def spikformer() -> nn.Module:
    """SpikingJelly's Spikformer (`activation_based.model.spikformer`), built as its model zoo
    builds it, small (16x16 images, 32 channels, one block); its batch norms' statistics set by
    training-mode passes and their gains at 3, as training leaves them, so every layer spikes."""
    from spikingjelly.activation_based.model.spikformer import Spikformer

    torch.manual_seed(0)
    net = Spikformer(T=T, img_size_h=16, img_size_w=16, patch_size=4, num_classes=10, embed_dims=32, num_heads=2,
                     depths=1)
    for norm in (m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        norm.momentum = None  # a cumulative average: the statistics of every pass
        nn.init.constant_(norm.weight, 3.0)
    net.train()
    for batch in range(3):
        net(torch.rand(16, 3, 16, 16))
        functional.reset_net(net)
    return net.eval()


@pytest.mark.parametrize("form", ["unrolled", "step"])
def test_spikformer_exports_spike_exact(form, tmp_path):
    """Spikformer's own code builds and checks the [T, N, ...] axis, so it cannot run as a
    single-step network; it runs one step at a time as a sequence of length one, and both forms
    give the library's multi-step run."""
    net = spikformer()
    images = torch.rand(3, 1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    artifact = ep.export(net, images[0], out=tmp_path, snn_form=form, timesteps=T, verify_inputs=list(images))["onnx"]
    report = artifact.parity
    assert report.passed, report.summary()
    conversion = [o for o in report.outputs if o.name.startswith("conversion/")]
    assert len(conversion) == 1 and conversion[0].scale > 0 and conversion[0].max_rel_error <= 1e-6
    if form == "step":
        membranes = [o for o in report.outputs if o.name.endswith("_next")]
        assert len(membranes) == 10 and all(o.scale > 0 for o in membranes)  # every neuron layer charges


class AveragedOverTime(nn.Module):
    """A multi-step network whose forward averages its readout over T, as SpikingJelly's
    `ms_resnet` and `spike_driven_transformer` do."""

    def __init__(self):
        super().__init__()
        self.net = jelly_net("m")

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.net(x_seq).mean(0)


def test_a_network_that_averages_over_time_itself_is_refused_by_name(tmp_path):
    """Its output has no per-step values to check a spiking form against: one line says so
    (before, step t of the check silently took batch sample t)."""
    sequence = torch.stack([DIGITS[:1]] * T)
    with pytest.raises(ep.UserError, match=r"AveragedOverTime returns an output of shape \[1, 10\] for 5 timesteps, "
                                           "without a time axis first"):
        ep.export(AveragedOverTime(), sequence, out=tmp_path, snn_form="unrolled", timesteps=T, sequence=True)


class TutorialCSNN(nn.Module):
    """SpikingJelly's conv_fashion_mnist tutorial network: multi-step layers, IF neurons, the
    image repeated over T inside forward and the readout averaged over T."""

    def __init__(self, steps: int = 4, channels: int = 8):
        super().__init__()
        self.steps = steps
        self.conv_fc = nn.Sequential(
            layer.Conv2d(1, channels, 3, padding=1, bias=False), layer.BatchNorm2d(channels),
            neuron.IFNode(surrogate_function=surrogate.ATan()), layer.MaxPool2d(2, 2),
            layer.Conv2d(channels, channels, 3, padding=1, bias=False), layer.BatchNorm2d(channels),
            neuron.IFNode(surrogate_function=surrogate.ATan()), layer.MaxPool2d(2, 2),
            layer.Flatten(), layer.Linear(channels * 4, 10, bias=False), neuron.IFNode(surrogate_function=surrogate.ATan()))
        functional.set_step_mode(self, step_mode="m")

    def forward(self, x):
        return self.conv_fc(x.unsqueeze(0).repeat(self.steps, 1, 1, 1, 1)).mean(0)


def tutorial_csnn() -> nn.Module:
    torch.manual_seed(0)
    return driven(TutorialCSNN()).eval()


def test_a_stateful_network_exported_without_a_spiking_form_runs_from_rest(tmp_path):
    """Exported as a plain model after the user ran it (state left in its neurons), the file
    computes the network from rest, as a freshly built one does on each sample; the user's
    model keeps its state."""
    images = ep.zoo.testset("cnn-digits")[0][:6] * 3
    model = tutorial_csnn()
    with torch.no_grad():
        model(images[5:6])  # the user's own run: membranes left behind
    left = model.conv_fc[2].v.clone()
    artifact = ep.export(model, images[:1], out=tmp_path, verify_inputs=[images[i:i + 1] for i in range(6)])["onnx"]
    assert artifact.parity.passed and any("from rest" in note for note in artifact.notes)
    session = ort.InferenceSession(str(artifact.path))
    for i in range(6):
        with torch.no_grad():
            fresh = tutorial_csnn()(images[i:i + 1]).numpy()
        assert np.array_equal(session.run(None, {"x": images[i:i + 1].numpy()})[0], fresh)
    assert torch.equal(model.conv_fc[2].v, left)


@pytest.mark.parametrize("form", ["unrolled", "step"])
def test_a_network_that_makes_its_own_time_axis_is_refused_by_name(form, tmp_path):
    """SpikingJelly's tutorial CSNN repeats its input over T and averages its readout inside
    forward, so no step can be fed to it from outside: the spiking forms, in export and in spike
    statistics, refuse it saying so and what to do (before, with the shape errors of conversions
    that cannot apply); exported without a spiking form, it verifies (test above)."""
    images = ep.zoo.testset("cnn-digits")[0][:2] * 3
    reason = (r"TutorialCSNN.forward makes its own time axis: given one timestep's input of shape \[\d, 1, 8, 8\], "
              r"its neurons run 4 timesteps .* returns an output of shape \[\d, 10\] without a time axis first .* "
              r"export it without snn_form")
    with pytest.raises(ep.UserError, match=reason):
        ep.export(tutorial_csnn(), images[:1], out=tmp_path, snn_form=form, timesteps=4)
    with pytest.raises(ep.UserError, match=reason):
        ep.spike_statistics(tutorial_csnn(), images, timesteps=4)


class NeedsTwoSteps(nn.Module):
    """A multi-step network whose own code refuses fewer than two timesteps: it runs neither one
    step at a time nor on one frame, for a reason of its own."""

    def __init__(self):
        super().__init__()
        self.net = jelly_net("m")

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if x_seq.shape[0] < 2:
            raise ValueError("needs two timesteps or more")
        return self.net(x_seq)


def test_a_network_that_fails_on_one_step_keeps_its_own_error(tmp_path):
    """Only a forward that runs on one frame is refused as making its own time axis; any other
    failure to convert is reported with the model's own errors."""
    sequence = torch.stack([DIGITS[:1]] * T)
    with pytest.raises(ep.UserError, match=r"NeedsTwoSteps runs neither one step at a time \(needs two timesteps or "
                                           r"more\) nor as a sequence of length one \(needs two timesteps or more\)"):
        ep.export(NeedsTwoSteps(), sequence, out=tmp_path, snn_form="unrolled", timesteps=T, sequence=True)


def test_spike_statistics_of_multi_step_networks_are_per_sample_and_per_step():
    """A multi-step network's layers run all T steps in one call: its figures per sample do not
    depend on the batch, each neuron layer counts T steps, and a [T, B, ...] sequence has B
    samples; the same figures as the per-step form of the same network. Repeated calls measure
    from rest, and leave the user's network as it was."""
    images = ep.zoo.testset("cnn-digits")[0][:4] * 3
    per_batch = [ep.spike_statistics(tutorial_csnn(), images[:b]) for b in (1, 4)]
    ann_macs = 8 * 64 * 9 + 8 * 16 * 72 + 32 * 10
    for stats, batch in zip(per_batch, (1, 4)):
        assert stats.samples == batch and stats.energy()["ann_macs"] == ann_macs
        assert set(stats.neuron_steps.values()) == {4}
        assert stats.neuron_sizes == {"conv_fc.2": 512, "conv_fc.6": 128, "conv_fc.10": 10}
    first = {layer.name: layer for layer in per_batch[0].layers}["conv_fc.0"]
    assert not first.spike_input and first.repeated_input and first.calls == 4  # direct coding: counted once
    sequence = rate_coded(images[:2], steps=T)  # [T, B, ...]
    own = ep.spike_statistics(plif_net(), sequence, sequence=True)
    stepped = ep.spike_statistics(plif_net(), sequence, T, sequence=True)
    assert own.samples == stepped.samples == 2
    assert own.memory_energy() == pytest.approx(stepped.memory_energy())
    model = jelly_net()
    rates = [ep.spike_statistics(model, DIGITS[:2]).neuron_rates for _ in range(3)]
    assert rates[0] == rates[1] == rates[2]
    assert all(not isinstance(getattr(m, "v", 0.0), torch.Tensor) for m in model.modules())  # never ran


def test_energy_reproduces_the_worked_example():
    """spiking_and_energy.md 6.5: encoding 0.10 GMAC, 6.0 GMAC spike-driven, T = 4, rate 0.20."""
    fp32 = sdt_energy(0.10e9, [(6.0e9, 0.20)], 4, "fp32")
    int8 = sdt_energy(0.10e9, [(6.0e9, 0.20)], 4, "int8")
    assert f"{fp32['snn_mj']:.3g}" == "4.78" and f"{fp32['ann_mj']:.3g}" == "28.1"
    assert f"{int8['snn_mj']:.3g}" == "0.167" and f"{int8['ann_mj']:.3g}" == "1.4"


def test_memory_aware_energy_counts_weight_and_membrane_traffic():
    """Lemaire et al.'s SRAM costs by memory size, and the memory-aware estimate worked by hand
    for one encoding layer and one spiking layer: the SNN is affine in its firing rate, and at
    the break-even rate it costs what the ANN costs."""
    assert sram_access_pj(0, 4) == 0 and sram_access_pj(8 * 1024, 4) == 10 and sram_access_pj(32 * 1024, 4) == 20
    assert sram_access_pj(20 * 1024, 4) == 15 and sram_access_pj(4 << 20, 4) == 100 and sram_access_pj(8 * 1024, 1) == 2.5
    encoder = LayerStats("enc", "Conv2d", 1000, 4, False, 1.0, repeated_input=True, weights=2048, inputs_per_call=64,
                         outputs_per_call=512)
    spiking = LayerStats("fc", "Linear", 5120, 4, True, 0.1, weights=5120, inputs_per_call=512, outputs_per_call=10)
    stats = SpikeStats(1, {"lif1": 0.1, "lif2": 0.2}, [encoder, spiking], {"lif1": 512, "lif2": 10},
                       {"lif1": 4, "lif2": 4})
    e = stats.memory_energy("fp32")
    w_enc, in_enc, out_enc = (sram_access_pj(n * 4, 4) for n in (2048, 64, 512))
    w_fc, in_fc, out_fc = (sram_access_pj(n * 4, 4) for n in (5120, 512, 10))
    dense_enc = 1000 * (4.6 + w_enc + in_enc) + 512 * out_enc
    upkeep = 4 * 512 * 2 * sram_access_pj(512 * 4, 4) + 4 * 10 * 2 * sram_access_pj(10 * 4, 4)
    per_rate = 4 * 5120 * (0.9 + w_fc + 2 * out_fc)
    ann = dense_enc + 5120 * (4.6 + w_fc + in_fc) + 10 * out_fc
    assert e["snn_mj"] == pytest.approx((dense_enc + upkeep + 0.1 * per_rate) * 1e-9)
    assert e["ann_mj"] == pytest.approx(ann * 1e-9) and e["mean_input_rate"] == pytest.approx(0.1)
    assert e["break_even_rate"] == pytest.approx((ann - dense_enc - upkeep) / per_rate)
    assert e["provenance"].startswith("estimated:memory-aware") and "Lemaire" in e["provenance"]
    assert e["snn_mj"] > stats.energy("fp32")["snn_mj"]  # memory traffic only adds


def test_spike_statistics_of_the_zoo_snn_and_cnn():
    stats = ep.spike_statistics("snn-digits")
    assert set(stats.neuron_rates) == {"lif1", "lif2", "lif3"}
    assert all(0 < rate < 1 for rate in stats.neuron_rates.values())
    first, *rest = stats.layers
    assert first.name == "conv1.0" and not first.spike_input and first.repeated_input and first.calls == 4
    assert all(layer.spike_input and layer.calls == 4 for layer in rest)
    energy = stats.energy("fp32")
    assert energy["macs"] == first.macs_per_call  # the encoding layer is paid once, as in the SDT formula
    assert 0 < energy["snn_mj"] < energy["ann_mj"] and energy["provenance"].startswith("estimated")
    ann = ep.spike_statistics("cnn-digits").energy("fp32")
    assert ann["synaptic_ops"] == 0 and ann["snn_mj"] == ann["ann_mj"]
    memory = stats.memory_energy("fp32")
    assert energy["snn_mj"] < memory["snn_mj"] < memory["ann_mj"]  # memory dominates; at its rate the SNN still wins
    assert memory["mean_input_rate"] < memory["break_even_rate"] < 1
    rates, compute_line, memory_line = stats.summary("fp32").splitlines()
    assert rates.startswith(f"{stats.samples} samples; firing rates: lif1 ") and "lif3" in rates
    assert f"SNN {energy['snn_mj'] * 1e3:.4g} uJ against ANN {energy['ann_mj'] * 1e3:.4g} uJ" in compute_line
    assert f"break-even input rate {memory['break_even_rate']:.1%}" in memory_line


def test_multilevel_neuron_rounds_half_up_in_onnx(tmp_path):
    model = nn.Sequential(nn.Identity(), MultiLevel(levels=4, threshold=0.25, scale=0.25)).eval()

    class Stateless(nn.Module):
        def __init__(self):
            super().__init__()
            self.neuron = model[1]

        def forward(self, x):
            return self.neuron(x)[0]

    ties = torch.tensor([[0.125, 0.375, 0.625, -0.1, 2.0, 0.5625]])  # x/threshold = 0.5, 1.5, 2.5: ties
    expected = torch.floor(torch.clamp(ties / 0.25, 0, 4) + 0.5) * 0.25
    assert not torch.equal(expected, torch.round(torch.clamp(ties / 0.25, 0, 4)) * 0.25)  # ties really differ
    artifact = ep.export(Stateless(), ties, out=tmp_path)["onnx"]
    out = ort.InferenceSession(str(artifact.path)).run(None, {"x": ties.numpy()})[0]
    assert np.array_equal(out, expected.numpy())
    ops = {n.op_type for n in onnx.load(str(artifact.path)).graph.node}
    assert "Floor" in ops and "Round" not in ops


def test_spiking_bad_input(tmp_path):
    with pytest.raises(ep.UserError, match="timesteps must be an integer from 1 to 1000"):
        ep.export(leaky_net(), DIGITS[:1], out=tmp_path, snn_form="unrolled", timesteps=0)
    with pytest.raises(ep.UserError, match="inhibition=True"):
        ep.export(leaky_net(inhibition=True), DIGITS[:1], out=tmp_path, snn_form="step", timesteps=T)
    qif = nn.Sequential(layer.Linear(64, 8), neuron.QIFNode())
    with pytest.raises(ep.UserError, match="QIFNode at 1 is not supported .supported: IFNode, LIFNode, "
                                           "ParametricLIFNode"):
        ep.export(qif, DIGITS[:1], out=tmp_path, snn_form="step", timesteps=T)
    lstm = nn.Sequential(nn.Linear(64, 8), snn.SLSTM(8, 8, init_hidden=True))
    with pytest.raises(ep.UserError, match="SLSTM at 1 is not supported .supported: Leaky, Synaptic, RLeaky, "
                                           "RSynaptic, Alpha, Lapicque"):
        ep.export(lstm, DIGITS[:1], out=tmp_path, snn_form="step", timesteps=T)
    with pytest.raises(ep.UserError, match="unknown spiking outputs 'all'"):
        ep.export(leaky_net(), DIGITS[:1], out=tmp_path, snn_form="unrolled", timesteps=T, snn_outputs="all")
    with pytest.raises(ep.UserError, match="no spiking neurons"):
        ep.export(nn.Linear(64, 3), DIGITS[:1], out=tmp_path, snn_form="step", timesteps=T)
    step = ep.export("snn-digits", out=tmp_path, snn_form="step")["onnx"]
    streaming = StreamingRunner.open(step.path).load()
    with pytest.raises(ep.UserError, match="state 'v1' has shape \\[1, 16, 8, 7\\]"):
        streaming.set_state([np.zeros((1, 16, 8, 7), np.float32)] + [np.zeros((1, 32, 4, 4)), np.zeros((1, 128))])
    with pytest.raises(ep.UserError, match="3 state tensors, 1 were given"):
        streaming.set_state([np.zeros((1, 16, 8, 8), np.float32)])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".edgeport")] == []


@pytest.mark.parametrize("form", ["unrolled", "step"])
def test_core_ml_forms_convert_and_say_what_was_checked(form, tmp_path):
    for model, example, steps in (("snn-digits", None, None), (jelly_net(), DIGITS[:1], T)):  # None: the model's T
        artifact = ep.export(model, example, targets=["coreml"], out=tmp_path, snn_form=form, timesteps=steps)["coreml"]
        structure = artifact.settings["verification"]["structure"]
        assert artifact.path.suffix == ".mlpackage" and structure["reloaded"]
        assert structure["op_histogram"].get("greater_equal", 0) >= 1  # the spike comparison survived conversion
        if form == "step":
            assert any(name.endswith("_next") for name in structure["outputs"])
        # numerics: Core ML itself on macOS, coremltools' MIL interpreter elsewhere where it runs the program
        if artifact.parity is None:
            assert "not checked here" in artifact.settings["verification"]["numerical"]
        else:
            assert artifact.parity.passed, artifact.parity.summary()


def test_cli_spiking_export_and_spikes(tmp_path, capsys):
    assert main(["export", "snn-digits", "--snn-form", "step", "-o", str(tmp_path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["onnx"]
    assert record["settings"]["snn"]["state_inputs"] == ["v1", "v2", "v3"]
    assert main(["spikes", "snn-digits", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["energy"]["int8"]["provenance"].startswith("estimated:45nm-sop")
    memory = record["memory_aware_energy"]["fp32"]
    assert memory["provenance"].startswith("estimated:memory-aware") and 0 < memory["break_even_rate"] < 1
    assert main(["spikes", "snn-digits"]) == 0
    text = capsys.readouterr().out
    assert "compute only" in text and "memory-aware" in text and "break-even input rate" in text
    assert f"{memory['break_even_rate']:.1%}" in text and "Lemaire" in text and "Horowitz" in text
    assert main(["export", "snn-digits", "--snn-form", "step", "--timesteps", "-1", "-o", str(tmp_path)]) == 2
