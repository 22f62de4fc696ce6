"""Spike statistics and the energy they imply: the compute-only estimate spiking-network
papers print, and a memory-aware one beside it.

Firing rates are measured with hooks on real (calibration) data. Synaptic operations of a
layer whose input is spikes = its MACs x the input's firing rate, summed over timesteps.

*Compute only* (`energy`, labelled `estimated:45nm-sop`) follows the Spike-driven Transformer
formula: layers with real-valued input (the encoding layer) cost multiply-accumulates, layers
with spike input cost accumulates,

    E = E_MAC x MACs(real-input layers) + E_AC x SOPs(spike-input layers),

with Horowitz's 45 nm constants (fp32 MAC 4.6 pJ, AC 0.9 pJ; fp16 1.5 / 0.4; int8 0.23 /
0.03), beside the ANN of the same architecture (every layer once, as MACs).

*Memory-aware* (`memory_energy`, labelled `estimated:memory-aware`) adds the SRAM traffic that
the compute estimate leaves out, which Dampfhoffer et al. (IEEE TETCI 2023) and Yan et al.
(arXiv 2409.08290) find dominant. Accesses, counted without data reuse as Lemaire et al.
(arXiv 2210.13107) count them: the ANN reads a weight and an input per MAC and writes each
output once; the SNN, per timestep, reads the fan-out weight and reads and writes the target
membrane for every synaptic event, reads and writes every membrane once for its leak and
threshold, and runs its real-input layer as the ANN does. Energy per access is Lemaire's 45 nm
SRAM cost interpolated by the size of the memory it hits (0 B: 0, 8 KiB: 10 pJ, 32 KiB: 20 pJ,
1 MiB and above: 100 pJ per 32-bit word, as SpikingJelly's `LemaireEnergyProfiler` has it),
scaled to the word width of the precision; arithmetic is Horowitz's as above. Both networks
keep weights, inputs and membranes at the same precision. The SNN's energy is affine in its
firing rate, so the rate at which it equals the ANN's, the break-even rate, follows.
Addressing logic and spike queues are not counted.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from edgeport.devices.estimate import ENERGY_45NM_PJ
from edgeport.verify import is_binary

PROVENANCE = "estimated:45nm-sop (Horowitz ISSCC 2014 constants; compute only, no memory traffic)"
MEMORY_PROVENANCE = ("estimated:memory-aware (SRAM access energy by memory size from Lemaire et al. 2022, "
                     "arXiv 2210.13107; Horowitz ISSCC 2014 arithmetic; accesses without data reuse; addressing and "
                     "spike queues not counted)")
SRAM_PJ_PER_WORD = ((0, 0.0), (8 * 1024, 10.0), (32 * 1024, 20.0), (1024 * 1024, 100.0))  # bytes, pJ per 32-bit word
WORD_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def sram_access_pj(capacity_bytes: float, word_bytes: int) -> float:
    """Energy in pJ of one access of `word_bytes` to an SRAM of `capacity_bytes` (45 nm),
    linear between Lemaire et al.'s points and flat past 1 MiB, scaled from their 32-bit word."""
    sizes, costs = zip(*SRAM_PJ_PER_WORD)
    capacity = min(max(capacity_bytes, 0.0), sizes[-1])
    index = next(i for i in range(1, len(sizes)) if capacity <= sizes[i])
    fraction = (capacity - sizes[index - 1]) / (sizes[index] - sizes[index - 1])
    per_word = costs[index - 1] + fraction * (costs[index] - costs[index - 1])
    return per_word * word_bytes / 4


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
    weights: int = 0  # parameters of the layer
    inputs_per_call: int = 0  # input elements per sample
    outputs_per_call: int = 0  # output elements per sample (the membranes it charges, in an SNN)

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
    neuron_sizes: dict[str, int] = field(default_factory=dict)  # neurons per sample in each neuron layer
    neuron_steps: dict[str, int] = field(default_factory=dict)  # calls per forward (T)

    def energy(self, precision: str = "fp32") -> dict[str, float]:
        """SNN energy (MACs for real inputs, ACs for spikes) and the ANN's, in mJ per sample."""
        mac_pj, ac_pj = ENERGY_45NM_PJ[precision]
        macs = sum(layer.macs for layer in self.layers)
        sops = sum(layer.synaptic_ops for layer in self.layers)
        ann = sum(layer.macs_per_call for layer in self.layers)
        return {"snn_mj": (mac_pj * macs + ac_pj * sops) * 1e-9, "ann_mj": mac_pj * ann * 1e-9, "macs": macs,
                "synaptic_ops": sops, "ann_macs": ann, "precision_preset": precision, "provenance": PROVENANCE}

    def memory_energy(self, precision: str = "fp32") -> dict[str, float]:
        """SNN and same-precision ANN energy with memory traffic, in mJ per sample, its parts,
        and the break-even mean input firing rate (see the module docstring). `mean_input_rate`
        is the measured one, weighted by each spiking layer's MACs."""
        mac_pj, ac_pj = ENERGY_45NM_PJ[precision]
        word = WORD_BYTES[precision]
        ann_compute = ann_memory = snn_fixed = snn_per_rate = spiking_macs = sops = 0.0
        for layer in self.layers:
            weight_pj = sram_access_pj(layer.weights * word, word)
            input_pj = sram_access_pj(layer.inputs_per_call * word, word)
            output_pj = sram_access_pj(layer.outputs_per_call * word, word)
            dense_memory = layer.macs_per_call * (weight_pj + input_pj) + layer.outputs_per_call * output_pj
            ann_compute += layer.macs_per_call * mac_pj
            ann_memory += dense_memory
            if layer.spike_input:  # per event: accumulate, read the weight, read and write the membrane
                snn_per_rate += layer.calls * layer.macs_per_call * (ac_pj + weight_pj + 2 * output_pj)
                spiking_macs += layer.calls * layer.macs_per_call
                sops += layer.synaptic_ops
            else:
                snn_fixed += (1 if layer.repeated_input else layer.calls) * (layer.macs_per_call * mac_pj +
                                                                             dense_memory)
        membranes = sum(self.neuron_steps.get(name, 0) * size * 2 * sram_access_pj(size * word, word)
                        for name, size in self.neuron_sizes.items())  # leak and threshold: read and write each step
        snn_fixed += membranes
        rate = sops / spiking_macs if spiking_macs else 0.0
        snn = snn_fixed + rate * snn_per_rate
        ann = ann_compute + ann_memory
        break_even = (ann - snn_fixed) / snn_per_rate if snn_per_rate else None
        return {"snn_mj": snn * 1e-9, "ann_mj": ann * 1e-9, "snn_membrane_upkeep_mj": membranes * 1e-9,
                "ann_memory_mj": ann_memory * 1e-9, "mean_input_rate": rate,
                "break_even_rate": None if break_even is None else max(break_even, 0.0),
                "precision_preset": precision, "provenance": MEMORY_PROVENANCE}

    def summary(self, precision: str = "fp32") -> str:
        """Firing rates and the energy per sample at `precision` (a key of ENERGY_45NM_PJ), the
        SNN beside its ANN, each estimate with its provenance."""
        compute, memory = self.energy(precision), self.memory_energy(precision)
        even = "never" if memory["break_even_rate"] is None else f"{memory['break_even_rate']:.1%}"
        return "\n".join([
            f"{self.samples} samples; firing rates: "
            + (", ".join(f"{name} {rate:.3f}" for name, rate in self.neuron_rates.items()) or "no neuron layers found"),
            f"energy per sample at {precision}: compute only, SNN {compute['snn_mj'] * 1e3:.4g} uJ against "
            f"ANN {compute['ann_mj'] * 1e3:.4g} uJ ({compute['provenance']})",
            f"memory-aware, SNN {memory['snn_mj'] * 1e3:.4g} uJ against ANN {memory['ann_mj'] * 1e3:.4g} uJ, "
            f"break-even input rate {even}, measured {memory['mean_input_rate']:.1%} ({memory['provenance']})"])

    def to_dict(self) -> dict:
        return {**asdict(self), "energy": {p: self.energy(p) for p in ENERGY_45NM_PJ},
                "memory_aware_energy": {p: self.memory_energy(p) for p in ENERGY_45NM_PJ}}


