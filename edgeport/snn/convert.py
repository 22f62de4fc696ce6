"""Turn spiking networks into the step protocol: `step(x_t, *states) -> (*outputs, *states)`
and `initial_state(x_t) -> states`, with every neuron's state explicit.

A model that already has `step` and `initial_state` (the zoo's spiking models) is used as it
is. A network built with snnTorch (`Leaky`, `Synaptic`, `RLeaky`, `RSynaptic`, `Alpha`,
`Lapicque`) or SpikingJelly (`IFNode`, `LIFNode`, `ParametricLIFNode`, single- or multi-step
mode, `SeqToANNContainer` and the other time containers) is converted: each library neuron is
replaced by its edgeport equivalent with the library's exact arithmetic and call convention,
and its hidden state moves into a `StateBank` that the step function fills from its arguments
and empties into its results. A multi-step network runs one step at a time: its time
containers become the plain layers they wrap. A neuron type or option we do not support is
named in a `UserError`.

Networks are converted on a copy, as users hand them over: after training or evaluation,
their neurons holding state tensors from the last forward pass, which `copy.deepcopy` refuses
when they are part of an autograd graph. `library_copy` copies around them and clears them.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from edgeport.errors import UserError
from edgeport.snn.neurons import (LIF, Alpha, Lapicque, Leaky, ParametricLIF, RecurrentLeaky, RecurrentSynaptic,
                                  Synaptic)


@dataclass
class Slot:
    """One neuron's state in the bank: names, per-sample shapes and initial fill values."""

    path: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # without the batch axis
    fills: tuple[float, ...]


