"""Per-layer sensitivity: how much of a quantized model's output error each layer brings.

Each quantized module (a Linear or Conv2d with its input, weight and output quantizers, or an
activation x activation matmul with its operands') is measured alone: every other quantizer
of the fake-quant model is switched off, so the model computes its float function (the folds
of the pipeline preserve it) except at that one layer, and the output is compared with the
float model's: SQNR in dB, and a task metric when the caller gives one. The ranking, least
SQNR first, says where precision is lost and which layers to keep wider.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgeport.quant.adalog import AdaLogQuantizer
from edgeport.quant.ptq import QUANTIZED_MODULES
from edgeport.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer

log = logging.getLogger(__name__)

QUANTIZERS = (UniformQuantizer, LogSqrt2Quantizer, AdaLogQuantizer)


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer quantized alone: the model output's SQNR against the float model (dB;
    inf where the layer's quantization changes nothing), and the caller's metric of the
    two outputs where one was given (None otherwise)."""

    layer: str
    sqnr_db: float
    metric: float | None = None


def _output(model: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        leaves = torch.utils._pytree.tree_leaves(model(*args))
    return torch.cat([leaf.double().flatten() for leaf in leaves
                      if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()])


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `candidate` against `reference`, in dB."""
    noise = float(((candidate - reference) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((reference ** 2).sum()) / noise)


def layer_sensitivity(model: nn.Module, qmodel: nn.Module, args: tuple[torch.Tensor, ...],
                      metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None
                      ) -> list[LayerSensitivity]:
    """Each quantized module of `qmodel` (from `edgeport.quant.ptq.quantize` of `model`)
    quantized alone on the batch `args`, ranked least SQNR first; `metric(reference,
    output)`, if given, scores the float and the one-layer-quantized outputs (flattened,
    float64) too. `qmodel`'s quantizers are left switched on as they were."""
    reference = _output(model, args)
    quantizers = [m for m in qmodel.modules() if isinstance(m, QUANTIZERS)]
    enabled = [q.enabled for q in quantizers]
    results = []
    try:
        for quantizer in quantizers:
            quantizer.enabled = False
        for name, module in qmodel.named_modules():
            if not isinstance(module, QUANTIZED_MODULES):
                continue
            own = [m for m in module.modules() if isinstance(m, QUANTIZERS)]
            for quantizer in own:
                quantizer.enabled = True
            output = _output(qmodel, args)
            for quantizer in own:
                quantizer.enabled = False
            results.append(LayerSensitivity(name, sqnr_db(reference, output),
                                            None if metric is None else float(metric(reference, output))))
    finally:
        for quantizer, state in zip(quantizers, enabled):
            quantizer.enabled = state
    return sorted(results, key=lambda r: r.sqnr_db)


WIDTHS = (4, 6, 8)  # the widths a mixed-precision map chooses from, narrowest first
ROUNDS = 4  # budget tightenings before the map falls back to 8 bits everywhere


def cosine_drop(reference: torch.Tensor, output: torch.Tensor) -> float:
    """1 - cosine similarity of the two flattened outputs: the default budgeted loss."""
    return 1.0 - float(reference @ output / (reference.norm() * output.norm()).clamp(min=1e-30))


FOLDS = 4  # a map is checked by cross-validation over this many interleaved folds of the batch
HELD_OUT_MIN = 8  # calibration samples needed for the folds (two held out in each)


@dataclass(frozen=True)
class MixedPrecision:
    """A mixed-precision choice: each quantized layer's width, the measured loss of the
    model quantized with it (`drop`, by the budgeted loss function, on the calibration
    batch), its cross-validated loss: the worst over FOLDS interleaved folds of the batch of the
    loss on each fold of the map calibrated on the others (`held_out_drop`, the figure the
    budget bounds; None where the batch had fewer than HELD_OUT_MIN samples and `drop` was
    bounded instead), the mean width over the layers and over the weights (by parameter
    count), the weights' size in bytes, and what the loss is (`loss_name`: "1 - cosine" or the
    user's function's name)."""

    widths: dict[str, int]
    drop: float
    held_out_drop: float | None
    mean_bits: float
    mean_weight_bits: float
    weight_bytes: int
    loss_name: str = "1 - cosine"
    max_drop: float | None = None  # the budget asked for

    @property
    def bounded_drop(self) -> float:
        """The loss the budget bounds: the cross-validated one where there was one."""
        return self.drop if self.held_out_drop is None else self.held_out_drop

    @property
    def met(self) -> bool:
        """Whether `bounded_drop` is within `max_drop`: not where even uniform 8 bits lose more."""
        return self.max_drop is None or self.bounded_drop <= self.max_drop

    def summary(self) -> str:
        """The choice as `edgeport quantize --max-drop` prints it: the losses and mean widths on
        one line, then each layer's width."""
        held_out = "" if self.held_out_drop is None else f", {self.held_out_drop:.5f} cross-validated"
        head = (f"mixed precision: {self.loss_name} {self.drop:.5f} on the calibration data{held_out}; mean "
                f"{self.mean_bits:.2f} bits per layer, {self.mean_weight_bits:.2f} per weight "
                f"({self.weight_bytes} weight bytes)")
        return "\n".join([head, *(f"  {bits} bits  {layer}" for layer, bits in self.widths.items())])


def _folds(args: tuple[torch.Tensor, ...]) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """(fitting, held-out) pairs of the calibration batch, sample i held out in fold i mod
    FOLDS (interleaved: a batch in some order, such as sorted sentences, still gives each fold
    its spread); none where the batch is too small or its inputs disagree on axis 0 (a batch
    elsewhere, as an LSTM state's)."""
    sizes = {a.shape[0] for a in args}
    if len(sizes) != 1 or (size := sizes.pop()) < HELD_OUT_MIN:
        return []
    held = [torch.arange(size) % FOLDS == fold for fold in range(FOLDS)]
    return [(tuple(a[~h] for a in args), tuple(a[h] for a in args)) for h in held]


def choose_widths(model: nn.Module, calib, config, max_drop: float,
                  loss: Callable[[torch.Tensor, torch.Tensor], float] = cosine_drop
                  ) -> tuple[nn.Module, MixedPrecision]:
    """The model quantized with the fewest bits per layer (4, 6 or 8) whose loss
    (`loss(reference, output)` of the flattened float and quantized outputs, 1 - cosine by
    default) stays within `max_drop` on data its ranges never saw: each candidate map is
    cross-validated over FOLDS folds of the calibration batch, and the worst fold must meet the
    budget (the whole batch serves both where it has fewer than HELD_OUT_MIN samples), since
    ranges fitted and judged on the same samples promise less loss than new inputs get, and
    the mean of the folds promised less than new sentences got on MiniLM. Each layer's noise at
    each width is measured alone (`layer_sensitivity`); noises add, and 1 - cosine is half
    the noise-to-signal ratio, so a greedy pass starts every layer at 4 bits and widens the
    layer that removes most noise per added bit until the estimate fits. The map is then
    measured as a whole and the budget tightened by the estimate's miss, up to ROUNDS times;
    uniform 8 bits when nothing narrower meets it. The returned model is calibrated on the
    whole batch."""
    import dataclasses

    from edgeport.quant.ptq import _calibration_args, quantize

    args = _calibration_args(model, calib)
    reference = _output(model, args)
    folds = _folds(args) or [(args, args)]
    held_references = [_output(model, held) for _, held in folds]
    noise: dict[str, dict[int, float]] = {}
    for bits in WIDTHS:
        log.info("measuring each layer's noise alone at %d bits", bits)
        uniform, _ = quantize(model, calib, dataclasses.replace(config, w_bits=bits, a_bits=bits, matmul_bits=None,
                                                                keep_8bit=(), layer_widths=()))
        for result in layer_sensitivity(model, uniform, args):
            noise.setdefault(result.layer, {})[bits] = 10 ** (-result.sqnr_db / 10)

    def held_out_loss(chosen) -> float:
        losses = []
        for (fit, held), reference_held in zip(folds, held_references):
            candidate, _ = quantize(model, fit, chosen)
            losses.append(loss(reference_held, _output(candidate, held)))
        return max(losses)

    budget = 2 * max_drop
    for round_number in range(1, ROUNDS + 1):
        widths = {layer: WIDTHS[0] for layer in noise}
        while sum(noise[layer][bits] for layer, bits in widths.items()) > budget:
            def gain(layer: str) -> float:
                bits = widths[layer]
                wider = WIDTHS[WIDTHS.index(bits) + 1]
                return (noise[layer][bits] - noise[layer][wider]) / (wider - bits)
            candidates = [layer for layer, bits in widths.items() if bits < WIDTHS[-1]]
            if not candidates:
                break
            best = max(candidates, key=gain)
            widths[best] = WIDTHS[WIDTHS.index(widths[best]) + 1]
        chosen = dataclasses.replace(config, keep_8bit=(), layer_widths=widths)
        log.info("checking a map of %.2f bits per layer on %d held-out folds (round %d of %d)",
                 sum(widths.values()) / len(widths), len(folds), round_number, ROUNDS)
        checked = held_out_loss(chosen)
        if checked <= max_drop:
            break
        budget *= 0.8 * max_drop / max(checked, 1e-30)
    else:
        widths = {layer: WIDTHS[-1] for layer in noise}
        chosen = dataclasses.replace(config, w_bits=8, a_bits=8, matmul_bits=None, keep_8bit=(), layer_widths=())
        checked = held_out_loss(chosen)
    qmodel, report = quantize(model, calib, chosen)
    drop = loss(reference, _output(qmodel, args))
    sizes = {name: m.inner.weight.numel() for name, m in qmodel.named_modules() if hasattr(m, "inner")}
    weighted = sum(sizes[name] * widths[name] for name in sizes)
    narrowest = min(widths.values())  # the report's widths, like the artifact's precision label, are its narrowest
    qmodel.quant_report = dataclasses.replace(report, w_bits=narrowest, a_bits=narrowest)
    return qmodel, MixedPrecision(widths, drop, checked if len(folds) > 1 else None,
                                  sum(widths.values()) / len(widths), weighted / sum(sizes.values()),
                                  math.ceil(weighted / 8),
                                  "1 - cosine" if loss is cosine_drop else getattr(loss, "__name__", "the metric"),
                                  max_drop)
