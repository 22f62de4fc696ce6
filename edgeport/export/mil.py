"""A reference interpreter of Core ML ML Programs (MIL): the numerical check of a Core ML
package where Core ML itself cannot run (Linux CI).

The saved `.mlpackage` is read through coremltools' own loaders — its protobuf spec, and the
milproto loader that rebuilds the MIL program with the weights from the package's weight
file; nothing is re-converted. The program is then evaluated op by op with numpy (torch for
convolutions, pooling windows and `erf`): one small function per MIL op in `OPS`, keyed by the
op's name as coremltools' op registry keys it and following the op's definition in
`coremltools/converters/mil/mil/ops/defs/` (iOS15 semantics, with the iOS17 changes in
`IOS17_OPS`, as the registry versions them). Every op's result is cast to the dtype and
checked against the shape the program declares for it, so an fp16 program runs in fp16: an op
computes in float32 from its fp16 inputs and its result is rounded to fp16, which is what the
program stores between ops. An op with no function here is named (`MILProgram.missing`) and
the program is not run: nothing passes unchecked.
"""
from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from edgeport.core import Runner
from edgeport.errors import BackendUnavailable, CheckFailed, UserError

IOS17_SPEC_VERSION = 8  # Core ML specification version of iOS17 programs (the iOS17 op set)
FP16_SUFFIX = "_cast_fp16"  # what coremltools' fp16 pass appends to the names of the vars it retypes

# --- elementwise ----------------------------------------------------------------------------


def _binary(function):
    """MIL names the operands `x` and `y`; numpy's ufuncs take them by position."""
    return lambda x, y: function(x, y)


def _unary(function):
    return lambda x: function(x)


