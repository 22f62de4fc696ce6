"""The NIR backend: the zoo's spiking CNN and converted snnTorch / SpikingJelly networks written
as NIR graphs, read back with `nir.read`, run by edgeport's NIR interpreter and verified by the
SDK spike for spike against torch; what NIR cannot express refused by name; a planted fault in
the file caught; snnTorch's own NIR reader as an independent consumer."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import leftovers
from torch import nn

import edgeport as ep
from edgeport.cli import main
from edgeport.snn import LIF
from edgeport.snn.convert import library_reference
from edgeport.verify import StreamingRunner

nir = pytest.importorskip("nir", reason="nir is in the dev extra")
warnings.filterwarnings("ignore", category=UserWarning)

T = 5
DIGITS = ep.zoo.testset("cnn-digits")[0][:6]  # real images; flattened and scaled as input currents below
CURRENTS = DIGITS.flatten(1) * 3
BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))  # how NIR's `>` says `>= 1.0` on float32 membranes


@pytest.fixture(scope="module")
def zoo_artifact(tmp_path_factory) -> ep.Artifact:
    """The zoo's spiking CNN exported once as a verified NIR step form."""
    return ep.export("snn-digits", targets=["nir"], snn_form="step", out=tmp_path_factory.mktemp("zoo"))["nir"]


def test_zoo_snn_exports_to_nir_and_verifies_spike_for_spike(zoo_artifact):
    """The parity covers 64 test images x 4 steps. The readout is linear in lif3's spikes, so an
    identical readout means identical lif3 spikes; a flipped lif1 or lif2 spike would move its
    membrane (a state output) by the threshold, 1.0, far outside the 1e-4 relative tolerance."""
    report = zoo_artifact.parity
    assert report.passed, report.summary()
    assert report.samples == 64 and report.inputs_source.startswith("snn-digits test images, 4 timesteps")
    outputs = {o.name: o for o in report.outputs}
    assert list(outputs) == ["output_0", "v1_next", "v2_next", "v3_next"]
    assert outputs["output_0"].mismatched == 0
    assert zoo_artifact.format == "nir" and zoo_artifact.precision == "fp32"
    assert zoo_artifact.files == [zoo_artifact.path.name] and zoo_artifact.path.suffix == ".nir"
    assert [s.name for s in zoo_artifact.inputs] == ["x", "v1", "v2", "v3"]
    assert zoo_artifact.settings["nir"]["dt"] == 1e-4
    assert zoo_artifact.settings["nir"]["states"][0] == {"state": "v1", "node": "lif1", "membrane": "after reset"}
    notes = " ".join(zoo_artifact.notes)
    assert "lif1, lif2, lif3: fire on membrane >= threshold" in notes and "SumPool2d + Threshold(0.5)" in notes
    assert "reset by subtraction" in notes and "conv1.1 into conv1.0" in notes


def test_the_written_file_reads_back_as_nir_with_the_expected_nodes(zoo_artifact):
    graph = nir.read(zoo_artifact.path)  # type-checks every edge
    kinds = {name: type(node).__name__ for name, node in graph.nodes.items()}
    neuron = {"": "LI", ".fire": "Threshold", ".reset": "Scale"}
    assert kinds == {"input": "Input", "conv1.0": "Conv2d", "pool": "SumPool2d", "pool.any": "Threshold",
                     "conv2.0": "Conv2d", "flatten": "Flatten", "fc1": "Affine", "fc2": "Affine", "output_0": "Output",
                     **{f"lif{i}{part}": kind for i in (1, 2, 3) for part, kind in neuron.items()}}
    for i in (1, 2, 3):  # the soft reset: membrane -> threshold -> scale -> back into the membrane
        assert {(f"lif{i}", f"lif{i}.fire"), (f"lif{i}.fire", f"lif{i}.reset"), (f"lif{i}.reset", f"lif{i}")} \
            <= set(graph.edges)
    lif, fire, reset = graph.nodes["lif1"], graph.nodes["lif1.fire"], graph.nodes["lif1.reset"]
    assert np.all(lif.tau == 2 * 1e-4) and np.all(lif.r == 1) and np.all(lif.v_leak == 0)  # tau = 2 steps of dt
    assert np.all(fire.threshold == BELOW_ONE) and np.all(reset.scale == -1)
    assert list(graph.nodes["input"].input_type["input"]) == [1, 8, 8]
    assert list(graph.nodes["output_0"].output_type["output"]) == [10]


