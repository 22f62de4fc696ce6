"""Scale reparameterization (RepQ-ViT): per-channel activation quantization at calibration,
per-tensor at inference, exactly equivalent; and Conv-BatchNorm and layer-scale folding.

With per-channel (scale_j, zero_j) on a layer's input x, pick a per-tensor target
(mean scale, rounded mean zero point — or zero point 0 for a symmetric result), set
r = scale / target and b = target_scale * (target_zero - zero). Then x' = x / r - b is
quantized per tensor with exactly the codes the per-channel quantizer gave x (integer
zero points), and the consumer absorbs the change: W' = W diag(r), bias' = bias + W' b,
so W' x' + bias' = W x + bias. The arithmetic runs in float64.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def fold_targets(scale: torch.Tensor, zero: torch.Tensor, symmetric_zero: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(r, b, target scale, target zero point) for per-channel (scale, zero) (float64)."""
    scale = scale.double().clamp(min=1e-12)
    target_scale = scale.mean()
    target_zero = torch.round(zero.double().mean()) if symmetric_zero is None else torch.tensor(float(symmetric_zero))
    r = scale / target_scale
    b = target_scale * (target_zero - zero.double())
    return r, b, float(target_scale), int(target_zero)


def fold_into_linear(linear: nn.Linear, r: torch.Tensor, b: torch.Tensor) -> None:
    """W <- W diag(r); bias <- bias + W_new b (a bias is created if missing), in place."""
    weight = linear.weight.data.double() * r.reshape(1, -1)
    bias = (linear.bias.data.double() if linear.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64))
    bias = bias + weight @ b
    linear.weight.data.copy_(weight.to(linear.weight.dtype))
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.to(linear.weight.dtype))
    else:
        linear.bias.data.copy_(bias.to(linear.bias.dtype))


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of `conv` (its class kept: a subclass may pad or dispatch its own way) that
    computes conv followed by bn (eval statistics)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps) if bn.affine else \
        1 / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() if bn.affine else torch.zeros_like(scale)
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        fused.weight.copy_((conv.weight.double() * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype))
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        fused.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + shift).to(conv.weight.dtype))
    return fused


def scale_output_channels(layer: nn.Conv2d | nn.Linear, factor: torch.Tensor) -> nn.Conv2d | nn.Linear:
    """A copy of `layer` whose output channel j is multiplied by factor[j] (its weight rows and
    bias): the fold of a layer scale (x * gamma per channel) that follows it. A copy, as a weight
    tied to another module must not change there."""
    factor = factor.detach().double().flatten()
    scaled = copy.deepcopy(layer)
    with torch.no_grad():
        scaled.weight.copy_((layer.weight.double() * factor.reshape((-1,) + (1,) * (layer.weight.ndim - 1)))
                            .to(layer.weight.dtype))
        if layer.bias is not None:
            scaled.bias.copy_((layer.bias.double() * factor).to(layer.bias.dtype))
    return scaled