def _erf(x: np.ndarray) -> np.ndarray:
    return torch.special.erf(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return torch.sigmoid(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()


ELEMENTWISE = {
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply),
    "real_div": _binary(np.true_divide), "floor_div": _binary(np.floor_divide), "mod": _binary(np.mod),
    "pow": _binary(np.power), "maximum": _binary(np.maximum), "minimum": _binary(np.minimum),
    "equal": _binary(np.equal), "not_equal": _binary(np.not_equal), "less": _binary(np.less),
    "less_equal": _binary(np.less_equal), "greater": _binary(np.greater), "greater_equal": _binary(np.greater_equal),
    "logical_and": _binary(np.logical_and), "logical_or": _binary(np.logical_or),
    "logical_xor": _binary(np.logical_xor), "logical_not": _unary(np.logical_not),
    "abs": _unary(np.abs), "acos": _unary(np.arccos), "asin": _unary(np.arcsin), "atan": _unary(np.arctan),
    "atanh": _unary(np.arctanh), "ceil": _unary(np.ceil), "cos": _unary(np.cos), "cosh": _unary(np.cosh),
    "erf": _unary(_erf), "exp": _unary(np.exp), "exp2": _unary(np.exp2), "floor": _unary(np.floor),
    "round": _unary(np.round), "sign": _unary(np.sign), "sin": _unary(np.sin), "sinh": _unary(np.sinh),
    "sqrt": _unary(np.sqrt), "square": _unary(np.square), "tan": _unary(np.tan), "tanh": _unary(np.tanh),
    "identity": _unary(np.asarray),
    # activations
    "relu": _unary(lambda x: np.maximum(x, 0)), "relu6": _unary(lambda x: np.clip(x, 0, 6)),
    "sigmoid": _unary(_sigmoid), "silu": _unary(lambda x: x * _sigmoid(x)),
    "softplus": _unary(lambda x: np.logaddexp(0, x)), "softsign": _unary(lambda x: x / (1 + np.abs(x))),
}


def log(x, epsilon=1e-45):
    """log(x + epsilon)."""
    return np.log(x + epsilon)


def rsqrt(x, epsilon=1e-12):
    """1 / sqrt(x + epsilon)."""
    return 1 / np.sqrt(x + epsilon)


def inverse(x, epsilon=1e-4):
    """1 / (x + epsilon)."""
    return 1 / (x + epsilon)


def clip(x, alpha, beta):
    return np.minimum(np.maximum(x, alpha), beta)


def threshold(x, alpha):
    return np.maximum(x, alpha)


def cast(x, dtype):
    """The conversion itself happens when the result takes the declared output dtype."""
    return x


def gelu(x, mode="EXACT"):
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def leaky_relu(x, alpha=0.01):
    return np.where(x >= 0, x, alpha * x)


def elu(x, alpha=1.0):
    return np.where(x > 0, x, alpha * (np.exp(x) - 1))


def prelu(x, alpha):
    """alpha per channel (axis 1)."""
    return np.where(x >= 0, x, _on_axis(alpha, 1, x.ndim) * x)


def clamped_relu(x, alpha, beta):
    return np.minimum(np.maximum(x, 0), beta) + alpha * np.minimum(x, 0)


def sigmoid_hard(x, alpha=0.2, beta=0.5):
    return np.clip(alpha * x + beta, 0, 1)


def softplus_parametric(x, alpha, beta):
    return _on_axis(alpha, 1, x.ndim) * np.logaddexp(0, _on_axis(beta, 1, x.ndim) * x)


def scaled_tanh(x, alpha=1.0, beta=1.0):
    return alpha * np.tanh(beta * x)


def linear_activation(x, alpha, beta=0.0):
    return alpha * x + beta


def thresholded_relu(x, alpha=1.0):
    """x where x >= alpha, else 0 (activation.py: x equal to alpha is kept)."""
    return np.where(x >= alpha, x, 0)


def softmax(x, axis=-1):
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


# --- linear algebra, convolution, pooling -------------------------------------------------------


def linear(x, weight, bias=None):
    """x @ weight^T + bias."""
    y = np.matmul(x, weight.T)
    return y if bias is None else y + bias


def matmul(x, y, transpose_x=False, transpose_y=False):
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def einsum(values, equation):
    return np.einsum(equation, *values)


def _spatial_pads(pad_type: str, pad, sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(before, after) per spatial dimension for `pad_type` valid, custom, same or same_lower
    (conv.py: same gives ceil(size / stride) outputs, same_lower puts an odd extra row first)."""
    if pad_type == "custom":
        return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(len(sizes))]
    if pad_type == "valid":
        return [(0, 0)] * len(sizes)
    if pad_type not in ("same", "same_lower"):
        raise InterpreterError(f"unknown pad_type {pad_type!r}")
    pads = []
    for size, k, stride, dilation in zip(sizes, kernel, strides, dilations):
        total = max((math.ceil(size / stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
        small = total // 2
        pads.append((small, total - small) if pad_type == "same" else (total - small, small))
    return pads


def _torch_pad(pads: list[tuple[int, int]]) -> list[int]:
    """F.pad's order: the last dimension first."""
    return [p for before_after in reversed(pads) for p in before_after]


def conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    spatial = weight.ndim - 2
    strides = [1] * spatial if strides is None else [int(s) for s in strides]
    dilations = [1] * spatial if dilations is None else [int(d) for d in dilations]
    pads = _spatial_pads(pad_type, pad, x.shape[2:], weight.shape[2:], strides, dilations)
    inputs = F.pad(torch.from_numpy(np.ascontiguousarray(x)), _torch_pad(pads))
    function = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    y = function(inputs, torch.from_numpy(np.ascontiguousarray(weight)),
                 None if bias is None else torch.from_numpy(np.ascontiguousarray(bias)),
                 stride=strides, dilation=dilations, groups=int(groups))
    return y.numpy()


def conv_transpose(x, weight, bias=None, pad=None, output_shape=None, pad_type="valid", strides=None,
                   dilations=None, groups=1):
    """weight [C_in, C_out / groups, *K]; `pad` removes rows from the full output."""
    spatial = weight.ndim - 2
    strides = [1] * spatial if strides is None else [int(s) for s in strides]
    dilations = [1] * spatial if dilations is None else [int(d) for d in dilations]
    function = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
    y = function(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(weight)),
                 None if bias is None else torch.from_numpy(np.ascontiguousarray(bias)), stride=strides,
                 dilation=dilations, groups=int(groups)).numpy()
    full = y.shape[2:]
    if output_shape is not None:
        wanted = [int(s) for s in output_shape][-spatial:]
        crops = [(0, f - w) for f, w in zip(full, wanted)]
    elif pad_type == "custom":
        crops = [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(spatial)]
    elif pad_type == "valid":
        crops = [(0, 0)] * spatial
    else:  # same: the output is input * stride, the surplus cropped (more at the end)
        surplus = [f - n * s for f, n, s in zip(full, x.shape[2:], strides)]
        crops = [(e // 2, e - e // 2) if pad_type == "same" else (e - e // 2, e // 2) for e in surplus]
    index = tuple(slice(b, f - a) for (b, a), f in zip(crops, full))
    return y[(slice(None), slice(None), *index)]


def _pool_geometry(sizes, kernel_sizes, strides, pad_type, pad, ceil_mode):
    """Kernel, strides, (before, after) padding and output size per spatial dimension, as
    pool.py defines them (ceil mode drops a last window that would start in the padding only
    when there is padding)."""
    kernel = [int(k) for k in kernel_sizes]
    strides = [1] * len(kernel) if strides is None else [int(s) for s in strides]
    pads = _spatial_pads(pad_type, pad, sizes, kernel, strides, [1] * len(kernel))
    outs = []
    for size, k, s, (before, after) in zip(sizes, kernel, strides, pads):
        span = size + before + after - k
        out = (span + s - 1) // s + 1 if ceil_mode else span // s + 1
        if ceil_mode and (out - 1) * s >= size + before and (before > 0 or after > 0):
            out -= 1
        outs.append(out)
    return kernel, strides, pads, outs


def _windows(x, kernel, strides, widths, outs, fill) -> np.ndarray:
    """The pooling windows of `x` padded by `widths` (its spatial dimensions), [..., *outs, *kernel];
    the end is padded further where the last window overhangs."""
    spatial = len(kernel)
    widths = [(b, max(a, (o - 1) * s + k - n - b)) for (b, a), o, s, k, n in
              zip(widths, outs, strides, kernel, x.shape[-spatial:])]
    padded = np.pad(x, [(0, 0)] * (x.ndim - spatial) + widths, constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=tuple(range(-spatial, 0)))
    index = tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(outs, strides))
    return windows[(Ellipsis, *index, *[slice(None)] * spatial)]


def max_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False):
    kernel, strides, pads, outs = _pool_geometry(x.shape[2:], kernel_sizes, strides, pad_type, pad, ceil_mode)
    return _windows(x, kernel, strides, pads, outs, -np.inf).max(axis=tuple(range(-len(kernel), 0)))


def avg_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, exclude_padding_from_average=False,
             ceil_mode=False):
    """The mean of each window; the count includes the declared padding unless
    `exclude_padding_from_average`, never the overhang ceil mode adds."""
    kernel, strides, pads, outs = _pool_geometry(x.shape[2:], kernel_sizes, strides, pad_type, pad, ceil_mode)
    axes = tuple(range(-len(kernel), 0))
    counted = np.pad(np.ones(x.shape[2:], dtype=np.float32), pads,
                     constant_values=0.0 if exclude_padding_from_average else 1.0)
    count = _windows(counted, kernel, strides, [(0, 0)] * len(kernel), outs, 0.0).sum(axis=axes)
    return _windows(x, kernel, strides, pads, outs, 0.0).sum(axis=axes) / count