def test_cli_exports_nir_and_lists_its_options(tmp_path, capsys):
    assert main(["export", "--help"]) == 0
    assert "--nir-dt" in capsys.readouterr().out
    assert main(["export", "snn-digits", "--to", "nir", "--snn-form", "step", "--nir-dt", "1e-3",
                 "-o", str(tmp_path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["nir"]
    assert record["format"] == "nir" and record["parity"]["passed"] and record["settings"]["nir"]["dt"] == 1e-3
    assert np.all(nir.read(tmp_path / "snn-digits-step.nir").nodes["lif1"].tau == 2 * 1e-3)
    assert main(["export", "snn-digits", "--to", "nir", "-o", str(tmp_path / "none")]) == 2
    assert "--snn-form step" in capsys.readouterr().err
    assert main(["export", "snn-digits", "--to", "nir", "--snn-form", "step", "--nir-dt", "-1",
                 "-o", str(tmp_path / "none")]) == 2
    assert "positive number of seconds" in capsys.readouterr().err


class AtThreshold(nn.Module):
    """An integrate-and-fire neuron (hard reset) charged by 0.5 per step: its membrane reaches
    exactly 1.0 at the second step, where SpikingJelly semantics fire and a plain `> 1.0` would not."""

    timesteps = 3

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)
        nn.init.eye_(self.fc.weight)
        self.fc.weight.data *= 0.5
        self.lif = LIF(tau=None, threshold=1.0, v_reset=0.0)

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x.new_zeros(x.shape[0], 4),)

    def step(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lif(self.fc(x), v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.initial_state(x)
        for _ in range(self.timesteps):
            spikes, *state = self.step(x, *state)
        return spikes


def test_firing_at_exactly_the_threshold_survives_nir(out):
    artifact = ep.export(AtThreshold(), torch.ones(1, 4), targets=["nir"], snn_form="step", out=out)["nir"]
    spikes = artifact.parity.outputs[0]
    assert artifact.parity.passed and spikes.tolerance.kind == "exact" and spikes.mismatched == 0
    graph = nir.read(artifact.path)
    assert type(graph.nodes["lif"]).__name__ == "IF" and np.all(graph.nodes["lif"].v_threshold == BELOW_ONE)
    stream = StreamingRunner.open(artifact.path).load()
    fired = [stream.infer({"x": np.ones((1, 4), np.float32)})["output_0"][0, 0] for _ in range(3)]
    assert fired == [0, 1, 0]  # membrane 0.5, then exactly 1.0: fires, resets to 0, 0.5


def leaky(reset: str, output: bool = False) -> nn.Module:
    snn = pytest.importorskip("snntorch", reason="snntorch is in the dev extra")
    torch.manual_seed(0)
    return driven(nn.Sequential(nn.Linear(64, 32), snn.Leaky(beta=0.9, init_hidden=True, reset_mechanism=reset),
                                nn.Linear(32, 10), snn.Leaky(beta=0.8, init_hidden=True, reset_mechanism=reset,
                                                             output=output)))


def spikingjelly():
    """SpikingJelly's layer and neuron modules (the Makefile installs the package)."""
    pytest.importorskip("spikingjelly.activation_based.neuron", reason="spikingjelly is installed by the Makefile")
    from spikingjelly.activation_based import layer, neuron

    return layer, neuron


def jelly(v_reset: float | None, decay_input: bool = True, second: str = "IF") -> nn.Module:
    """Linear -> LIF -> Linear -> IF (or a second LIF), SpikingJelly neurons with one reset."""
    layer, neuron = spikingjelly()
    torch.manual_seed(0)
    lif = dict(tau=2.0, v_reset=v_reset, decay_input=decay_input)
    return driven(nn.Sequential(layer.Linear(64, 32), neuron.LIFNode(**lif), layer.Linear(32, 10),
                                neuron.IFNode(v_reset=v_reset) if second == "IF" else neuron.LIFNode(**lif)))


def jelly_conv() -> nn.Module:
    layer, neuron = spikingjelly()
    torch.manual_seed(0)
    return driven(nn.Sequential(layer.Conv2d(1, 8, 3, padding=1), neuron.LIFNode(tau=2.0), layer.MaxPool2d(2),
                                layer.Flatten(), layer.Linear(8 * 16, 10), neuron.LIFNode(tau=3.0, v_reset=None)))


def driven(net: nn.Module) -> nn.Module:
    """Random weights scaled up so that every layer, the output included, really spikes."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(4)
    return net


NETS = {  # name: (network, NIR node kinds of its two neurons, membrane convention)
    "snntorch-subtract": (lambda: leaky("subtract", output=True), "LI", "before reset"),
    "snntorch-zero": (lambda: leaky("zero"), "LIF", "before reset"),
    "snntorch-none": (lambda: leaky("none"), "LI", "before reset"),
    "spikingjelly-soft": (lambda: jelly(v_reset=None), "LI", "after reset"),
    "spikingjelly-hard-no-decay-input": (lambda: jelly(v_reset=-0.1, decay_input=False), "LIF", "after reset"),
    "spikingjelly-conv": (jelly_conv, "LIF", "after reset"),
}


@pytest.mark.parametrize("name", NETS)
def test_converted_networks_export_spike_exact(name, out):
    make, first_kind, membrane = NETS[name]
    images = name == "spikingjelly-conv"
    inputs = DIGITS * 3 if images else CURRENTS
    artifact = ep.export(make(), inputs[:1], targets=["nir"], snn_form="step", timesteps=T, out=out,
                         verify_inputs=[inputs[i:i + 1] for i in range(len(inputs))])["nir"]
    report = artifact.parity
    assert report.passed, report.summary()
    spikes = [o for o in report.outputs if o.tolerance.kind == "exact" and not o.name.startswith("conversion/")]
    assert spikes and all(o.mismatched == 0 for o in spikes)
    assert 0 < spikes[0].scale  # the output layer really spikes
    states = artifact.settings["nir"]["states"]
    assert [s["membrane"] for s in states] == [membrane] * 2
    assert type(nir.read(artifact.path).nodes[states[0]["node"]]).__name__ == first_kind


def test_snntorch_reads_the_nir_graph_as_an_independent_consumer(out, capsys):
    """snnTorch's `import_from_nir` (a third-party reader) runs edgeport's NIR graphs of a
    zero-reset snnTorch network and of a hard-reset SpikingJelly LIF network with the same
    output spikes as the original libraries (measured: 0 of 300 differ each, 6 inputs x 5
    steps). Its semantics differ from edgeport's reading, each difference measured:

    - it hard-codes dt = 1e-4 in beta = 1 - dt/tau: a graph written with `--nir-dt 1e-3` is read
      with the wrong leak and loses every output spike of the snnTorch network (77 of 77);
    - it resets in the same step (reset_delay=False): its membranes differ from snnTorch's
      delayed-reset ones after a spike, the spikes of a zero reset do not;
    - where the input gain r*dt/tau is not 1 (SpikingJelly's decay_input: 1/2 at tau = 2 steps)
      it scales the threshold by its inverse instead of the input, the same model in exact
      arithmetic with other float rounding; `>= 1` written as `> the float32 below 1` becomes
      `> twice that` (0 spikes differ on these inputs);
    - it reads neither LI, Threshold, Scale nor SumPool2d, nor IF nodes with r != 1: the zoo's
      graph (soft resets as LI loops, max pooling over spikes) fails to import.
    """
    pytest.importorskip("nirtorch", reason="nirtorch is in the dev extra")
    from snntorch import utils
    from snntorch.import_nir import import_from_nir

    def imported_spikes(artifact) -> torch.Tensor:
        network = import_from_nir(nir.read(artifact.path))
        utils.reset(network)
        with torch.no_grad():
            return torch.stack([network(CURRENTS)[0] for _ in range(T)])

    for make in (lambda: leaky("zero"), lambda: jelly(v_reset=0.0, second="LIF")):
        model = make()
        reference = torch.stack([outputs[0] for outputs in library_reference(model, [CURRENTS] * T)])
        artifact = ep.export(model, CURRENTS[:1], targets=["nir"], snn_form="step", timesteps=T, out=out)["nir"]
        assert reference.sum() > 0 and torch.equal(imported_spikes(artifact), reference)
    model = leaky("zero")
    slow = ep.export(model, CURRENTS[:1], targets=["nir"], snn_form="step", timesteps=T, out=out / "dt", nir_dt=1e-3)
    assert slow["nir"].parity.passed  # edgeport's own reading of the dt is right
    reference = torch.stack([outputs[0] for outputs in library_reference(model, [CURRENTS] * T)])
    assert imported_spikes(slow["nir"]).sum() == 0 < reference.sum()
    zoo = ep.export("snn-digits", targets=["nir"], snn_form="step", out=out / "zoo")["nir"]
    with pytest.raises(ValueError, match="Unknown node type.*LI"):
        import_from_nir(nir.read(zoo.path))
    capsys.readouterr()  # the importer prints its weight-scaling warnings


class ReluBetween(nn.Module):
    """A spiking step with a ReLU between layer and neuron: NIR has no such activation."""

    timesteps = 2

    def __init__(self):
        super().__init__()
        self.fc, self.lif = nn.Linear(4, 4), LIF()

    def initial_state(self, x):
        return (x.new_zeros(x.shape[0], 4),)

    def step(self, x, v):
        return self.lif(torch.relu(self.fc(x)), v)

    def forward(self, x):
        return self.step(x, *self.initial_state(x))[0]


def synaptic() -> nn.Module:
    snn = pytest.importorskip("snntorch", reason="snntorch is in the dev extra")
    return nn.Sequential(nn.Linear(64, 10), snn.Synaptic(alpha=0.7, beta=0.9, init_hidden=True))


def pooled_currents() -> nn.Module:
    """Max pooling before the neuron: over currents, where the sum-and-threshold form is wrong."""
    layer, neuron = spikingjelly()
    return nn.Sequential(layer.Conv2d(1, 4, 3, padding=1), layer.MaxPool2d(2), neuron.LIFNode())


REFUSALS = {  # case: (the export into `out`, the error it raises, what its message says)
    "no neurons": (lambda out: ep.export("cnn-digits", targets=["nir"], out=out),
                   ep.UserError, "CNN has no spiking neurons; NIR describes spiking networks"),
    "unrolled": (lambda out: ep.export("snn-digits", targets=["nir"], snn_form="unrolled", out=out),
                 ep.UserError, "not the unrolled one: export with --snn-form step"),
    "no form": (lambda out: ep.export("snn-digits", targets=["nir"], out=out),
                ep.UserError, "exported without a spiking form; NIR takes the step form"),
    "quantized": (lambda out: ep.export(ep.quantize("snn-digits", method="minmax"), ep.zoo.example("snn-digits"),
                                        targets=["nir"], snn_form="step", timesteps=4, out=out),
                  ep.UserError, "no integer or quantized types: this w8a8 model"),
    "synaptic": (lambda out: ep.export(synaptic(), CURRENTS[:1], targets=["nir"], snn_form="step", timesteps=T,
                                       out=out),
                 ep.ExportError, r"1 \(Synaptic\) is not mapped to NIR"),
    "max pool of currents": (lambda out: ep.export(pooled_currents(), DIGITS[:1], targets=["nir"], snn_form="step",
                                                   timesteps=T, out=out),
                             ep.ExportError, r"1 \(MaxPool2d\) pools values that are not spikes"),
    "activation": (lambda out: ep.export(ReluBetween(), torch.ones(1, 4), targets=["nir"], snn_form="step", out=out),
                   ep.ExportError, "relu applied to the output of fc has no NIR form"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_nir_refuses_what_it_cannot_express_by_name(case, out):
    export, error, message = REFUSALS[case]
    with pytest.raises(error, match=message):
        export(out)
    assert leftovers(out) == []


@pytest.mark.parametrize("node, field, change", [("lif2.fire", "threshold", 1.5), ("fc2", "weight", 1.01)])
def test_a_planted_fault_in_the_nir_file_fails_verification(zoo_artifact, tmp_path, node, field, change):
    folder = tmp_path / "copy"
    shutil.copytree(zoo_artifact.path.parent, folder)
    path = folder / zoo_artifact.path.name
    graph = nir.read(path)
    setattr(graph.nodes[node], field, getattr(graph.nodes[node], field) * change)
    nir.write(path, graph)
    report = ep.verify(path, "snn-digits")
    assert not report.passed
    assert "output_0" in {o.name for o in report.failures()}