class StateBank:
    """The states of every converted neuron during one step, in the order they fire."""

    def __init__(self):
        self.slots: list[Slot] = []
        self.current: list[torch.Tensor] | None = None  # flat, set by the step function
        self.next: dict[int, tuple[torch.Tensor, ...]] = {}

    def read(self, neuron: "StatefulNeuron", x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.current is None:  # discovery: an eager pass that records shapes and fills
            state = neuron.neuron.initial_state(x)
            neuron.slot = len(self.slots)
            self.slots.append(Slot(neuron.path, neuron.state_names, tuple(tuple(s.shape[1:]) for s in state),
                                   tuple(float(s.flatten()[0]) if s.numel() else 0.0 for s in state)))
            return state
        start = sum(len(s.names) for s in self.slots[:neuron.slot])
        return tuple(self.current[start:start + len(self.slots[neuron.slot].names)])

    def write(self, neuron: "StatefulNeuron", state: tuple[torch.Tensor, ...]) -> None:
        self.next[neuron.slot] = state


class StatefulNeuron(nn.Module):
    """A library neuron replaced by an edgeport neuron; keeps the library's call convention
    (`returns_state`: snnTorch returns (spk, *state) unless init_hidden, `returned`: which of
    the states it returns, as a recurrent neuron's spike state is its output) while its state
    lives in the bank. Called with explicit state, it simply computes."""

    def __init__(self, neuron: nn.Module, bank: StateBank, path: str, state_names: tuple[str, ...],
                 returns_state: bool):
        super().__init__()
        self.neuron, self.path, self.state_names, self.returns_state = neuron, path, state_names, returns_state
        self.returned = tuple(i for i, name in enumerate(state_names) if name != "spk")
        self.bank, self.slot = bank, -1  # a plain attribute: the bank is no submodule

    def forward(self, x: torch.Tensor, *explicit: torch.Tensor):
        if explicit and all(e is not None for e in explicit):
            out, *state = self.neuron(x, *explicit)
            return (out, *(state[i] for i in self.returned))
        out, *state = self.neuron(x, *self.bank.read(self, x))
        self.bank.write(self, tuple(state))
        return (out, *(state[i] for i in self.returned)) if self.returns_state else out


def _is_from(module: nn.Module, package: str) -> bool:
    return any(c.__module__.startswith(package) for c in type(module).__mro__)


def _jelly_neuron(module: nn.Module, named: str) -> nn.Module:
    """The edgeport neuron of a SpikingJelly neuron, with its exact arithmetic."""
    from spikingjelly.activation_based import neuron as sj

    if type(module) is sj.IFNode:
        return LIF(tau=None, threshold=module.v_threshold, v_reset=module.v_reset)
    if type(module) is sj.LIFNode:
        return LIF(tau=module.tau, threshold=module.v_threshold, v_reset=module.v_reset,
                   decay_input=module.decay_input)
    if type(module) is sj.ParametricLIFNode:
        with torch.no_grad():  # the decay the library recomputes at every step, in the same float32 op
            reciprocal_tau = module.w.detach().float().sigmoid()
        return ParametricLIF(reciprocal_tau, threshold=module.v_threshold, v_reset=module.v_reset,
                             decay_input=module.decay_input)
    raise UserError(f"SpikingJelly neuron {named} is not supported (supported: IFNode, LIFNode, ParametricLIFNode)")


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    return getattr(module, name).detach().clone()


def _recurrent(module: nn.Module) -> nn.Module:
    """The recurrent connection of an RLeaky/RSynaptic: its Linear/Conv2d, or x * V one-to-one."""
    if module.all_to_all:
        return copy.deepcopy(module.recurrent)
    return OneToOne(_buffer(module.recurrent, "V"))


class OneToOne(nn.Module):
    """snnTorch's `RecurrentOneToOne`: each neuron's spike fed back to itself times its weight V."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


# snnTorch neuron class -> (edgeport neuron from the library module and the common options, state names)
SNNTORCH_NEURONS = {
    "Leaky": (lambda m, common: Leaky(_buffer(m, "beta"), **common), ("mem",)),
    "Synaptic": (lambda m, common: Synaptic(_buffer(m, "alpha"), _buffer(m, "beta"), **common), ("syn", "mem")),
    "RLeaky": (lambda m, common: RecurrentLeaky(_buffer(m, "beta"), _recurrent(m), **common), ("spk", "mem")),
    "RSynaptic": (lambda m, common: RecurrentSynaptic(_buffer(m, "alpha"), _buffer(m, "beta"), _recurrent(m),
                                                      **common | {"reset_delay": True}), ("spk", "syn", "mem")),
    "Alpha": (lambda m, common: Alpha(_buffer(m, "alpha"), _buffer(m, "beta"), **common | {"reset_delay": True}),
              ("syn_exc", "syn_inh", "mem")),
    "Lapicque": (lambda m, common: Lapicque(_buffer(m, "R"), _buffer(m, "C"), _buffer(m, "time_step"),
                                            **common | {"reset_delay": True}), ("mem",)),
}


def replacement(module: nn.Module, path: str) -> tuple[nn.Module, tuple[str, ...], bool] | None:
    """(edgeport neuron, state names, returns state) for a library neuron; None for other modules."""
    kind = type(module).__name__
    named = f"{kind} at {path or '<root>'}"
    if _is_from(module, "spikingjelly") and hasattr(module, "v_threshold"):
        return _jelly_neuron(module, named), ("v",), False
    if _is_from(module, "snntorch") and hasattr(module, "threshold") and hasattr(module, "reset_mechanism"):
        for option in ("inhibition", "state_quant"):
            if getattr(module, option, False):
                raise UserError(f"snnTorch {named} uses {option}=True, which is not supported")
        if kind not in SNNTORCH_NEURONS:
            raise UserError(f"snnTorch neuron {named} is not supported (supported: {', '.join(SNNTORCH_NEURONS)})")
        returns_state = bool(getattr(module, "output", False)) or not module.init_hidden
        # the options the library does not pass on to its base class keep their defaults there
        common = dict(threshold=_buffer(module, "threshold"), reset=module.reset_mechanism,
                      reset_delay=getattr(module, "reset_delay", True),
                      graded_spikes_factor=_buffer(module, "graded_spikes_factor"))
        build, names = SNNTORCH_NEURONS[kind]
        return build(module, common), names, returns_state
    return None


class SteppedNetwork(nn.Module):
    """A converted single-step network implementing the step protocol."""

    def __init__(self, net: nn.Module, bank: StateBank):
        super().__init__()
        self.net, self.bank = net, bank

    @property
    def state_names(self) -> list[str]:
        """`<state>_<module path>`, e.g. `mem_1`, `v_features_3`: valid names in ONNX and Core ML."""
        return [re.sub(r"\W", "_", f"{name}_{slot.path}") for slot in self.bank.slots for name in slot.names]

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.new_full((x.shape[0], *shape), fill) for slot in self.bank.slots
                     for shape, fill in zip(slot.shapes, slot.fills))

    def step(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.bank.current, self.bank.next = list(states), {}
        try:
            outputs = self.net(x)
        finally:
            self.bank.current = None
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return (*outputs, *(s for i in range(len(self.bank.slots)) for s in self.bank.next[i]))


def multi_step(model: nn.Module) -> bool:
    """Whether a SpikingJelly network runs in multi-step mode (input [T, B, ...])."""
    return any(getattr(m, "step_mode", "s") == "m" for m in model.modules() if _is_from(m, "spikingjelly"))


def _state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors a module holds besides its parameters: buffers, plain attributes and
    SpikingJelly's `_memories` (its neurons' `v`)."""
    held = [*module._buffers.values(), *module.__dict__.values(), *getattr(module, "_memories", {}).values()]
    return [t for t in held if isinstance(t, torch.Tensor)]


def library_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with the library neurons' hidden state cleared.

    State left by a forward pass outside `torch.no_grad()` belongs to an autograd graph, which
    `copy.deepcopy` refuses; such tensors are carried over detached (and then cleared) instead
    of copied, so the user's model is never touched.
    """
    memo = {id(t): t.detach() for m in model.modules() for t in _state_tensors(m) if t.grad_fn is not None}
    copied = copy.deepcopy(model, memo).eval()
    reset_library_state(copied)
    return copied


def _unwrap_time_containers(net: nn.Module) -> None:
    """Replace SpikingJelly's time containers (`SeqToANNContainer`, `MultiStepContainer` and
    their T-last forms), which fold or loop over a time axis, by the layers they wrap: one step
    has no time axis."""
    from spikingjelly.activation_based.layer import (MultiStepContainer, SeqToANNContainer, TLastMultiStepContainer,
                                                     TLastSeqToANNContainer)

    containers = (SeqToANNContainer, MultiStepContainer, TLastSeqToANNContainer, TLastMultiStepContainer)
    for path, module in list(net.named_modules()):
        if isinstance(module, containers):
            if not path:
                raise UserError(f"the model is a single {type(module).__name__}; wrap it in a network")
            parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
            setattr(parent, path.rpartition(".")[2], nn.Sequential(*module))


def convert(model: nn.Module, example_step: torch.Tensor) -> SteppedNetwork:
    """Convert a library spiking network into a `SteppedNetwork`; `example_step` is one
    timestep's input (B, ...), used once to record each neuron's state shape."""
    net = library_copy(model)
    if any(_is_from(m, "spikingjelly") for m in net.modules()):
        from spikingjelly.activation_based import functional

        _unwrap_time_containers(net)
        functional.set_step_mode(net, "s")
    bank = StateBank()
    replaced = 0
    for path, module in list(net.named_modules()):
        found = replacement(module, path)
        if found is None:
            continue
        neuron, names, returns_state = found
        parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
        wrapped = StatefulNeuron(neuron, bank, path, names, returns_state)
        if path:
            setattr(parent, path.rpartition(".")[2], wrapped)
        else:
            raise UserError("the model is a single neuron; wrap it in a network")
        replaced += 1
    if not replaced:
        raise UserError("no spiking neurons found: the model is neither an edgeport step model (step, initial_state) "
                        "nor built with snnTorch (Leaky, Synaptic) or SpikingJelly (IFNode, LIFNode) neurons")
    with torch.no_grad():
        net(example_step)  # discovery: slot order and state shapes
    if len({s.path for s in bank.slots}) != len(bank.slots):
        raise UserError("a neuron module is called more than once per step; give each use its own module")
    return SteppedNetwork(net, bank)


def as_stepped(model: nn.Module, example_step: torch.Tensor) -> nn.Module:
    """The model itself when it implements the step protocol, else its conversion."""
    if callable(getattr(model, "step", None)) and callable(getattr(model, "initial_state", None)):
        return model.eval()
    return convert(model, example_step)


def state_names(stepped: nn.Module, count: int) -> list[str]:
    """The names of the `count` state tensors, in the order `step` takes and returns them: the
    model's `state_names` where it has them (`<v|mem|syn>_<module path>` for converted networks),
    `step`'s parameter names otherwise."""
    named = getattr(stepped, "state_names", None)
    if named is not None:  # a converted network, an imported NIR graph
        return list(named)
    import inspect

    params = [p.name for p in inspect.signature(stepped.step).parameters.values()
              if p.kind == p.POSITIONAL_OR_KEYWORD][1:]
    return params if len(params) == count else [f"state_{i}" for i in range(count)]


SNNTORCH_STATES = ("mem", "syn", "spk", "syn_exc", "syn_inh")


def reset_library_state(model: nn.Module) -> None:
    """Clear the hidden state that snnTorch and SpikingJelly neurons keep between calls (each
    module by itself: snnTorch's own `utils.reset` resets every instance of every network)."""
    for module in model.modules():
        if _is_from(module, "spikingjelly") and hasattr(module, "reset"):
            module.reset()
        elif _is_from(module, "snntorch"):
            for name in SNNTORCH_STATES:
                if isinstance(getattr(module, name, None), torch.Tensor):
                    setattr(module, name, torch.zeros(0))


def library_reference(model: nn.Module, steps: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """The original model's outputs at each timestep, run the library's own way on a copy."""
    model = library_copy(model)
    with torch.no_grad():
        if multi_step(model):
            outputs = model(torch.stack(steps))
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            return [tuple(o[t] for o in outputs) for t in range(len(steps))]
        result = []
        for x in steps:
            out = model(x)
            result.append(tuple(out) if isinstance(out, (tuple, list)) else (out,))
    return result
