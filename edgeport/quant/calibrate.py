"""Observers: how a quantizer's range is chosen from calibration data.

Each observer maps (tensor, quantizer) to per-channel (low, high) along the quantizer's
axis (one value when per tensor). `mse` tries min-max and the 99.9/99.99/99.999th
percentiles and keeps, per channel, the range whose fake-quantized values are closest to
the data (mean squared error): the calibration error chooses, not the recipe. `entropy`
is TensorRT's KL calibration: the clipping threshold whose quantized histogram loses the
least information (KL divergence) against the data's. `dualclip` searches a lower and an
upper clip apart (RepQuant's dual clipping). `clip` shrinks each channel's range by the ratio,
down to a half, with the least error (weights at 4 bits).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from edgeport.errors import UserError

PERCENTILES = (0.999, 0.9999, 0.99999)
MAX_QUANTILE_ELEMENTS = 1 << 22  # torch.quantile refuses very large inputs; subsample beyond this


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """x as (channels, values): one row per channel, or a single row per tensor."""
    rows = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if rows.shape[1] > MAX_QUANTILE_ELEMENTS // rows.shape[0]:
        step = rows.shape[1] // (MAX_QUANTILE_ELEMENTS // rows.shape[0]) + 1
        rows = rows[:, ::step]
    return rows.float()


def minmax(x: torch.Tensor, quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the smallest and largest value: nothing clipped."""
    rows = _rows(x, quantizer.axis)
    return _shape(rows.min(1).values, quantizer), _shape(rows.max(1).values, quantizer)


def percentile(x: torch.Tensor, quantizer, p: float = 0.9999) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the (1 - p) and p quantiles: the rarest outliers clipped."""
    rows = _rows(x, quantizer.axis)
    return (_shape(torch.quantile(rows, 1 - p, dim=1), quantizer),
            _shape(torch.quantile(rows, p, dim=1), quantizer))


def _shape(values: torch.Tensor, quantizer) -> torch.Tensor:
    return values.reshape(()) if quantizer.axis is None else values


def _tail_bounds(x: torch.Tensor, quantizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Candidate lower and upper bounds per channel: the extreme, then the PERCENTILES on that side."""
    rows = _rows(x, quantizer.axis)
    # one sort for every percentile: torch.quantile per candidate was most of MiniLM's calibration time
    levels = torch.tensor([1 - p for p in PERCENTILES] + list(PERCENTILES), dtype=rows.dtype)
    bounds = torch.quantile(rows, levels, dim=1)
    count = len(PERCENTILES)
    lows = [rows.min(1).values] + [bounds[i] for i in range(count)]
    highs = [rows.max(1).values] + [bounds[count + i] for i in range(count)]
    return [_shape(low, quantizer) for low in lows], [_shape(high, quantizer) for high in highs]


