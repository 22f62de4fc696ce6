"""Hadamard rotations before quantization: per-head rotations of attention values folded into
the weights, and rotations of a Linear's input done online.

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

Where no weight before an input can absorb a rotation (a GELU's output, the attention context
mixing heads, a LayerNorm's output that also feeds the residual), `rotate_inputs` does it online,
as QuaRot does: the Linear becomes `RotatedInput`, a block-Hadamard rotation R of its input (two
small float matmuls per block, a few dozen multiply-adds per element) and the Linear with weight
W R, so that its input quantizer sees x R. `online_rotation_paths` picks both layers of each GELU
FFN and the attention output projections. In driver runs on MiniLM (2 threads, a 2-vCPU Intel
Xeon), repq-adalog-live-rot at W4A4: 0.9075 / top-1 0.730 without online rotations (values
rotated), 0.9168 / 0.747 with the FFN down and attention output projections rotated, 0.9365 /
0.750 with the FFN up projection as well (its LayerNorm-fed input loses less to a rotation than
to RepQ's per-channel fold), 0.9268 / 0.737 with query, key and value rotated too (left out);
the online Hadamard without random signs after the folded value rotation 0.906 (the two cancel);
without the value rotation, a full-width Kronecker Hadamard (H_12 x H_128) 0.9151, a random
orthogonal matrix 0.9206 / 0.72 (one seed; a dense matmul of 2.4 M multiply-adds per token for
the FFN's 1536 channels, more than the layer's Linears). The bench's figures are in
`bench/results/quant_lowbit.json`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from edgeport.quant.adalog import gelu_neighbours

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


class _ExactnessCheck:
    """The float output of `model` on `args` before any rotation, to tell whether one kept it."""

    def __init__(self, model: nn.Module, args: tuple[torch.Tensor, ...]):
        self.model, self.args = model, args
        self.reference = self.output()

    def output(self) -> torch.Tensor:
        with torch.no_grad():
            leaves = tree_leaves(self.model(*self.args))
        return torch.cat([t.flatten().double() for t in leaves if isinstance(t, torch.Tensor)])

    def unchanged(self) -> bool:
        """Whether the output moved by less than EXACT_TOLERANCE (relative)."""
        change = (self.output() - self.reference).norm() / self.reference.norm().clamp(min=1e-30)
        return float(change) < EXACT_TOLERANCE


def rotate_values(model: nn.Module, args: tuple[torch.Tensor, ...]) -> list[str]:
    """Rotate the values of every attention module of `model` (in place) whose head size is a
    power of two and whose layout is recognised, keeping each rotation only where the float
    output on `args` moves by less than EXACT_TOLERANCE (relative). Returns one line per
    attention module rotated."""
    check, lines = _ExactnessCheck(model, args), []
    for path, value, rows, proj, head_dim in _value_pairs(model):
        if head_dim & (head_dim - 1):
            continue
        saved = [t.detach().clone() for t in (value.weight, value.bias, proj.weight) if t is not None]
        _rotate(value, rows, proj, head_dim)
        if check.unchanged():
            lines.append(f"{path}: values rotated per head (Hadamard {head_dim})")
            continue
        with torch.no_grad():
            for tensor, old in zip([t for t in (value.weight, value.bias, proj.weight) if t is not None], saved):
                tensor.copy_(old)
    return lines


# the smallest Hadamard block worth a rotation online: a narrower one spreads outliers over too few channels
MIN_BLOCK = 16
SIGN_SEED = 0  # the random signs of every online rotation: fixed, so a quantization is reproducible


class BlockHadamard(nn.Module):
    """x -> x R along the last axis, R = D B: D a diagonal of random signs (SIGN_SEED), B
    block-diagonal with orthonormal Sylvester-Hadamard blocks of the largest power of two dividing
    the width. The signs keep R from cancelling a Hadamard already folded into the weights before
    it (two Sylvester matrices multiply to the identity; QuaRot randomizes its Hadamard alike).
    Each block H_b = H_a (x) H_c is applied as H_a X H_c to the block reshaped to a x c: two small
    matmuls (`F.linear`, which no matmul finder takes for an activation x activation product; the
    blocks are symmetric)."""

    def __init__(self, width: int):
        super().__init__()
        block = width & -width
        if block < MIN_BLOCK:
            raise ValueError(f"a width of {width} has no power-of-two block of at least {MIN_BLOCK}")
        rows = 2 ** (block.bit_length() // 2)
        self.width, self.blocks, self.shape = width, width // block, (rows, block // rows)
        signs = torch.randint(0, 2, (width,), generator=torch.Generator().manual_seed(SIGN_SEED)) * 2 - 1
        self.register_buffer("signs", signs.float())
        self.register_buffer("rows", hadamard(rows).float())
        self.register_buffer("columns", hadamard(block // rows).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x * self.signs).reshape(*x.shape[:-1], self.blocks, *self.shape)
        y = F.linear(y, self.columns)  # X H_c
        y = F.linear(y.transpose(-1, -2), self.rows).transpose(-1, -2)  # H_a X H_c
        return y.reshape(x.shape)

    def matrix(self) -> torch.Tensor:
        """R itself, float64 (width x width)."""
        block = torch.kron(hadamard(self.shape[0]), hadamard(self.shape[1]))
        return self.signs.double()[:, None] * torch.block_diag(*[block] * self.blocks)

    def extra_repr(self) -> str:
        return f"width={self.width}, blocks={self.blocks}, block={self.shape[0] * self.shape[1]}"


class RotatedInput(nn.Module):
    """`linear` with its input rotated online: linear(x R) with the weight turned into W R, the
    same function in exact arithmetic, whose input quantizer sees the rotated x."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.rotation = BlockHadamard(linear.in_features)
        with torch.no_grad():
            linear.weight.copy_((linear.weight.double() @ self.rotation.matrix()).to(linear.weight.dtype))
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rotation(x))


