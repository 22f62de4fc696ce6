"""Calibration on the positions the model's output reads.

A batch of padded sequences carries positions nothing downstream reads: the attention mask
keeps them out of every key, mean pooling out of the embedding (the MiniLM bench's 32
calibration sentences of 7 to 20 tokens, padded to 32: 58 % of the rows). Their activations
still drove the ranges, the outlier and AdaLog searches and GPTQ's Hessians. `mark_live_rows`
finds, for every activation quantizer, the elements of its calibration input that reach the
model's outputs, from one float pass with autograd: an element whose gradient from a random
projection of the outputs is exactly zero is read by nothing (a padded position's row, a
transposed key's padded column). Each quantizer keeps the mask as
`live`; `edgeport.quant.quantizers.calibration_rows` gives the live rows of a tensor wherever
calibration reads one, `calibration_values` what a range is fitted on.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

# the attributes of quantized layers and matmuls that hold their activation quantizers
ACTIVATION_SLOTS = ("act", "out", "left", "right")


class _Probe(nn.Module):
    """Stands in for an activation quantizer for one float pass: passes its input on with a
    zero that requires grad added, whose gradient then says which elements the outputs read."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer, self.zero = quantizer, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero is not None or not x.is_floating_point() or x.ndim < 2:
            return x  # a second call (shared module): the quantizer fits on its first input
        self.zero = torch.zeros_like(x, requires_grad=True)
        return x + self.zero


def mark_live_rows(qmodel: nn.Module, args: tuple[torch.Tensor, ...], seed: int = 0) -> int:
    """Set `live` (a bool mask of the elements of its first calibration input) on
    each activation quantizer of `qmodel` (not yet fitted; those of a softmax output's
    candidates too), from one float pass on `args`; returns how many quantizers got one. A
    model whose outputs carry no gradient leaves every quantizer unmasked."""
    slots = [(m, slot) for m in qmodel.modules() for slot in ACTIVATION_SLOTS
             if isinstance(getattr(m, slot, None), nn.Module)]
    probes = [_Probe(getattr(m, slot)) for m, slot in slots]
    choices = [getattr(m, "left_choices", ()) if slot == "left" else () for m, slot in slots]
    for (module, slot), probe, candidates in zip(slots, probes, choices):
        setattr(module, slot, probe)
        if candidates:
            module.left_choices = ()  # QuantMatMul fits its candidates in forward: nothing fits here
    grads: tuple = ()
    try:
        with torch.enable_grad():
            outputs = [o for o in tree_leaves(qmodel(*args)) if isinstance(o, torch.Tensor) and o.requires_grad]
            reached = [p.zero for p in probes if p.zero is not None]
            if outputs and reached:
                generator = torch.Generator().manual_seed(seed)
                signs = [torch.randint(0, 2, o.shape, generator=generator).to(o.dtype) * 2 - 1 for o in outputs]
                grads = torch.autograd.grad(sum((o * r).sum() for o, r in zip(outputs, signs)), reached,
                                            allow_unused=True)
    finally:
        for (module, slot), probe, candidates in zip(slots, probes, choices):
            setattr(module, slot, probe.quantizer)
            if candidates:
                module.left_choices = candidates
    if not grads:
        return 0
    gradients = iter(grads)
    marked = 0
    for probe, candidates in zip(probes, choices):
        grad = next(gradients) if probe.zero is not None else None
        if grad is None:
            continue
        for quantizer in (probe.quantizer, *candidates):
            quantizer.live = grad != 0
        marked += 1
    return marked
