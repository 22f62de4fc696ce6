"""Block-wise reconstruction after calibration: learned weight rounding (AdaRound) with
randomly dropped activation quantization (QDrop), unit by unit (BRECQ).

A unit is a transformer block (a module of an nn.ModuleList or nn.Sequential of at least two
of the same type that holds quantized layers), or a single quantized layer outside blocks. A
torch.fx graph module inlines its blocks' code: its blocks are split out of its graph first.
Units are reconstructed in call order. Each unit's target is its output in the float form of
the quantized model itself (every quantizer switched off: the same folds, migrations and
reparameterizations, so targets and inputs line up), taken in one pass before anything is
learned, with each output row weighted by how much the model's outputs depend on it; its
input is what the quantized model, its earlier units already reconstructed, gives it, mixed
element by element with the float input (QDrop, p = 0.5). While a unit trains, every weight is s * clamp(floor(W/s) + h(V))
with h the rectified sigmoid, V learned by Adam against the output's squared error plus a
regularizer pushing h to 0 or 1 (annealed after a warm-up); each activation quantizer of the
unit has its output replaced by the float value with probability 0.5 and, optionally, its
per-tensor step size learned (LSQ gradients). At the end each weight is rounded hard (h >= 0.5
rounds up) and written as the layer's weight on its quantizer's grid, the learned step sizes
as the quantizers' scales: plain buffers and weights, so the export is that of any quantized
model. A unit whose error over the whole calibration batch did not fall keeps its nearest
rounding and its calibrated scales.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from edgeport.quant.adalog import AdaLogQuantizer
from edgeport.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer

log = logging.getLogger(__name__)  # a line per unit: reconstruction takes minutes on a BERT

# the activation quantizers a unit can hold (each has `enabled`: the float pass switches them off)
ACTIVATION_QUANTIZERS = (UniformQuantizer, LogSqrt2Quantizer, AdaLogQuantizer)

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)
DROP_PROBABILITY = 0.5  # QDrop's chance of an activation taking its float value while training
WARMUP = 0.2  # share of the iterations before the rounding regularizer starts
BETA = (20.0, 2.0)  # the regularizer's exponent, annealed from the first to the second
REGULARIZER = 0.01  # the regularizer's weight against the output's squared error (summed per row)
ROUNDING_LR, SCALE_LR = 1e-2, 4e-3  # Adam: on V, and on the log of each activation step size
BATCH = 8  # calibration samples per iteration


class _Stop(Exception):
    """Ends a forward pass once the unit's input is captured."""


@dataclass
class _Inputs:
    """A unit's call: its positional and keyword arguments, batch first."""

    args: tuple
    kwargs: dict


