"""ONNX graph helpers shared by the ONNX-based backends (the TensorRT readiness check) and the
quantized-ONNX emission (edgeport.quant.qdq).

One index of the graph's constants (initializers and Constant outputs), decoded to numpy only
when a value is read; the maps from a tensor to the nodes that read it and to the node that
makes it; attribute lookup with a default; rewiring a tensor's readers; and the sweep that
drops what a rewrite left unused. Nothing here imports the rest of edgeport, so both the
export and the quantization side can depend on it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

# A Constant node's value, by the attribute that holds it, as a tensor. The scalar and list
# forms are small, so they are converted when the index is built.
CONSTANT_VALUE_TENSORS: dict[str, Callable[[onnx.AttributeProto], onnx.TensorProto]] = {
    "value": lambda attribute: attribute.t,
    "value_float": lambda attribute: numpy_helper.from_array(np.array(attribute.f, np.float32)),
    "value_floats": lambda attribute: numpy_helper.from_array(np.array(attribute.floats, np.float32)),
    "value_int": lambda attribute: numpy_helper.from_array(np.array(attribute.i, np.int64)),
    "value_ints": lambda attribute: numpy_helper.from_array(np.array(attribute.ints, np.int64)),
}


class Constants:
    """The constants of an ONNX graph by tensor name: its initializers and the outputs of its
    Constant nodes (a Constant's output wins over an initializer of the same name, as at run
    time). A value is decoded on first read and kept, so a pass that reads a few scales does
    not decode every weight of a large model; `shape` reads the stored dimensions without
    decoding at all. The index is a snapshot: constants added to the graph later are not in it.
    """

    def __init__(self, graph: onnx.GraphProto):
        self._tensors: dict[str, onnx.TensorProto] = {tensor.name: tensor for tensor in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name in CONSTANT_VALUE_TENSORS:
                self._tensors[node.output[0]] = CONSTANT_VALUE_TENSORS[node.attribute[0].name](node.attribute[0])
        self._decoded: dict[str, np.ndarray] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._decoded:
            self._decoded[name] = numpy_helper.to_array(self._tensors[name])
        return self._decoded[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The dimensions of constant `name` as stored, without decoding its values."""
        return tuple(self._tensors[name].dims)


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Every tensor name read by a node, mapped to the nodes that read it in graph order (a
    node that reads a tensor twice is listed twice). Graph outputs are not consumers."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Every tensor name a node writes, mapped to that node. Graph inputs and initializers
    have no producer."""
    return {name: node for node in graph.node for name in node.output}


def attribute_value(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute `name` of `node` (an int, float, list, tensor...) or `default`
    where the node does not set it; ONNX's defaults are the operator's, so callers pass them."""
    found = next((attribute for attribute in node.attribute if attribute.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def redirect_inputs(nodes: Iterable[onnx.NodeProto], old: str, new: str) -> None:
    """Make every input of `nodes` that reads tensor `old` read tensor `new` instead."""
    for node in nodes:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads, and the
    recorded shapes (stale after a rewrite; shape inference redoes them)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
        dead = [node for node in graph.node if not any(name in used for name in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for initializer in [tensor for tensor in graph.initializer if tensor.name not in used]:
        graph.initializer.remove(initializer)
    del graph.value_info[:]


def keep_residual_norms_apart(graph: onnx.GraphProto) -> int:
    """Write each Add of two computed tensors whose only reader is a LayerNormalization (a
    residual connection into a post-norm, BERT's pattern) as a two-input Sum, the same sum.
    ONNX Runtime fuses Add + LayerNormalization into SkipLayerNormalization, and its CPU kernel
    for that op is a scalar loop with a division per element (onnxruntime 1.32): on MiniLM's
    64 x 384 blocks it takes about 100 us where the Add and the LayerNormalization it replaces
    take 18 us together (one thread; `bench/quant_bench.py` shows the whole-model effect). Its
    fusion matches Add only. Returns how many Adds were rewritten."""
    constants = Constants(graph)
    readers = consumers(graph)
    graph_outputs = {output.name for output in graph.output}
    rewritten = 0
    for node in graph.node:
        users = readers.get(node.output[0], []) if node.op_type == "Add" else []
        if (len(users) == 1 and users[0].op_type == "LayerNormalization" and node.output[0] not in graph_outputs
                and not any(name in constants for name in node.input)):
            node.op_type = "Sum"
            rewritten += 1
    return rewritten
