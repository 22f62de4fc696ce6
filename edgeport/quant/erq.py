"""Weight compensation for quantized inputs: error-feedback rounding (GPTQ-style) and,
optionally, closed-form ridge regression of the float weights (ERQ-style).

A quantized Linear sees its input Xq (rows = tokens) with the quantization error of every
layer upstream and of its own input quantizer. Its weight is rounded onto its grid one input
column at a time, each column's rounding error pushed onto the columns not yet rounded
through the inverse of H = Xq^T Xq (optimal brain quantization as GPTQ does it, columns in
order of decreasing diag(H)): the rounding that keeps Xq W^T closest to the float weight's.
With a ridge factor, the float weight and bias are first regressed onto the float model's
output Y of the layer, pulled towards the current ones (ERQ's activation-error reduction):

    [W b] = argmin ||Xq W^T + b - Y||^2 + lambda ||[W b] - [W0 b0]||^2

Measured: the rounding gains on every model tried; the regression loses on MiniLM, whose
few tokens with massive activations dominate Y and pull every token's bias (W4A4 cosine 0.40
against 0.87 without it), and on the zoo ViT (32 images: too few rows per unknown). The layer
stays an ordinary quantized Linear: its weight lies on its quantizer's grid and its bias is
float, so the export is exactly that of any other weight.

The layers are visited in execution order inside one forward pass of the quantized model,
each compensated before it runs, so every layer sees the inputs its already compensated
predecessors give it. Arithmetic in float64.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgeport.quant.quantizers import UniformQuantizer, calibration_rows

# dampening of H, relative to its mean diagonal: GPTQ's 0.01 overfits 32 calibration sentences
# (1024 rows, half of them padding, for 1536-wide inputs); 0.1 measured better on MiniLM W4A8.
# On the live rows alone (385 of the 1024) 0.3 measured best on MiniLM W6A6 (cosine 0.9880,
# 0.9888, 0.9892, 0.9890 for 0.03, 0.1, 0.3, 1.0): QuantConfig.damping
DAMPING = 0.1
MAX_ROWS = 8192  # rows kept per layer (tokens x batch); beyond this, evenly subsampled
ROUNDING_BLOCK = 128  # columns rounded between two updates of the rest of the weight


def _rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.detach().reshape(-1, t.shape[-1]).double()
    return rows[:: rows.shape[0] // MAX_ROWS + 1]


def _float_outputs(model: nn.Module, names: set[str], args: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The float model's output of each Linear in `names` on `args`; a
    Linear called more than once is left out (no single target)."""
    outputs: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            outputs[name] = output.detach()
        return record

    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(hook(n)) for n in names if isinstance(modules.get(n), nn.Linear)]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return {n: y for n, y in outputs.items() if calls[n] == 1}


