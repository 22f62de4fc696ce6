"""Spike statistics and the energy they imply, as spiking-network papers compute it.

Firing rates are measured with hooks on real (calibration) data. Synaptic operations of a
layer whose input is spikes = its MACs x the input's firing rate, summed over timesteps.
Energy follows the Spike-driven Transformer formula: layers with real-valued input (the
encoding layer) cost multiply-accumulates, layers with spike input cost accumulates:

    E = E_MAC x MACs(real-input layers) + E_AC x SOPs(spike-input layers)

with Horowitz's 45 nm constants (fp32 MAC 4.6 pJ, AC 0.9 pJ; fp16 1.5 / 0.4; int8 0.23 /
0.03), beside the ANN of the same architecture (every layer once, as MACs). These are
theoretical compute energies: memory traffic is not in them, and they are labelled
`estimated:45nm-sop` wherever they are printed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from edgeport.devices.estimate import ENERGY_45NM_PJ
from edgeport.verify import is_binary
from edgeport.snn.neurons import NEURONS

PROVENANCE = "estimated:45nm-sop (Horowitz ISSCC 2014 constants; compute only, no memory traffic)"


def sdt_energy(first_layer_macs: float, spiking_layers: list[tuple[float, float]], timesteps: int,
               precision: str = "fp32") -> dict[str, float]:
    """Energy in mJ of the Spike-driven Transformer formula and of the equivalent ANN.

    `spiking_layers` holds (MACs of the equivalent ANN layer, input firing rate) for every
    layer after the first; the SNN pays E_MAC for the first layer and E_AC x T x rate x MACs
    for the others; the ANN pays E_MAC for every MAC once.
    """
    mac_pj, ac_pj = ENERGY_45NM_PJ[precision]
    sops = sum(timesteps * rate * macs for macs, rate in spiking_layers)
    ann_macs = first_layer_macs + sum(macs for macs, _ in spiking_layers)
    return {"snn_mj": (mac_pj * first_layer_macs + ac_pj * sops) * 1e-9, "ann_mj": mac_pj * ann_macs * 1e-9,
            "synaptic_ops": sops, "precision_preset": precision}


@dataclass
class LayerStats:
    """One weight layer: MACs per call, calls per sample, and its input's firing rate."""

    name: str
    kind: str  # "Conv2d", "Linear"
    macs_per_call: float  # per sample
    calls: int  # per sample and forward (T for layers inside the time loop)
    spike_input: bool  # True: accumulates (AC); False: multiply-accumulates (MAC)
    input_rate: float  # mean over calls of the fraction of non-zero inputs (spike inputs)
    repeated_input: bool = False  # a real-valued input identical at every call (direct coding): counted once

    @property
    def synaptic_ops(self) -> float:
        return self.calls * self.input_rate * self.macs_per_call if self.spike_input else 0.0

    @property
    def macs(self) -> float:
        if self.spike_input:
            return 0.0
        return self.macs_per_call * (1 if self.repeated_input else self.calls)


@dataclass
class SpikeStats:
    """Firing rates per neuron layer and the energy they imply, per sample."""

    samples: int
    neuron_rates: dict[str, float]  # mean spike count per neuron per step
    layers: list[LayerStats] = field(default_factory=list)

    def energy(self, precision: str = "fp32") -> dict[str, float]:
        """SNN energy (MACs for real inputs, ACs for spikes) and the ANN's, in mJ per sample."""
        mac_pj, ac_pj = ENERGY_45NM_PJ[precision]
        macs = sum(layer.macs for layer in self.layers)
        sops = sum(layer.synaptic_ops for layer in self.layers)
        ann = sum(layer.macs_per_call for layer in self.layers)
        return {"snn_mj": (mac_pj * macs + ac_pj * sops) * 1e-9, "ann_mj": mac_pj * ann * 1e-9, "macs": macs,
                "synaptic_ops": sops, "ann_macs": ann, "precision_preset": precision, "provenance": PROVENANCE}

    def to_dict(self) -> dict:
        return {**asdict(self), "energy": {p: self.energy(p) for p in ENERGY_45NM_PJ}}


def _macs(module: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> float:
    per_output = (module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                  if isinstance(module, nn.Conv2d) else module.in_features)
    return output[0].numel() * per_output


def spike_statistics(model: nn.Module, inputs: torch.Tensor) -> SpikeStats:
    """Run `model` once on `inputs` (a batch of real samples) and measure, per sample, each
    weight layer's MACs, calls and input firing rate, and each neuron layer's firing rate.

    `model` is anything whose forward runs all timesteps (the zoo's spiking CNN, or an
    `UnrolledModule` from `edgeport.transforms.spiking`).
    """
    names = {m: n.removeprefix("stepped.").removeprefix("net.") for n, m in model.named_modules()}
    layers: dict[str, LayerStats] = {}
    rates: dict[str, list[float]] = {}
    last_input: dict[str, torch.Tensor] = {}

    def on_weight_layer(module, args, output):
        name, x = names[module], args[0]
        spike = is_binary(x.detach().cpu().numpy())
        stats = layers.get(name)
        if stats is None:
            stats = layers[name] = LayerStats(name, type(module).__name__, _macs(module, x, output), 0, spike, 0.0,
                                              repeated_input=not spike)
        stats.spike_input = stats.spike_input and spike
        if name in last_input and not torch.equal(last_input[name], x):
            stats.repeated_input = False
        last_input[name] = x.detach()
        stats.input_rate += float((x != 0).float().mean())
        stats.calls += 1

    def on_neuron(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        rates.setdefault(names[module], []).append(float(out.float().mean()))

    from edgeport.snn.convert import StatefulNeuron

    hooks = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(on_weight_layer))
        elif isinstance(module, (*NEURONS, StatefulNeuron)) and not any(
                isinstance(p, StatefulNeuron) and module is p.neuron for p in model.modules()):
            hooks.append(module.register_forward_hook(on_neuron))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    for stats in layers.values():
        stats.input_rate /= max(stats.calls, 1)
    return SpikeStats(int(inputs.shape[0]), {k: sum(v) / len(v) for k, v in rates.items()}, list(layers.values()))