def _macs_per_output(module: nn.Module) -> int:
    return (module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            if isinstance(module, nn.Conv2d) else module.in_features)


def _steps_in_call(module: nn.Module, leading: int, batch: int) -> int:
    """How many timesteps one call of `module` covers: T for a SpikingJelly multi-step module
    (input [T, B, ...]), T for a layer given time folded into the batch ([T*B, ...], inside a
    `SeqToANNContainer`), else one."""
    if getattr(module, "step_mode", "s") == "m":
        return leading
    return leading // batch if leading > batch and leading % batch == 0 else 1


def spike_statistics(model: nn.Module, inputs: torch.Tensor, batch: int | None = None) -> SpikeStats:
    """Run `model` once on `inputs` (a batch of real samples) and measure, per sample, each
    weight layer's MACs, calls and input firing rate, and each neuron layer's firing rate.

    `model` is anything whose forward runs all timesteps (the zoo's spiking CNN, an
    `UnrolledModule` from `edgeport.transforms.spiking`, or an snnTorch or SpikingJelly network
    whose forward loops over time itself or runs its layers multi-step, its library neurons
    measured as they are). `batch` is the number of samples in `inputs` (default: its first
    axis; a [T, B, ...] sequence has B): figures are per sample and per timestep whether a
    layer is called once per step or once for all of them.
    """
    batch = int(inputs.shape[0]) if batch is None else batch
    names = {m: re.sub(r"^(stepped\.|model\.)?(net\.)?", "", n) for n, m in model.named_modules()}
    layers: dict[str, LayerStats] = {}
    rates: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    steps: dict[str, int] = {}
    last_input: dict[str, torch.Tensor] = {}

    def on_weight_layer(module, args, output):
        name, x = names[module], args[0]
        spike = is_binary(x.detach().cpu().numpy())
        per_sample_step = batch * _steps_in_call(module, x.shape[0], batch)
        stats = layers.get(name)
        if stats is None:
            stats = layers[name] = LayerStats(name, type(module).__name__,
                                              output.numel() * _macs_per_output(module) / per_sample_step, 0, spike,
                                              0.0, repeated_input=not spike, weights=module.weight.numel(),
                                              inputs_per_call=x.numel() // per_sample_step,
                                              outputs_per_call=output.numel() // per_sample_step)
        covered = per_sample_step // batch
        stats.spike_input = stats.spike_input and spike
        each_step = x.detach().reshape(covered, -1)  # time leads in [T, B, ...] and in [T*B, ...] alike
        if name in last_input and not torch.equal(last_input[name], each_step[0]) or \
                not bool((each_step == each_step[:1]).all()):
            stats.repeated_input = False
        last_input[name] = each_step[-1]
        stats.input_rate += float((x != 0).float().mean()) * covered
        stats.calls += covered

    def on_neuron(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        name, covered = names[module], _steps_in_call(module, out.shape[0], batch)
        rates.setdefault(name, []).append(float(out.float().mean()))
        sizes[name] = out.numel() // (batch * covered)
        steps[name] = steps.get(name, 0) + covered

    from edgeport.snn.convert import StatefulNeuron, is_library_neuron, is_neuron

    hooks = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(on_weight_layer))
        elif is_neuron(module) and (is_library_neuron(module) or not any(
                isinstance(p, StatefulNeuron) and module is p.neuron for p in model.modules())):
            hooks.append(module.register_forward_hook(on_neuron))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    for stats in layers.values():
        stats.input_rate /= max(stats.calls, 1)
    return SpikeStats(batch, {k: sum(v) / len(v) for k, v in rates.items()}, list(layers.values()), sizes, steps)
