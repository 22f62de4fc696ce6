"""Turn spiking networks into the step protocol: `step(x_t, *states) -> (*outputs, *states)`
and `initial_state(x_t) -> states`, with every neuron's state explicit.

A model that already has `step` and `initial_state` (the zoo's spiking models) is used as it
is. A network built with snnTorch (`Leaky`, `Synaptic`, `RLeaky`, `RSynaptic`, `Alpha`,
`Lapicque`) or SpikingJelly (`IFNode`, `LIFNode`, `ParametricLIFNode`, single- or multi-step
mode, `SeqToANNContainer` and the other time containers) is converted: each library neuron is
replaced by its edgeport equivalent with the library's exact arithmetic and call convention,
and its hidden state moves into a `StateBank` that the step function fills from its arguments
and empties into its results. A multi-step network runs one step at a time: its time
containers become the plain layers they wrap, or, where its own code builds the [T, B, ...]
axis (Spikformer), it runs as a sequence of length one. A forward written as snnTorch's
tutorials write it (state from `init_leaky()`, a loop over time handing each neuron its state,
`spk, mem = lif(cur, mem)`, results stacked) runs one iteration of its loop per step. A neuron
type or option we do not support is named in a `UserError`.

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
from torch.overrides import TorchFunctionMode

from edgeport.errors import UserError
from edgeport.snn.neurons import (LIF, NEURONS, Alpha, Lapicque, Leaky, ParametricLIF, RecurrentLeaky,
                                  RecurrentSynaptic, Synaptic)


WITHOUT_TIME_AXIS = "without a time axis first (it reduces over time itself, e.g. averages its readout over T)"
# what to do with a forward that no single step can be cut from
WHOLE_FORWARD = ("export it without snn_form (and measure its spikes without timesteps), which takes its whole "
                 "forward, its time loop included, as one graph")


@dataclass
class Slot:
    """One neuron's state in the bank: names, per-sample shapes and initial fill values."""

    path: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # without the batch axis
    fills: tuple[float, ...]


class _IterationDone(Exception):
    """Every neuron of a network that runs its own time loop has fired once: one iteration of
    the loop, which is one step, is complete."""