class _SoftRounding(nn.Module):
    """Stands in for a weight quantizer while its unit trains: s * clamp(floor(W/s) + h(V),
    qmin, qmax), V initialised so that h(V) is W/s's fractional part (the float weight)."""

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor):
        super().__init__()
        self.scale = quantizer._view(quantizer.scale, weight).detach()
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        scaled = weight.detach() / self.scale
        self.floor = torch.floor(scaled)
        fraction = ((scaled - self.floor - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(torch.log(fraction / (1 - fraction)))

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.floor + self.h(), self.qmin, self.qmax) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def hard(self) -> torch.Tensor:
        """The weight rounded as learned, on the quantizer's grid."""
        return torch.clamp(self.floor + (self.v >= 0).float(), self.qmin, self.qmax) * self.scale


class _Dropped(nn.Module):
    """An activation quantizer while its unit trains: each element keeps its float value with
    probability DROP_PROBABILITY (QDrop); with `learn_scale`, a per-tensor uniform quantizer's
    step size is learned (LSQ's gradient, through its log)."""

    def __init__(self, quantizer: nn.Module, learn_scale: bool):
        super().__init__()
        self.quantizer = quantizer
        learnable = learn_scale and isinstance(quantizer, UniformQuantizer) and quantizer.axis is None
        self.log_scale = nn.Parameter(quantizer.scale.detach().log().reshape(1)) if learnable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        if self.log_scale is None:
            quantized = q(x)
        else:
            quantized = torch._fake_quantize_learnable_per_tensor_affine(
                x, self.log_scale.exp(), q.zero_point.float().reshape(1), q.qmin, q.qmax,
                1.0 / (x.numel() * q.qmax) ** 0.5)
        return torch.where(torch.rand_like(x) < DROP_PROBABILITY, x, quantized)

    def unwrap(self) -> nn.Module:
        """The quantizer, with the learned step size as its scale."""
        if self.log_scale is not None:
            self.quantizer.scale = self.log_scale.detach().exp().reshape(()).clamp(min=1e-8)
        return self.quantizer


# the attributes of quantized layers and matmuls that hold their activation quantizers
_ACTIVATION_SLOTS = ("act", "out", "left", "right")


def _blocks(model: nn.Module, layer_types: tuple[type, ...]) -> set[str]:
    """Paths of the modules of an nn.ModuleList or nn.Sequential of two or more of one type
    that hold quantized layers and no such module inside them: a transformer's blocks. A torch.fx graph module keeps only
    its called layers, in plain containers: its blocks are read from its trace's module
    stacks (numbered siblings of one type)."""
    layers = [name for name, m in model.named_modules() if isinstance(m, layer_types)]
    if isinstance(model, torch.fx.GraphModule):
        kinds = {path: kind for node in model.graph.nodes
                 for path, kind in (node.meta.get("nn_module_stack") or {}).values()}
        siblings: dict[str, set] = {}
        for path, kind in kinds.items():
            parent, _, index = path.rpartition(".")
            if index.isdigit():
                siblings.setdefault(parent, set()).add((path, kind))
        candidates = {path for group in siblings.values() if len(group) > 1 and len({k for _, k in group}) == 1
                      for path, _ in group}
    else:
        candidates = {f"{name}.{child}" if name else child for name, m in model.named_modules()
                      if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1
                      and len({type(c) for c in m}) == 1 for child in m._modules}
    found = {path for path in candidates if any(layer.startswith(f"{path}.") for layer in layers)}
    # blocks inside blocks (LeViT's stages, each a list of blocks): the innermost are the units,
    # so every layer belongs to exactly one
    return {path for path in found if not any(other.startswith(f"{path}.") for other in found)}


def _units(model: nn.Module, args: tuple, layer_types: tuple[type, ...], blocks: set[str]) -> list[str]:
    """The reconstruction units' module paths in call order: the `blocks` the model calls, and
    the quantized layers outside them."""
    called: list[str] = []
    modules = dict(model.named_modules())

    def hook(name):
        return lambda module, inputs: None if name in called else called.append(name)

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in modules
               if n in blocks or isinstance(modules[n], layer_types)]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    units = [n for n in called if n in blocks]
    return [n for n in called if n in units or not any(n.startswith(f"{u}.") for u in units)]


def _split_blocks(graph_module: torch.fx.GraphModule, blocks: set[str]
                  ) -> tuple[torch.fx.GraphModule, set[str], dict[str, str]]:
    """A torch.fx graph module inlines its blocks' code, so no block is called: the same
    model split into one submodule per block (torch.fx's split_module, sharing the graph
    module's layers and quantizers) and the stretches between them; the names of the block
    submodules; each block submodule's name mapped to the block's path (and every shared
    module's to its own). A node belongs to the block its module
    path (a called module's target, else the innermost module of its trace) lies in."""
    def block(node: torch.fx.Node) -> str | None:
        path = node.target if node.op == "call_module" else next(reversed(node.meta.get("nn_module_stack") or {}), "")
        return next((b for b in blocks if path == b or str(path).startswith(f"{b}.")), None)

    owners = {node: block(node) for node in graph_module.graph.nodes}
    parts: dict[torch.fx.Node, int] = {}
    part, current = 0, None
    for node, owner in owners.items():
        if owner != current:
            part, current = part + 1, owner
        parts[node] = part
    view = split_module(graph_module, graph_module, lambda node: parts[node])
    names = {f"submod_{parts[node]}": owner for node, owner in owners.items() if owner is not None}
    paths = {id(m): name for name, m in graph_module.named_modules()}
    shared = {name: paths[id(m)] for name, m in view.named_modules() if id(m) in paths}
    return view, set(names), {**shared, **names}