def l2_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None):
    kernel, strides, pads, outs = _pool_geometry(x.shape[2:], kernel_sizes, strides, pad_type, pad, False)
    return np.sqrt((_windows(x, kernel, strides, pads, outs, 0.0) ** 2).sum(axis=tuple(range(-len(kernel), 0))))


# --- normalization and reductions ------------------------------------------------------------


def _on_axis(vector, axis: int, rank: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along `axis` of a rank-`rank` tensor."""
    vector = np.asarray(vector)
    if vector.ndim == 0 or vector.size == 1:
        return vector.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return vector.reshape(shape)


def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    axes = tuple(range(x.ndim)) if axes is None else tuple(int(a) % x.ndim for a in np.atleast_1d(axes))
    mean = x.mean(axis=axes, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(variance + epsilon)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if gamma is not None:
        y = y * np.reshape(gamma, shape)
    if beta is not None:
        y = y + np.reshape(beta, shape)
    return y


def batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    y = (x - _on_axis(mean, 1, x.ndim)) / np.sqrt(_on_axis(variance, 1, x.ndim) + epsilon)
    if gamma is not None:
        y = y * _on_axis(gamma, 1, x.ndim)
    return y if beta is None else y + _on_axis(beta, 1, x.ndim)


def instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + epsilon)
    if gamma is not None:
        y = y * _on_axis(gamma, 1, x.ndim)
    return y if beta is None else y + _on_axis(beta, 1, x.ndim)


def _reduction(function):
    def reduce(x, axes=None, keep_dims=False):
        axis = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
        return function(x, axis=axis, keepdims=bool(keep_dims))
    return reduce


REDUCTIONS = {
    "reduce_mean": _reduction(np.mean), "reduce_sum": _reduction(np.sum), "reduce_max": _reduction(np.max),
    "reduce_min": _reduction(np.min), "reduce_prod": _reduction(np.prod),
    "reduce_l1_norm": _reduction(lambda x, **k: np.abs(x).sum(**k)),
    "reduce_l2_norm": _reduction(lambda x, **k: np.sqrt((x ** 2).sum(**k))),
    "reduce_sum_square": _reduction(lambda x, **k: (x ** 2).sum(**k)),
    "reduce_log_sum": _reduction(lambda x, **k: np.log(x.sum(**k))),
    "reduce_log_sum_exp": _reduction(lambda x, **k: np.logaddexp.reduce(x, **k)),
}


def _arg_reduction(function):
    def reduce(x, axis=-1, keep_dims=False, output_dtype="int32"):
        y = function(x, axis=int(axis))
        return np.expand_dims(y, int(axis)) if keep_dims else y
    return reduce


# --- tensor shapes, slicing and gathering ----------------------------------------------------


def reshape(x, shape):
    """0 keeps the input's dimension (when the ranks agree), -1 is inferred."""
    shape = [int(d) for d in np.atleast_1d(shape)]
    if len(shape) == x.ndim:
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return np.reshape(x, shape)


def transpose(x, perm):
    return np.transpose(x, [int(p) for p in perm])


def expand_dims(x, axes):
    """`axes` are positions in the output (negative ones counted from its end)."""
    rank = x.ndim + len(np.atleast_1d(axes))
    return np.expand_dims(x, tuple(int(a) % rank for a in np.atleast_1d(axes)))


def squeeze(x, axes=None):
    """Only axes of size 1 go (PyTorch's rule: others are ignored, not an error)."""
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, tuple(int(a) % x.ndim for a in np.atleast_1d(axes) if x.shape[int(a)] == 1))


def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    index = []
    for i in range(x.ndim):
        if squeeze_mask is not None and squeeze_mask[i]:
            index.append(int(begin[i]))
            continue
        start = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        stop = None if end_mask is not None and end_mask[i] else int(end[i])
        index.append(slice(start, stop, 1 if stride is None else int(stride[i])))
    return x[tuple(index)]