class StateBank:
    """The states of every converted neuron during one step, in the order they fire.

    Discovery (`current` is None) runs the network once eagerly, keeping each neuron's results
    call by call (`calls`, in first-call order) and the state it started from; `assign` then
    gives the neurons their slots. A neuron whose state the forward's own code hands over
    (snnTorch's `spk, mem = lif(cur, mem)`) gets a slot only when the forward runs its own time
    loop, calling it once per iteration: one step is then one iteration, cut at the first module
    called after every neuron has fired (`end_of_iteration`). Called once per forward, it starts
    from the handed state at every step, as the library's run does.
    """

    def __init__(self):
        self.slots: list[Slot] = []
        self.current: list[torch.Tensor] | None = None  # flat, set by the step function
        self.next: dict[int, tuple[torch.Tensor, ...]] = {}
        self.results: dict[int, tuple[torch.Tensor, ...]] = {}  # what each neuron returned in this step
        self.calls: dict[StatefulNeuron, list[tuple[torch.Tensor, ...]]] = {}  # discovery: results, call by call
        self.started: dict[StatefulNeuron, tuple[torch.Tensor, ...]] = {}  # discovery: the state of the first call
        self.handed: set[StatefulNeuron] = set()  # neurons whose state the forward hands over
        self.loop_length = 1  # iterations of the forward's own time loop (1: none), set by `assign`
        self.loop_outputs: list[tuple[int, int]] | None = None  # own loop: (slot, result) of each model output

    def state_for(self, neuron: "StatefulNeuron", x: torch.Tensor,
                  handed: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...]:
        """The state `neuron` computes from: in discovery the handed state (else its initial
        state), in a step its slot's share of the step's arguments (or the handed state)."""
        if self.current is None:
            state = handed if handed is not None else neuron.neuron.initial_state(x)
            if neuron not in self.calls:
                self.calls[neuron], self.started[neuron] = [], state
            if handed is not None:
                self.handed.add(neuron)
            return state
        if neuron.slot < 0:
            return handed
        start = sum(len(s.names) for s in self.slots[:neuron.slot])
        return tuple(self.current[start:start + len(self.slots[neuron.slot].names)])

    def record(self, neuron: "StatefulNeuron", state: tuple[torch.Tensor, ...],
               results: tuple[torch.Tensor, ...]) -> None:
        """Keep what `neuron` computed: its next state (in a step) and what it returned."""
        if self.current is None:
            self.calls[neuron].append(results)
        elif neuron.slot >= 0:
            self.next[neuron.slot], self.results[neuron.slot] = state, results

    def end_of_iteration(self, module: nn.Module, args: tuple) -> None:
        """A forward pre-hook on every module of a network with its own time loop: a module
        called in a step after every neuron has fired belongs to the next iteration, so the
        step ends before it runs (nothing of the next iteration is computed or counted)."""
        if self.current is not None and len(self.next) == len(self.slots):
            raise _IterationDone

    def assign(self) -> None:
        """Give slots, in first-call order, to the neurons that keep state between steps, after
        checking that every step calls each of them once."""
        loop = self.loop_length = max((len(self.calls[n]) for n in self.handed), default=1)
        for neuron, calls in self.calls.items():
            if neuron not in self.handed and len(calls) > 1:
                raise UserError(f"the neuron at {neuron.path} is called {len(calls)} times per forward with its state "
                                f"kept inside it: give each use its own module, or hand its state over as snnTorch's "
                                f"tutorials do (spk, mem = lif(cur, mem))")
            if neuron in self.handed and len(calls) != loop:
                raise UserError(f"the forward's own time loop calls the neuron at {neuron.path} {len(calls)} times and "
                                f"another {loop} times; each neuron must fire once per step")
        for neuron in self.calls:
            if neuron in self.handed and loop == 1:
                continue  # started afresh by the forward at every call
            state = self.started[neuron]
            for s in state:
                if s.numel() and not bool((s == s.flatten()[0]).all()):
                    raise UserError(f"the forward starts the neuron at {neuron.path} from a state that is not one "
                                    f"value everywhere; a step form starts each state from one value")
            neuron.slot = len(self.slots)
            self.slots.append(Slot(neuron.path, neuron.state_names, tuple(tuple(s.shape[1:]) for s in state),
                                   tuple(float(s.flatten()[0]) if s.numel() else 0.0 for s in state)))