def _capture(qmodel: nn.Module, args: tuple, path: str) -> _Inputs:
    """The unit `path`'s input on `args`, detached (the forward pass stops there)."""
    found: list[_Inputs] = []

    def take(module, a, kw):
        found.append(_Inputs(*tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (a, kw))))
        raise _Stop

    handle = qmodel.get_submodule(path).register_forward_pre_hook(take, with_kwargs=True)
    try:
        with torch.no_grad():
            qmodel(*args)
    except _Stop:
        pass
    finally:
        handle.remove()
    return found[0]


def _float_pass(qmodel: nn.Module, args: tuple, units: list[str], seed: int
                ) -> dict[str, tuple[_Inputs, torch.Tensor, torch.Tensor]]:
    """Per unit, from one pass of the float form (quantizers off) before anything is learned:
    its input, its output (the target) and a weight per output row, ||J^T r||^2 for the
    Jacobian J of the model's outputs with respect to that row and a random sign vector r:
    in expectation the row's share of a squared error at the model's output (BRECQ's
    output-aware weighting, Gauss-Newton form), normalised to mean 1. A row the outputs do
    not read (a padded token, a patch token after the last block of a class-token ViT)
    weighs 0 and costs the rounding nothing."""
    captured: dict[str, list] = {}
    modules = {path: qmodel.get_submodule(path) for path in units}

    def hook(path):
        def take(module, a, kw, out):
            first = _first_tensor(out)
            if first.requires_grad:
                first.retain_grad()
            captured[path] = [_Inputs(*tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (a, kw))),
                              first]
        return take

    quantizers = _quantizers(qmodel)
    for q in quantizers:
        q.enabled = False
    handles = [modules[path].register_forward_hook(hook(path), with_kwargs=True) for path in units]
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            outputs = [o for o in tree_flatten(qmodel(*args))[0] if isinstance(o, torch.Tensor) and o.requires_grad]
            signs = [torch.randint(0, 2, o.shape, generator=generator).to(o.dtype) * 2 - 1 for o in outputs]
            sum((o * r).sum() for o, r in zip(outputs, signs)).backward()
    finally:
        for h in handles:
            h.remove()
        for q in quantizers:
            q.enabled = True
        for p in qmodel.parameters():
            p.grad = None
    result = {}
    for path, (inputs, output) in captured.items():
        if output.grad is None:
            continue  # its output reaches no model output (BERT's pooler under a mean-pooling encoder)
        weight = (output.grad.detach() ** 2).sum(-1)
        result[path] = (inputs, output.detach(), weight / weight.mean().clamp(min=1e-30))
    return result


def _first_tensor(output) -> torch.Tensor:
    return next(t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor))


def _quantizers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, ACTIVATION_QUANTIZERS)]


def _select(inputs: _Inputs, index: torch.Tensor, batch: int) -> _Inputs:
    """The rows `index` of every argument whose first axis is the batch."""
    pick = lambda t: t[index] if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == batch else t
    return _Inputs(tree_map(pick, inputs.args), tree_map(pick, inputs.kwargs))


def _mixed(quantized: _Inputs, float_: _Inputs) -> _Inputs:
    """QDrop's input: each element of each float argument from the float model with p = 0.5."""
    q_leaves, spec = tree_flatten((quantized.args, quantized.kwargs))
    f_leaves = tree_flatten((float_.args, float_.kwargs))[0]
    mixed = [torch.where(torch.rand_like(q) < DROP_PROBABILITY, f, q)
             if isinstance(q, torch.Tensor) and q.is_floating_point() and isinstance(f, torch.Tensor)
             and f.shape == q.shape else q for q, f in zip(q_leaves, f_leaves)]
    args, kwargs = tree_unflatten(mixed, spec)
    return _Inputs(args, kwargs)