def _error(x: torch.Tensor, quantizer, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Per channel, the mean squared error of x fake-quantized to the range [low, high]."""
    quantizer.set_range(low, high)
    error = (quantizer(x) - x) ** 2
    return error.mean() if quantizer.axis is None else error.movedim(quantizer.axis, 0).reshape(
        x.shape[quantizer.axis], -1).mean(1)


def _least_error(x: torch.Tensor, quantizer, candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the (low, high) of `candidates` whose fake-quantized x has the lowest MSE."""
    best_low, best_high, best_error = None, None, None
    for low, high in candidates:
        error = _error(x, quantizer, low, high)
        if best_error is None:
            best_low, best_high, best_error = low.clone(), high.clone(), error
            continue
        better = error < best_error
        best_low, best_high = torch.where(better, low, best_low), torch.where(better, high, best_high)
        best_error = torch.minimum(error, best_error)
    quantizer.fitted = False
    return best_low, best_high


def mse(x: torch.Tensor, quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the candidate range (min-max or a percentile) with the lowest MSE."""
    return _least_error(x, quantizer, zip(*_tail_bounds(x, quantizer)))


def dual_clip(x: torch.Tensor, quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQuant's dual clipping, learned by search: per channel, the lower and the upper clip
    chosen apart, each from the channel's extreme and its PERCENTILES on that side, the pair
    with the lowest MSE of the fake-quantized values winning. `mse` clips both sides at the
    same percentile; a skewed channel (a LayerNorm output's large ones, a softmax's long tail)
    gets its own bound on each side here. Its candidates include mse's, so its error is never
    higher. Measured on MiniLM W4A4 (repq-gptq: cosine 0.859): this 0.869; clips searched as
    fractions of min and max down to 0.3 gave a lower activation error and a worse model
    (0.789), the 99th and 99.5th percentiles as candidates too 0.842: clipping stays in the
    far tails."""
    lows, highs = _tail_bounds(x, quantizer)
    return _least_error(x, quantizer, itertools.product(lows, highs))


CLIP_RATIOS = tuple(1 - 0.025 * i for i in range(21))  # of each channel's extremes, down to a half


def clip_search(x: torch.Tensor, quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, min and max shrunk by the ratio of CLIP_RATIOS whose fake-quantized values
    are closest to the data (mean squared error): the grid search of weight clipping that
    4-bit weight quantization needs (a 16-level grid loses more to rounding than to clipping
    a few large weights; the percentiles `mse` tries sit within a few weights of the maximum)."""
    rows = _rows(x, quantizer.axis)
    low, high = _shape(rows.min(1).values, quantizer), _shape(rows.max(1).values, quantizer)
    return _least_error(x, quantizer, ((low * ratio, high * ratio) for ratio in CLIP_RATIOS))


HISTOGRAM_BINS = 512
THRESHOLD_STEP = 8  # candidate thresholds every 8 bins: 64 candidates per channel


def entropy(x: torch.Tensor, quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the threshold T on |x| minimising KL(P || Q), where P is the histogram of
    |x| clipped at T (outliers in the last bin) and Q is P merged into the quantizer's levels
    and spread back over the bins that were non-empty; the range is [max(min, -T), min(max, T)]."""
    rows = _rows(x, quantizer.axis)
    levels = quantizer.qmax - quantizer.qmin + 1 if rows.min() >= 0 else (quantizer.qmax - quantizer.qmin + 1) // 2
    low, high = rows.min(1).values, rows.max(1).values
    thresholds = []
    for row in rows.abs():
        top = float(row.max())
        if top == 0:
            thresholds.append(0.0)
            continue
        hist = torch.histc(row, HISTOGRAM_BINS, 0, top).double()
        best, best_kl = HISTOGRAM_BINS, float("inf")
        for kept in range(max(levels, THRESHOLD_STEP), HISTOGRAM_BINS + 1, THRESHOLD_STEP):
            reference = hist[:kept].clone()
            reference[-1] += hist[kept:].sum()
            groups = torch.tensor_split(hist[:kept], levels)
            expanded = torch.cat([torch.where(g > 0, g.sum() / (g > 0).sum().clamp(min=1), torch.zeros_like(g))
                                  for g in groups])
            p, q = reference / reference.sum(), expanded / expanded.sum().clamp(min=1e-12)
            present = p > 0
            kl = float((p[present] * torch.log(p[present] / q[present].clamp(min=1e-12))).sum())
            if kl < best_kl:
                best, best_kl = kept, kl
        thresholds.append(top * best / HISTOGRAM_BINS)
    threshold = torch.tensor(thresholds, dtype=low.dtype)
    return _shape(torch.maximum(low, -threshold), quantizer), _shape(torch.minimum(high, threshold), quantizer)


# name -> observer: the registry configs, the SDK and the CLI take calibration names from
OBSERVERS = {"minmax": minmax, "percentile": percentile, "mse": mse, "entropy": entropy, "dualclip": dual_clip,
             "clip": clip_search}


def observer(name: str) -> Callable[[torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]]:
    """The observer registered as `name`; a UserError naming the registered ones otherwise."""
    if name not in OBSERVERS:
        raise UserError(f"unknown calibration method {name!r}; choose one of {', '.join(OBSERVERS)}")
    return OBSERVERS[name]