def rotate_inputs(model: nn.Module, args: tuple[torch.Tensor, ...], paths: set[str]) -> list[str]:
    """Turn each Linear of `model` at `paths` (in place) whose width has a Hadamard block of at
    least MIN_BLOCK into a `RotatedInput`, keeping it only where the float output on `args`
    moves by less than EXACT_TOLERANCE (relative). Returns one line per Linear rotated."""
    check, lines = _ExactnessCheck(model, args), []
    for path in sorted(paths):
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            continue
        saved = linear.weight.detach().clone()
        try:
            rotated = RotatedInput(linear)
        except ValueError:  # no Hadamard block of MIN_BLOCK divides its width
            continue
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, rotated)
        if check.unchanged():
            lines.append(f"{path}: input rotated online ({rotated.rotation.extra_repr()} Hadamard; float ops "
                         f"before its quantizer)")
            continue
        with torch.no_grad():
            linear.weight.copy_(saved)
        setattr(owner, leaf, linear)
    return lines


def attention_output_projections(model: nn.Module) -> set[str]:
    """Paths of the output projections of the attention modules `rotate_values` recognises: their
    input mixes every head's context, which no single weight before it can rotate."""
    paths = {module: path for path, module in model.named_modules()}
    return {paths[proj] for _, _, _, proj, _ in _value_pairs(model)}


def online_rotation_paths(model: nn.Module, sample: tuple[torch.Tensor, ...]) -> set[str]:
    """Paths of the Linears whose inputs `rotate_inputs` rotates: both layers of each GELU FFN
    (the first one's input is a LayerNorm's output, whose per-channel ranges RepQ would otherwise
    fold; the second one's is the GELU's output) and the attention output projections."""
    feeding, fed = gelu_neighbours(model, sample)
    return feeding | fed | attention_output_projections(model)
