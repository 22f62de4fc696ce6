"""Slimming: turn pruning into a smaller dense model that computes the same function.

1. `bake_masks` removes `torch.nn.utils.prune` re-parameterizations (weight_orig x
   weight_mask) so that plain weights remain; it accepts a model straight from `prune`,
   which cannot be deep-copied in that state.
2. `slim` finds channels that are constant (an all-zero weight row makes its output the
   bias, or 0) and follows them through per-channel ops (BatchNorm, activations, pooling,
   residual additions, concatenation, flatten) to the layers that consume them. Where every
   consumer can absorb the constant exactly — into its bias (Linear, 1x1 or unpadded conv),
   or into a constant bias map added after a zero-padded conv — the channel is removed from
   its producer, every per-channel op and every consumer. Channels that consumers ignore (an
   all-zero weight column, as `ln_structured(..., dim=1)` leaves) are followed back the same
   way to the layers that produce them; where each consumer ignores them (or absorbs them as
   a constant), they are removed alike. Where a channel cannot go (a residual addition whose other
   branch is not constant or that carries it to a layer that reads it, a LayerNorm, a model
   input or output), it stays and the report says why.
3. Attention modules with fused `qkv`, `proj` and a head count lose whole heads whose value
   rows are zero (their output is exactly zero whatever the attention weights).

The graph comes from torch.export, which captures models torch.fx symbolic tracing cannot
(data-dependent checks, `transformers` models): its ATen graph is read back at module level
(`_module_graph`) and the channels are cut from the model's own modules, so the slimmed model
keeps its class, forward and output structure. The report lists what was removed and the MAC
and parameter counts before and after.
"""
from __future__ import annotations

import copy
import operator
import types
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgeport.core import flatten_outputs
from edgeport.errors import CheckFailed

aten = torch.ops.aten

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.LeakyReLU, nn.Identity,
               nn.Dropout, nn.ELU, nn.Mish)
# Elementwise functions, as torch.fx records them and as torch.export's ATen graph does.
ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.relu6, F.hardswish,
                        F.dropout, aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default,
                        aten.silu_.default, aten.sigmoid.default, aten.tanh.default, aten.hardtanh.default,
                        aten.hardtanh_.default, aten.hardswish.default, aten.hardswish_.default,
                        aten.leaky_relu.default, aten.elu.default, aten.mish.default, aten.dropout.default,
                        aten.clone.default}
ACTIVATION_METHODS = ("relu", "sigmoid", "tanh")
ADDITIONS = (operator.add, torch.add, aten.add.Tensor, aten.add_.Tensor)
POOLS = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def pruned_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, tensor name) of every tensor a `torch.nn.utils.prune` mask is attached to."""
    import torch.nn.utils.prune as prune

    return [(m, hook._tensor_name) for m in model.modules() for hook in m._forward_pre_hooks.values()
            if isinstance(hook, prune.BasePruningMethod)]


def bake_masks(model: nn.Module) -> nn.Module:
    """A copy of `model` with every `torch.nn.utils.prune` mask multiplied into its weight.

    The pruned model itself is left as it was (its masks still attached)."""
    import torch.nn.utils.prune as prune

    pruned = pruned_tensors(model)
    # deepcopy refuses the computed (non-leaf) `weight` attribute that prune leaves behind
    saved = [(m, name, getattr(m, name)) for m, name in pruned]
    for m, name, _ in saved:
        delattr(m, name)
    try:
        clone = copy.deepcopy(model)
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
    for m in list(clone.modules()):
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                setattr(m, hook._tensor_name, hook.apply_mask(m))  # remove() needs the attribute present
                prune.remove(m, hook._tensor_name)
    return clone


@dataclass
class SlimReport:
    """What slimming did: channels removed per layer, MACs and parameters before and after."""

    removed: dict[str, int] = field(default_factory=dict)  # layer -> output channels (or heads) removed
    kept: list[str] = field(default_factory=list)  # why constant or ignored channels could not be removed
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    sparsity: dict = field(default_factory=dict)
    max_rel_error: float = 0.0  # slimmed vs pruned on the example, relative to the output scale
    fixed_size: list[str] = field(default_factory=list)  # convs given a BiasMap: the example's height and width only

    @property
    def changed(self) -> bool:
        return bool(self.removed)

    def summary(self) -> str:
        if not self.changed:
            head = "nothing to remove: the model is returned unchanged (masks baked)"
        else:
            head = (f"removed {sum(self.removed.values())} channels/heads from {len(self.removed)} layers: "
                    f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_after / self.macs_before:.1%}), "
                    f"parameters {self.params_before:,} -> {self.params_after:,}")
        fixed = ([f"fixed to the example's height and width: {len(self.fixed_size)} conv(s) add what removed "
                  f"constant channels gave through zero padding, a map of that size (BiasMap): "
                  f"{', '.join(self.fixed_size[:3])}{' ...' if len(self.fixed_size) > 3 else ''}"]
                 if self.fixed_size else [])
        return "\n".join([head, *fixed, *(f"kept: {reason}" for reason in self.kept)])


class BiasMap(nn.Module):
    """A conv followed by a constant map: what constant input channels contributed through
    zero padding, which no per-channel bias can express. Fixed to one spatial size."""

    def __init__(self, conv: nn.Conv2d, bias_map: torch.Tensor):
        super().__init__()
        self.conv = conv
        self.register_buffer("bias_map", bias_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias_map


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_attention(m: nn.Module) -> bool:
    """Attention with a fused `qkv` Linear, a `proj` Linear, a head count and a fixed `head_dim`."""
    return isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear) \
        and isinstance(getattr(m, "heads", getattr(m, "num_heads", None)), int) and hasattr(m, "head_dim")


def count_macs(model: nn.Module, example: tuple) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one call on `example`."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            total += output.numel() // output.shape[-1] * module.in_features * module.out_features
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    return int(total)


def sparsity_report(model: nn.Module) -> dict:
    """Unstructured sparsity per weight layer, whether it follows 2:4, and what backends do with it."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            zeros = float((w == 0).float().mean())
            if zeros == 0:
                continue
            # 2:4 runs along the input channels: per output channel, and for a conv per kernel tap
            rows = w.permute(0, *range(2, w.ndim), 1).reshape(-1, w.shape[1])
            two_four = rows.shape[1] % 4 == 0 and bool(((rows.reshape(-1, 4) == 0).sum(1) >= 2).all())
            layers[name] = {"zero_fraction": round(zeros, 4), "two_four_pattern": two_four}
    return {"layers": layers, "backends": {
        "onnxruntime-cpu": "dense kernels: zeros inside a weight cost the same time as any value",
        "tensorrt": "2:4 structured sparsity runs on sparse tensor cores (Ampere and newer, with "
                    "--sparsity=enable) for the layers whose pattern holds",
        "coreml": "prune_weights can store sparse weights (smaller file); speed depends on the device"}}


