"""Activation x activation matmuls of models torch.fx cannot trace, found in torch.export's graph.

`transformers`' BERT family (and other models with data-dependent Python in their forward)
defeat `torch.fx.symbolic_trace`, but `torch.export` captures them. Its graph says which
modules call a matmul of two activations, in what order, and whether the left operand is a
softmax output; `scaled_dot_product_attention` (the default attention of `transformers`)
counts as two such matmuls, scores and probabilities x values. The model itself stays as it
is: each of those modules gets its quantized matmuls as submodules (`matmul0`, `matmul1`,
... as torch.fx's path names them) and a hook that, for the length of its forward, routes its
own matmul calls to them in that order (a TorchFunctionMode). Attention through SDPA is
computed in the open (scores, scale, mask, softmax, probabilities x values) so that both
products get their quantized operands; the result is SDPA's up to float rounding.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from edgeport.core import capture

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_MATMULS = {aten.matmul.default, aten.bmm.default}
_SOFTMAXES = {aten.softmax.int, aten._softmax.default}
# ops between a softmax and the matmul that reads it that do not change what it is
_PASS_THROUGH = {aten.dropout.default, aten.clone.default, aten.to.dtype, aten.to.dtype_layout,
                 aten.contiguous.default, aten._to_copy.default}
# the torch functions a module's forward calls for the graph's matmuls
_RUNTIME_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}


@dataclass(frozen=True)
class MatMulSite:
    """One activation x activation matmul of the captured graph: the module whose forward
    calls it (`path`), its order among that module's matmuls (`index`), whether the left
    operand is a softmax output (`softmax_left`)."""

    path: str
    index: int
    softmax_left: bool

    @property
    def name(self) -> str:
        """The quantized matmul's module path (torch.fx's naming: `<module>.matmul<k>`)."""
        return f"{self.path}.matmul{self.index}" if self.path else f"matmul{self.index}"


def _is_softmax(node: torch.fx.Node, resolve: Callable[[torch.fx.Node], torch.fx.Node]) -> bool:
    """Whether `node` is a softmax output, through ops that do not change it and into the
    graph around a nested one (`resolve`, see `_calls`)."""
    node = resolve(node)
    while node.op == "call_function" and node.target in _PASS_THROUGH:
        node = resolve(node.args[0])
    return node.op == "call_function" and node.target in _SOFTMAXES


def exported_matmul_sites(model: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[list[MatMulSite], str]:
    """The activation x activation matmuls of `model` run on `args`, in call order, from the
    graph torch.export captures, and why none could be looked for when it cannot capture
    the model ("" otherwise). A matmul with a parameter or buffer operand is a weight
    layer's, not an activation product."""
    try:
        program = capture(model, args)
    except Exception as error:  # capture runs arbitrary model code; any failure means "not capturable"
        return [], f"not capturable by torch.export ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    signature = program.graph_signature
    weights = set(signature.inputs_to_parameters) | set(signature.inputs_to_buffers) | set(
        signature.inputs_to_lifted_tensor_constants)
    counts: dict[str, int] = {}
    sites = []
    for node, resolve in _calls(program.graph_module):
        if node.target not in (*_MATMULS, _SDPA):
            continue
        operands = [resolve(a) if isinstance(a, torch.fx.Node) else a for a in node.args[:2]]
        if any(not isinstance(a, torch.fx.Node) or a.name in weights or a.op == "get_attr" for a in operands):
            continue
        stack = node.meta.get("nn_module_stack")
        path = next(reversed(stack.values()))[0] if stack else ""
        products = ((False, True) if node.target == _SDPA else (_is_softmax(node.args[0], resolve),))
        for softmax_left in products:
            counts[path] = counts.get(path, -1) + 1
            sites.append(MatMulSite(path, counts[path], softmax_left))
    return sites, ""


