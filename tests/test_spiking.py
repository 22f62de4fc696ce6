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
from edgeport.snn.stats import sdt_energy

warnings.filterwarnings("ignore", category=UserWarning)
snn = pytest.importorskip("snntorch", reason="snntorch is in the dev extra")
sj = pytest.importorskip("spikingjelly.activation_based", reason="spikingjelly is installed by the Makefile")
from spikingjelly.activation_based import functional, layer, neuron  # noqa: E402

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


NETS = {
    "snntorch-leaky-subtract": leaky_net, "snntorch-leaky-zero": lambda: leaky_net(reset_mechanism="zero"),
    "snntorch-leaky-no-delay": lambda: leaky_net(reset_delay=False), "snntorch-synaptic": synaptic_net,
    "snntorch-synaptic-zero": lambda: synaptic_net(reset_mechanism="zero"),
    "spikingjelly-single-step": jelly_net, "spikingjelly-hard-reset": lambda: jelly_net(v_reset=-0.1, decay_input=False),
    "spikingjelly-multi-step": lambda: jelly_net("m"), "spikingjelly-conv": jelly_conv_net,
}


def inputs_for(name):
    if name == "spikingjelly-conv":
        images = ep.zoo.testset("cnn-digits")[0][:6] * 3
        return images[:1], [images[i:i + 1] for i in range(6)], False
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
        unrolled = ep.export(model, example, out=tmp_path, snn_form="unrolled", timesteps=T)["onnx"]
        x = (ep.zoo.example("snn-digits") if example is None else example).numpy()
        streaming = StreamingRunner.open(step.path).load()
        steps = [streaming.infer({"x": x}) for _ in range(T)]
        whole = OnnxRuntimeRunner(unrolled.path).load().infer({"x": x})
        for index, name in enumerate(streaming.output_names):
            assert np.array_equal(np.stack([s[name] for s in steps]), list(whole.values())[index])


def test_zoo_snn_keeps_its_accuracy_through_export(tmp_path):
    artifact = ep.export("snn-digits", out=tmp_path, snn_form="unrolled")["onnx"]
    images, labels = ep.zoo.testset("snn-digits")
    runner = OnnxRuntimeRunner(artifact.path).load()
    onnx_pred = np.array([runner.infer({"x": images[i:i + 1].numpy()})["output_0"].mean(0).argmax()
                          for i in range(len(images))])
    with torch.no_grad():
        torch_pred = ep.zoo.load("snn-digits")(images).argmax(1).numpy()
    assert np.array_equal(onnx_pred, torch_pred)
    assert (onnx_pred == labels.numpy()).mean() == pytest.approx(ep.zoo.info("snn-digits")["test_accuracy_percent"]
                                                               / 100, abs=1e-4)


def test_energy_reproduces_the_worked_example():
    """spiking_and_energy.md 6.5: encoding 0.10 GMAC, 6.0 GMAC spike-driven, T = 4, rate 0.20."""
    fp32 = sdt_energy(0.10e9, [(6.0e9, 0.20)], 4, "fp32")
    int8 = sdt_energy(0.10e9, [(6.0e9, 0.20)], 4, "int8")
    assert f"{fp32['snn_mj']:.3g}" == "4.78" and f"{fp32['ann_mj']:.3g}" == "28.1"
    assert f"{int8['snn_mj']:.3g}" == "0.167" and f"{int8['ann_mj']:.3g}" == "1.4"


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
    plif = nn.Sequential(layer.Linear(64, 8), neuron.ParametricLIFNode())
    with pytest.raises(ep.UserError, match="ParametricLIFNode at 1 is not supported"):
        ep.export(plif, DIGITS[:1], out=tmp_path, snn_form="step", timesteps=T)
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
    for model, example in (("snn-digits", None), (jelly_net(), DIGITS[:1])):
        artifact = ep.export(model, example, targets=["coreml"], out=tmp_path, snn_form=form, timesteps=T)["coreml"]
        structure = artifact.settings["verification"]["structure"]
        assert artifact.path.suffix == ".mlpackage" and structure["reloaded"]
        assert structure["op_histogram"].get("greater_equal", 0) >= 1  # the spike comparison survived conversion
        if form == "step":
            assert any(name.endswith("_next") for name in structure["outputs"])
        import platform

        if platform.system() != "Darwin":
            assert artifact.parity is None and "not checked here" in artifact.settings["verification"]["numerical"]


def test_cli_spiking_export_and_spikes(tmp_path, capsys):
    assert main(["export", "snn-digits", "--snn-form", "step", "-o", str(tmp_path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["onnx"]
    assert record["settings"]["snn"]["state_inputs"] == ["v1", "v2", "v3"]
    assert main(["spikes", "snn-digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["energy"]["int8"]["provenance"].startswith("estimated")
    assert main(["export", "snn-digits", "--snn-form", "step", "--timesteps", "-1", "-o", str(tmp_path)]) == 2