class StatefulNeuron(nn.Module):
    """A library neuron replaced by an edgeport neuron; keeps the library's call convention
    (`returns_state`: snnTorch returns (spk, *state) unless init_hidden, `returned`: which of
    the states it returns, as a recurrent neuron's spike state is its output) while its state
    lives in the bank. Called with its state handed over (`spk, mem = lif(cur, mem)`), it
    returns (spk, *state) as the library does, and snnTorch's initialisers (`initialisers`:
    `reset_mem()`, `init_leaky()`, ...) give what the library's give. `time_axis`: a
    SpikingJelly multi-step neuron fed one step as a sequence of length one."""

    def __init__(self, neuron: nn.Module, bank: StateBank, path: str, state_names: tuple[str, ...],
                 returns_state: bool, initialisers: tuple[str, ...] = (), time_axis: bool = False):
        super().__init__()
        self.neuron, self.path, self.state_names, self.returns_state = neuron, path, state_names, returns_state
        self.initialisers, self.time_axis = initialisers, time_axis
        self.returned = tuple(i for i, name in enumerate(state_names) if name != "spk")
        self.bank, self.slot = bank, -1  # a plain attribute: the bank is no submodule

    def __getattr__(self, name: str):
        if name in self.__dict__.get("initialisers", ()):
            return self.library_initial_state
        return super().__getattr__(name)

    def library_initial_state(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What snnTorch's `reset_mem()` / `init_leaky()` ... return on a fresh neuron: an empty
        tensor per state, which the first call replaces by zeros shaped as its input."""
        empty = tuple(torch.zeros(0) for _ in self.state_names)
        return empty[0] if len(empty) == 1 else empty

    def handed_state(self, x: torch.Tensor, given: tuple, named: dict) -> tuple[torch.Tensor, ...] | None:
        """The state the forward's own code passes (by position or by the library's argument
        names), None when it passes none; a state missing or not shaped as the initial state
        (the initialisers' empty tensor) starts from the initial state, as in the library."""
        passed = [*given, *[None] * (len(self.state_names) - len(given))]
        for name, value in named.items():
            passed[self.state_names.index(name)] = value
        if all(p is None for p in passed):
            return None
        initial = self.neuron.initial_state(x)
        return tuple(p if p is not None and p.shape == i.shape else i for p, i in zip(passed, initial))

    def forward(self, x: torch.Tensor, *given: torch.Tensor | None, **named: torch.Tensor | None):
        if self.time_axis:
            return self._step(x[0], given, named).unsqueeze(0)
        return self._step(x, given, named)

    def _step(self, x: torch.Tensor, given: tuple, named: dict):
        handed = self.handed_state(x, given, named)
        out, *state = self.neuron(x, *self.bank.state_for(self, x, handed))
        results = (out, *(state[i] for i in self.returned))
        self.bank.record(self, tuple(state), results)
        return results if self.returns_state or handed is not None else out


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


def snntorch_initialisers(kind: str) -> tuple[str, ...]:
    """The state initialisers an snnTorch neuron class has: `reset_mem` and its older name
    (`init_leaky` for `Leaky`, `init_rsynaptic` for `RSynaptic`, ...)."""
    return "reset_mem", f"init_{kind.lower()}"


def is_neuron(module: nn.Module) -> bool:
    """Whether `module` is a spiking neuron: edgeport's own, a converted one, snnTorch's or
    SpikingJelly's."""
    return is_library_neuron(module) or isinstance(module, (*NEURONS, StatefulNeuron))


def is_library_neuron(module: nn.Module) -> bool:
    """Whether `module` is an snnTorch or SpikingJelly neuron (supported or not)."""
    return (_is_from(module, "spikingjelly") and hasattr(module, "v_threshold")) or (
        _is_from(module, "snntorch") and hasattr(module, "threshold") and hasattr(module, "reset_mechanism"))


def replacement(module: nn.Module, path: str) -> tuple[nn.Module, tuple[str, ...], bool] | None:
    """(edgeport neuron, state names, returns state) for a library neuron; None for other modules."""
    kind = type(module).__name__
    named = f"{kind} at {path or '<root>'}"
    if not is_library_neuron(module):
        return None
    if _is_from(module, "spikingjelly"):
        return _jelly_neuron(module, named), ("v",), False
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


class SteppedNetwork(nn.Module):
    """A converted network implementing the step protocol. `time_axis`: a multi-step network
    whose own code needs its [T, B, ...] axis, run one step at a time as a sequence of length
    one. A network with its own time loop runs one iteration per step: its outputs are the
    neuron results it stacks over time (`bank.loop_outputs`), taken from that iteration."""

    def __init__(self, net: nn.Module, bank: StateBank, time_axis: bool = False):
        super().__init__()
        self.net, self.bank, self.time_axis = net, bank, time_axis

    @property
    def state_names(self) -> list[str]:
        """`<state>_<module path>`, e.g. `mem_1`, `v_features_3`: valid names in ONNX and Core ML."""
        return [re.sub(r"\W", "_", f"{name}_{slot.path}") for slot in self.bank.slots for name in slot.names]

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.new_full((x.shape[0], *shape), fill) for slot in self.bank.slots
                     for shape, fill in zip(slot.shapes, slot.fills))

    def step(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.bank.current, self.bank.next, self.bank.results = list(states), {}, {}
        try:
            outputs = self.net(x.unsqueeze(0) if self.time_axis else x)
        except _IterationDone:  # the forward's own loop finished one iteration: the step's outputs are in the bank
            outputs = ()
        finally:
            self.bank.current = None
        if self.bank.loop_outputs is not None:
            outputs = tuple(self.bank.results[slot][index] for slot, index in self.bank.loop_outputs)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        if self.time_axis:
            outputs = tuple(o[0] for o in outputs)
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


def from_rest(model: nn.Module) -> nn.Module:
    """A `library_copy` of a stateful snnTorch or SpikingJelly network that runs from rest on
    every call, as its users reset it between samples (`functional.reset_net`, `utils.reset`):
    a forward pre-hook clears its neurons' state, so an export traces no membrane left by an
    earlier call and verification compares with the model's own first step. Same class and
    weights, so the same source hash; the user's model is never touched."""
    copied = library_copy(model)
    copied.register_forward_pre_hook(lambda module, args: reset_library_state(module))
    return copied


def stateful(model: nn.Module) -> bool:
    """Whether `model` holds snnTorch or SpikingJelly neurons, whose state outlives a call."""
    return any(is_library_neuron(m) for m in model.modules())


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


class _Stacks(TorchFunctionMode):
    """Records every `torch.stack` over the first axis (a forward's per-step results stacked
    over time): its result's id -> (result, the tensors stacked)."""

    def __init__(self):
        super().__init__()
        self.stacked: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.stack and (args[1] if len(args) > 1 else kwargs.get("dim", 0)) == 0:
            self.stacked[id(result)] = (result, list(args[0]))
        return result


def _loop_outputs(model: nn.Module, outputs, bank: StateBank, stacks: _Stacks) -> list[tuple[int, int]]:
    """For a forward with its own time loop, which neuron result (slot, index) each returned
    output stacks over time; a step cannot be cut from a forward that returns anything else."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    found = []
    for number, output in enumerate(outputs):
        stacked = stacks.stacked.get(id(output), (None, []))[1]
        match = next(((neuron.slot, index) for neuron, calls in bank.calls.items() if neuron in bank.handed
                      for index in range(len(calls[0])) if len(stacked) == len(calls)
                      and all(a is call[index] for a, call in zip(stacked, calls))), None)
        if match is None:
            raise UserError(f"{type(model).__name__}.forward runs its own loop of {bank.loop_length} timesteps and "
                            f"returns an output ({number}) that is not a neuron's results stacked over time "
                            f"(torch.stack(spk_rec) of spk, mem = lif(cur, mem)), so no single step can be cut from "
                            f"it: {WHOLE_FORWARD}")
        found.append(match)
    return found


def _converted(model: nn.Module, example_step: torch.Tensor, time_axis: bool) -> SteppedNetwork:
    """`convert` with SpikingJelly's multi-step networks run single-step (time containers
    unwrapped) or, with `time_axis`, as sequences of length one."""
    net = library_copy(model)
    if any(_is_from(m, "spikingjelly") for m in net.modules()) and not time_axis:
        from spikingjelly.activation_based import functional

        _unwrap_time_containers(net)
        functional.set_step_mode(net, "s")
    bank = StateBank()
    replaced = 0
    for path, module in list(net.named_modules()):
        found = replacement(module, path)
        if found is None:
            continue
        if not path:
            raise UserError("the model is a single neuron; wrap it in a network")
        neuron, names, returns_state = found
        initialisers = snntorch_initialisers(type(module).__name__) if _is_from(module, "snntorch") else ()
        parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
        setattr(parent, path.rpartition(".")[2],
                StatefulNeuron(neuron, bank, path, names, returns_state, initialisers, time_axis))
        replaced += 1
    if not replaced:
        raise UserError("no spiking neurons found: the model is neither an edgeport step model (step, initial_state) "
                        "nor built with snnTorch (Leaky, Synaptic) or SpikingJelly (IFNode, LIFNode) neurons")
    stacks = _Stacks()
    with torch.no_grad(), stacks:  # discovery: call order, state shapes, what the forward stacks
        outputs = net(example_step.unsqueeze(0) if time_axis else example_step)
    bank.assign()
    if bank.loop_length > 1:
        bank.loop_outputs = _loop_outputs(model, outputs, bank, stacks)
        for module in net.modules():
            module.register_forward_pre_hook(bank.end_of_iteration)
    bank.calls, bank.started, bank.handed = {}, {}, set()  # discovery's tensors are not needed again
    return SteppedNetwork(net, bank, time_axis)


def convert(model: nn.Module, example_step: torch.Tensor) -> SteppedNetwork:
    """Convert a library spiking network into a `SteppedNetwork`; `example_step` is one
    timestep's input (B, ...), used once to record each neuron's state shape.

    A SpikingJelly multi-step network runs single-step where its code allows (its time
    containers unwrapped: the smallest graph, and the form NIR takes); one whose own code builds
    or checks the [T, B, ...] axis (SpikingJelly's Spikformer) runs as a sequence of length one.
    One whose forward makes its own time axis from one frame is refused by name.
    """
    try:
        return _converted(model, example_step, time_axis=False)
    except UserError:
        raise
    except Exception as single_step:  # a multi-step model's own code may need the time axis
        if not multi_step(model):
            raise
        try:
            return _converted(model, example_step, time_axis=True)
        except UserError:
            raise
        except Exception as sequence:
            _refuse_own_time_axis(model, example_step)
            raise UserError(f"{type(model).__name__} runs neither one step at a time "
                            f"({str(single_step).splitlines()[0][:160]}) nor as a sequence of length one "
                            f"({str(sequence).splitlines()[0][:160]})") from sequence


def _refuse_own_time_axis(model: nn.Module, example_step: torch.Tensor) -> None:
    """Refuse by name a multi-step network whose forward makes its own time axis from one frame,
    as SpikingJelly's tutorial CSNN does (`x.unsqueeze(0).repeat(T, 1, 1, 1, 1)`, its readout
    averaged over T): it runs as it is on one timestep's input, its neurons stepping through a
    time axis that input lacks. Neither conversion can feed it one step, so both fail on
    shapes that say nothing of why; a model that fails on that input too keeps those errors."""
    net = library_copy(model)
    timesteps: list[int] = []
    for module in net.modules():
        if is_library_neuron(module) and getattr(module, "step_mode", "s") == "m":
            module.register_forward_pre_hook(lambda neuron, args: timesteps.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            outputs = net(example_step)
    except Exception:  # a genuine failure, not this pattern
        return
    if not timesteps:
        return
    steps = timesteps[0]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    outputs = [o for o in outputs if isinstance(o, torch.Tensor)]
    shapes = ", ".join(str(list(o.shape)) for o in outputs)
    returned = f"{'an output' if len(outputs) == 1 else 'outputs'} of shape {shapes}"
    reduced = f" {WITHOUT_TIME_AXIS}" if any(not _has_time_axis(o, steps) for o in outputs) else ""
    raise UserError(f"{type(model).__name__}.forward makes its own time axis: given one timestep's input of shape "
                    f"{list(example_step.shape)}, its neurons run {steps} timesteps (the input repeated over T inside "
                    f"forward, as SpikingJelly's tutorials write it) and it returns {returned}{reduced}; a spiking "
                    f"form feeds a network one timestep at a time, which such a forward does not take: {WHOLE_FORWARD}")


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
    """The original model's outputs at each timestep, run the library's own way on a copy: a
    multi-step network on the whole sequence, a forward with its own time loop (its neurons
    called several times per call, as in snnTorch's tutorials) once, a single-step network
    once per step. Either of the first two returns its outputs over time on the first axis."""
    model = library_copy(model)
    with torch.no_grad():
        if multi_step(model):
            return _over_time(model, model(torch.stack(steps)), len(steps))
        calls = {}
        hooks = [m.register_forward_hook(lambda m, args, out: calls.__setitem__(m, calls.get(m, 0) + 1))
                 for m in model.modules() if is_library_neuron(m)]
        try:
            first = model(steps[0])
        finally:
            for hook in hooks:
                hook.remove()
        loop = max(calls.values(), default=1)
        if loop > 1:
            if len(steps) != loop or any(x is not steps[0] for x in steps):
                raise UserError(f"{type(model).__name__}.forward runs its own loop of {loop} timesteps on one input: "
                                f"export it with timesteps={loop} and an input that is one frame (no sequence)")
            return _over_time(model, first, loop)
        result = []
        for t, x in enumerate(steps):
            out = first if t == 0 else model(x)
            result.append(tuple(out) if isinstance(out, (tuple, list)) else (out,))
    return result


def _over_time(model: nn.Module, outputs, steps: int) -> list[tuple[torch.Tensor, ...]]:
    """Outputs stacked over time (T, B, ...) as each step's outputs; a model whose outputs have
    no time axis (it reduces over T itself) cannot be compared step by step."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for output in outputs:
        if not _has_time_axis(output, steps):
            raise UserError(f"{type(model).__name__} returns an output of shape {list(output.shape)} for {steps} "
                            f"timesteps, {WITHOUT_TIME_AXIS}; a spiking form returns every step's outputs, which it "
                            f"cannot be checked against: {WHOLE_FORWARD}")
    return [tuple(o[t] for o in outputs) for t in range(steps)]


def _has_time_axis(output: torch.Tensor, steps: int) -> bool:
    """Whether a model's output over `steps` timesteps keeps them on its first axis (T, B, ...)."""
    return output.ndim >= 2 and output.shape[0] == steps
