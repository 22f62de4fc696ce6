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


class LeakyIntegrator(nn.Module):
    """NIR's LI primitive, tau dv/dt = (v_leak - v) + r I, as one forward-Euler step of dt, in
    nirtorch's module convention (forward(x, state) -> (output, state)). No installed NIR reader
    maps LI, Threshold or Scale, so these three are written here from the primitives' definitions."""

    def __init__(self, node, dt: float):
        super().__init__()
        for name, value in (("steps_per_tau", np.asarray(node.tau) / dt), ("r", node.r), ("v_leak", node.v_leak)):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        v = torch.zeros_like(x) if state is None else state
        v = v + (self.r * x - (v - self.v_leak)) / self.steps_per_tau
        return v, v


class Threshold(nn.Module):
    """NIR's Threshold: 1 where the input is above the threshold."""

    def __init__(self, node):
        super().__init__()
        self.register_buffer("threshold", torch.as_tensor(node.threshold, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)


class Scale(nn.Module):
    """NIR's Scale: the input times a per-element factor."""

    def __init__(self, node):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(node.scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_nirtorch_runs_the_zoo_snn_graph_spike_for_spike(zoo_artifact):
    """An independent consumer runs the zoo SNN's NIR file: nirtorch's interpreter wires the
    graph, threads its state and carries the reset loops to the next step; SpikingJelly's NIR
    importer maps its Conv2d, Affine and Flatten nodes; nirtorch maps SumPool2d. Every spike of
    lif1, lif2 and lif3 and the readout equal the torch model's at all 4 steps of all 360 test
    images (measured: 0 spikes differ, the readout bit for bit). nirtorch's own Affine map is
    not used: in nirtorch 2.6 it leaves the bias at its random initial value."""
    nirtorch = pytest.importorskip("nirtorch", reason="nirtorch is in the dev extra")
    pytest.importorskip("spikingjelly.activation_based.nir_exchange", reason="spikingjelly is installed by the Makefile")
    from spikingjelly.activation_based.nir_exchange.from_nir import _NodeMapper

    dt = zoo_artifact.settings["nir"]["dt"]
    graph = nir.read(zoo_artifact.path)
    primitives = {nir.LI: lambda n: LeakyIntegrator(n, dt), nir.Threshold: Threshold, nir.Scale: Scale}
    assert not torch.equal(nirtorch.nir_to_torch(graph, primitives).fc1.bias,
                           torch.from_numpy(graph.nodes["fc1"].bias))  # the nirtorch bug named above
    consumer = nirtorch.nir_to_torch(graph, {**_NodeMapper(dt).map_dict, **primitives})
    model = ep.zoo.load("snn-digits")
    spikes = {}
    for name in ("lif1", "lif2", "lif3"):
        getattr(model, name).register_forward_hook(lambda m, a, out, name=name: spikes.__setitem__(name, out[0]))
    images = ep.zoo.testset("snn-digits")[0]
    differing, counted = 0, 0
    with torch.no_grad():
        state, reference_state = None, model.initial_state(images)
        for _ in range(model.timesteps):
            readout, state = consumer(images, state)
            expected, *reference_state = model.step(images, *reference_state)
            assert torch.equal(readout, expected)
            for name in spikes:
                differing += int((state[f"{name}_fire_prev_output"] != spikes[name]).sum())
                counted += spikes[name].numel()
    assert differing == 0 and counted == 360 * 4 * (16 * 64 + 32 * 16 + 128)


def test_spikingjelly_reads_the_nir_graph_of_a_spikingjelly_net(out):
    """SpikingJelly's own `import_from_nir` (a second independent reader) runs edgeport's graph of
    a hard-reset SpikingJelly LIF network with the library's output spikes at every step
    (measured: 0 of 300 differ, 6 inputs x 5 steps). It fires on `>=` where NIR fires on `>`, so
    it reads the written threshold (the float32 below 1.0) as `>= that`: the same test but for
    a membrane exactly at that float, which never occurs here."""
    pytest.importorskip("spikingjelly.activation_based.nir_exchange", reason="spikingjelly is installed by the Makefile")
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    model = jelly(v_reset=0.0, second="LIF")
    reference = torch.stack([outputs[0] for outputs in library_reference(model, [CURRENTS] * T)])
    artifact = ep.export(model, CURRENTS[:1], targets=["nir"], snn_form="step", timesteps=T, out=out)["nir"]
    network = import_from_nir(artifact.path, dt=artifact.settings["nir"]["dt"])
    imported, state = [], None
    with torch.no_grad():
        for _ in range(T):
            spikes, state = network(CURRENTS, state)
            imported.append(spikes)
    assert reference.sum() > 0 and torch.equal(torch.stack(imported), reference)


def snntorch_written_graph(path) -> tuple[nn.Module, object]:
    """A zero-reset snnTorch network and the NIR file snnTorch's own `export_to_nir` writes of it
    (per-neuron beta and threshold: with scalar ones snnTorch 1.0 writes nodes without shapes that
    fail nir's type check, its issues #367 and #410)."""
    snn = pytest.importorskip("snntorch", reason="snntorch is in the dev extra")
    from snntorch.export_nir import export_to_nir

    torch.manual_seed(0)
    net = driven(nn.Sequential(
        nn.Linear(64, 32), snn.Leaky(beta=torch.full((32,), 0.9), threshold=torch.ones(32), init_hidden=True,
                                     reset_mechanism="zero"),
        nn.Linear(32, 10), snn.Leaky(beta=torch.full((10,), 0.8), threshold=torch.ones(10), init_hidden=True,
                                     reset_mechanism="zero", output=True)))
    nir.write(path, export_to_nir(net, CURRENTS[:1], ignore_dims=[0]))
    return net, path


def test_a_graph_written_by_snntorch_loads_and_exports_to_onnx_verified(out, capsys):
    """`ep.load_model("net.nir")` reads the graph snnTorch wrote into a stepped model (dt 1e-4,
    snnTorch's) whose spikes equal the original network's at every step (measured: 0 of 300
    differ, 6 inputs x 5 steps), and it exports to ONNX in both forms, verified spike for spike."""
    out.mkdir(parents=True, exist_ok=True)
    net, path = snntorch_written_graph(out / "net.nir")
    model = ep.load_model(str(path))
    assert model.state_names == ["v_1", "v_3"] and model.dt == 1e-4
    reference = torch.stack([outputs[0] for outputs in library_reference(net, [CURRENTS] * T)])
    with torch.no_grad():
        imported = model(torch.stack([CURRENTS] * T))
    assert reference.sum() > 0 and torch.equal(imported, reference)
    for form in ("step", "unrolled"):
        artifact = ep.export(str(path), CURRENTS[:1], out=out, snn_form=form, timesteps=T,
                             verify_inputs=[CURRENTS[i:i + 1] for i in range(6)])["onnx"]
        assert artifact.parity.passed and artifact.parity.outputs[0].mismatched == 0
        assert artifact.parity.outputs[0].tolerance.kind == "exact"
    assert main(["export", str(path), "--to", "onnx", "--snn-form", "step", "--timesteps", "5", "--input", "1x64",
                 "-o", str(out / "cli")]) == 0
    assert (out / "cli" / "nirgraphmodel-step.onnx").exists()  # the SDK names a loaded model by its class
    (out / "bad.nir").write_bytes(b"not hdf5")
    capsys.readouterr()
    assert main(["export", str(out / "bad.nir"), "--snn-form", "step", "--timesteps", "5", "--input", "1x64",
                 "-o", str(out / "bad")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "cannot read" in error and "as NIR" in error


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


def test_the_zoo_graph_loads_back_with_the_models_outputs(zoo_artifact):
    """`ep.load_model` on edgeport's own NIR file gives the zoo SNN's readout at every step
    (its reset loops run with the state after the reset, as the file's Input -> Output graph
    alone says, not with the sidecar's state map)."""
    model, loaded = ep.zoo.load("snn-digits"), ep.load_model(str(zoo_artifact.path))
    images = ep.zoo.testset("snn-digits")[0][:64]
    with torch.no_grad():
        state, expected_state = loaded.initial_state(images), model.initial_state(images)
        for _ in range(model.timesteps):
            readout, *state = loaded.step(images, *state)
            expected, *expected_state = model.step(images, *expected_state)
            torch.testing.assert_close(readout, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(readout.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("name", ["spikingjelly-hard-no-decay-input", "spikingjelly-soft", "snntorch-subtract"])
def test_graphs_edgeport_writes_load_back_with_the_librarys_spikes(name, out):
    """A hard-reset SpikingJelly net starts at v_reset (-0.1 here); the loaded graph started its
    membranes at 0 and 6 of its 300 output spikes differed. It now starts each neuron at rest."""
    make, _, _ = NETS[name]
    artifact = ep.export(make(), CURRENTS[:1], targets=["nir"], snn_form="step", timesteps=T, out=out,
                         verify_inputs=[CURRENTS[:1]])["nir"]
    reference = torch.stack([outputs[0] for outputs in library_reference(make(), [CURRENTS] * T)])
    with torch.no_grad():
        loaded = ep.load_model(str(artifact.path))(torch.stack([CURRENTS] * T))
    spikes = loaded[0] if isinstance(loaded, tuple) else loaded  # snnTorch's output=True adds the membrane
    assert reference.sum() > 0 and torch.equal(spikes, reference)


def edited_copy(source, destination, edit):
    """A copy of the NIR file `source` changed in place with h5py: `edit(nodes_group, file)`."""
    h5py = pytest.importorskip("h5py", reason="nir depends on h5py")
    shutil.copy(source, destination)
    with h5py.File(destination, "r+") as file:
        edit(file["node/nodes"], file)
    return destination


def replace_dataset(group, name: str, **dataset) -> None:
    del group[name]
    group.create_dataset(name, **dataset)


def link(group, name: str, target) -> None:
    del group[name]
    group[name] = target


SECRET = np.arange(1, 11, dtype=np.float32)  # what a crafted graph would carry off as fc2's bias
OUTSIDE_THE_FILE = {  # case: (edit of the zoo graph, what the refusal says)
    "external storage": (lambda nodes, file, secret: replace_dataset(
        nodes["fc2"], "bias", shape=(10,), dtype="<f4", external=[(str(secret), 0, 40)]), "keeps its data in .*secret"),
    "external storage of /dev/zero": (lambda nodes, file, secret: replace_dataset(
        nodes["fc2"], "bias", shape=(10,), dtype="<f4", external=[("/dev/zero", 0, 40)]),
        "keeps its data in /dev/zero"),
    "external link": (lambda nodes, file, secret: link(nodes, "fc2", __import__("h5py").ExternalLink(secret, "/fc2")),
                      r"/node/nodes/fc2 is a link \(ExternalLink\)"),
    "soft link": (lambda nodes, file, secret: link(nodes, "fc2", __import__("h5py").SoftLink("/node/nodes/fc1")),
                  r"/node/nodes/fc2 is a link \(SoftLink\)"),
    "hard-linked loop": (lambda nodes, file, secret: file["node/metadata"].__setitem__("loop", file["node/metadata"]),
                         "already reached under another name"),
}


@pytest.mark.parametrize("case", OUTSIDE_THE_FILE)
def test_a_nir_file_reaching_outside_itself_is_refused_in_one_line(case, zoo_artifact, tmp_path, capsys):
    """HDF5 lets a dataset keep its bytes in any other file and a link point anywhere: nir.read
    followed them, so a graph carried another file's bytes as weights into the exported model."""
    h5py = pytest.importorskip("h5py", reason="nir depends on h5py")
    edit, message = OUTSIDE_THE_FILE[case]
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET.tobytes())
    if case == "external link":
        secret = tmp_path / "secret.h5"
        with h5py.File(secret, "w") as other:
            other["fc2/type"] = np.bytes_(b"Affine")
            other["fc2/weight"], other["fc2/bias"] = np.ones((10, 128), np.float32), SECRET
    path = edited_copy(zoo_artifact.path, tmp_path / "crafted.nir", lambda nodes, file: edit(nodes, file, secret))
    with pytest.raises(ep.UserError, match=f"refusing {path}: .*{message}"):
        ep.load_model(str(path))
    capsys.readouterr()
    assert main(["export", str(path), "--snn-form", "step", "--timesteps", "2", "--input", "1x1x8x8",
                 "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("error: refusing") and leftovers(tmp_path / "out") == []


def test_nir_datasets_are_counted_at_their_declared_size(zoo_artifact, tmp_path, monkeypatch):
    """A dataset declared 64 MiB takes a few hundred bytes of file (a fill value), and nir.read
    allocated all of it: the declared sizes, not the file's, are held to the limit."""
    import edgeport.core

    monkeypatch.setattr(edgeport.core, "MAX_MODEL_BYTES", 8 << 20)
    assert ep.load_model(str(zoo_artifact.path)) is not None  # 0.4 MiB of genuine graph passes
    def pad(nodes, file) -> None:  # 16 Mi float32 of nothing but a fill value
        file["node/metadata"].create_dataset("padding", shape=(16 << 20,), dtype="<f4", chunks=(1 << 20,),
                                             compression="gzip")

    path = edited_copy(zoo_artifact.path, tmp_path / "bomb.nir", pad)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(ep.UserError, match=r"datasets .*bomb.nir declares would take 64.3 MiB, over the 8 MiB limit"):
        ep.load_model(str(path))


MALFORMED = {  # case: (edit of the zoo graph, what the refusal says)
    "zero groups": (lambda nodes, file: replace_dataset(nodes["conv1.0"], "groups", data=np.int64(0)),
                    r"node conv1.0 \(Conv2d\) cannot run on what reaches it: non-positive groups"),
    "groups as text": (lambda nodes, file: replace_dataset(nodes["conv1.0"], "groups", data=b"x"),
                       r"node conv1.0 \(Conv2d\) holds a parameter that is not a number array"),
    "dt as text": (lambda nodes, file: replace_dataset(file["node/metadata"], "dt", data=b"fast"),
                   "its metadata dt 'fast' is not a positive number of seconds"),
    "zero dt": (lambda nodes, file: replace_dataset(file["node/metadata"], "dt", data=0.0),
                "its metadata dt '0.0' is not a positive number of seconds"),
    "negative dt": (lambda nodes, file: replace_dataset(file["node/metadata"], "dt", data=-1e-4),
                    "its metadata dt '-0.0001' is not a positive number of seconds"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_nir_graph_is_refused_naming_what_is_wrong(case, zoo_artifact, tmp_path, capsys):
    """Each went through as a traceback (exit 3), or, with a dt of zero or below, ran silently."""
    edit, message = MALFORMED[case]
    path = edited_copy(zoo_artifact.path, tmp_path / "malformed.nir", edit)
    with pytest.raises(ep.UserError, match=f"{path}: {message}"):
        ep.load_model(str(path))
    capsys.readouterr()
    assert main(["export", str(path), "--snn-form", "step", "--timesteps", "2", "--input", "1x1x8x8",
                 "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0 and leftovers(tmp_path / "out") == []


def test_an_input_of_another_shape_than_the_graphs_is_one_line(zoo_artifact, tmp_path, capsys):
    """`--input 1x64` for a graph taking 1x8x8 images failed inside conv2d with exit 3."""
    assert main(["export", str(zoo_artifact.path), "--snn-form", "step", "--timesteps", "2", "--input", "1x64",
                 "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "takes inputs of shape [1, 8, 8] per sample" in error
    assert "give --input 1x1x8x8" in error and leftovers(tmp_path / "out") == []


def test_neurons_resting_at_different_potentials_stream_from_their_own_rest(out):
    """A graph whose LIF neurons rest at different potentials (v_leak per neuron, as Norse and
    Rockpool write them): the step artifact's streaming runner starts each neuron there, so a
    stream on the device gives the graph's own spikes (its sidecar once kept one start value
    per state, the first neuron's)."""
    rng = np.random.default_rng(0)
    leak = np.array([0.0, 0.4, -0.3, 0.8], np.float32)
    graph = nir.NIRGraph(
        nodes={"input": nir.Input(input_type={"input": np.array([3])}),
               "fc": nir.Affine(weight=rng.uniform(0.1, 0.5, (4, 3)).astype(np.float32), bias=np.zeros(4, np.float32)),
               "lif": nir.LIF(tau=np.full(4, 2e-4, np.float32), r=np.ones(4, np.float32), v_leak=leak,
                              v_threshold=np.ones(4, np.float32)),
               "output": nir.Output(output_type={"output": np.array([4])})},
        edges=[("input", "fc"), ("fc", "lif"), ("lif", "output")])
    out.mkdir(parents=True, exist_ok=True)
    nir.write(out / "rest.nir", graph)
    model = ep.load_model(str(out / "rest.nir"))
    currents = torch.from_numpy(rng.uniform(0, 2, (T, 1, 3)).astype(np.float32))
    with torch.no_grad():
        expected = model(currents).numpy()
    artifact = ep.export(str(out / "rest.nir"), currents[0], out=out, snn_form="step", timesteps=T)["onnx"]
    assert artifact.settings["snn"]["initial_state_values"] == [leak.tolist()]
    stream = StreamingRunner.open(artifact.path).load()
    streamed = np.stack([list(stream.infer({"x": x.numpy()}).values())[0] for x in currents])
    assert expected.sum() > 0 and np.array_equal(streamed, expected)
    stream.snn["initial_state_values"] = [0.0]  # every neuron from 0, as the sidecar once said
    stream.reset()
    from_zero = np.stack([list(stream.infer({"x": x.numpy()}).values())[0] for x in currents])
    assert not np.array_equal(from_zero, expected)