def _loss(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the last axis, weighted per row, averaged."""
    return (((output - target) ** 2).sum(-1) * weight).mean()


def _error(unit: nn.Module, inputs: _Inputs, target: torch.Tensor, weight: torch.Tensor) -> float:
    with torch.no_grad():
        return float(_loss(_first_tensor(unit(*inputs.args, **inputs.kwargs)), target, weight))


def _train(unit: nn.Module, layers: list[nn.Module], q_in: _Inputs, f_in: _Inputs, target: torch.Tensor,
           weight: torch.Tensor, iterations: int, learn_scales: bool, generator: torch.Generator) -> None:
    """Learn the rounding (and step sizes) of `unit`'s quantized `layers`, then write them."""
    roundings = {layer: _SoftRounding(layer.wq, layer.inner.weight) for layer in layers}
    slots = [(m, slot) for m in unit.modules() for slot in _ACTIVATION_SLOTS
             if isinstance(getattr(m, slot, None), ACTIVATION_QUANTIZERS)]
    original = {layer: layer.wq for layer in layers}
    for layer, rounding in roundings.items():
        layer.wq = rounding
    for module, slot in slots:
        setattr(module, slot, _Dropped(getattr(module, slot), learn_scales))
    dropped = [getattr(m, s) for m, s in slots]
    scales = [d.log_scale for d in dropped if d.log_scale is not None]
    groups = [{"params": [r.v for r in roundings.values()], "lr": ROUNDING_LR}]
    groups += [{"params": scales, "lr": SCALE_LR}] if scales else []
    optimizer = torch.optim.Adam(groups)
    batch = target.shape[0]
    warmup = int(WARMUP * iterations)
    with torch.enable_grad():
        for step in range(iterations):
            index = torch.randperm(batch, generator=generator)[:BATCH]
            inputs = _mixed(_select(q_in, index, batch), _select(f_in, index, batch))
            output = _first_tensor(unit(*inputs.args, **inputs.kwargs))
            loss = _loss(output, target[index], weight[index])
            if step >= warmup:
                progress = (step - warmup) / max(iterations - warmup, 1)
                beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - progress)
                loss = loss + REGULARIZER * sum(r.regularizer(beta) for r in roundings.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for module, slot in slots:
        setattr(module, slot, getattr(module, slot).unwrap())
    with torch.no_grad():
        for layer, rounding in roundings.items():
            layer.inner.weight.copy_(rounding.hard())
            layer.wq = original[layer]


def reconstruct(qmodel: nn.Module, args: tuple[torch.Tensor, ...], layer_types: tuple[type, ...], iterations: int,
                learn_scales: bool = True, seed: int = 0) -> list[str]:
    """Reconstruct `qmodel` (a calibrated fake-quant model; its `layer_types` instances are the
    quantized weight layers, with `inner`, `wq` and `act`) unit by unit on the calibration
    batch `args`, `iterations` Adam steps per unit on BATCH samples each, in place (see the
    module docstring). Returns one line per unit: its path, its weighted squared output error
    over the batch before and after, the iterations and the seconds it took (wall clock)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the drop masks (rand_like draws from the global generator)
    blocks = _blocks(qmodel, layer_types)
    units, labels = _units(qmodel, args, layer_types, blocks), {}
    if isinstance(qmodel, torch.fx.GraphModule) and blocks and not set(units) & blocks:
        qmodel, blocks, labels = _split_blocks(qmodel, blocks)
        units = _units(qmodel, args, layer_types, blocks)
    floats = _float_pass(qmodel, args, units, seed)
    lines = []
    for number, path in enumerate(units, 1):
        if path not in floats:
            lines.append(f"{labels.get(path, path)}: not reconstructed: its output reaches no output of the model")
            continue
        start = time.perf_counter()
        unit = qmodel.get_submodule(path)
        layers = [m for m in unit.modules() if isinstance(m, layer_types)]
        f_in, target, weight = floats[path]
        q_in = _capture(qmodel, args, path)
        saved = {k: v.clone() for k, v in unit.state_dict().items()}
        before = _error(unit, q_in, target, weight)
        _train(unit, layers, q_in, f_in, target, weight, iterations, learn_scales, generator)
        after = _error(unit, q_in, target, weight)
        if after >= before:  # nothing gained on the batch: keep the calibrated unit
            unit.load_state_dict(saved)
        lines.append(f"{labels.get(path, path)}: weighted output error {before:.4g} -> {min(before, after):.4g} "
                     f"({iterations} iterations, {time.perf_counter() - start:.1f} s)"
                     + ("" if after < before else ", kept nearest rounding"))
        log.info("reconstructed unit %d of %d, %s", number, len(units), lines[-1])
    return lines
