"""NIR (the Neuromorphic Intermediate Representation, read by neuromorphic chips and
simulators): a spiking model's step form written as a NIR graph (`nir.write`, HDF5), and a
runner that reads the file back (`nir.read`) and interprets its primitives one step per call.

NIR nodes are continuous-time ODEs; a discrete model needs a time step. Each model step is
`dt` seconds of NIR time and every stateful node is integrated by one forward-Euler step,
tau * dv/dt = (v_leak - v) + R*I  ->  v' = v + (R*I - (v - v_leak)) / (tau/dt), which is
SpikingJelly's charge written with tau_nir = tau_steps * dt; a cycle in the graph carries the
value its source had at the previous step (as NIR's discrete simulators, nirtorch among them,
run recurrent edges). Under that reading the mapping is exact; what it cannot express exactly
is refused, naming the layer:

- Conv2d -> Conv2d (a BatchNorm2d right after it folded in), Linear -> Affine/Linear,
  AvgPool2d -> AvgPool2d, Flatten/flatten/view(B, -1) -> Flatten (over the unbatched shape),
  MaxPool2d over spikes -> SumPool2d + Threshold(0.5) (the same for 0/1 inputs; refused on
  anything but spikes), Identity/Dropout -> nothing;
- edgeport `LIF` (SpikingJelly semantics, fires on membrane >= threshold): NIR fires on `>`,
  so the threshold is written as the float32 just below it, which is the same test on float32
  membranes. Hard reset -> `LIF(tau=tau*dt, r=1 or tau, v_leak=v_reset, v_reset)` or, without
  tau, `IF(r=1/dt)`. Soft (subtract) reset has no NIR neuron: it becomes `LI` (or `I`) ->
  `Threshold` -> `Scale(-c)` -> back into the `LI`, c chosen so that a spike changes the next
  membrane exactly as subtracting the threshold right after it does;
- snnTorch `Leaky` (fires on `>`, reset derived from the previous membrane): reset "zero" ->
  `LIF(tau=dt/(1-beta), r=tau/dt, v_leak=0, v_reset=0)`, "subtract" -> the `LI` loop with
  `Scale(-threshold)`, "none" -> `LI` + `Threshold`;
- SpikingJelly PLIF maps as a LIF with tau = 1/sigmoid(w) steps (the interpreter divides by
  tau where PLIF multiplies by its decay: float rounding may differ, the parity report says);
- refused: the unrolled form, models without spiking neurons, quantized models (NIR has no
  integer types), snnTorch `Synaptic`, `RLeaky`, `RSynaptic`, `Alpha`, `Lapicque`, immediate
  resets and graded spikes, multi-level (integer-count) neurons, and any other layer or tensor
  operation.

The other way, `NirGraphModel` (`edgeport.load_model("net.nir")`) reads any writer's graph with
the same interpreter into a stepped torch model that exports to ONNX and Core ML.

The step form's state stays what torch exchanges: per neuron the artifact's settings name the
NIR node holding its membrane and whether that membrane is taken after the reset (edgeport
`LIF`) or before it (snnTorch's delayed reset), so the SDK's streaming verification compares
the NIR run with torch spike for spike and membrane by membrane.
"""
from __future__ import annotations

import functools
import math
import operator
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from edgeport.core import (Artifact, Backend, ExportRequest, Runner, TensorSpec, check_input_size, check_model_size,
                           option, source_sha256)
from edgeport.errors import BackendUnavailable, ExportError, UserError, first_line
from edgeport.snn.convert import StatefulNeuron, SteppedNetwork
from edgeport.snn.neurons import (LIF, NEURONS, Alpha, Lapicque, Leaky, MultiLevel, RecurrentLeaky, RecurrentSynaptic,
                                  Synaptic)
from edgeport.transforms.spiking import ModelOutput, StepModule, UnrolledModule

AFTER_RESET, BEFORE_RESET = "after reset", "before reset"
MAPPED_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)


def _nir():
    """The `nir` package, imported on use so that edgeport works without it."""
    try:
        import nir
    except ImportError as error:
        raise BackendUnavailable("nir", "the nir package is not installed", "pip install nir==1.0.8") from error
    return nir


@dataclass
class NirOptions:
    """How the NIR graph is written."""

    dt: float = option(1e-4, "NIR time step in seconds: one model step is dt of NIR time, so time constants "
                             "are written as tau = steps x dt (snnTorch's NIR import assumes 1e-4)")


@dataclass
class NeuronState:
    """How one step-form state maps onto the NIR graph: `node` holds the membrane, taken
    `after reset` (SpikingJelly/edgeport LIF) or `before reset` (snnTorch's delayed reset)."""

    state: str
    node: str
    membrane: str


# --- export: the traced step as NIR nodes ---------------------------------------------------

@dataclass
class _Tensor:
    """An fx value carried by NIR: the node producing it; `binary` when it holds 0/1 spikes."""

    node: str
    binary: bool = False


@dataclass
class _NextState:
    """A neuron's next state, which may only leave the step as that neuron's state output (or,
    where it is a NIR node's output, be used as data); `label` names the neuron in messages."""

    neuron: NeuronState
    membrane: _Tensor | None
    label: str


@dataclass
class _NeuronCall:
    """A neuron module's tuple result: its spikes, then its next state."""

    spike: _Tensor
    state: _NextState


def _full(shape: tuple[int, ...], value, dtype=np.float64) -> np.ndarray:
    """A per-neuron parameter array: `value` (a number or a tensor) broadcast as torch would."""
    value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
    return np.broadcast_to(np.asarray(value, dtype=dtype), shape).copy()


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class _Tracer(fx.Tracer):
    """Keeps neurons and the layers with a NIR form as single calls (SpikingJelly's layer
    wrappers included), and traces through everything else."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (*NEURONS, StatefulNeuron, *MAPPED_LAYERS)) or \
            super().is_leaf_module(module, qualified_name)


class _StepCall(nn.Module):
    """`stepped.step(x, *states)` with the states as one argument, which fx can trace."""

    def __init__(self, stepped: nn.Module):
        super().__init__()
        self.stepped = stepped

    def forward(self, x: torch.Tensor, states: tuple[torch.Tensor, ...]):
        return self.stepped.step(x, *states)


class _Recorder(fx.Interpreter):
    """Runs the traced step once and keeps every node's value (shapes, tuple results)."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, node: fx.Node):
        self.values[node] = result = super().run_node(node)
        return result