# --- constant-channel analysis ---------------------------------------------------------


@dataclass
class _Info:
    """Per node: constant values per channel, and the channel axis of the tensor."""

    const: dict[int, float]
    axis: int


_Rule = Callable[["_Analysis", fx.Node, "_Info | None"], "_Info | None"]
_Channel = tuple[fx.Node, int]  # a node and a channel of its output
_Read = tuple[fx.Node, fx.Node, int]  # (user, node, channel): a use of the channel other than an op carrying it on
_Entry = TypeVar("_Entry")


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    """The shape traced for `node`'s output; empty where none was recorded (not a tensor)."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def _by_type(table: dict[type, _Entry], module: nn.Module | None) -> _Entry | None:
    """The entry of `table` for the module's class or, failing that, its nearest base class in
    the table: a subclass follows its base's rule, as an isinstance test would have it."""
    return next((table[kind] for kind in type(module).__mro__ if kind in table), None)


def _zero_slices(weight: torch.Tensor, dim: int) -> list[int]:
    """The indices along `dim` where `weight` is all zero: output channels whose value is the
    bias (dim 0), or input channels the layer ignores (dim 1)."""
    slices = weight.detach().transpose(0, dim)
    return torch.nonzero((slices.reshape(slices.shape[0], -1) == 0).all(1)).flatten().tolist()


def _row_constants(m: nn.Module) -> dict[int, float]:
    bias = m.bias.detach() if m.bias is not None else torch.zeros(m.weight.shape[0])
    return {j: float(bias[j]) for j in _zero_slices(m.weight, 0)}


def _apply(fn, const: dict[int, float]) -> dict[int, float]:
    values = fn(torch.tensor(list(const.values()), dtype=torch.float32)) if const else []
    return {j: float(v) for j, v in zip(const, values)}


# The rules below say how one op carries constant channels from its input to its output:
# given the analysis, the node and what is known of its first input (None when that is not a
# traced tensor), they link the channels that must be removed together and return the
# output's constant channels, or None where the op's rule does not apply to this call (then
# no output channel is known to be constant).


