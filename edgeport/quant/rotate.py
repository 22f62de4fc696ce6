"""Per-head Hadamard rotation of attention values, folded into the weights.

Attention's output is the sum over heads of P_h V_h W_o,h^T: rotating each head's values by an
orthogonal H (V_h H: the value projection's rows of head h become H^T W_v,h, its bias H^T b_v,h)
and the output projection's columns of that head by the same H (W_o,h H) leaves it unchanged in
exact arithmetic, while a Hadamard H spreads a head's few outlier channels over all of them, so
the value operand of P V and the output projection's input quantize on a tighter per-tensor
range. Nothing is added to the graph: the export is that of any quantized model. Two layouts are
recognised: a fused qkv Linear beside a `proj` Linear (`heads` or `num_heads`, `head_dim`: timm,
the zoo ViT) and a `value` Linear whose parent's `output.dense` projects (`num_attention_heads`,
`attention_head_size`: the Hugging Face BERT family). A rotation is kept only where the model's
float output on the calibration batch stays the same. Measured on MiniLM W6A6 (1 thread):
repq-adalog-live-recon's cosine 0.98985 / 0.98984 / 0.98987 without (reconstruction seeds 0, 1,
2), 0.99002 / 0.98993 / 0.98977 with; repq-adalog-live's 0.9888 without, 0.9891 with, 0.9879
with Q and K rotated per head as well (the scores stay exact, their operands quantize worse).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

# relative change of the float output above which a rotation is taken for a layout it does not fit
EXACT_TOLERANCE = 1e-4


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of size `n` (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two size, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def _value_pairs(model: nn.Module) -> list[tuple[str, nn.Linear, slice, nn.Linear, int]]:
    """(path, value-producing Linear, its rows holding the values, output projection, head size)
    of each attention module of a recognised layout."""
    pairs = []
    for path, module in model.named_modules():
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        head_dim = getattr(module, "head_dim", None)
        if isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(head_dim, int):
            width = qkv.out_features // 3
            pairs.append((path, qkv, slice(2 * width, 3 * width), proj, head_dim))
        value, head_size = getattr(module, "value", None), getattr(module, "attention_head_size", None)
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else None
        dense = getattr(getattr(parent, "output", None), "dense", None)
        if isinstance(value, nn.Linear) and isinstance(dense, nn.Linear) and isinstance(head_size, int):
            pairs.append((path, value, slice(0, value.out_features), dense, head_size))
    return pairs


def _rotate(value: nn.Linear, rows: slice, proj: nn.Linear, head_dim: int) -> None:
    h = hadamard(head_dim)
    with torch.no_grad():
        w = value.weight[rows].double()
        w = torch.einsum("dj,hdi->hji", h, w.reshape(-1, head_dim, w.shape[1])).reshape(w.shape)
        value.weight[rows] = w.to(value.weight.dtype)
        if value.bias is not None:
            b = value.bias[rows].double()
            value.bias[rows] = (b.reshape(-1, head_dim) @ h).reshape(-1).to(value.bias.dtype)
        o = proj.weight.double()
        o = torch.einsum("ohd,dj->ohj", o.reshape(o.shape[0], -1, head_dim), h).reshape(o.shape)
        proj.weight.copy_(o.to(proj.weight.dtype))


def rotate_values(model: nn.Module, args: tuple[torch.Tensor, ...]) -> list[str]:
    """Rotate the values of every attention module of `model` (in place) whose head size is a
    power of two and whose layout is recognised, keeping each rotation only where the float
    output on `args` moves by less than EXACT_TOLERANCE (relative). Returns one line per
    attention module rotated."""
    def output() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([t.flatten().double() for t in tree_leaves(model(*args)) if isinstance(t, torch.Tensor)])

    reference, lines = output(), []
    for path, value, rows, proj, head_dim in _value_pairs(model):
        if head_dim & (head_dim - 1):
            continue
        saved = [t.detach().clone() for t in (value.weight, value.bias, proj.weight) if t is not None]
        _rotate(value, rows, proj, head_dim)
        change = float((output() - reference).norm() / reference.norm().clamp(min=1e-30))
        if change < EXACT_TOLERANCE:
            lines.append(f"{path}: values rotated per head (Hadamard {head_dim})")
            continue
        with torch.no_grad():
            for tensor, old in zip([t for t in (value.weight, value.bias, proj.weight) if t is not None], saved):
                tensor.copy_(old)
    return lines
