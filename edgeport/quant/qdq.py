"""Quantized ONNX: fake-quant ops become QuantizeLinear / DequantizeLinear, then the forms
each runtime runs best.

torch's exporter maps 8-bit fake quantization to Q/DQ itself but refuses narrower ranges.
These translations express any 2-8 bit range exactly: Q to int8 (signed) or uint8, an
integer Clip to the narrower range, then DQ — bit-exact against the torch fake-quant. Full
8-bit ranges get plain Q/DQ pairs. After export, weights are stored as integers
(`fold_weight_quantization`: the QDQ form TensorRT takes) and, for ONNX Runtime, a Linear
whose result is re-quantized after only data movement becomes a Gemm between DQ and Q
(`requantized_gemms`: it runs as QGemm) and other matmuls followed by a scale or bias are
written as MatMulInteger (`integer_matmuls`), the form whose scale and bias it folds into the
integer kernel.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxscript import opset18 as op

from edgeport.export.onnxgraph import Constants, attribute_value, consumers, drop_unused, producers, redirect_inputs


def _qdq(x, scale, zero_point, quant_min: int, quant_max: int, axis: int | None = None):
    dtype = onnx.TensorProto.INT8 if quant_min < 0 else onnx.TensorProto.UINT8
    zero = op.Cast(zero_point, to=dtype)
    options = {} if axis is None else {"axis": axis}
    q = op.QuantizeLinear(x, scale, zero, **options)
    if (quant_min, quant_max) not in ((-128, 127), (0, 255)):
        low = op.Constant(value=helper.make_tensor("low", dtype, [], [quant_min]))
        high = op.Constant(value=helper.make_tensor("high", dtype, [], [quant_max]))
        q = op.Clip(q, low, high)
    return op.DequantizeLinear(q, scale, zero, **options)


def _per_tensor(x, scale, zero_point, quant_min: int, quant_max: int):
    return _qdq(x, scale, zero_point, quant_min, quant_max)


def _per_channel(x, scale, zero_point, axis: int, quant_min: int, quant_max: int):
    return _qdq(x, scale, zero_point, quant_min, quant_max, axis)


TRANSLATIONS = {torch.ops.aten.fake_quantize_per_tensor_affine.tensor_qparams: _per_tensor,
                torch.ops.aten.fake_quantize_per_channel_affine.default: _per_channel}


def _output_and_mask(x, *_):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


# torch.export traces a dynamic batch with fake tensors, and torch has no fake kernel for the
# ops fake quantization calls inside: without these, a quantized model exports only with
# static shapes (8-bit ones fell back to the legacy exporter; narrower ones failed).
for _op in ("aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
            "aten::fake_quantize_per_channel_affine_cachemask"):
    try:
        torch.library.register_fake(_op, _output_and_mask)
    except RuntimeError:  # a torch that has its own
        pass


def fold_weight_quantization(model: onnx.ModelProto) -> int:
    """Store quantized weights as integer initializers: QuantizeLinear (and its Clip) applied
    to a constant float weight is computed once here, so the runtime sees DQ(int8 weight), the
    pattern it runs as integer kernels, instead of re-quantizing every weight on every call.
    Returns how many weights were folded. The codes are those the graph computed (round half
    to even, saturate, clip)."""
    if not any(node.op_type == "QuantizeLinear" for node in model.graph.node):
        return 0  # a float model: nothing to fold, and no initializer worth decoding
    constants = Constants(model.graph)
    readers = consumers(model.graph)
    removed, folded = set(), 0
    for q in list(model.graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] not in constants or len(q.input) < 3:
            continue
        if q.input[1] not in constants or q.input[2] not in constants:
            continue
        weight, scale, zero = (constants[name] for name in q.input[:3])
        axis = attribute_value(q, "axis", 1) % weight.ndim
        shape = [1] * weight.ndim
        if scale.ndim:
            shape[axis] = -1
        info = np.iinfo(zero.dtype)
        codes = np.clip(np.rint(weight / scale.reshape(shape)) + zero.astype(np.int64).reshape(shape), info.min, info.max)
        out = q.output[0]
        users = readers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Clip":  # a narrower bit width
            clip = users[0]
            low, high = (constants[name] for name in clip.input[1:3])
            codes = np.clip(codes, low, high)
            out = clip.output[0]
            removed.add(id(clip))
        name = f"{q.input[0]}_quantized"
        model.graph.initializer.append(numpy_helper.from_array(codes.astype(zero.dtype), name))
        redirect_inputs(readers.get(out, []), out, name)
        removed.add(id(q))
        folded += 1
    for dq in model.graph.node:  # DQ(W) -> Transpose: store W transposed instead (a Linear's weight)
        if dq.op_type != "DequantizeLinear" or not dq.input[0].endswith("_quantized"):
            continue
        users = [n for n in model.graph.node if dq.output[0] in n.input and id(n) not in removed]
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        transpose = users[0]
        perm = attribute_value(transpose, "perm")
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
            dq.attribute.append(helper.make_attribute("axis", 0))
        redirect_inputs(model.graph.node, transpose.output[0], dq.output[0])
        removed.add(id(transpose))
    if not removed:
        return 0
    kept = [n for n in model.graph.node if id(n) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    drop_unused(model.graph)
    return folded


def _dequantizer(name: str, producer: dict[str, onnx.NodeProto], constants: Constants) -> onnx.NodeProto | None:
    """The DequantizeLinear that makes tensor `name`, where it has a zero point input and a
    float32 constant scale (the forms the integer rewrites can fold); None otherwise."""
    node = producer.get(name)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) != 3 or node.input[1] not in constants:
        return None
    return node if constants[node.input[1]].dtype == np.float32 else None


# the most a re-quantizing Gemm's int32 bias may be off, in steps of the output's quantizer: it
# is rounded to within half its step sa * sw, which grows with coarser input and weight grids
# faster than the output's step does. Measured at W8: at most 0.0019 (MiniLM, DeiT-Ti,
# MobileViT-XS). Past this bound a Linear keeps its float bias (MatMulIntegerToFloat): MiniLM's
# best W6A6 and W4A4 models reach 0.0082 and 0.0275, and written as QGemm their exports drifted
# from their fake-quant models (cosine 0.9979 -> 0.9947 and 0.9936 -> 0.9502)
MAX_BIAS_ROUNDING = 0.005


def requantized_gemms(model: onnx.ModelProto) -> int:
    """Rewrite each quantized Linear whose biased result is re-quantized per tensor after
    nothing but data movement as 2-D Gemms between DQ and Q, which ONNX Runtime fuses into
    QGemm, whose kernel writes the re-quantized codes itself. Two patterns:

    - BERT's query, key and value: DQ(a) x DQ(W) -> MatMul -> Add(bias) -> Reshape/Transpose...
      -> Q becomes Reshape(a, [-1, K]) -> DQ -> Gemm(DQ(W), DQ(int32 bias)) -> Q ->
      Reshape/Transpose... on the integer codes;
    - a fused projection split after its head reshape (timm's and the zoo's qkv: Reshape to
      [..., P, heads, head_dim], a Transpose that moves the P axis first, then each part picked
      off it by Gather i, or by Slice and Squeeze as torch's unbind exports, each part
      re-quantized by its own quantizer): one Gemm for all parts, re-quantized by the first
      part's quantizer, each part's scale and zero point carried by its columns' weight scale
      and int32 bias so that the kernel writes each part's own codes; then a Split of the codes
      and each part's Reshape and Transpose. On the ViT-S stack one QGemm of 1152 columns took
      397 us against 492 us for three of 384 (ONNX Runtime profiler, 2 threads), its Split 37 us.

    In isolation (a 64 x 384 input, 384 outputs, 2 threads) QGemm took 85 us against 111 us
    for MatMulIntegerToFloat, the float data movement and a QuantizeLinear; in MiniLM's op
    profile its 18 QGemms took 1.15 ms (`bench/results/quant.json`). Moving a per-tensor quantizer
    across a reshape, transpose or gather is exact. The bias is stored as int32 codes at scale
    sa * sw, as QGemm takes it, so it is rounded to within half of that step (at most 0.0019
    of the output's quantization step on MiniLM's 18, 0.00025 on the ViT-S stack's); a Linear
    whose bound passes MAX_BIAS_ROUNDING (coarse grids), or whose input is narrower than 8 bits
    (its fake-quant model sums the codes, see `integer_matmuls`), is left to `integer_matmuls`. Returns
    how many Gemms were written; run it before `integer_matmuls`, which takes the other matmuls."""
    graph = model.graph
    constants = Constants(graph)
    producer = producers(graph)
    readers = consumers(graph)
    graph_outputs = {o.name for o in graph.output}

    def only_reader(name: str):
        users = readers.get(name, [])
        return users[0] if len(users) == 1 and name not in graph_outputs else None

    def dequantize(name: str, constant: bool):
        """`_dequantizer` of `name` where its zero point is a constant too and its codes are a
        constant (`constant`: a weight) or computed (an activation)."""
        node = _dequantizer(name, producer, constants)
        if node is None or (node.input[0] in constants) != constant or node.input[2] not in constants:
            return None
        return node

    def requantizer(start):
        """The data-movement nodes after `start` up to the per-tensor QuantizeLinear that ends
        them, each the only reader of the one before; (None, None) where there is none."""
        chain, node = [], only_reader(start.output[0])
        while node is not None and node.op_type in ("Reshape", "Transpose") and node.input[0] == (chain[-1] if chain else start).output[0]:
            chain.append(node)
            node = only_reader(node.output[0])
        if node is None or node.op_type != "QuantizeLinear" or len(node.input) != 3:
            return None, None
        if any(name not in constants or constants[name].size != 1 for name in node.input[1:3]):
            return None, None
        return chain, node

    def picked(node):
        """(the part index, the nodes that pick it) where `node` picks one part off the first
        axis: Gather with a scalar index, or Slice of one step then Squeeze, as torch's unbind
        exports; None otherwise."""
        if node.op_type == "Gather" and attribute_value(node, "axis", 0) == 0:
            index = node.input[1]
            return (int(constants[index]), [node]) if index in constants and constants[index].ndim == 0 else None
        if node.op_type != "Slice" or not 4 <= len(node.input) <= 5 or any(i not in constants for i in node.input[1:]):
            return None
        start, end, axes, *steps = (constants[i].reshape(-1).tolist() for i in node.input[1:])
        squeeze = only_reader(node.output[0])
        if axes != [0] or len(start) != 1 or end[0] != start[0] + 1 or steps not in ([], [[1]]) or squeeze is None \
                or squeeze.op_type != "Squeeze" or len(squeeze.input) != 2 or squeeze.input[1] not in constants \
                or constants[squeeze.input[1]].reshape(-1).tolist() != [0]:
            return None
        return start[0], [node, squeeze]

    def split(add, width: int):
        """The parts of a fused projection split after its head reshape: (the reshape, the
        transpose, each part's (picking nodes, chain, quantizer) in part order, a part's shape
        and perm); None where `add`'s readers do not make that pattern."""
        reshape = only_reader(add.output[0])
        if reshape is None or reshape.op_type != "Reshape" or reshape.input[1] not in constants:
            return None
        shape = constants[reshape.input[1]].astype(np.int64)
        transpose = only_reader(reshape.output[0])
        axis = len(shape) - 3
        if transpose is None or transpose.op_type != "Transpose" or axis < 1 or (shape[axis:] <= 0).any():
            return None
        perm = list(attribute_value(transpose, "perm") or [])
        pickers = readers.get(transpose.output[0], [])
        if perm[:1] != [axis] or int(np.prod(shape[axis:])) != width or len(pickers) != shape[axis]:
            return None
        parts = {}
        for picker in pickers:
            part = picked(picker)
            chain, quantize = requantizer(part[1][-1]) if part is not None else (None, None)
            if quantize is None:
                return None
            parts[part[0] % shape[axis]] = (part[1], chain, quantize)
        if sorted(parts) != list(range(shape[axis])):
            return None
        return reshape, transpose, [parts[i] for i in range(shape[axis])], np.delete(shape, axis), \
            [d - (d > axis) for d in perm[1:]]

    rewritten, removed, nodes, rows = 0, set(), [], {}  # rows: the 2-D codes of each input, shared by its readers

    def gemm(a, weight: str, bias: np.ndarray, bias_scale: np.ndarray, quantize, k: int) -> str:
        """Append Reshape(a codes, [-1, k]) (once per input) -> DQ -> Gemm(weight, DQ(int32 bias))
        -> Q(as `quantize`); returns the name of the 2-D codes."""
        out = quantize.output[0]
        if (a.input[0], k) not in rows:
            rows[a.input[0], k] = f"{out}_rows_codes"
            graph.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"{out}_rows"))
            nodes.append(helper.make_node("Reshape", [a.input[0], f"{out}_rows"], [f"{out}_rows_codes"]))
        graph.initializer.extend([
            numpy_helper.from_array(np.rint(bias / bias_scale).astype(np.int32), f"{out}_bias_codes"),
            numpy_helper.from_array(bias_scale, f"{out}_bias_scale"),
            numpy_helper.from_array(np.zeros(bias_scale.shape, np.int32), f"{out}_bias_zero")])
        nodes.extend([helper.make_node("DequantizeLinear", [rows[a.input[0], k], *a.input[1:3]], [f"{out}_rows_dq"]),
                      helper.make_node("DequantizeLinear", [f"{out}_bias_codes", f"{out}_bias_scale", f"{out}_bias_zero"],
                                       [f"{out}_bias_dq"], **({"axis": 0} if bias_scale.size > 1 else {})),
                      helper.make_node("Gemm", [f"{out}_rows_dq", weight, f"{out}_bias_dq"], [f"{out}_gemm"]),
                      helper.make_node("QuantizeLinear", [f"{out}_gemm", *quantize.input[1:3]], [f"{out}_gemm_codes"])])
        return f"{out}_gemm_codes"

    def reroute(chain, quantize, source: str) -> None:
        """The chain that led to `quantize` now reads the codes `source`, and its end is named
        as the quantizer's output was."""
        if chain:
            chain[0].input[0] = source
            chain[-1].output[0] = quantize.output[0]
        removed.add(id(quantize))

    for node in graph.node:
        a, b = (dequantize(node.input[0], False), dequantize(node.input[1], True)) if node.op_type == "MatMul" else (None, None)
        add = only_reader(node.output[0]) if a is not None and b is not None else None
        bias = next((i for i in add.input if i != node.output[0]), None) if add is not None and add.op_type == "Add" else None
        if bias not in constants or constants[a.input[1]].size != 1 or np.any(constants[b.input[2]]) \
                or _narrower(a, producer):
            nodes.append(node)
            continue
        k, n = constants.shape(b.input[0])
        weight_scale = constants[b.input[1]].astype(np.float32)
        bias_values = constants[bias].astype(np.float64).reshape(-1)
        bias_scale = (constants[a.input[1]].astype(np.float32).reshape(()) * weight_scale).astype(np.float32)
        if (weight_scale.size != 1 and (weight_scale.size != n or attribute_value(b, "axis", 1) % 2 != 1)) \
                or bias_values.size != n or np.abs(bias_values / bias_scale).max(initial=0) >= 2 ** 31:
            nodes.append(node)
            continue
        chain, quantize = requantizer(add)
        parts = split(add, n) if quantize is None else None
        quantizers = [quantize] if quantize is not None else [q for _, _, q in parts[2]] if parts is not None else []
        if not quantizers or 0.5 * float(bias_scale.max()) > MAX_BIAS_ROUNDING * min(
                float(constants[q.input[1]]) for q in quantizers) \
                or len({constants[q.input[2]].dtype for q in quantizers}) != 1:
            nodes.append(node)
            continue
        if parts is not None:
            # one Gemm for every part, re-quantized by the first part's (s0, z0): each column
            # of part p gets weight scale sw * s0 / sp and int32 bias b / (sa sw) + (zp - z0) sp / (sa sw),
            # so that the kernel's round(acc * sa sw / sp + bias codes) + zp is that part's own codes
            shared = quantizers[0]
            out_scale, out_zero = float(constants[shared.input[1]]), int(constants[shared.input[2]])
            columns = n // len(quantizers)
            ratio = np.repeat([out_scale / float(constants[q.input[1]]) for q in quantizers], columns)
            offset = np.repeat([int(constants[q.input[2]]) - out_zero for q in quantizers], columns)
            fused_step = (np.broadcast_to(weight_scale.reshape(-1), (n,)) * ratio).astype(np.float32)
            bias_values = bias_values * ratio + offset * out_scale
            bias_scale = (constants[a.input[1]].astype(np.float32).reshape(()) * fused_step).astype(np.float32)
            if np.abs(bias_values / bias_scale).max(initial=0) >= 2 ** 31:
                nodes.append(node)
                continue
        removed.add(id(add))
        if quantize is not None:
            source = gemm(a, b.output[0], bias_values, bias_scale, quantize, k)
            first = chain[0] if chain else None
            if first is None or first.op_type != "Reshape" or (first.input[1] in constants and not constants[first.input[1]].all()):
                # the rows back into the Linear's own output shape (a's with n last): nothing, or a
                # Reshape that copies a dimension (a 0), follows to do it
                out = quantize.output[0]
                shaped = f"{out}_codes" if chain else out
                graph.initializer.append(numpy_helper.from_array(np.array([n], np.int64), f"{out}_width"))
                nodes.extend([helper.make_node("Shape", [a.input[0]], [f"{out}_shape_in"], end=-1),
                              helper.make_node("Concat", [f"{out}_shape_in", f"{out}_width"], [f"{out}_shape"], axis=0),
                              helper.make_node("Reshape", [source, f"{out}_shape"], [shaped])])
                source = shaped
            reroute(chain, quantize, source)
            rewritten += 1
            continue
        reshape, transpose, pieces, shape, perm = parts
        removed |= {id(reshape), id(transpose)}
        out = shared.output[0]
        zero = np.zeros(n, constants[b.input[2]].dtype)
        graph.initializer.extend([numpy_helper.from_array(fused_step, f"{out}_fused_weight_scale"),
                                  numpy_helper.from_array(zero, f"{out}_fused_weight_zero"),
                                  numpy_helper.from_array(np.full(len(pieces), columns, np.int64), f"{out}_parts")])
        nodes.append(helper.make_node("DequantizeLinear", [b.input[0], f"{out}_fused_weight_scale", f"{out}_fused_weight_zero"],
                                      [f"{out}_fused_weight_dq"], axis=1))
        source = gemm(a, f"{out}_fused_weight_dq", bias_values, bias_scale, shared, k)
        nodes.append(helper.make_node("Split", [source, f"{out}_parts"], [f"{q.output[0]}_columns" for _, _, q in pieces],
                                      axis=1))
        for picking, chain, quantize in pieces:
            out = quantize.output[0]
            graph.initializer.append(numpy_helper.from_array(shape, f"{out}_part_shape"))
            nodes.extend([helper.make_node("Reshape", [f"{out}_columns", f"{out}_part_shape"], [f"{out}_part"]),
                          helper.make_node("Transpose", [f"{out}_part"], [f"{out}_heads" if chain else out], perm=perm)])
            reroute(chain, quantize, f"{out}_heads")
            removed |= {id(n) for n in picking}
        rewritten += 1
    if not rewritten:
        return 0
    del graph.node[:]
    graph.node.extend(n for n in nodes if id(n) not in removed)
    drop_unused(graph)
    return rewritten