def _conv(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    m = analysis.module(node)
    if not is_depthwise(m):  # an all-zero weight row makes its output channel the bias
        return _Info(_row_constants(m) if m.groups == 1 else {}, 1)
    if inp is None:
        return _Info({}, 1)
    analysis.link(node, node.args[0])  # channel j in, channel j out: a per-channel op
    bias = m.bias.detach() if m.bias is not None else torch.zeros(m.out_channels)
    return _Info({j: float(bias[j]) for j, c in inp.const.items() if c == 0.0}, 1)  # zeros pad like zeros


def _linear(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    return _Info(_row_constants(analysis.module(node)), -1)


def _batch_norm(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    if inp is None:
        return None
    m = analysis.module(node)
    if m.running_mean is None:  # normalizes by each batch's own statistics: no constant map
        return None
    analysis.link(node, node.args[0])
    with torch.no_grad():
        const = torch.tensor(list(inp.const.values()), dtype=torch.float32)
        index = torch.tensor(list(inp.const.keys()), dtype=torch.long)
        out = (const - m.running_mean[index]) / torch.sqrt(m.running_var[index] + m.eps)
        if m.weight is not None:  # affine=False: normalization alone
            out = out * m.weight[index] + m.bias[index]
        out = out if inp.const else const
    return _Info(dict(zip(inp.const, map(float, out))), inp.axis)


def _elementwise(analysis: _Analysis, node: fx.Node, inp: _Info | None, fn) -> _Info | None:
    if inp is None:
        return None
    analysis.link(node, node.args[0])
    return _Info(_apply(fn, inp.const), inp.axis)


def _activation_module(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    return _elementwise(analysis, node, inp, analysis.module(node).eval())


def _activation_function(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    if any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
        return None  # a second tensor operand: not a function of this channel alone
    return _elementwise(analysis, node, inp, lambda t: node.target(t, *node.args[1:], **node.kwargs))


def _activation_method(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    return _elementwise(analysis, node, inp, lambda t: getattr(t, node.target)())


def _pool(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    if inp is None:
        return None
    analysis.link(node, node.args[0])
    return _Info(dict(inp.const), inp.axis)


def _avg_pool(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    m = analysis.module(node)
    # counted zero padding averages a constant with zeros: the border is no longer that constant
    return _pool(analysis, node, inp) if m.padding == 0 or not m.count_include_pad else None


def _add(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    alpha = node.kwargs.get("alpha", 1)  # torch.add(a, b, alpha=s) is a + s * b
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args) or isinstance(alpha, fx.Node):
        return None
    if any(_shape(a) != _shape(node) for a in node.args):  # a broadcast operand's channel reaches many of the sum's
        return None
    a, b = analysis.info[node.args[0]], analysis.info[node.args[1]]
    for arg in node.args:
        analysis.link(node, arg)
    return _Info({j: a.const[j] + alpha * b.const[j] for j in a.const.keys() & b.const.keys()}, a.axis)


def _cat(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    tensors = node.args[0] if node.args else None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or dim not in (1, -3) or len(_shape(node)) != 4:
        return None
    const, offset = {}, 0
    for t in tensors:
        analysis.link(node, t, lambda j, o=offset: j + o)
        const |= {j + offset: c for j, c in analysis.info[t].const.items()}
        offset += _shape(t)[1]
    return _Info(const, 1)


def _flatten(analysis: _Analysis, node: fx.Node, inp: _Info | None) -> _Info | None:
    """(N, C, H, W) -> (N, C*H*W), channel-major: channel j becomes features j*H*W onwards."""
    if inp is None:
        return None
    before, after = _shape(node.args[0]), _shape(node)
    if len(before) != 4 or len(after) != 2 or after[1] != before[1] * before[2] * before[3]:
        return None
    spatial = before[2] * before[3]
    analysis.link(node, node.args[0], lambda j: [j * spatial + p for p in range(spatial)])
    return _Info({j * spatial + p: c for j, c in inp.const.items() for p in range(spatial)}, -1)


# Rules by module type (found along the module's class hierarchy), by function and by method.
MODULE_RULES: dict[type[nn.Module], _Rule] = {
    nn.Conv2d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm1d: _batch_norm,
    nn.AvgPool2d: _avg_pool,
    nn.Flatten: _flatten,
    **dict.fromkeys(ACTIVATIONS, _activation_module),
    **dict.fromkeys(POOLS, _pool),
}
FUNCTION_RULES: dict[Callable, _Rule] = {
    torch.cat: _cat,
    torch.flatten: _flatten,
    **dict.fromkeys(ADDITIONS, _add),
    **dict.fromkeys(ACTIVATION_FUNCTIONS, _activation_function),
}
METHOD_RULES: dict[str, _Rule] = {
    "flatten": _flatten,
    "view": _flatten,
    "reshape": _flatten,
    **dict.fromkeys(ACTIVATION_METHODS, _activation_method),
}


class _Analysis:
    """Walks the traced graph, tracking constant channels, channel-preserving edges and the
    input channels each layer ignores."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.info, self.edges = gm, {}, []
        for node in gm.graph.nodes:
            self.info[node] = self._visit(node)
        self.linked = {(node, source) for source, node, _ in self.edges}  # (user, input) joined channel by channel
        self.derived = {node for _, node, _ in self.edges}  # nodes whose channels are their inputs' channels
        self.ignored = {node: self._ignored_inputs(node) for node in gm.graph.nodes if _foldable(self.module(node))}

    def module(self, node: fx.Node) -> nn.Module | None:
        return _module(self.gm, node)

    def link(self, node: fx.Node, source: fx.Node, mapping=lambda j: j) -> None:
        """Channel j of `source` is channel mapping(j) of `node` (one removal group)."""
        self.edges.append((source, node, mapping))

    def _rule(self, node: fx.Node) -> _Rule | None:
        if node.op == "call_module":
            return _by_type(MODULE_RULES, self.module(node))
        if node.op == "call_function":
            return FUNCTION_RULES.get(node.target)
        if node.op == "call_method":
            return METHOD_RULES.get(node.target)
        return None

    def _ignored_inputs(self, node: fx.Node) -> set[int]:
        """The input channels the layer's all-zero weight columns ignore; none where its columns
        are not its input's channels (a Linear over a conv output's width)."""
        source, layer = node.args[0], self.module(node)
        if not _reads_channel_axis(layer, self.info[source].axis, len(_shape(source))):
            return set()
        return set(_zero_slices(layer.weight, 1))

    def _visit(self, node: fx.Node) -> _Info:
        rule = self._rule(node)
        first = node.args[0] if node.args else None
        inp = self.info.get(first) if isinstance(first, fx.Node) else None
        info = rule(self, node, inp) if rule else None
        # no rule, or one that does not apply to this call: no channel is known to be constant
        return info if info is not None else _Info({}, 1 if len(_shape(node)) == 4 else -1)

    @cached_property
    def joined(self) -> dict[_Channel, list[_Channel]]:
        """Each channel -> the channels per-channel ops join it to, upstream and downstream."""
        joined: dict[_Channel, list[_Channel]] = {}
        for source, node, mapping in self.edges:
            for j in range(_shape(source)[self.info[source].axis]):
                targets = mapping(j)
                for t in targets if isinstance(targets, list) else [targets]:
                    joined.setdefault((source, j), []).append((node, t))
                    joined.setdefault((node, t), []).append((source, j))
        return joined

    def groups(self) -> list[list[_Channel]]:
        """The channels that are constant or that a layer ignores, each with every channel joined
        to it (all of which go, or stay, together), in graph order."""
        order = {node: i for i, node in enumerate(self.info)}
        seeds = [(node, j) for node, info in self.info.items() for j in info.const]
        seeds += [(layer.args[0], j) for layer, channels in self.ignored.items() for j in sorted(channels)]
        seen: set[_Channel] = set()
        groups = []
        for seed in seeds:
            if seed not in seen:
                group = sorted(_reach(self.joined, [seed]), key=lambda c: (order[c[0]], c[1]))
                seen.update(group)
                groups.append(group)
        return groups

    def reads(self, group: list[_Channel]) -> list[_Read]:
        """Every use of the group's channels other than by an op that carries them on."""
        return [(user, node, j) for node, j in group for user in node.users if (user, node) not in self.linked]


def _reach(joined: dict[_Channel, list[_Channel]], starts: Iterable[_Channel]) -> dict[_Channel, _Channel | None]:
    """The channels joined to `starts`, nearest first, each with the channel it was reached from
    (None for a start)."""
    came_from: dict[_Channel, _Channel | None] = dict.fromkeys(starts)
    queue = deque(came_from)
    while queue:
        channel = queue.popleft()
        for other in joined.get(channel, ()):
            if other not in came_from:
                came_from[other] = channel
                queue.append(other)
    return came_from


def slim(model: nn.Module, example: torch.Tensor | tuple) -> tuple[nn.Module, SlimReport]:
    """A smaller dense model computing the same function as the pruned `model` on inputs
    shaped like `example`, and the report of what was removed (and what was kept, why).

    Masks from `torch.nn.utils.prune` are baked first; the result is that baked copy with
    narrower layers in place of the pruned ones (its own class and forward). A model with
    nothing to remove comes back unchanged (masks baked) with a report that says so.
    """
    args = example if isinstance(example, tuple) else (example,)
    baked = bake_masks(model).eval()
    report = SlimReport(macs_before=count_macs(baked, args), params_before=sum(p.numel() for p in baked.parameters()))
    report.sparsity = sparsity_report(baked)
    with torch.no_grad():
        before = flatten_outputs(baked(*args))
    _remove_heads(baked, args, report)
    try:
        gm = _module_graph(baked, args)
    except Exception as error:  # torch.export raises many types; the model is then only baked
        report.kept.append(f"torch.export cannot capture the model ({str(error).strip().splitlines()[0][:160]}); "
                           f"no channel was removed")
    else:
        _remove_channels(gm, report)
        for name, module in gm.named_modules():  # the cut layers go back into the model itself
            if name in gm.model_paths:
                setattr_module(baked, name, module)
    with torch.no_grad():
        after = flatten_outputs(baked(*args))
    scale = max(float(b.abs().max()) for b in before) if before else 0.0
    report.max_rel_error = max((float((b - a).abs().max()) for b, a in zip(before, after)), default=0.0) / \
        max(scale, 1e-12)
    if report.max_rel_error > 1e-4:
        raise CheckFailed(f"slimming changed the function: max error {report.max_rel_error:.2e} of the output "
                          f"scale on the example (a bug: please report it with the model)")
    report.macs_after = count_macs(baked, args)
    report.params_after = sum(p.numel() for p in baked.parameters())
    report.fixed_size = [name for name, module in baked.named_modules() if isinstance(module, BiasMap)]
    return baked, report


# ATen ops of torch.export's graph that are a module's whole forward (weights from that module).
MODULE_OPS = {aten.conv2d.default, aten.convolution.default, aten.linear.default, aten.batch_norm.default}
# ATen ops read back as the torch function or tensor method the rule tables know.
AS_FUNCTION = {aten.cat.default: torch.cat, aten.flatten.using_ints: torch.flatten}
AS_METHOD = {aten.view.default: "view", aten.reshape.default: "reshape", aten._unsafe_view.default: "view"}
# ATen pooling ops read back as the module that computes them: op -> module from the op's arguments.
AS_POOL = {
    aten.max_pool2d.default: lambda kernel, stride=(), padding=0, dilation=1, ceil_mode=False: nn.MaxPool2d(
        kernel, stride or kernel, padding, dilation, ceil_mode=ceil_mode),
    aten.avg_pool2d.default: lambda kernel, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
    divisor_override=None: nn.AvgPool2d(kernel, stride or kernel, padding, ceil_mode, count_include_pad,
                                        divisor_override),
    aten.adaptive_avg_pool2d.default: nn.AdaptiveAvgPool2d,
}


def _plain_layer(m: nn.Module) -> bool:
    """A layer a rule knows whose forward is its base class's own: what the rule assumes it
    computes, and what a narrower copy of the base class computes too."""
    base = next((kind for kind in type(m).__mro__ if kind in MODULE_RULES), None)
    return base is not None and type(m).forward is base.forward


def _module_graph(model: nn.Module, args: tuple) -> fx.GraphModule:
    """The model's torch.export graph read back at module level, for the rule tables: each op
    that is a whole plain layer's forward (conv, linear, batch norm, with that layer's own
    weights, called once) becomes a call of that module, pooling ops become the pooling module
    they compute, flatten/view/cat the functions and methods torch.fx would record; every
    other op stays as it is, with no rule (so no channel is known constant through it).

    The graph only describes the model; it is not run. `model_paths` lists the model's
    modules it calls, whose narrower copies go back into the model."""
    program = torch.export.export(model, args)
    signature = program.graph_signature
    owners = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}  # placeholder -> qualified name
    layer_of: dict[fx.Node, str] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in MODULE_OPS:
            weights = [a for a in node.args[1:] if isinstance(a, fx.Node) and a.name in owners]
            paths = {owners[a.name].rpartition(".")[0] for a in weights}
            # a layer whose weights reach any other op (tied or reused weights) keeps its width
            if len(paths) == 1 and all(set(w.users) == {node} for w in weights):
                layer_of[node] = paths.pop()
    calls = Counter(layer_of.values())
    graph, env, modules = fx.Graph(), {}, {}
    for node in program.graph.nodes:
        path = layer_of.get(node)
        if path is not None and calls[path] == 1 and _plain_layer(model.get_submodule(path)):
            modules[path] = model.get_submodule(path)
            new = graph.call_module(path, (env[node.args[0]],))
        elif node.target in AS_POOL:
            name = f"_pool_{len(modules)}"
            modules[name] = AS_POOL[node.target](*node.args[1:], **node.kwargs)
            new = graph.call_module(name, (env[node.args[0]],))
        elif node.target in AS_FUNCTION:
            new = graph.call_function(AS_FUNCTION[node.target], fx.map_arg(node.args, env.get), node.kwargs)
        elif node.target in AS_METHOD:
            new = graph.call_method(AS_METHOD[node.target], fx.map_arg(node.args, env.get), node.kwargs)
        else:
            new = graph.node_copy(node, env.get)
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            new.meta["tensor_meta"] = types.SimpleNamespace(shape=tuple(value.shape))
        env[node] = new
    gm = fx.GraphModule(modules, graph)
    gm.model_paths = {path for path in modules if not path.startswith("_pool_")}
    return gm


def _remove_heads(model: nn.Module, args: tuple, report: SlimReport) -> None:
    """Drop attention heads whose value rows and biases are all zero (their output is 0), where
    the model still runs on `args` without them."""
    for name, m in list(model.named_modules()):
        if not is_attention(m):
            continue
        heads_attr = "heads" if hasattr(m, "heads") else "num_heads"
        heads, head_dim = getattr(m, heads_attr), m.head_dim
        dim = heads * head_dim
        w = m.qkv.weight.detach().reshape(3, heads, head_dim, -1)
        b = m.qkv.bias.detach().reshape(3, heads, head_dim) if m.qkv.bias is not None else torch.zeros(3, heads, head_dim)
        dead = [h for h in range(heads) if bool((w[2, h] == 0).all()) and bool((b[2, h] == 0).all())]
        if not dead or len(dead) == heads:
            continue
        if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
            report.kept.append(f"{len(dead)} zero head(s) of {name}: a norm over every head's output (timm's "
                               f"scale_norm) follows them, and their zeros count in its statistics")
            continue
        keep = [h for h in range(heads) if h not in dead]
        rows = torch.tensor([part * dim + h * head_dim + i for part in range(3) for h in keep for i in range(head_dim)])
        cols = torch.tensor([h * head_dim + i for h in keep for i in range(head_dim)])
        before = {attr: getattr(m, attr) for attr in ("qkv", "proj", "gate", heads_attr, "attn_dim") if hasattr(m, attr)}
        m.qkv = _linear_subset(m.qkv, rows=rows)
        m.proj = _linear_subset(m.proj, cols=cols)
        if isinstance(getattr(m, "gate", None), nn.Linear):  # timm's gated attention: one gate per output channel
            m.gate = _linear_subset(m.gate, rows=cols)
        setattr(m, heads_attr, len(keep))  # the softmax scale stays that of the (unchanged) head size
        if isinstance(getattr(m, "attn_dim", None), int):  # timm reshapes the heads' output to it
            m.attn_dim = len(keep) * head_dim
        try:  # a forward that reshapes the heads' output to its input width (timm 0.9) cannot lose heads
            with torch.no_grad():
                model(*args)
        except Exception as error:  # the model's own error, whatever its type
            for attr, value in before.items():
                setattr(m, attr, value)
            report.kept.append(f"{len(dead)} zero head(s) of {name}: its forward does not run with fewer heads "
                               f"({str(error).strip().splitlines()[0][:120]})")
            continue
        report.removed[name] = len(dead)


def _linear_subset(m: nn.Linear, rows=None, cols=None, bias_add: torch.Tensor | None = None) -> nn.Linear:
    weight = m.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    bias = m.bias.detach() if m.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias[rows]
    if bias_add is not None:
        bias = bias_add if bias is None else bias + bias_add
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _conv_subset(m: nn.Conv2d, rows=None, cols=None, bias_add: torch.Tensor | None = None) -> nn.Conv2d:
    weight = m.weight.detach()
    weight = weight[rows] if rows is not None else weight
    if cols is not None and m.groups == 1:
        weight = weight[:, cols]
    bias = m.bias.detach() if m.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias[rows]
    if bias_add is not None:
        bias = bias_add if bias is None else bias + bias_add
    groups = weight.shape[0] if m.groups > 1 else 1
    new = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, groups,
                    bias is not None, m.padding_mode)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _norm_subset(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = type(m)(len(keep), m.eps, m.momentum, m.affine, m.track_running_stats)
    new.load_state_dict({k: v[keep] if v.ndim else v for k, v in m.state_dict().items()})
    return new


def _fold_into_linear(m: nn.Linear, constants: dict[int, float], source: fx.Node) -> nn.Module:
    """The Linear with its constant input channels' contribution added to its bias."""
    cols = sorted(constants)
    values = torch.tensor([constants[j] for j in cols], dtype=torch.float64)
    contribution = (m.weight.detach().double()[:, cols] @ values).float()
    return _linear_subset(m, bias_add=contribution)


def _fold_into_conv(m: nn.Conv2d, constants: dict[int, float], source: fx.Node) -> nn.Module:
    """The conv with its constant input channels' contribution added: to its bias where that
    is the same at every position, else as a map (zero padding makes the borders differ)."""
    shape = _shape(source)
    image = torch.zeros(1, m.in_channels, shape[2], shape[3], dtype=torch.float64)
    for j, c in constants.items():
        image[0, j] = c
    bias_map = F.conv2d(image, m.weight.detach().double(), None, m.stride, m.padding, m.dilation, m.groups)[0]
    flat = bias_map.reshape(bias_map.shape[0], -1)
    if bool((flat == flat[:, :1]).all()):
        return _conv_subset(m, bias_add=flat[:, 0].float())
    return BiasMap(m, bias_map.float().unsqueeze(0))


@dataclass(frozen=True)
class _Cut:
    """How a module type loses channels on one side: its width on that side, a copy that
    keeps only the given channels, and whether the removal is counted in the report (a
    norm's channels go with its producer's, counted there)."""

    width: Callable[[nn.Module], int]
    keep: Callable[[nn.Module, torch.Tensor], nn.Module]
    counted: bool = True


# By module type (found along the module's class hierarchy, like the analysis rules): how a
# consumer absorbs constant input channels, how a layer loses output channels, and how a
# consumer loses the input channels that were folded into it or that it ignores. A module type with no output
# cut (activations, pools) takes its width from its input.
CONSTANT_FOLDS: dict[type[nn.Module], Callable[[nn.Module, dict[int, float], fx.Node], nn.Module]] = {
    nn.Linear: _fold_into_linear,
    nn.Conv2d: _fold_into_conv,
}
OUTPUT_CUTS: dict[type[nn.Module], _Cut] = {
    nn.Conv2d: _Cut(lambda m: m.out_channels, lambda m, keep: _conv_subset(m, rows=keep)),
    nn.Linear: _Cut(lambda m: m.out_features, lambda m, keep: _linear_subset(m, rows=keep)),
    nn.BatchNorm2d: _Cut(lambda m: m.num_features, _norm_subset, counted=False),
    nn.BatchNorm1d: _Cut(lambda m: m.num_features, _norm_subset, counted=False),
}
INPUT_CUTS: dict[type[nn.Module], _Cut] = {
    nn.Conv2d: _Cut(lambda m: m.in_channels, lambda m, keep: _conv_subset(m, cols=keep)),
    nn.Linear: _Cut(lambda m: m.in_features, lambda m, keep: _linear_subset(m, cols=keep)),
}


def _foldable(m: nn.Module | None) -> bool:
    """Consumers that absorb a constant input channel exactly, or drop one they ignore, and
    producers that lose an output channel: the types with a fold, convs only over all channels
    (in a grouped conv a channel reaches one group's outputs only)."""
    return _by_type(CONSTANT_FOLDS, m) is not None and getattr(m, "groups", 1) == 1


def _pruned_channels(analysis: _Analysis, group: list[_Channel], reads: list[_Read]) -> dict[str, list[_Channel]]:
    """The group's channels that pruning made removable, by the layer whose weights did it, as
    the report names them: constant outputs of a layer (all-zero weight rows), and input
    channels a layer ignores (all-zero weight columns)."""
    pruned: dict[str, list[_Channel]] = {}
    for node, j in group:
        if node not in analysis.derived and j in analysis.info[node].const:
            pruned.setdefault(f"constant channel(s) of {node.target}", []).append((node, j))
    for user, node, j in reads:
        if j in analysis.ignored.get(user, ()):
            pruned.setdefault(f"ignored input channel(s) of {user.target} (all-zero weights)", []).append((node, j))
    return pruned


def _blocker(analysis: _Analysis, group: list[_Channel], reads: list[_Read], pruned: list[_Channel]) -> str | None:
    """Why the `pruned` channels of this group cannot be removed, or None when the group can:
    every layer that reads its channels must absorb them (a constant, folded into its bias) or
    ignore them (all-zero weights), and each must come from a layer that can lose it."""
    for user, node, j in reads:
        if user.op == "output":
            return "they are an output of the model"
        layer = analysis.module(user)
        if not _foldable(layer):
            loss = "absorb a constant channel" if j in analysis.info[node].const else "lose an input channel"
            return f"they feed {_describe(analysis.gm, user)}, which cannot {loss}"
        if not _reads_channel_axis(layer, analysis.info[node].axis, len(_shape(node))):
            return f"they feed {_describe(analysis.gm, user)} along another axis than the one they are channels of"
    readers = {(node, j): user for user, node, j in reversed(reads)
               if j not in analysis.ignored[user] and j not in analysis.info[node].const}
    if readers:
        return _nearest_need(analysis, pruned, readers)
    for node, j in group:
        if node not in analysis.derived and not _foldable(analysis.module(node)):
            return f"they come from {_describe(analysis.gm, node)}, which cannot lose a channel"
    return None


def _nearest_need(analysis: _Analysis, pruned: list[_Channel], readers: dict[_Channel, fx.Node]) -> str:
    """What, nearest to the `pruned` channels, needs their values: a residual addition or a
    depthwise conv's zero padding that turns their constant into values that vary, or a layer
    that reads them (named with the residual additions between)."""
    came_from = _reach(analysis.joined, pruned)
    for channel in came_from:
        node, j = channel
        inputs = [(source, i) for source, i in analysis.joined.get(channel, ()) if source in node.all_input_nodes]
        if j not in analysis.info[node].const and any(i in analysis.info[source].const for source, i in inputs):
            if node.target in ADDITIONS:
                return f"they reach {node.name} (residual addition) where the other input is not constant"
            return f"they pass through {_describe(analysis.gm, node)}, whose zero padding turns a nonzero " \
                   f"constant into a map"
        if channel in readers:
            reader, path = readers[channel], []
            while channel is not None:
                path.append(channel[0])
                channel = came_from[channel]
            additions = [step.name for step in reversed(path) if step.target in ADDITIONS]
            through = f", through {', '.join(additions)} (residual addition{'s' * (len(additions) > 1)})" \
                if additions else ""
            return f"{_describe(analysis.gm, reader)} reads them too{through}"
    raise AssertionError("a group with a reader reaches it from every channel")


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node as the report names it: a layer by its path in the model and its type, another op
    by its graph name and what it computes."""
    layer = _module(gm, node)
    if layer is not None:
        return f"{node.target} ({type(layer).__name__})"
    kind = "model input or parameter" if node.op == "placeholder" else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({kind})"


def _reads_channel_axis(consumer: nn.Module, axis: int, ndim: int) -> bool:
    """Whether `consumer` mixes the axis the constant channels lie on: a Linear its input's
    last, a conv axis 1 (a Linear over the width of a conv's output mixes pixels, not channels)."""
    wanted = -1 if isinstance(consumer, nn.Linear) else 1
    return axis % max(ndim, 1) == wanted % max(ndim, 1)


def _remove_channels(gm: fx.GraphModule, report: SlimReport) -> None:
    analysis = _Analysis(gm)
    removals: dict[fx.Node, set[int]] = {}  # node -> channels removed from its output
    dropped: dict[fx.Node, set[int]] = {}  # layer -> channels removed from its input
    folds: dict[tuple[fx.Node, fx.Node], dict[int, float]] = {}  # (consumer, source) -> {channel: constant}
    kept: dict[str, Counter[str]] = {}  # pruned channels, as the report names them -> reason -> how many
    for group in analysis.groups():
        reads = analysis.reads(group)
        pruned = _pruned_channels(analysis, group, reads)
        # the group goes or stays as a whole; what keeps it is told per pruned layer, nearest to its channels
        reasons = {label: _blocker(analysis, group, reads, channels) for label, channels in pruned.items()}
        if None not in reasons.values():
            for label, reason in reasons.items():
                kept.setdefault(label, Counter())[reason] += len(pruned[label])
            continue
        for node, j in group:
            removals.setdefault(node, set()).add(j)
        for user, node, j in reads:
            dropped.setdefault(user, set()).add(j)
            if j not in analysis.ignored[user]:  # the layer reads the constant: it goes into its bias
                folds.setdefault((user, node), {})[j] = analysis.info[node].const[j]
    report.kept += [f"{count} {label}: {reason}" for label, reasons in kept.items() for reason, count in reasons.items()]
    _apply_removals(gm, removals, dropped, folds, report)


def _apply_removals(gm: fx.GraphModule, removals: dict[fx.Node, set[int]], dropped: dict[fx.Node, set[int]],
                    folds: dict[tuple[fx.Node, fx.Node], dict[int, float]], report: SlimReport) -> None:
    """Fold constants into consumers (with the original weights), then cut rows and columns."""
    for (consumer, source), constants in folds.items():
        m = _module(gm, consumer)
        setattr_module(gm, consumer.target, _by_type(CONSTANT_FOLDS, m)(m, constants, source))
    for node, channels in removals.items():
        m = _module(gm, node)
        layer = m.conv if isinstance(m, BiasMap) else m
        cut = _by_type(OUTPUT_CUTS, layer)
        if cut is None:
            continue  # activations, pools, additions: their width follows their inputs
        keep = torch.tensor([j for j in range(cut.width(layer)) if j not in channels])
        if isinstance(m, BiasMap):
            m.bias_map = m.bias_map[:, keep]
        _replace_layer(gm, node, cut.keep(layer, keep).eval())
        if cut.counted:
            report.removed[node.target] = len(channels)
    for consumer, channels in dropped.items():
        m = _module(gm, consumer)
        layer = m.conv if isinstance(m, BiasMap) else m
        cut = _by_type(INPUT_CUTS, layer)
        _replace_layer(gm, consumer, cut.keep(layer, torch.tensor([j for j in range(cut.width(layer))
                                                                   if j not in channels])))


def _replace_layer(gm: fx.GraphModule, node: fx.Node, layer: nn.Module) -> None:
    """Put `layer` where the module `node` calls is, inside its BiasMap where it has one."""
    m = _module(gm, node)
    if isinstance(m, BiasMap):
        m.conv = layer
    else:
        setattr_module(gm, node.target, layer)


def setattr_module(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