def _traced_step(stepped: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[fx.GraphModule, dict, str]:
    """The step as an fx graph, every node's value on `args`, and the prefix its module paths
    carry. A converted network is traced inside its state bank, as `SteppedNetwork.step` runs it."""
    tracer = _Tracer()
    try:
        with torch.no_grad():
            if isinstance(stepped, SteppedNetwork):
                module = fx.GraphModule(stepped.net, tracer.trace(stepped.net))
                stepped.bank.current, stepped.bank.next = list(args[1:]), {}
                try:
                    recorder = _Recorder(module)
                    recorder.run(args[0])
                finally:
                    stepped.bank.current = None
                return module, recorder.values, ""
            wrapper = _StepCall(stepped)
            states = {"states": (fx.PH,) * (len(args) - 1)}
            module = fx.GraphModule(wrapper, tracer.trace(wrapper, concrete_args=states))
            recorder = _Recorder(module)
            recorder.run(*args)
            return module, recorder.values, "stepped."
    except (fx.proxy.TraceError, TypeError, RuntimeError) as error:  # data-dependent Python in the step
        first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise ExportError(f"the step cannot be traced into a NIR graph with torch.fx: {first}") from error


# Why an exported graph differs from a plain layer-for-layer copy, one sentence per encoding;
# the artifact's notes name the layers each one applies to.
ENCODINGS = {
    "at or above": "fire on membrane >= threshold, written as NIR's > with v_threshold the float32 just below the "
                   "threshold: the same test on float32 membranes (a float64 reader would also fire in that one-ulp "
                   "gap)",
    "subtract": "reset by subtraction, written as LI (I without leak) -> Threshold -> Scale -> back into it, the loop "
                "acting on the next membrane as subtracting the threshold after the spike does: exact under forward "
                "Euler with the loop carried to the next step; readers that map only NIR's LIF (snnTorch's "
                "import_from_nir) cannot take it",
    "max pool": "max pooling over spikes, written as SumPool2d + Threshold(0.5): the same result on 0/1 spikes",
    "folded": "batch norm folded into the convolution before it: rounding differs from torch's unfolded layers in "
              "the last bits (the parity report measures the effect)",
}


class _GraphBuilder:
    """Walks the traced step and collects the NIR nodes and edges, each neuron's state record,
    the graph's outputs and the encodings used."""

    def __init__(self, module: fx.GraphModule, values: dict, prefix: str, request: ExportRequest, dt: float):
        self.module, self.values, self.prefix, self.request, self.dt = module, values, prefix, request, dt
        self.explicit_states = bool(prefix)  # a custom step returns its states; a converted one keeps them in its bank
        self.state_count = len(request.input_names) - 1
        self.nodes: dict[str, object] = {}
        self.edges: list[tuple[str, str]] = []
        self.refs: dict[fx.Node, object] = {}
        self.state_inputs: dict[fx.Node, int] = {}
        self.neurons: dict[int, NeuronState] = {}  # by state index
        self.encodings: dict[str, list[str]] = {kind: [] for kind in ENCODINGS}
        self.outputs: list[str] = []
        self.output_shapes: list[tuple[int, ...]] = []

    def build(self):
        """The NIR graph (type-checked by `nir`) and the neurons' state records in state order."""
        nir = _nir()
        for node in self.module.graph.nodes:
            if node.op == "placeholder":
                self.placeholder(node, nir)
            elif node.op == "call_module":
                self.call_module(node, self.module.get_submodule(str(node.target)), nir)
            elif node.op in ("call_function", "call_method"):
                self.call_function(node, nir)
            elif node.op == "output":
                self.output(node, nir)
            else:  # get_attr: a parameter used outside a layer
                raise ExportError(f"the step reads {node.target} directly; NIR holds weights only inside layers")
        missing = [self.request.input_names[1 + i] for i in range(self.state_count) if i not in self.neurons]
        if missing:
            raise ExportError(f"state {', '.join(missing)} belongs to no neuron of the NIR graph")
        try:
            graph = nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata={
                "writer": "edgeport", "dt": self.dt,
                "discretisation": "one forward-Euler step of dt per model step; a cycle carries its source's value "
                                  "from the previous step"})
        except (ValueError, AssertionError) as error:
            raise ExportError(f"the NIR graph does not type-check: {error}") from error
        return graph, [self.neurons[i] for i in range(self.state_count)]

    def notes(self) -> list[str]:
        return [f"{', '.join(layers)}: {ENCODINGS[kind]}" for kind, layers in self.encodings.items() if layers]

    # -- helpers

    def add(self, name: str, node, *sources: str) -> str:
        if name in self.nodes:
            raise ExportError(f"{name} is used twice in one step; a NIR node has one use: give each use its own module")
        self.nodes[name] = node
        self.edges += [(source, name) for source in sources]
        return name

    def path(self, node: fx.Node) -> str:
        return str(node.target).removeprefix(self.prefix)

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        """The unbatched shape of an fx node's tensor value."""
        return tuple(self.values[node].shape[1:])

    def tensor(self, arg, user: str) -> _Tensor:
        """The NIR source of an fx argument that `user` consumes as data."""
        ref = self.refs.get(arg) if isinstance(arg, fx.Node) else None
        if isinstance(ref, _Tensor):
            return ref
        if isinstance(ref, _NextState):
            return self.membrane(ref, user)
        if isinstance(ref, _NeuronCall):
            raise ExportError(f"{user} takes a neuron's whole (spikes, state) result; NIR passes on its spikes")
        if isinstance(arg, fx.Node) and arg in self.state_inputs:
            raise ExportError(f"{user} uses the step's state input {arg.name} as data; NIR has no such input")
        raise ExportError(f"{user} takes {arg!r}, which is not a tensor computed from the input")

    def membrane(self, state: _NextState, user: str) -> _Tensor:
        if state.membrane is None:
            raise ExportError(f"{user} uses the membrane of {state.label}; NIR carries a membrane only where a node "
                              f"outputs it (LIF/IF nodes output spikes; a reset loop's node holds it before the reset)")
        return state.membrane

    def describe_source(self, arg) -> str:
        """`the output of <module path>` for the module an fx value comes from, for messages."""
        producer = arg
        while isinstance(producer, fx.Node) and producer.op != "call_module" and producer.args:
            producer = producer.args[0]
        if isinstance(producer, fx.Node) and producer.op == "call_module":
            return f"the output of {self.path(producer)}"
        return "the input" if isinstance(producer, fx.Node) else repr(arg)

    # -- fx nodes

    def placeholder(self, node: fx.Node, nir) -> None:
        if not self.refs:
            self.refs[node] = _Tensor(self.add("input", nir.Input(input_type=np.array(self.shape(node)))))
        else:
            self.state_inputs[node] = len(self.state_inputs)

    def call_module(self, node: fx.Node, module: nn.Module, nir) -> None:
        path = self.path(node)
        named = f"{path} ({type(module).__name__})"
        if isinstance(module, (StatefulNeuron, *NEURONS)):
            self.neuron(node, module, nir)
            return
        if len(node.args) != 1 or node.kwargs:
            raise ExportError(f"{named} is called with {len(node.args) + len(node.kwargs)} arguments; NIR layers take "
                              f"one input")
        if node in self.refs:  # a batch norm folded into its convolution
            return
        source = self.tensor(node.args[0], named)
        if isinstance(module, (nn.Identity, nn.Dropout)):
            self.refs[node] = source
        elif isinstance(module, nn.Conv2d):
            self.refs[node] = _Tensor(self.conv(node, module, named, path, source, nir))
        elif isinstance(module, nn.BatchNorm2d):
            raise ExportError(f"{named} does not directly follow a Conv2d whose only user it is; NIR has no batch "
                              f"norm (one right after a convolution is folded into it)")
        elif isinstance(module, nn.Linear):
            if len(self.shape(node.args[0])) != 1:
                raise ExportError(f"{named} is applied to a {len(self.shape(node.args[0])) + 1}-D tensor; NIR's "
                                  f"Affine takes (batch, features)")
            weight = module.weight.detach().cpu().numpy().astype(np.float32)
            layer = nir.Linear(weight=weight) if module.bias is None else \
                nir.Affine(weight=weight, bias=module.bias.detach().cpu().numpy().astype(np.float32))
            self.refs[node] = _Tensor(self.add(path, layer, source.node))
        elif isinstance(module, nn.AvgPool2d):
            if module.ceil_mode or module.divisor_override or any(_pair(module.padding)):
                raise ExportError(f"{named} pads, rounds up or overrides its divisor; NIR's AvgPool2d does none")
            self.refs[node] = _Tensor(self.add(path, nir.AvgPool2d(
                kernel_size=np.array(_pair(module.kernel_size)),
                stride=np.array(_pair(module.stride if module.stride is not None else module.kernel_size)),
                padding=np.zeros(2, dtype=np.int64)), source.node))
        elif isinstance(module, nn.MaxPool2d):
            self.refs[node] = _Tensor(self.max_pool(node, module, named, path, source, nir), binary=True)
        elif isinstance(module, nn.Flatten):
            self.refs[node] = self.flatten(node, named, path, source, module.start_dim, nir)
        else:
            raise ExportError(f"{named} has no NIR form (layers NIR takes: Conv2d, Linear, AvgPool2d, MaxPool2d over "
                              f"spikes, Flatten)")

    def conv(self, node: fx.Node, module: nn.Conv2d, named: str, path: str, source: _Tensor, nir) -> str:
        if module.padding_mode != "zeros":
            raise ExportError(f"{named} pads with {module.padding_mode!r}; NIR's Conv2d pads with zeros")
        padding = module.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            spans = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(span % 2 for span in spans):
                raise ExportError(f"{named} pads 'same' around an even kernel span (unevenly); NIR's Conv2d pads "
                                  f"both sides alike")
            padding = tuple(span // 2 for span in spans)
        weight = module.weight.detach().cpu().double()
        bias = module.bias.detach().cpu().double() if module.bias is not None else \
            torch.zeros(weight.shape[0], dtype=torch.float64)
        users = list(node.users)
        norm = self.module.get_submodule(str(users[0].target)) if len(users) == 1 and \
            users[0].op == "call_module" else None
        if isinstance(norm, nn.BatchNorm2d):
            if norm.running_mean is None:
                raise ExportError(f"{self.path(users[0])} (BatchNorm2d) keeps no running statistics, so it cannot "
                                  f"be folded into {path}")
            scale = 1 / torch.sqrt(norm.running_var.detach().cpu().double() + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight.detach().cpu().double()
            shift = norm.bias.detach().cpu().double() if norm.bias is not None else 0.0
            weight = weight * scale[:, None, None, None]
            bias = (bias - norm.running_mean.detach().cpu().double()) * scale + shift
            self.refs[users[0]] = _Tensor(path)
            self.encodings["folded"].append(f"{self.path(users[0])} into {path}")
        return self.add(path, nir.Conv2d(
            input_shape=self.shape(node.args[0])[1:], weight=weight.float().numpy(), stride=_pair(module.stride),
            padding=_pair(padding), dilation=_pair(module.dilation), groups=module.groups,
            bias=bias.float().numpy()), source.node)

    def max_pool(self, node: fx.Node, module: nn.MaxPool2d, named: str, path: str, source: _Tensor, nir) -> str:
        if not source.binary:
            raise ExportError(f"{named} pools values that are not spikes; NIR has no max pooling (over 0/1 spikes "
                              f"it is written as a sum pool and a threshold)")
        if module.ceil_mode or module.return_indices or _pair(module.dilation) != (1, 1):
            raise ExportError(f"{named} rounds up, dilates or returns indices; NIR's SumPool2d does none")
        pooled = self.add(path, nir.SumPool2d(
            kernel_size=np.array(_pair(module.kernel_size)),
            stride=np.array(_pair(module.stride if module.stride is not None else module.kernel_size)),
            padding=np.array(_pair(module.padding))), source.node)
        self.encodings["max pool"].append(path)
        return self.add(f"{path}.any", nir.Threshold(threshold=_full(self.shape(node), 0.5, np.float32)), pooled)

    def flatten(self, node: fx.Node, named: str, path: str, source: _Tensor, start_dim: int, nir) -> _Tensor:
        shape_in, shape_out = self.shape(node.args[0]), self.shape(node)
        if start_dim == 0 or start_dim < -len(shape_in):
            raise ExportError(f"{named} flattens the batch axis; NIR shapes have no batch axis")
        if len(shape_out) != 1 or math.prod(shape_in) != shape_out[0]:
            raise ExportError(f"{named} reshapes {list(shape_in)} to {list(shape_out)}; NIR's Flatten is used here "
                              f"only to flatten everything after the batch axis")
        if len(shape_in) == 1:
            return source
        # NIR counts the dimensions of the unbatched shape: torch's start_dim=1 is NIR's 0
        return _Tensor(self.add(path, nir.Flatten(input_type={"input": np.array(shape_in)}, start_dim=0, end_dim=-1),
                                source.node), source.binary)

    def call_function(self, node: fx.Node, nir) -> None:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        first = node.args[0] if node.args else None
        if node.target is operator.getitem and isinstance(self.refs.get(first), _NeuronCall):
            call = self.refs[first]
            self.refs[node] = call.spike if node.args[1] == 0 else call.state
            return
        if not isinstance(self.values[node], torch.Tensor):  # x.size(0) and the like: shapes, not data
            return
        named = f"{target} applied to {self.describe_source(first)}"
        if target in ("flatten", "view", "reshape"):
            start = (node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)) \
                if target == "flatten" else 1
            self.refs[node] = self.flatten(node, named, node.name, self.tensor(first, named), start, nir)
            return
        raise ExportError(f"{named} has no NIR form: between layers and neurons a NIR graph only flattens and pools "
                          f"(no arithmetic, activation functions or concatenation)")

    def neuron(self, node: fx.Node, module: nn.Module, nir) -> None:
        converted = isinstance(module, StatefulNeuron)
        neuron = module.neuron if converted else module
        path = module.path if converted else self.path(node)
        named = f"{path} ({type(neuron).__name__})"
        source = self.tensor(node.args[0], named)
        spike, membrane, convention = self.neuron_nodes(neuron, named, path, self.shape(node.args[0]), nir)
        if converted:
            if len(node.args) > 1:
                raise ExportError(f"{named} is handed its state by the network's own code; NIR takes converted "
                                  f"neurons whose state edgeport keeps")
            index = sum(len(slot.names) for slot in module.bank.slots[:module.slot])
        else:
            if len(node.args) != 2 or node.args[1] not in self.state_inputs:
                raise ExportError(f"{named} is not called as (input, state) with one of the step's state inputs")
            index = self.state_inputs[node.args[1]]
        self.edges.append((source.node, path))
        record = NeuronState(self.request.input_names[1 + index], path, convention)
        self.neurons[index] = record
        state = _NextState(record, _Tensor(membrane) if membrane and convention == BEFORE_RESET else None, named)
        spikes = _Tensor(spike, binary=True)
        self.refs[node] = spikes if converted and not module.returns_state else _NeuronCall(spikes, state)

    def neuron_nodes(self, neuron: nn.Module, named: str, path: str, shape, nir) -> tuple[str, str | None, str]:
        """Add one neuron's NIR nodes (its input enters at `path`); returns its spike node, the
        node whose output is its membrane (or None) and the membrane convention of its state."""
        if isinstance(neuron, LIF):
            return self.lif_nodes(neuron, path, shape, nir)
        if isinstance(neuron, (Synaptic, RecurrentLeaky, RecurrentSynaptic, Alpha, Lapicque)):
            raise ExportError(f"{named} is not mapped to NIR by this backend (mapped: SpikingJelly IF/LIF/PLIF, "
                              f"snnTorch Leaky, edgeport LIF)")
        if isinstance(neuron, Leaky):
            return self.leaky_nodes(neuron, named, path, shape, nir)
        if isinstance(neuron, MultiLevel):
            raise ExportError(f"{named} emits integer spike counts (0..{neuron.levels}); NIR neurons emit binary "
                              f"spikes")
        raise ExportError(f"{named} has no NIR form")

    def lif_nodes(self, neuron: LIF, path: str, shape, nir) -> tuple[str, str | None, str]:
        dt, tau = self.dt, neuron.tau
        below = np.nextafter(np.float32(neuron.threshold), np.float32(-np.inf))
        fire_at = _full(shape, below, np.float32)
        self.encodings["at or above"].append(path)
        gain = 1.0 if neuron.decay_input else tau  # r: decay_input scales the input by 1/tau like the leak
        if neuron.v_reset is not None:
            reset = _full(shape, neuron.v_reset)
            self.add(path, nir.IF(r=_full(shape, 1 / dt), v_threshold=fire_at, v_reset=reset) if tau is None else
                     nir.LIF(tau=_full(shape, tau * dt), r=_full(shape, gain), v_leak=reset, v_threshold=fire_at,
                             v_reset=reset))
            return path, None, AFTER_RESET
        if tau == 1:
            raise ExportError(f"{path} (LIF) has tau=1 with a soft reset: the membrane is replaced every step, so the "
                              f"reset lives only in the state, which no NIR loop carries")
        if tau is None:
            charge, removed_per_unit = nir.I(r=_full(shape, 1 / dt)), 1.0  # dt * r = 1
        else:
            charge = nir.LI(tau=_full(shape, tau * dt), r=_full(shape, gain), v_leak=_full(shape, 0.0))
            removed_per_unit = gain / (tau - 1)  # a unit on the loop, net of the leak it escapes
        self.add_reset_loop(path, charge, fire_at, _full(shape, -neuron.threshold / removed_per_unit), nir)
        self.encodings["subtract"].append(path)
        return f"{path}.fire", path, AFTER_RESET

    def leaky_nodes(self, neuron: Leaky, named: str, path: str, shape, nir) -> tuple[str, str | None, str]:
        if not bool((neuron.graded == 1).all()):
            raise ExportError(f"{named} emits graded spikes (factor {neuron.graded.tolist()}); NIR spikes are 1")
        if not neuron.reset_delay:
            raise ExportError(f"{named} resets in the same step (reset_delay=False); only snnTorch's default delayed "
                              f"reset is mapped to NIR")
        dt, beta, threshold = self.dt, _full(shape, neuron.beta), _full(shape, neuron.threshold, np.float32)
        integrates = beta == 1
        if integrates.any() and not integrates.all():
            raise ExportError(f"{named} mixes beta=1 (no leak) with leaky neurons; NIR takes one neuron model per node")
        tau = None if integrates.all() else dt / (1 - beta)  # snnTorch's own mapping: beta = 1 - dt/tau, r = tau/dt
        zero = _full(shape, 0.0)
        if neuron.reset == "zero":
            self.add(path, nir.IF(r=_full(shape, 1 / dt), v_threshold=threshold, v_reset=zero) if tau is None else
                     nir.LIF(tau=tau, r=tau / dt, v_leak=zero, v_threshold=threshold, v_reset=zero))
            return path, None, BEFORE_RESET
        charge = nir.I(r=_full(shape, 1 / dt)) if tau is None else nir.LI(tau=tau, r=tau / dt, v_leak=zero)
        if neuron.reset == "subtract":  # the input gain dt/tau * r is 1: a unit on the loop removes one
            self.add_reset_loop(path, charge, threshold, -threshold.astype(np.float64), nir)
            self.encodings["subtract"].append(path)
        else:
            self.add(path, charge)
            self.add(f"{path}.fire", nir.Threshold(threshold=threshold), path)
        return f"{path}.fire", path, BEFORE_RESET

    def add_reset_loop(self, path: str, charge, fire_at: np.ndarray, loop_scale: np.ndarray, nir) -> None:
        self.add(path, charge)
        self.add(f"{path}.fire", nir.Threshold(threshold=fire_at), path)
        self.add(f"{path}.reset", nir.Scale(scale=loop_scale), f"{path}.fire")
        self.edges.append((f"{path}.reset", path))

    def output(self, node: fx.Node, nir) -> None:
        items = []  # (reference, value) per returned tensor, a neuron's tuple result taken apart
        for leaf in torch.utils._pytree.tree_flatten(node.args[0])[0]:
            ref, value = self.refs.get(leaf), self.values.get(leaf)
            items += [(ref.spike, value[0]), (ref.state, value[1])] if isinstance(ref, _NeuronCall) else \
                [(ref if ref is not None else leaf, value)]
        count = len(self.request.output_names) - self.state_count
        expected = count + (self.state_count if self.explicit_states else 0)
        if len(items) != expected:
            raise ExportError(f"the step returns {len(items)} tensors; its form declares {count} outputs"
                              + (f" and {self.state_count} states" if self.explicit_states else ""))
        for index, (ref, value) in enumerate(items[:count]):
            user = f"model output {self.request.output_names[index]}"
            source = self.membrane(ref, user) if isinstance(ref, _NextState) else \
                ref if isinstance(ref, _Tensor) else self.tensor(ref, user)
            shape = tuple(value.shape[1:])
            self.outputs.append(self.add(f"output_{index}", nir.Output(output_type=np.array(shape)), source.node))
            self.output_shapes.append(shape)
        for index, (ref, _) in enumerate(items[count:]):
            if not isinstance(ref, _NextState) or ref.neuron is not self.neurons.get(index):
                raise ExportError(f"the step's state output {self.request.output_names[count + index]} is not the "
                                  f"next state of the neuron that takes {self.request.input_names[1 + index]}")


def _time_step(value) -> float:
    """The NIR time step in seconds from an option value (the CLI passes text)."""
    try:
        dt = float(value)
    except (TypeError, ValueError):
        raise UserError(f"nir_dt (--nir-dt) must be a number of seconds, not {value!r}") from None
    if not math.isfinite(dt) or dt <= 0:
        raise UserError(f"nir_dt (--nir-dt) must be a positive number of seconds, not {value!r}")
    return dt


def _is_spiking(module: nn.Module) -> bool:
    """Whether `module` has edgeport's step protocol or neurons of edgeport, snnTorch or SpikingJelly."""
    libraries = ("snntorch._neurons", "spikingjelly.activation_based.neuron")
    return callable(getattr(module, "step", None)) or \
        any(isinstance(m, NEURONS) or type(m).__module__.startswith(libraries) for m in module.modules())


# --- the runner: a small interpreter of the primitives edgeport writes ------------------------

STATEFUL = ("LIF", "IF", "LI", "I")
STATELESS = ("Input", "Output", "Affine", "Linear", "Conv2d", "Flatten", "SumPool2d", "AvgPool2d", "Scale", "Threshold")


def _back_edges(edges: list[tuple[str, str]], start: str) -> set[tuple[str, str]]:
    """The edges that close a cycle, found depth-first from the input node."""
    children: dict[str, list[str]] = {}
    for source, target in edges:
        children.setdefault(source, []).append(target)
    back, done, stack = set(), set(), [(start, iter(children.get(start, [])))]
    on_path = {start}
    while stack:
        node, pending = stack[-1]
        child = next(pending, None)
        if child is None:
            stack.pop()
            on_path.discard(node)
            done.add(node)
        elif child in on_path:
            back.add((node, child))
        elif child not in done:
            on_path.add(child)
            stack.append((child, iter(children.get(child, []))))
    return back


def _tensor(array, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float64)).to(dtype)