def _calls(graph_module: torch.fx.GraphModule, outer: Callable[[torch.fx.Node], torch.fx.Node] = lambda n: n
           ) -> Iterator[tuple[torch.fx.Node, Callable[[torch.fx.Node], torch.fx.Node]]]:
    """The call_function nodes of `graph_module` in execution order, each with the function
    that takes a node of its graph to the node of the top-level graph it stands for. The ops
    under a region the model opens (`torch.autocast(enabled=False)` around EfficientViT's
    linear attention, `torch.no_grad()`) sit in a nested graph that torch.export calls through
    a higher-order op (`wrap_with_autocast`, `wrap_with_set_grad_enabled`): its nodes come in
    at that call, each of its placeholders standing for a tensor the call passes. A call of
    more than one graph (`torch.cond`'s branches) has no one order of calls: its contents are
    not looked into."""
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        graphs = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                  and isinstance(getattr(graph_module, a.target, None), torch.fx.GraphModule)]
        if len(graphs) != 1:
            yield node, outer
            continue
        inner = getattr(graph_module, graphs[0].target)
        passed = [a for a in node.args[node.args.index(graphs[0]) + 1:] if isinstance(a, torch.fx.Node)]
        bound = dict(zip((n for n in inner.graph.nodes if n.op == "placeholder"), passed))

        def resolve(n: torch.fx.Node, bound=bound) -> torch.fx.Node:
            return outer(bound[n]) if n in bound else n

        yield from _calls(inner, resolve)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores_matmul: nn.Module,
               values_matmul: nn.Module, attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention with its two products done by the given (quantized)
    matmuls. Dropout is not applied: quantized models are inference models."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        repeats = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeats, dim=-3), v.repeat_interleave(repeats, dim=-3)
    scores = scores_matmul(q, k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        length, keys = q.shape[-2], k.shape[-2]
        attn_mask = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # as an additive mask: the select runs once on the mask (ONNX Runtime merges the layers'
        # identical ones), the heads' scores get an Add; a select over all the scores took 70 us a
        # layer on MiniLM at 64 tokens (2 threads), a fifth of its quantized attention. The
        # dtype's lowest value, not -inf, as transformers' eager attention masks: a query that may
        # see no key (an all-padding sample) attends uniformly instead of making NaN
        attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(~attn_mask,
                                                                                 torch.finfo(scores.dtype).min)
    if attn_mask is not None:
        scores = scores + attn_mask
    return values_matmul(torch.softmax(scores, dim=-1), v)


class _RouteMatMuls(TorchFunctionMode):
    """Sends a module's activation x activation matmul calls to its quantized matmuls, in
    the order of the captured graph; a call beyond the graph's count is an error, not a
    float matmul left in silence."""

    def __init__(self, module: nn.Module, count: int):
        super().__init__()
        self.module, self.count, self.calls = module, count, 0

    def _next(self) -> nn.Module:
        if self.calls >= self.count:
            raise RuntimeError(f"{type(self.module).__name__} called more activation matmuls than its captured "
                               f"graph has ({self.count})")
        self.calls += 1
        return getattr(self.module, f"matmul{self.calls - 1}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            scores, values = self._next(), self._next()
            return _attention(*args, scores, values, **kwargs)
        if func in _RUNTIME_MATMULS and len(args) == 2 and not kwargs and not any(
                isinstance(a, nn.Parameter) for a in args):
            return self._next()(*args)
        return func(*args, **kwargs)


class RouteMatMulsHook:
    """The forward pre-hook and (always-called) forward hook that hold `_RouteMatMuls` open
    for the length of a module's forward. It keeps no reference to the module, so that a
    deep copy of the model hooks the copy."""

    def __init__(self, count: int):
        self.count = count
        self.modes: list[_RouteMatMuls] = []  # a stack: a module may be re-entered

    def enter(self, module: nn.Module, _args) -> None:
        self.modes.append(_RouteMatMuls(module, self.count))
        self.modes[-1].__enter__()

    def exit(self, module: nn.Module, _args, _output) -> None:
        self.modes.pop().__exit__(None, None, None)


def route_matmuls(model: nn.Module, sites: list[MatMulSite], make: Callable[[MatMulSite], nn.Module]) -> None:
    """Give each module of `sites` its quantized matmuls (`make(site)`, registered as
    `matmul<k>`) and the hooks that route its calls to them, in place."""
    for path in dict.fromkeys(site.path for site in sites):
        module = model.get_submodule(path)
        own = [site for site in sites if site.path == path]
        for site in own:
            module.add_module(f"matmul{site.index}", make(site))
        hook = RouteMatMulsHook(len(own))
        module.register_forward_pre_hook(hook.enter)
        module.register_forward_hook(hook.exit, always_call=True)
