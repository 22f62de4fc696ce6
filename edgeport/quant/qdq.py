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
