"""QDQ emission: fake-quant ops become QuantizeLinear / DequantizeLinear in ONNX.

torch's exporter maps 8-bit fake quantization to Q/DQ itself but refuses narrower ranges.
These translations express any 2-8 bit range exactly: Q to int8 (signed) or uint8, an
integer Clip to the narrower range, then DQ — bit-exact against the torch fake-quant. Full
8-bit ranges get plain Q/DQ pairs, the pattern ONNX Runtime fuses into integer kernels.
"""
from __future__ import annotations

import onnx
import torch
from onnxscript import opset18 as op


def _qdq(x, scale, zero_point, quant_min: int, quant_max: int, axis: int | None = None):
    dtype = onnx.TensorProto.INT8 if quant_min < 0 else onnx.TensorProto.UINT8
    zero = op.Cast(zero_point, to=dtype)
    options = {} if axis is None else {"axis": axis}
    q = op.QuantizeLinear(x, scale, zero, **options)
    if (quant_min, quant_max) not in ((-128, 127), (0, 255)):
        low = op.Constant(value=onnx.helper.make_tensor("low", dtype, [], [quant_min]))
        high = op.Constant(value=onnx.helper.make_tensor("high", dtype, [], [quant_max]))
        q = op.Clip(q, low, high)
    return op.DequantizeLinear(q, scale, zero, **options)


def _per_tensor(x, scale, zero_point, quant_min: int, quant_max: int):
    return _qdq(x, scale, zero_point, quant_min, quant_max)


def _per_channel(x, scale, zero_point, axis: int, quant_min: int, quant_max: int):
    return _qdq(x, scale, zero_point, quant_min, quant_max, axis)


TRANSLATIONS = {torch.ops.aten.fake_quantize_per_tensor_affine.tensor_qparams: _per_tensor,
                torch.ops.aten.fake_quantize_per_channel_affine.default: _per_channel}


def fold_weight_quantization(model: onnx.ModelProto) -> int:
    """Store quantized weights as integer initializers: QuantizeLinear (and its Clip) applied
    to a constant float weight is computed once here, so the runtime sees DQ(int8 weight), the
    pattern it runs as integer kernels, instead of re-quantizing every weight on every call.
    Returns how many weights were folded. The codes are those the graph computed (round half
    to even, saturate, clip)."""
    import numpy as np
    from onnx import numpy_helper

    if not any(node.op_type == "QuantizeLinear" for node in model.graph.node):
        return 0  # a float model: nothing to fold, and no initializer worth decoding
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed, folded = set(), 0
    for q in list(model.graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] not in constants or len(q.input) < 3:
            continue
        if q.input[1] not in constants or q.input[2] not in constants:
            continue
        weight, scale, zero = constants[q.input[0]], constants[q.input[1]], constants[q.input[2]]
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1) % weight.ndim
        shape = [1] * weight.ndim
        if scale.ndim:
            shape[axis] = -1
        info = np.iinfo(zero.dtype)
        codes = np.clip(np.rint(weight / scale.reshape(shape)) + zero.astype(np.int64).reshape(shape), info.min, info.max)
        out = q.output[0]
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Clip":  # a narrower bit width
            clip = users[0]
            low, high = (constants.get(name) for name in clip.input[1:3])
            codes = np.clip(codes, low, high)
            out = clip.output[0]
            removed.add(id(clip))
        name = f"{q.input[0]}_quantized"
        model.graph.initializer.append(numpy_helper.from_array(codes.astype(zero.dtype), name))
        for node in consumers.get(out, []):
            for i, value in enumerate(node.input):
                if value == out:
                    node.input[i] = name
        removed.add(id(q))
        folded += 1
    for dq in model.graph.node:  # DQ(W) -> Transpose: store W transposed instead (a Linear's weight)
        if dq.op_type != "DequantizeLinear" or not dq.input[0].endswith("_quantized"):
            continue
        users = [n for n in model.graph.node if dq.output[0] in n.input and id(n) not in removed]
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        transpose = users[0]
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        codes = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == dq.input[0])
        if codes.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = dq.input[0] + "_t"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(codes.T), name))
        dq.input[0] = name
        for attribute in dq.attribute:
            if attribute.name == "axis":
                attribute.i = 1 - (attribute.i % 2)
        if not any(a.name == "axis" for a in dq.attribute) and constants[dq.input[1]].ndim:
            dq.attribute.append(onnx.helper.make_attribute("axis", 0))
        for node in model.graph.node:
            for i, value in enumerate(node.input):
                if value == transpose.output[0]:
                    node.input[i] = dq.output[0]
        removed.add(id(transpose))
    if not removed:
        return 0
    del model.graph.value_info[:]  # stale shapes (transposed weights): shape inference redoes them
    kept = [n for n in model.graph.node if id(n) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    stale = [i for i in model.graph.initializer if i.name not in used]
    for initializer in stale:
        model.graph.initializer.remove(initializer)
    return folded