def slice_by_size(x, begin, size):
    """size -1 runs to the end of the dimension."""
    return x[tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))]


def concat(values, axis, interleave=False):
    """Scalars join as one-element vectors (shape arithmetic concatenates them)."""
    values = [np.atleast_1d(v) for v in values]
    if interleave:
        stacked = np.stack(values, axis=int(axis) + 1)
        shape = list(values[0].shape)
        shape[int(axis)] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=int(axis))


def stack(values, axis=0):
    return np.stack(values, axis=int(axis))


def split(x, axis, num_splits=None, split_sizes=None):
    if split_sizes is None:
        return tuple(np.split(x, int(num_splits), axis=int(axis)))
    return tuple(np.split(x, np.cumsum([int(s) for s in split_sizes])[:-1], axis=int(axis)))


def tile(x, reps):
    return np.tile(x, [int(r) for r in reps])


def pad(x, pad, mode="constant", constant_val=0.0):
    """`pad` covers the last len(pad) / 2 dimensions, before and after each."""
    count = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - count) + [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(count)]
    if mode == "constant":
        return np.pad(x, widths, constant_values=constant_val)
    return np.pad(x, widths, mode={"reflect": "reflect", "replicate": "edge"}[mode])


def _valid_indices(indices, size: int, negative_allowed: bool) -> np.ndarray:
    """Indices within the axis; negative ones count from the end where the op set allows them
    (iOS15/16), and are out of bounds from iOS17 on."""
    indices = np.asarray(indices).astype(np.int64)
    low = -size if negative_allowed else 0
    if indices.size and (indices.min() < low or indices.max() >= size):
        raise InterpreterError(f"index out of bounds: values span {indices.min()}..{indices.max()} for an axis "
                               f"of {size}" + ("" if negative_allowed else " (iOS17+ gathers take no negative index)"))
    return np.where(indices < 0, indices + size, indices)


def _gather(negative_allowed: bool):
    def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
        axis, batch_dims = int(axis) % x.ndim, int(batch_dims)
        indices = _valid_indices(indices, x.shape[axis], negative_allowed)
        if batch_dims == 0:
            return np.take(x, indices, axis=axis)
        batch = x.shape[:batch_dims]
        return np.stack([np.take(x[b], indices[b], axis=axis - batch_dims)
                         for b in np.ndindex(*batch)]).reshape(*batch, *(
                             x.shape[batch_dims:axis] + indices.shape[batch_dims:] + x.shape[axis + 1:]))
    return gather


def _gather_along_axis(negative_allowed: bool):
    def gather_along_axis(x, indices, axis=0, validate_indices=False):
        axis = int(axis) % x.ndim
        return np.take_along_axis(x, _valid_indices(indices, x.shape[axis], negative_allowed), axis=axis)
    return gather_along_axis


def _gather_nd(negative_allowed: bool):
    def gather_nd(x, indices, batch_dims=0, validate_indices=False):
        batch_dims, depth = int(batch_dims), indices.shape[-1]
        checked = np.stack([_valid_indices(indices[..., i], x.shape[batch_dims + i], negative_allowed)
                            for i in range(depth)], axis=-1)
        if batch_dims == 0:
            return x[tuple(np.moveaxis(checked, -1, 0))]
        batch = x.shape[:batch_dims]
        parts = [x[b][tuple(np.moveaxis(checked[b], -1, 0))] for b in np.ndindex(*batch)]
        return np.stack(parts).reshape(*batch, *parts[0].shape)
    return gather_nd


# how a scatter combines an update with the value already there (scatter_gather.py's modes);
# the unbuffered ufunc.at applies repeated indices one after another, as a scatter does
SCATTER_MODES = {"add": np.add.at, "sub": np.subtract.at, "mul": np.multiply.at, "div": np.divide.at,
                 "max": np.maximum.at, "min": np.minimum.at}


def _scatter_into(data, positions: tuple[np.ndarray, ...], updates, mode: str) -> np.ndarray:
    """A copy of `data` with each element of `updates` combined, by `mode`, into the element
    of `data` that `positions` (one index array per axis of data, shaped like updates) names."""
    out = np.array(data, copy=True)
    updates = np.asarray(updates).astype(out.dtype, copy=False)
    if str(mode) == "update":
        out[positions] = updates
    elif str(mode) in SCATTER_MODES:
        SCATTER_MODES[str(mode)](out, positions, updates)
    else:
        raise InterpreterError(f"unknown scatter mode {mode!r}")
    return out


def _scatter(negative_allowed: bool):
    def scatter(data, indices, updates, axis=0, mode="add", validate_indices=False):
        """updates[..., i, ...] into data[..., indices[i], ...] along `axis`."""
        axis = int(axis) % data.ndim
        indices = _valid_indices(indices, data.shape[axis], negative_allowed)
        positions = list(np.indices(updates.shape, sparse=True))
        positions[axis] = indices[positions[axis]]
        return _scatter_into(data, tuple(positions), updates, mode)
    return scatter