class _Program:
    """A NIR graph compiled for stepping: the node order, each node's inputs, and parameters as
    float32 tensors (factors derived in float64 first, then rounded once)."""

    def __init__(self, graph, path: Path, dt: float, neurons: list[NeuronState], outputs: list[str]):
        self.nodes, self.dt, self.outputs = graph.nodes, dt, outputs
        self.kinds = {name: type(node).__name__ for name, node in graph.nodes.items()}
        unknown = [f"{name} ({kind})" for name, kind in self.kinds.items() if kind not in STATEFUL + STATELESS]
        if unknown:
            raise UserError(f"{path}: the NIR runner interprets the primitives edgeport writes "
                            f"({', '.join(STATEFUL + STATELESS)}), not {', '.join(unknown)}")
        inputs = [name for name, kind in self.kinds.items() if kind == "Input"]
        if len(inputs) != 1 or any(o not in self.kinds for o in outputs):
            raise UserError(f"{path}: expected one Input node and the Output nodes {outputs}")
        self.input = inputs[0]
        self.path = path
        back = _back_edges(list(graph.edges), self.input)
        forward = [edge for edge in graph.edges if edge not in back]
        self.sources = {name: [] for name in self.nodes}
        for source, target in forward:  # one pass: a file may hold many nodes
            self.sources[target].append(source)
        self.order = self._topological(forward, path)
        self.loops = {target: self._loop(source, target, path) for source, target in back}
        self.neurons = {n.node: (index, n.membrane) for index, n in enumerate(neurons)}
        stateful = {name for name, kind in self.kinds.items() if kind in STATEFUL}
        if stateful != set(self.neurons):
            raise UserError(f"{path}: the stateful nodes {sorted(stateful)} do not match the step's states "
                            f"{sorted(self.neurons)}")
        self.params = {name: self._checked_params(name, node) for name, node in self.nodes.items()}

    def _checked_params(self, name: str, node) -> dict:
        """`_params`, with a value that is not the number or array NIR defines refused by node."""
        try:
            return self._params(name, node)
        except (TypeError, ValueError) as error:
            raise UserError(f"{self.path}: node {name} ({self.kinds[name]}) holds a parameter that is not a number "
                            f"array: {first_line(error)}") from error

    def _topological(self, forward: list[tuple[str, str]], path: Path) -> list[str]:
        waiting = {name: len(self.sources[name]) for name in self.nodes}
        targets: dict[str, list[str]] = {}
        for source, target in forward:
            targets.setdefault(source, []).append(target)
        ready, order = [self.input], []
        while ready:
            name = ready.pop(0)
            order.append(name)
            for target in targets.get(name, []):
                waiting[target] -= 1
                if waiting[target] == 0:
                    ready.append(target)
        if len(order) != len(self.nodes):
            raise UserError(f"{path}: nodes {sorted(set(self.nodes) - set(order))} are not reached from the input")
        return order

    def _loop(self, source: str, target: str, path: Path) -> tuple[str, str]:
        """(threshold node, scale node) of a reset loop target -> Threshold -> Scale -> target."""
        fire = self.sources[source][0] if len(self.sources[source]) == 1 else None
        if self.kinds[target] not in ("LI", "I") or self.kinds[source] != "Scale" or fire is None or \
                self.kinds[fire] != "Threshold" or self.sources[fire] != [target]:
            raise UserError(f"{path}: the cycle {target} -> ... -> {source} -> {target} is not a reset loop "
                            f"(LI or I -> Threshold -> Scale -> back), the only cycle this runner interprets")
        return fire, source

    def _params(self, name: str, node) -> dict:
        kind, dt = self.kinds[name], self.dt
        if kind in ("Input", "Output"):
            return {}
        if kind == "Affine":
            return {"weight": _tensor(node.weight), "bias": _tensor(node.bias)}
        if kind == "Linear":
            return {"weight": _tensor(node.weight), "bias": None}
        if kind == "Conv2d":
            if isinstance(node.padding, (str, bytes)):
                raise UserError(f"{name}: Conv2d padding {node.padding!r} is not interpreted; edgeport writes numbers")
            return {"weight": _tensor(node.weight), "bias": _tensor(node.bias), "stride": _ints(node.stride),
                    "padding": _ints(node.padding), "dilation": _ints(node.dilation), "groups": int(node.groups)}
        if kind in ("SumPool2d", "AvgPool2d"):
            return {"kernel_size": _ints(node.kernel_size), "stride": _ints(node.stride),
                    "padding": _ints(node.padding)}
        if kind == "Flatten":  # NIR counts unbatched dimensions; torch counts the batch too
            end = int(node.end_dim)
            return {"start": int(node.start_dim) + 1, "end": end + 1 if end >= 0 else end}
        if kind == "Scale":
            return {"scale": _tensor(node.scale)}
        if kind == "Threshold":
            return {"threshold": _tensor(node.threshold)}
        r = np.asarray(node.r, dtype=np.float64)
        if kind in ("LIF", "LI"):
            tau = np.asarray(node.tau, dtype=np.float64)
            params = {"steps_per_tau": _tensor(tau / dt), "r": _tensor(r), "v_leak": _tensor(node.v_leak)}
            with np.errstate(divide="ignore", invalid="ignore"):  # dt == tau: checked below where it matters
                loop_weight = (dt / tau) * r / (1 - dt / tau)
        else:  # IF, I: dv/dt = r I
            params = {"gain": _tensor(dt * r)}
            loop_weight = dt * r
        if kind in ("LIF", "IF"):
            params |= {"threshold": _tensor(node.v_threshold), "v_reset": _tensor(node.v_reset)}
        if name in self.loops:
            # a spike's next-step loop input already integrated into the state, net of the leak it escapes
            scale = np.asarray(self.nodes[self.loops[name][1]].scale, dtype=np.float64)
            removed = -scale * loop_weight
            if not np.isfinite(removed).all():
                raise UserError(f"{name}: a reset loop on a node whose time constant equals dt has no defined state")
            params["removed_per_spike"] = _tensor(removed)
        return params

    def step(self, x: torch.Tensor, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """One step of `dt`: the graph's outputs, then every neuron's next state."""
        values, start, feedback = {self.input: x}, {}, {}
        for name, (index, membrane) in self.neurons.items():
            state, params = states[index], self.params[name]
            if self.kinds[name] in ("LIF", "IF") and membrane == BEFORE_RESET:
                state = torch.where(state > params["threshold"], params["v_reset"], state)  # NIR's reset at the spike
            start[name] = state
            if name in self.loops and membrane == BEFORE_RESET:  # after the reset, the state holds the loop's work
                fire, scale = self.loops[name]
                fired = (state > self.params[fire]["threshold"]).to(state.dtype)
                feedback[name] = [fired * self.params[scale]["scale"]]
        charged, reset = {}, {}
        for name in self.order[1:]:
            # NIR sums every edge into a node; a loop brings the previous step's value
            inputs = [values[source] for source in self.sources[name]] + feedback.get(name, [])
            try:
                values[name] = self._apply(name, functools.reduce(operator.add, inputs), start, charged, reset)
            except (RuntimeError, IndexError) as error:  # shapes or settings the graph's type check let through
                raise UserError(f"{self.path}: node {name} ({self.kinds[name]}) cannot run on what reaches it: "
                                f"{first_line(error)}") from error
        next_states = [None] * len(self.neurons)
        for name, (index, membrane) in self.neurons.items():
            if membrane == BEFORE_RESET or name not in self.loops and self.kinds[name] in ("LI", "I"):
                next_states[index] = charged[name]
            elif self.kinds[name] in ("LIF", "IF"):
                next_states[index] = reset[name]
            else:
                fired = values[self.loops[name][0]]
                next_states[index] = charged[name] - self.params[name]["removed_per_spike"] * fired
        return [values[name] for name in self.outputs] + next_states

    def _apply(self, name: str, x: torch.Tensor, start: dict, charged: dict, reset: dict) -> torch.Tensor:
        kind, p = self.kinds[name], self.params[name]
        if kind == "Output":
            return x
        if kind in ("Affine", "Linear"):
            return F.linear(x, p["weight"], p["bias"])
        if kind == "Conv2d":
            return F.conv2d(x, p["weight"], p["bias"], p["stride"], p["padding"], p["dilation"], p["groups"])
        if kind == "SumPool2d":
            return F.avg_pool2d(x, p["kernel_size"], p["stride"], p["padding"], divisor_override=1)
        if kind == "AvgPool2d":
            return F.avg_pool2d(x, p["kernel_size"], p["stride"], p["padding"])
        if kind == "Flatten":
            return x.flatten(p["start"], p["end"])
        if kind == "Scale":
            return x * p["scale"]
        if kind == "Threshold":
            return (x > p["threshold"]).to(x.dtype)
        v = start[name]
        if kind in ("LIF", "LI"):  # forward Euler of tau dv/dt = (v_leak - v) + r I, written as SpikingJelly charges
            h = v + (p["r"] * x - (v - p["v_leak"])) / p["steps_per_tau"]
        else:  # dv/dt = r I
            h = v + p["gain"] * x
        charged[name] = h
        if kind in ("LI", "I"):
            return h
        fired = h > p["threshold"]
        reset[name] = torch.where(fired, p["v_reset"], h)
        return fired.to(h.dtype)


def _ints(value) -> tuple[int, ...]:
    return tuple(int(v) for v in np.atleast_1d(value))


DEFAULT_READ_DT = 1e-4  # the time step snnTorch's and SpikingJelly's NIR readers and writers assume


class NirGraphModel(nn.Module):
    """A NIR graph from any writer (snnTorch, Norse, Sinabs, Rockpool, edgeport) as a torch model
    with edgeport's step protocol, so that it exports to ONNX and Core ML like any stepped model.

    Each step is `dt` seconds of NIR time (the graph's `dt` metadata where it has one, else
    `DEFAULT_READ_DT`), every stateful node integrated by one forward-Euler step, LIF/IF nodes
    firing on `>` and resetting to v_reset in the same step, each starting at rest (see
    `_resting_membrane`) and its membrane (after the reset) a state named `v_<node>`.
    `step(x, *states)` is one step on inputs of the Input node's shape; `forward(x)` runs a
    (T, B, ...) sequence and stacks each output over time. Primitives outside what the
    interpreter reads (see `STATEFUL`, `STATELESS`), cycles other than a reset loop, and graphs
    whose first step from rest fails, are refused by name when the file is read.
    """

    def __init__(self, graph, path: Path):
        super().__init__()
        self.path = path
        self.dt = _graph_time_step(getattr(graph, "metadata", None) or {}, path)
        kinds = {name: type(node).__name__ for name, node in graph.nodes.items()}
        neurons = [NeuronState(f"v_{name}", name, AFTER_RESET) for name, kind in kinds.items() if kind in STATEFUL]
        self.state_names = [re.sub(r"\W", "_", n.state) for n in neurons]
        self.program = _Program(graph, path, self.dt, neurons, [n for n, kind in kinds.items() if kind == "Output"])
        self.input_shape = _input_shape(graph.nodes[self.program.input], path)
        self.rest = [_tensor(_resting_membrane(kinds[n.node], graph.nodes[n.node])) for n in neurons]

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.new_zeros((x.shape[0], *rest.shape)) + rest for rest in self.rest)

    def step(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if tuple(x.shape[1:]) != self.input_shape:  # else a layer fails deep inside, or broadcasts silently
            raise UserError(f"{self.path} takes inputs of shape {list(self.input_shape)} per sample (its Input "
                            f"node's), not {list(x.shape[1:])}: give --input 1x{'x'.join(map(str, self.input_shape))}")
        return tuple(self.program.step(x, list(states)))

    def check_runs(self) -> None:
        """Run one step from rest on zeros, so that a graph the interpreter cannot run (weights
        that do not fit what reaches them, zero groups, a Flatten past the rank) is refused when
        the file is read, naming the node, rather than in the middle of an export."""
        try:
            check_input_size("x", (1, *self.input_shape), torch.float32)
        except UserError as error:
            raise UserError(f"{self.path}: its Input node declares an unusable shape: {error}") from error
        x = torch.zeros((1, *self.input_shape))
        with torch.no_grad():
            self.step(x, *self.initial_state(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        states, per_step = self.initial_state(x[0]), []
        for x_t in x:
            *outputs, = self.step(x_t, *states)
            count = len(outputs) - len(states)
            per_step.append(outputs[:count])
            states = tuple(outputs[count:])
        stacked = tuple(torch.stack(step) for step in zip(*per_step))
        return stacked[0] if len(stacked) == 1 else stacked


def _resting_membrane(kind: str, node) -> np.ndarray:
    """Where a neuron's membrane starts, NIR having no initial state: at rest, the value it
    settles to without input. For LIF and LI that is v_leak (Norse starts there too); IF has
    no leak and starts at v_reset, as SpikingJelly's IFNode does (and its LIFNode, which
    edgeport writes with v_leak = v_reset); I at 0."""
    if kind in ("LIF", "LI"):
        return np.full(np.shape(node.r), node.v_leak, dtype=np.float64)
    if kind == "IF":
        return np.full(np.shape(node.r), node.v_reset, dtype=np.float64)
    return np.zeros(np.shape(node.r))


def _input_shape(node, path: Path) -> tuple[int, ...]:
    """The unbatched input shape an Input node declares."""
    try:
        return _ints(node.input_type["input"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: its Input node declares no shape of whole numbers ({error})") from error


def _graph_time_step(metadata: dict, path: Path) -> float:
    """The graph's `dt` metadata in seconds (else `DEFAULT_READ_DT`): one positive number."""
    if "dt" not in metadata:
        return DEFAULT_READ_DT
    try:
        dt = float(np.asarray(metadata["dt"]).item())
    except (TypeError, ValueError):
        dt = math.nan
    if not math.isfinite(dt) or dt <= 0:
        raise UserError(f"{path}: its metadata dt {str(metadata['dt'])[:40]!r} is not a positive number of seconds")
    return dt


def _check_nir_file(path: str | Path) -> None:
    """Refuse a NIR file that `nir.read` would let read other files or exhaust memory, before it
    reads anything of it.

    `nir.read` opens the HDF5 file and reads every dataset under its graph whole, whatever the
    names. HDF5 lets a dataset keep its bytes in another file (external storage, or a virtual
    dataset's mapping) and a link point into another file or elsewhere in this one, so a graph
    could carry /etc/passwd or /dev/zero as weights: all refused, as nir.write never writes them.
    A dataset's declared shape is allocated even when the file holds no data for it (a fill
    value, or chunks that compress to nothing), so the declared sizes, not the file's, are counted
    against `MAX_MODEL_BYTES`. An object reached twice (a hard-linked cycle) is refused too.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UserError(f"NIR file {path} does not exist or is no regular file")
    check_model_size(f"{path}", path.stat().st_size)
    try:
        with h5py.File(path, "r") as hdf5:
            declared = _hdf5_declared_bytes(hdf5, path)
    except UserError:
        raise
    except Exception as error:  # h5py raises OSError, KeyError or ValueError for what is not HDF5
        raise UserError(f"cannot read {path} as NIR (HDF5): {first_line(error)}") from error
    check_model_size(f"the datasets {path} declares", declared)


def _hdf5_declared_bytes(hdf5, path: Path) -> int:
    """The bytes every dataset of an open HDF5 file declares, walking its groups once; a link
    that is not a plain hard link, data stored outside the file, or an object seen twice is refused."""
    import h5py

    declared, seen, groups = 0, set(), [hdf5]
    while groups:
        group = groups.pop()
        for name in group:
            where = f"{group.name.rstrip('/')}/{name}"
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                target = getattr(link, "filename", "") or getattr(link, "path", "")
                raise UserError(f"refusing {path}: {where} is a link ({type(link).__name__}) to {target}; a NIR "
                                f"file holds its own groups and datasets, never links")
            item = group[name]
            if item.id in seen:
                raise UserError(f"refusing {path}: {where} is an object already reached under another name (a "
                                f"hard-linked loop or alias); nir.write never writes one")
            seen.add(item.id)
            if isinstance(item, h5py.Group):
                groups.append(item)
            elif isinstance(item, h5py.Dataset):
                if item.external or item.is_virtual:
                    elsewhere = os.fsdecode(item.external[0][0]) if item.external else "the files it maps"
                    raise UserError(f"refusing {path}: dataset {where} keeps its data in {elsewhere}, outside the "
                                    f"file; a NIR file holds its own arrays")
                declared += item.size * item.dtype.itemsize
    return declared


def _read(path: str | Path):
    """The graph in the NIR file at `path`: HDF5 read by `nir.read`, arrays and strings only,
    nothing unpickled or run, once `_check_nir_file` has found nothing that would read other
    files or exhaust memory; a file that is not NIR raises a `UserError` naming it."""
    nir = _nir()
    _check_nir_file(path)
    try:
        return nir.read(path)
    except Exception as error:  # h5py and nir raise their own errors for a file that is not NIR
        raise UserError(f"cannot read {path} as NIR: {str(error).splitlines()[0][:200]}") from error


def read_graph_model(path: str | Path) -> NirGraphModel:
    """The NIR file at `path` as a `NirGraphModel`; a file that is not NIR, or holds what the
    interpreter cannot run, raises a `UserError` naming it."""
    model = NirGraphModel(_read(path), Path(path)).eval()
    model.check_runs()
    return model


class NirRunner(Runner):
    """A NIR file written by this backend, read back with `nir.read` and interpreted one step
    per `infer`: inputs x and the neurons' states, outputs the graph's outputs and next states."""

    def __init__(self, path: str | Path, input_names: list[str], output_names: list[str], settings: dict):
        self.path, self.settings, self.name = Path(path), settings, "nir"
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.program: _Program | None = None

    def load(self) -> "NirRunner":
        graph = _read(self.path)
        try:  # the sidecar is a file too: a hand-edited state map is refused, not a KeyError
            neurons = [NeuronState(**record) for record in self.settings["states"]]
            dt, outputs = _time_step(self.settings["dt"]), list(self.settings["outputs"])
        except (KeyError, TypeError) as error:
            raise UserError(f"{self.path}: its sidecar's NIR state map is malformed ({error!r}); export it "
                            f"again") from error
        if any(n.membrane not in (AFTER_RESET, BEFORE_RESET) for n in neurons):
            raise UserError(f"{self.path}: its sidecar's NIR state map names a membrane other than "
                            f"{AFTER_RESET!r} or {BEFORE_RESET!r}; export it again")
        self.program = _Program(graph, self.path, dt, neurons, outputs)
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, *states = (torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self.input_names)
        with torch.inference_mode():
            results = self.program.step(x, states)
        return {name: result.numpy() for name, result in zip(self.output_names, results)}


class NirBackend(Backend):
    """NIR graphs of spiking step forms, run back by edgeport's interpreter of NIR primitives."""

    name = "nir"
    summary = "NIR graph (HDF5) for neuromorphic chips and simulators, verified by edgeport's NIR interpreter"
    Options = NirOptions
    formats = ("nir",)
    suffixes = (".nir",)
    quantized = "refused: NIR has no integer or quantized types (export the float model)"
    spiking = ("step form only, one model step = dt of NIR time: neurons with a hard or zero reset as NIR LIF/IF, "
               "subtract resets as an LI -> Threshold -> Scale loop, firing at >= threshold as > the float32 just "
               "below it; the unrolled form is refused")

    def export(self, request: ExportRequest, options: NirOptions) -> list[Artifact]:
        """Write `request.module` (a step form) as `<name>.nir` in `request.folder`; one model
        step is `options.dt` seconds of NIR time."""
        dt = _time_step(options.dt)
        module = request.module
        if request.precision != "fp32":
            raise UserError(f"NIR has no integer or quantized types: this {request.precision} model cannot be written "
                            f"as NIR; export the float model")
        if isinstance(module, (UnrolledModule, ModelOutput)):
            raise UserError("NIR takes the step form (a NIR graph is stateful per step), not the unrolled one: "
                            "export with --snn-form step (snn_form='step')")
        if not isinstance(module, StepModule):
            if _is_spiking(module):
                raise UserError(f"{type(module).__name__} is a spiking model exported without a spiking form; NIR "
                                f"takes the step form: export with --snn-form step (snn_form='step')")
            raise UserError(f"{type(module).__name__} has no spiking neurons; NIR describes spiking networks "
                            f"(export it to another target)")
        wrong = [f"{n} ({str(a.dtype).removeprefix('torch.')})" for n, a in zip(request.input_names, request.args)
                 if a.dtype != torch.float32]
        if wrong:
            raise UserError(f"the NIR interpreter computes in float32; the step takes {', '.join(wrong)}")
        nir = _nir()
        traced, values, prefix = _traced_step(module.stepped, request.args)
        builder = _GraphBuilder(traced, values, prefix, request, dt)
        graph, neurons = builder.build()
        path = request.folder / f"{request.name}.nir"
        nir.write(path, graph)
        states = [tuple(a.shape[1:]) for a in request.args[1:]]
        inputs = [TensorSpec(n, ["batch", *a.shape[1:]], "float32") for n, a in zip(request.input_names, request.args)]
        outputs = [TensorSpec(n, ["batch", *shape], "float32")
                   for n, shape in zip(request.output_names, builder.output_shapes + states)]
        return [Artifact(path=path, format="nir", precision="fp32", inputs=inputs, outputs=outputs,
                         source_sha256=source_sha256(module),
                         exporter=f"torch.fx trace of the step -> nir {nir.version}",
                         settings={"nir": {"dt": dt, "outputs": builder.outputs,
                                           "states": [asdict(n) for n in neurons]}},
                         notes=builder.notes(), files=[path.name])]

    def runner(self, artifact: Artifact, threads: int | None = None, profiling: bool = False) -> Runner:
        # threads and profiling do not apply: the interpreter runs in this process's torch
        if "nir" not in artifact.settings:
            raise UserError(f"{artifact.path} has no NIR state map in its sidecar; was it exported by edgeport's nir "
                            f"backend?")
        return NirRunner(artifact.path, [s.name for s in artifact.inputs], [s.name for s in artifact.outputs],
                         artifact.settings["nir"])


BACKEND = NirBackend()