def integer_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite each quantized matmul whose result is then scaled by a constant or gets a
    constant added (a Linear's bias, attention's 1/sqrt(d)): DQ(a) x DQ(b) -> MatMul -> Mul
    -> Add becomes MatMulInteger -> Cast -> Mul(scale) -> Add. Standard ONNX ops, the same
    arithmetic, and the form from which ONNX Runtime folds the scaling and the bias into its
    integer kernel (MatMulIntegerToFloat with bias); from DQ -> MatMul it makes the kernel
    without them, leaving a float Mul or Add per layer to run after it. An 8-bit matmul whose
    result is re-quantized directly keeps its QDQ form (the runtime makes that QLinearMatMul).
    Every matmul with an operand narrower than 8 bits is rewritten, its constant factor left a
    Mul of its own: the integer sum times sa * sb, as the fake-quant model computes it (see
    `edgeport.quant.ptq.on_integer_codes`).

    The scale is written as Mul(1, sa * sb) with the 1 coming out of DequantizeLinear: the
    runtime's fusion looks for that Mul node, and its constant folding, which would fold a
    Mul of constants away first, leaves DequantizeLinear outputs alone (an Abs after it keeps
    the runtime from copying that DequantizeLinear for every consumer). Returns how many
    matmuls were rewritten; TensorRT, which has no MatMulInteger, takes the QDQ form."""
    graph = model.graph
    constants = Constants(graph)
    producer = producers(graph)
    readers = consumers(graph)
    graph_outputs = {o.name for o in graph.output}

    def per_output_column(dq) -> bool:
        """A scale that factors out of the sum: one for the tensor, or one per column of a 2-D
        constant B (a Linear's weight, channel axis last)."""
        if constants[dq.input[1]].size == 1:
            return True
        axis = attribute_value(dq, "axis", 1)
        return dq.input[0] in constants and len(constants.shape(dq.input[0])) == 2 and axis in (1, -1)

    def follower(name: str, op_type: str):
        """The only consumer of `name` if it is `op_type` with a constant other operand."""
        users = readers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type or name in graph_outputs:
            return None, None
        other = next((i for i in users[0].input if i != name), None)
        return (users[0], other) if other in constants else (None, None)

    rewritten, removed, nodes = 0, set(), []
    for node in graph.node:
        a, b = ((_dequantizer(name, producer, constants) for name in node.input[:2]) if node.op_type == "MatMul"
                else (None, None))
        if a is None or b is None or constants[a.input[1]].size != 1 or not per_output_column(b):
            nodes.append(node)
            continue
        narrower = _narrower(a, producer) or _narrower(b, producer)
        mul, factor = follower(node.output[0], "Mul")
        if mul is not None and (constants[factor].size != 1 or narrower):
            mul = None  # below 8 bits the fake-quant model scales the sum, then multiplies by the factor
        add, bias = follower((mul or node).output[0], "Add")
        if mul is None and add is None and not narrower:
            nodes.append(node)
            continue
        rewritten += 1
        out = (add or mul or node).output[0]
        scale = constants[a.input[1]].astype(np.float32).reshape(()) * constants[b.input[1]].astype(np.float32)
        if mul is not None:
            scale = scale * constants[factor].astype(np.float32).reshape(())
        graph.initializer.append(numpy_helper.from_array(scale, f"{out}_int_scale"))
        nodes += [helper.make_node("MatMulInteger", [a.input[0], b.input[0], a.input[2], b.input[2]], [f"{out}_int"]),
                  helper.make_node("Cast", [f"{out}_int"], [f"{out}_acc"], to=onnx.TensorProto.FLOAT),
                  helper.make_node("Mul", [UNIT, f"{out}_int_scale"], [f"{out}_scale"]),
                  helper.make_node("Mul", [f"{out}_acc", f"{out}_scale"], [f"{out}_scaled" if add else out])]
        if add is not None:
            nodes.append(helper.make_node("Add", [f"{out}_scaled", bias], [out]))
        removed |= {id(n) for n in (mul, add) if n is not None}
    if not rewritten:
        return 0
    nodes[:0] = _unit_nodes(graph)
    del graph.node[:]
    graph.node.extend(n for n in nodes if id(n) not in removed)
    drop_unused(graph)
    return rewritten


UNIT = "edgeport_unit_scale"  # a 1.0 the runtime computes: see `integer_matmuls`


def _unit_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes that compute UNIT (DequantizeLinear of the code 1 at scale 1, then Abs) with
    their initializers added, or none where the graph has them already; `{UNIT}_one` is the
    constant 1.0 among those initializers."""
    if any(UNIT in node.output for node in graph.node):
        return []
    graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int8), f"{UNIT}_code"),
                              numpy_helper.from_array(np.array(1, np.float32), f"{UNIT}_one")])
    return [helper.make_node("DequantizeLinear", [f"{UNIT}_code", f"{UNIT}_one"], [f"{UNIT}_dq"]),
            helper.make_node("Abs", [f"{UNIT}_dq"], [UNIT])]


def _narrower(dq: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> bool:
    """Whether DequantizeLinear `dq` reads activation codes narrower than 8 bits: the Clip to
    the narrower range that `_qdq` writes after QuantizeLinear."""
    source = producer.get(dq.input[0])
    return source is not None and source.op_type == "Clip"


def code_domain_convs(model: onnx.ModelProto) -> int:
    """Rewrite each conv whose input codes are narrower than 8 bits, DQ(x) * DQ(W) -> Conv(bias),
    as Conv(DQ(x, 1), DQ(W, 1)) -> Mul(sx * sw) -> Add(bias): the float conv of the integer codes
    themselves, whose sums are exact in float32 in any order, scaled after, as the fake-quant
    model computes it (`edgeport.quant.ptq.on_integer_codes`). ONNX Runtime runs such convs in
    float either way; summing dequantized values in its order rather than torch's moved the
    next quantizer's codes. The scale is written as Mul(1, s) with the 1 from a
    DequantizeLinear, as in `integer_matmuls`, so that the runtime does not fold it back into
    the weights. Returns how many convs were rewritten."""
    graph = model.graph
    constants = Constants(graph)
    producer = producers(graph)
    rewritten, nodes = 0, []
    for node in graph.node:
        x, w = ((_dequantizer(name, producer, constants) for name in node.input[:2]) if node.op_type == "Conv"
                else (None, None))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if x is None or w is None or w.input[0] not in constants or constants[x.input[1]].size != 1 \
                or not _narrower(x, producer) or (bias is not None and bias not in constants):
            nodes.append(node)
            continue
        weight_scale = constants[w.input[1]].astype(np.float32)
        if weight_scale.size > 1 and attribute_value(w, "axis", 1) % 4 != 0:  # per output channel only
            nodes.append(node)
            continue
        rewritten += 1
        out, channels = node.output[0], constants.shape(w.input[0])[0]
        scale = constants[x.input[1]].astype(np.float32).reshape(()) * weight_scale
        graph.initializer.extend([
            numpy_helper.from_array(np.ones(weight_scale.shape, np.float32), f"{out}_unit_w"),
            numpy_helper.from_array(np.broadcast_to(scale.reshape(-1, 1, 1), (channels, 1, 1)).copy(), f"{out}_code_scale")])
        nodes += [helper.make_node("DequantizeLinear", [x.input[0], f"{UNIT}_one", x.input[2]], [f"{out}_x_codes"]),
                  helper.make_node("DequantizeLinear", [w.input[0], f"{out}_unit_w", w.input[2]], [f"{out}_w_codes"],
                                   **({} if weight_scale.ndim == 0 else {"axis": 0})),
                  helper.make_node("Conv", [f"{out}_x_codes", f"{out}_w_codes"], [f"{out}_sum"], name=node.name,
                                   **{a.name: helper.get_attribute_value(a) for a in node.attribute}),
                  helper.make_node("Mul", [UNIT, f"{out}_code_scale"], [f"{out}_scale"]),
                  helper.make_node("Mul", [f"{out}_sum", f"{out}_scale"], [out if bias is None else f"{out}_scaled"])]
        if bias is not None:
            graph.initializer.append(numpy_helper.from_array(
                constants[bias].astype(np.float32).reshape(-1, 1, 1), f"{out}_bias"))
            nodes.append(helper.make_node("Add", [f"{out}_scaled", f"{out}_bias"], [out]))
    if not rewritten:
        return 0
    nodes[:0] = _unit_nodes(graph)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused(graph)
    return rewritten


# input index of the integer weight and of its zero point, per op that reads one
_WEIGHT_INPUTS = {"DequantizeLinear": (0, 2), "MatMulInteger": (1, 3)}


def pairs_can_saturate(codes: np.ndarray) -> bool:
    """Whether int8 `codes` can overflow a 16-bit sum of two uint8 x int8 products (x86 CPUs
    without VNNI add them in pairs): only codes outside [-64, 63] can (255 x 64 x 2 < 32767)."""
    return codes.size > 0 and (int(codes.min()) < -64 or int(codes.max()) > 63)


def unsigned_weights(model: onnx.ModelProto) -> int:
    """Store every int8 weight as uint8 with zero point 128 more (w + 128): the same values,
    read by ONNX Runtime's u8 x u8 kernels instead of its u8 x s8 ones. On x86 CPUs without
    VNNI (AMD Zen 1-3, Intel Xeons before Cascade Lake, Intel client CPUs before Ice Lake) the
    u8 x s8 kernels add pairs of products in 16 bits (VPMADDUBSW), which saturate where a pair
    passes 32767 (255 x 127 x 2 does); the u8 x u8 ones widen first and are exact everywhere,
    for 0-8 % more latency there (the quant bench's `int8_weights` on an AVX2 AMD EPYC: DeiT-Ti
    at 64x64 1.00x, cosine to its fake-quant model 0.99968 against 0.99313;
    EfficientFormerV2-S0's integer convs 1.08x), but forgo VNNI and AMX where the CPU has them.
    Weights that cannot saturate (`pairs_can_saturate`: a 4- or 6-bit grid held in int8) stay
    int8, as do scalars (the unit-scale trick of `integer_matmuls`). ONNX Runtime's session
    option meant for this, `session.x64quantprecision`, fails to load these graphs (ONNX
    Runtime 1.32: "Attempt to replace the existing tensor"), and a user's session would have to
    set it. Returns how many weights were rewritten."""
    constants = Constants(model.graph)
    rewritten: dict[str, tuple[str, str]] = {}  # int8 weight -> its uint8 copy and that copy's zero point
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_INPUTS:
            continue
        weight_index, zero_index = _WEIGHT_INPUTS[node.op_type]
        weight = node.input[weight_index]
        if weight not in constants or constants[weight].dtype != np.int8 or constants[weight].ndim == 0:
            continue
        if weight not in rewritten:
            if not pairs_can_saturate(constants[weight]):
                continue
            # DequantizeLinear's zero point has its scale's shape; MatMulInteger's default is a scalar
            zero_name = node.input[zero_index] if len(node.input) > zero_index else ""
            shape = constants.shape(node.input[1]) if node.op_type == "DequantizeLinear" else ()
            zero = constants[zero_name] if zero_name else np.zeros(shape, np.int8)
            rewritten[weight] = (f"{weight}_u8", f"{weight}_u8_zero_point")
            for values, name in zip((constants[weight], zero), rewritten[weight]):
                model.graph.initializer.append(numpy_helper.from_array((values.astype(np.int16) + 128).astype(np.uint8),
                                                                       name))
        while len(node.input) <= zero_index:
            node.input.append("")
        node.input[weight_index], node.input[zero_index] = rewritten[weight]
    drop_unused(model.graph)
    return len(rewritten)