def _scatter_along_axis(negative_allowed: bool):
    def scatter_along_axis(data, indices, updates, axis=0, mode="add", validate_indices=False):
        """updates[p] into data at p with its `axis` coordinate replaced by indices[p]."""
        axis = int(axis) % data.ndim
        positions = list(np.indices(updates.shape, sparse=True))
        positions[axis] = _valid_indices(indices, data.shape[axis], negative_allowed)
        return _scatter_into(data, tuple(np.broadcast_arrays(*positions)), updates, mode)
    return scatter_along_axis


def _scatter_nd(negative_allowed: bool):
    def scatter_nd(data, indices, updates, mode="add", validate_indices=False):
        """updates[i] into the slice data[indices[i]] (indices' last axis indexes data's first ones)."""
        depth = indices.shape[-1]
        lead, trail = indices.shape[:-1], data.shape[depth:]
        into_lead = lambda a: a.reshape(*lead, *[1] * len(trail))  # noqa: E731
        heads = [into_lead(_valid_indices(indices[..., i], data.shape[i], negative_allowed)) for i in range(depth)]
        tails = [a.reshape(*[1] * len(lead), *a.shape) for a in np.indices(trail, sparse=True)]
        return _scatter_into(data, tuple(np.broadcast_arrays(*heads, *tails)), updates, mode)
    return scatter_nd


def non_zero(x):
    """[N, rank] indices of the N non-zero elements, in row-major order."""
    return np.argwhere(x)


def select(cond, a, b):
    return np.where(cond, a, b)


def shape(x):
    return np.array(x.shape, dtype=np.int32)


def fill(shape, value=0.0):
    return np.full([int(d) for d in np.atleast_1d(shape)], value)


def fill_like(ref_tensor, value=0.0):
    return np.full(ref_tensor.shape, value)


def range_1d(end, start, step):
    return np.arange(start, end, step)


def cumsum(x, axis=0, exclusive=False, reverse=False):
    axis = int(axis)
    y = np.flip(x, axis) if reverse else x
    y = np.cumsum(y, axis=axis)
    if exclusive:
        y = np.concatenate([np.zeros_like(np.take(y, [0], axis=axis)), np.delete(y, -1, axis=axis)], axis=axis)
    return np.flip(y, axis) if reverse else y


def band_part(x, lower=-1, upper=-1):
    """Keep the band of the last two dimensions; a negative bound keeps that whole triangle."""
    rows, cols = np.indices(x.shape[-2:])
    keep = ((lower < 0) | (rows - cols <= lower)) & ((upper < 0) | (cols - rows <= upper))
    return np.where(keep, x, 0)


def topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    order = np.argsort(x if ascending else -x, axis=int(axis), kind="stable")
    indices = np.take(order, np.arange(int(k)), axis=int(axis))
    return np.take_along_axis(x, indices, axis=int(axis)), indices


def argsort(x, axis=-1, ascending=False):
    return np.argsort(x if ascending else -x, axis=int(axis), kind="stable")


def one_hot(indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    hot = np.arange(int(one_hot_vector_size)) == np.asarray(indices)[..., None]
    return np.moveaxis(np.where(hot, on_value, off_value), -1, int(axis))


def flatten2d(x, axis=1):
    return x.reshape(math.prod(x.shape[:int(axis)]), -1)


def reverse(x, axes=None):
    return np.flip(x, None if axes is None else tuple(int(a) for a in axes))


def crop(x, crop_height, crop_width):
    """Remove rows from the top and bottom and columns from the left and right."""
    (top, bottom), (left, right) = (int(c) for c in crop_height), (int(c) for c in crop_width)
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]


def pixel_shuffle(x, upscale_factor):
    return F.pixel_shuffle(torch.from_numpy(np.ascontiguousarray(x)), int(upscale_factor)).numpy()


def pixel_unshuffle(x, downscale_factor):
    return F.pixel_unshuffle(torch.from_numpy(np.ascontiguousarray(x)), int(downscale_factor)).numpy()


def upsample_nearest_neighbor(x, scale_factor_height=1, scale_factor_width=1):
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), mode="nearest",
                         scale_factor=(float(scale_factor_height), float(scale_factor_width))).numpy()


def upsample_bilinear(x, scale_factor_height=1, scale_factor_width=1, align_corners=False, half_pixel_centers=None):
    if half_pixel_centers is not None and bool(half_pixel_centers) == bool(align_corners):
        raise InterpreterError("upsample_bilinear with half_pixel_centers == align_corners has no torch equivalent")
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), mode="bilinear",
                         scale_factor=(float(scale_factor_height), float(scale_factor_width)),
                         align_corners=bool(align_corners), recompute_scale_factor=False).numpy()


def scaled_dot_product_attention(query, key, value, attn_mask=None):
    """softmax(Q K^T / sqrt(E) + mask) V; a bool mask keeps where True."""
    scores = np.matmul(query, np.swapaxes(key, -1, -2)) / math.sqrt(query.shape[-1])
    if attn_mask is not None:
        scores = np.where(attn_mask, scores, -np.inf) if attn_mask.dtype == np.bool_ else scores + attn_mask
    return np.matmul(softmax(scores, -1), value)


# --- quantization and compressed weights -----------------------------------------------------