def ridge_weights(inputs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising ||inputs W^T + b - targets||^2 + lambda ||W - weight||^2 (float64),
    lambda = `ridge` x (inputs per row / rows) x the mean squared input value: the fewer rows
    per unknown, the closer to `weight`; the bias is pulled towards `bias` alike."""
    rows = inputs.shape[0]
    augmented = torch.cat([inputs, torch.ones(rows, 1, dtype=inputs.dtype)], 1)
    gram = augmented.T @ augmented / rows
    lam = ridge * inputs.shape[1] / rows * float(gram.diagonal()[:-1].mean().clamp(min=1e-12))
    penalty = torch.full((gram.shape[0],), lam, dtype=gram.dtype)
    rhs = augmented.T @ targets / rows + penalty[:, None] * torch.cat([weight.T, bias[None]], 0)
    solution = torch.linalg.solve(gram + torch.diag(penalty), rhs)
    return solution[:-1].T.contiguous(), solution[-1].clone()


def error_feedback_round(weight: torch.Tensor, inputs: torch.Tensor, quantizer: UniformQuantizer,
                         damping: float = DAMPING) -> torch.Tensor:
    """`weight` (out x in, float64) rounded onto `quantizer`'s grid (symmetric, per output
    channel or per tensor) column by column, each column's error spread over the remaining
    columns through the Cholesky factor of the inverse of H = inputs^T inputs (plus `damping`
    times its mean diagonal on the diagonal): the rounding that keeps inputs @ W^T closest
    (GPTQ). Returns the rounded weight (on the grid)."""
    weight = weight.clone()
    hessian = inputs.T @ inputs / inputs.shape[0]
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += torch.eye(len(hessian), dtype=hessian.dtype) * damping * float(hessian.diagonal().mean())
    order = torch.argsort(hessian.diagonal(), descending=True)
    weight, hessian = weight[:, order], hessian[order][:, order]
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    scale = quantizer.scale.double().reshape(-1)
    scale = scale if scale.numel() > 1 else scale.expand(weight.shape[0])
    rounded = torch.empty_like(weight)
    # GPTQ's lazy batch update: the errors of a block of columns reach the columns after it in
    # one matrix product, not one rank-1 update per column (the same rounding: Swin-T's
    # repq-gptq output with check_reparam_held_out unchanged, quantization 82 s -> 19 s on a quiet core)
    for start in range(0, weight.shape[1], ROUNDING_BLOCK):
        end = min(start + ROUNDING_BLOCK, weight.shape[1])
        errors = torch.empty(weight.shape[0], end - start, dtype=weight.dtype)
        for column in range(start, end):
            w = weight[:, column]
            q = torch.clamp(torch.round(w / scale), quantizer.qmin, quantizer.qmax) * scale
            rounded[:, column] = q
            errors[:, column - start] = error = (w - q) / upper[column, column]
            weight[:, column + 1:end] -= error[:, None] * upper[column, column + 1:end][None, :]
        weight[:, end:] -= errors @ upper[start:end, end:]
    restored = torch.empty_like(rounded)
    restored[:, order] = rounded
    return restored


def compensate(qmodel: nn.Module, model: nn.Module, args: tuple[torch.Tensor, ...], layer_type: type,
               weight_quantizer: Callable[[torch.Tensor, int], UniformQuantizer], ridge: float | None = None,
               damping: float = DAMPING) -> list[str]:
    """Compensate every quantized Linear (`layer_type` instances of `qmodel`, a fake-quant copy
    of `model`, the float model with the same rotations and folds) for its quantized input, in
    execution order within one forward pass of `qmodel` on `args`: with `ridge` (lambda's
    factor, see `ridge_weights`) the float weight and bias first regressed onto the float
    model's output of the layer and the weight quantizer refitted (`weight_quantizer(weight,
    bits)`); then error-feedback rounding (`damping`: see `error_feedback_round`).
    Returns the names of the layers compensated (a layer whose float counterpart is not a
    Linear of `model` at the same path, or is called more than once, is left as it was)."""
    layers = {name: m for name, m in qmodel.named_modules() if isinstance(m, layer_type)}
    targets = _float_outputs(model, set(layers), args) if ridge is not None else dict.fromkeys(layers)
    done: list[str] = []

    def pre_hook(name):
        def compensate_layer(layer, inputs):
            if name not in targets or name in done:  # no float counterpart, or a second call
                return
            # This runs inside the forward of the module that calls the layer, where a matmul
            # router (`exported_matmuls`) may be sending every matmul to a quantized one: the
            # algebra below must not be routed, so torch-function handling is off for it.
            with torch._C.DisableTorchFunction():
                # only the rows the model's output reads, where calibration marked them (`edgeport.quant.live`)
                quantized = layer.act(layer.quantizer_input(inputs[0]))
                quantized_input = _rows(calibration_rows(layer.act, quantized))
                inner = layer.inner
                bias = inner.bias.detach().double() if inner.bias is not None else \
                    torch.zeros(inner.weight.shape[0], dtype=torch.float64)
                weight = inner.weight.detach().double()
                if ridge is not None:
                    # the input's live rows: the output has other channels, so the input's mask picks its rows
                    live = getattr(layer.act, "live", None)
                    rows = live.any(-1) if live is not None and live.shape == quantized.shape else None
                    target = _rows(targets[name] if rows is None else targets[name][rows])
                    weight, bias = ridge_weights(quantized_input, target, weight, bias, ridge)
                    layer.wq = weight_quantizer(weight.float(), layer.wq.bits)
                weight = error_feedback_round(weight, quantized_input, layer.wq, damping)
            with torch.no_grad():
                inner.weight.copy_(weight.to(inner.weight.dtype))
                if inner.bias is None:
                    inner.bias = nn.Parameter(bias.to(inner.weight.dtype))
                else:
                    inner.bias.copy_(bias.to(inner.bias.dtype))
            done.append(name)

        return compensate_layer

    hooks = [layer.register_forward_pre_hook(pre_hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            qmodel(*args)
    finally:
        for h in hooks:
            h.remove()
    return done