INTEGER_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def quantize(input, scale, output_dtype, zero_point=None, axis=None):
    """clip(round(input / scale) + zero_point), round half to even, per tensor or along `axis`."""
    rank = input.ndim
    scale = _on_axis(scale, int(axis) if axis is not None else 0, rank)
    zero = 0 if zero_point is None else _on_axis(zero_point, int(axis) if axis is not None else 0, rank)
    low, high = INTEGER_RANGES[str(output_dtype)]
    return np.clip(np.rint(input / scale) + zero, low, high)


def dequantize(input, scale, zero_point=None, axis=None):
    """scale * (input - zero_point)."""
    rank = input.ndim
    zero = 0 if zero_point is None else _on_axis(zero_point, int(axis) if axis is not None else 0, rank)
    return _on_axis(scale, int(axis) if axis is not None else 0, rank) * (input.astype(np.float32) - zero)


def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    return dequantize(quantized_data, scale, zero_point, axis)


def constexpr_blockwise_shift_scale(data, scale, offset=None):
    """scale * (data - offset), each scale covering a block of data.shape / scale.shape."""
    blocks = [d // s for d, s in zip(data.shape, scale.shape)]
    expand = lambda t: t.repeat(blocks[0], 0) if t.ndim == 1 else _repeat_blocks(t, blocks)  # noqa: E731
    values = data.astype(np.float32)
    if offset is not None:
        values = values - expand(np.asarray(offset, dtype=np.float32))
    return expand(np.asarray(scale, dtype=np.float32)) * values


def _repeat_blocks(t: np.ndarray, blocks: list[int]) -> np.ndarray:
    for axis, block in enumerate(blocks):
        if block > 1:
            t = np.repeat(t, block, axis)
    return t


def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """`count` unsigned `bits`-bit values packed least significant bit first (constexpr_ops.py)."""
    flat = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[:count * bits]
    return (flat.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


def constexpr_lut_to_dense(indices, lut, shape=None, vector_axis=None):
    """Palettized weights. iOS16: `indices` packed in bytes, one `lut` of 2^bits entries, the
    output `shape`. iOS18: `indices` unpacked with the output's shape, `lut` [*blocks,
    palette, vector] (one palette per block; vectors laid along `vector_axis`)."""
    if shape is not None:
        count, bits = math.prod(int(d) for d in shape), int(math.log2(len(lut)))
        return np.asarray(lut)[_unpack_bits(indices, bits, count)].reshape([int(d) for d in shape])
    indices = np.asarray(indices).astype(np.int64)
    rank = indices.ndim
    palettes = _repeat_blocks(np.asarray(lut), [i // p for i, p in zip(indices.shape, lut.shape[:rank])])
    vectors = np.take_along_axis(palettes, indices[..., None, None], axis=rank)[..., 0, :]  # [*S, V]
    if vectors.shape[-1] == 1:
        return vectors[..., 0]
    axis = int(vector_axis) % rank
    out_shape = list(indices.shape)
    out_shape[axis] *= vectors.shape[-1]
    return np.moveaxis(vectors, -1, axis + 1).reshape(out_shape)


def constexpr_sparse_to_dense(nonzero_data, mask, shape=None):
    """Pruned weights: `nonzero_data` in row-major order where `mask` is set (iOS16: the mask
    packed in bytes with the output `shape`; iOS18: the mask unpacked)."""
    if shape is not None:
        dims = [int(d) for d in shape]
        mask = _unpack_bits(mask, 1, math.prod(dims)).reshape(dims)
    dense = np.zeros(mask.shape, dtype=np.asarray(nonzero_data).dtype)
    dense[np.asarray(mask).astype(bool)] = nonzero_data
    return dense


def constexpr_cast(source_val, output_dtype):
    return source_val


# --- the op table ------------------------------------------------------------------------------

OPS = {
    **ELEMENTWISE, **REDUCTIONS,
    "log": log, "rsqrt": rsqrt, "inverse": inverse, "clip": clip, "threshold": threshold, "cast": cast,
    "gelu": gelu, "leaky_relu": leaky_relu, "elu": elu, "prelu": prelu, "clamped_relu": clamped_relu,
    "sigmoid_hard": sigmoid_hard, "softplus_parametric": softplus_parametric, "scaled_tanh": scaled_tanh,
    "linear_activation": linear_activation, "thresholded_relu": thresholded_relu, "softmax": softmax,
    "linear": linear, "matmul": matmul, "einsum": einsum, "conv": conv, "conv_transpose": conv_transpose,
    "max_pool": max_pool, "avg_pool": avg_pool, "l2_pool": l2_pool,
    "layer_norm": layer_norm, "batch_norm": batch_norm, "instance_norm": instance_norm,
    "reduce_argmax": _arg_reduction(np.argmax), "reduce_argmin": _arg_reduction(np.argmin),
    "reshape": reshape, "transpose": transpose, "expand_dims": expand_dims, "squeeze": squeeze,
    "slice_by_index": slice_by_index, "slice_by_size": slice_by_size, "concat": concat, "stack": stack,
    "split": split, "tile": tile, "pad": pad, "select": select, "non_zero": non_zero, "shape": shape, "fill": fill,
    "fill_like": fill_like, "range_1d": range_1d, "cumsum": cumsum, "band_part": band_part, "topk": topk,
    "argsort": argsort, "one_hot": one_hot, "flatten2d": flatten2d, "reverse": reverse,
    "crop": crop, "pixel_shuffle": pixel_shuffle, "pixel_unshuffle": pixel_unshuffle,
    "upsample_nearest_neighbor": upsample_nearest_neighbor,
    "upsample_bilinear": upsample_bilinear, "scaled_dot_product_attention": scaled_dot_product_attention,
    "gather": _gather(negative_allowed=True), "gather_along_axis": _gather_along_axis(negative_allowed=True),
    "gather_nd": _gather_nd(negative_allowed=True),
    "scatter": _scatter(negative_allowed=True), "scatter_along_axis": _scatter_along_axis(negative_allowed=True),
    "scatter_nd": _scatter_nd(negative_allowed=True),
    "quantize": quantize, "dequantize": dequantize, "constexpr_affine_dequantize": constexpr_affine_dequantize,
    "constexpr_blockwise_shift_scale": constexpr_blockwise_shift_scale,
    "constexpr_lut_to_dense": constexpr_lut_to_dense, "constexpr_sparse_to_dense": constexpr_sparse_to_dense,
    "constexpr_cast": constexpr_cast,
}
# iOS17 changed the gathers and scatters: a negative index is out of bounds (iOS17/scatter_gather.py)
IOS17_OPS = {"gather": _gather(negative_allowed=False),
             "gather_along_axis": _gather_along_axis(negative_allowed=False),
             "gather_nd": _gather_nd(negative_allowed=False), "scatter": _scatter(negative_allowed=False),
             "scatter_along_axis": _scatter_along_axis(negative_allowed=False),
             "scatter_nd": _scatter_nd(negative_allowed=False)}


# --- loading and evaluating a program ----------------------------------------------------------


class InterpreterError(Exception):
    """An op whose inputs break its definition (an index out of bounds, a result of another
    shape than the program declares): the package does not compute what it says."""


@dataclass
class Step:
    """One op of the program: its type and name, its inputs (var names, or lists of them for
    variadic inputs), and the names, dtypes and declared shapes of its outputs."""

    op_type: str
    name: str
    inputs: dict[str, str | list[str]]
    outputs: list[str]
    dtypes: list[np.dtype]
    shapes: list[tuple]


@dataclass
class OpOutput:
    """One op's output from a run: what localization compares with the torch model's."""

    op: str
    op_type: str
    name: str
    value: np.ndarray


def import_coremltools_quietly() -> ModuleType:
    """coremltools, its first import silenced: importing it warns that this torch and
    scikit-learn are untested versions and, off macOS, logs each native proxy it cannot load,
    none of which is the user's to act on. Later imports of it print nothing more."""
    from edgeport.export.onnx import quiet

    with quiet():
        import coremltools
    return coremltools


class MILProgram:
    """The main function of a saved ML Program, ready to evaluate with `run`.

    `missing` names the op types the interpreter has no function for (then `run` refuses);
    `precision` is "fp16" where the program computes (mostly) in fp16, else "fp32".
    """

    def __init__(self, path: str | Path):
        from edgeport.export.onnx import quiet

        ct = import_coremltools_quietly()
        from coremltools.converters.mil.frontend.milproto.load import load as load_program
        from coremltools.converters.mil.mil import types

        self.path = Path(path)
        try:
            with quiet():
                model = ct.models.MLModel(str(self.path), skip_model_load=True)
                spec = model.get_spec()
                program = load_program(spec, specification_version=spec.specificationVersion,
                                       file_weights_dir=model.weights_dir)
        except Exception as error:  # coremltools' loaders raise many types on a broken package
            raise UserError(f"coremltools cannot load {self.path} as an ML Program: "
                            f"{str(error).splitlines()[0][:300]}") from error
        function = program.functions["main"]
        self.spec_version = spec.specificationVersion
        self.ops = dict(OPS, **(IOS17_OPS if self.spec_version >= IOS17_SPEC_VERSION else {}))
        self.input_names = list(function.inputs)
        self.input_dtypes = {n: np.dtype(types.nptype_from_builtin(v.dtype)) for n, v in function.inputs.items()}
        self.output_names = [v.name for v in function.outputs]
        self.constants: dict[str, np.ndarray] = {}
        self.steps: list[Step] = []
        for op in function.operations:
            if op.op_type == "const":
                value = op.outputs[0].val
                self.constants[op.outputs[0].name] = value if isinstance(value, str) else np.asarray(value)
                continue
            inputs = {key: [v.name for v in var] if isinstance(var, (list, tuple)) else var.name
                      for key, var in op.inputs.items()}
            self.steps.append(Step(op.op_type, op.name, inputs, [v.name for v in op.outputs],
                                   [np.dtype(types.nptype_from_builtin(v.dtype)) for v in op.outputs],
                                   [tuple(v.shape) for v in op.outputs]))
        self.missing = sorted({s.op_type for s in self.steps if s.op_type not in self.ops})
        floats = collections.Counter(d.name for s in self.steps if not s.op_type.startswith("constexpr_")
                                     for d in s.dtypes if d.kind == "f")
        # an fp32 program may still cast a mask to fp16 here and there: the bulk decides
        self.precision = "fp16" if floats["float16"] > floats["float32"] else "fp32"

    def run(self, feeds: dict[str, np.ndarray], trace: bool = False
            ) -> tuple[dict[str, np.ndarray], list[OpOutput]]:
        """The program's outputs for `feeds` (keyed by its input names), and with `trace`
        every op's outputs in program order."""
        if self.missing:
            raise InterpreterError(f"no implementation of op {', '.join(self.missing)}")
        values = dict(self.constants)
        for name in self.input_names:
            values[name] = _as_input(name, feeds[name], self.input_dtypes[name])
        with _one_torch_thread():
            return self._evaluate(values, trace)

    def _evaluate(self, values: dict, trace: bool) -> tuple[dict[str, np.ndarray], list[OpOutput]]:
        outputs: list[OpOutput] = []
        for step in self.steps:
            arguments = {key: [_compute_dtype(values[r]) for r in ref] if isinstance(ref, list)
                         else _compute_dtype(values[ref]) for key, ref in step.inputs.items()}
            try:
                with np.errstate(all="ignore"):  # inf and NaN are results to compare, not errors
                    result = self.ops[step.op_type](**arguments)
            except InterpreterError as error:
                raise InterpreterError(f"op {step.name} ({step.op_type}): {error}") from error
            except Exception as error:  # numpy's own errors: this interpreter could not evaluate the op
                raise BackendUnavailable("coreml", f"the MIL interpreter could not evaluate op {step.name} "
                                                   f"({step.op_type}): {str(error).splitlines()[0][:200]}",
                                         "verify the package on a Mac") from error
            results = result if isinstance(result, tuple) else (result,)
            for name, value, dtype, declared in zip(step.outputs, results, step.dtypes, step.shapes):
                value = np.asarray(value).astype(dtype, copy=False)
                fixed = [(d, n) for d, n in zip(declared, value.shape) if isinstance(d, int)]  # not the flexible ones
                if len(declared) != value.ndim or any(d != n for d, n in fixed):
                    raise InterpreterError(f"op {step.name} ({step.op_type}) gives shape {list(value.shape)}, the "
                                           f"program declares {list(declared)}")
                values[name] = value
                if trace:
                    outputs.append(OpOutput(step.name, step.op_type, name, value))
        return {name: values[name] for name in self.output_names}, outputs


@contextlib.contextmanager
def _one_torch_thread():
    """torch's ops on one thread while the program runs: its thread pool costs milliseconds per
    op on the small tensors of one inference (16 ms for one erf on 2 busy cores, 7 us alone)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _compute_dtype(value):
    """fp16 values computed on in float32 (the result is rounded back to the declared fp16)."""
    return value.astype(np.float32) if isinstance(value, np.ndarray) and value.dtype == np.float16 else value


def _as_input(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A feed in the program's input dtype; integers must fit (Core ML takes int32, torch int64)."""
    array = np.asarray(array)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype, np.integer) and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise UserError(f"input {name!r} holds values outside {dtype.name}, the type the Core ML package takes")
    return array.astype(dtype, copy=False)


class MILInterpreterRunner(Runner):
    """A Core ML package run by the MIL interpreter (`MILProgram`), where Core ML cannot run.

    Feeds may use the model's own input names where coremltools renamed them (`state`, a
    reserved word in MIL, becomes `state_workaround`): `input_map` maps the model's names to
    the package's. `intermediates(feeds)` gives every op's output for localization, named as
    the torch.export graph that was converted names them.
    """

    def __init__(self, path: str | Path, input_map: dict[str, str] | None = None):
        self.path, self.input_map = Path(path), dict(input_map or {})
        self.name, self.device, self.program = "mil-interpreter", "cpu", None

    def load(self) -> "MILInterpreterRunner":
        self.program = MILProgram(self.path)
        if self.program.missing:
            raise BackendUnavailable("coreml", "the MIL interpreter has no implementation of op "
                                               + ", ".join(self.program.missing), "verify the package on a Mac")
        self.name = f"mil-interpreter ({self.program.precision})"
        self.input_names = list(self.program.input_names)
        self.output_names = list(self.program.output_names)
        return self

    def _feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        renamed = {self.input_map.get(name, name): array for name, array in feeds.items()}
        missing = [n for n in self.input_names if n not in renamed]
        if missing:
            raise UserError(f"the Core ML package needs inputs {missing}; got {sorted(feeds)}")
        return renamed

    def _run(self, feeds: dict[str, np.ndarray], trace: bool):
        try:
            return self.program.run(self._feeds(feeds), trace=trace)
        except InterpreterError as error:
            raise CheckFailed(f"{self.path.name}: {error}") from error

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(feeds, trace=False)[0]

    def intermediates(self, feeds: dict[str, np.ndarray]) -> list[OpOutput]:
        """Every op's output in program order, its name without the suffix coremltools'
        fp16 pass adds, so that it matches the torch graph's node name."""
        return [OpOutput(o.op, o.op_type, o.name.removesuffix(FP16_SUFFIX), o.value)
                for o in self._run(feeds, trace=True)[1]]
