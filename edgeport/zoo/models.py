"""Architectures of the zoo models: small, but with the layers real deployments have.

The ViT has patch embedding, LayerNorm, multi-head attention with an explicit softmax
and a GELU MLP; the CNN has Conv/BatchNorm/ReLU; the spiking CNN has LIF neurons unrolled
over T timesteps with direct (repeated-input) encoding; the LMU reads a digit row by row
through a linear Legendre memory, one row per step. All take (B, 1, 8, 8) digits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeport.snn import LIF


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and an explicit softmax.

    The head count may shrink (slimming removes dead heads); the head size does not.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer for 8x8 images: 2x2 patches (16 tokens) plus a class token."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 4,
                 patch: int = 2, image: int = 8, classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class CNN(nn.Module):
    """Three Conv/BN/ReLU stages, one max-pool, global average pool, linear classifier."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, width), conv_bn_relu(width, width), nn.MaxPool2d(2),
            conv_bn_relu(width, 2 * width), conv_bn_relu(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SpikingCNN(nn.Module):
    """Conv-BN-LIF-pool, Conv-BN-LIF, FC-LIF, FC; T timesteps of the same input (direct coding).

    `step(x, v1, v2, v3)` is one timestep with the three membranes as explicit state (the
    streaming form); `forward(x)` runs T steps from `initial_state` and returns the FC readout
    averaged over them (logits).
    """

    def __init__(self, timesteps: int = 4, width: int = 16, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.timesteps, self.width, self.hidden = timesteps, width, hidden
        self.conv1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.lif1 = LIF()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width))
        self.lif2 = LIF()
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.lif3 = LIF()
        self.fc2 = nn.Linear(hidden, classes)

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zero membranes for a batch like `x` (B, 1, 8, 8)."""
        b = x.shape[0]
        return (x.new_zeros(b, self.width, 8, 8), x.new_zeros(b, 2 * self.width, 4, 4), x.new_zeros(b, self.hidden))

    def step(self, x: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor):
        """One timestep: (readout, v1', v2', v3')."""
        s1, v1 = self.lif1(self.conv1(x), v1)
        s2, v2 = self.lif2(self.conv2(self.pool(s1)), v2)
        s3, v3 = self.lif3(self.fc1(s2.flatten(1)), v3)
        return self.fc2(s3), v1, v2, v3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.initial_state(x)
        out = 0
        for _ in range(self.timesteps):
            y, *state = self.step(x, *state)
            out = out + y
        return out / self.timesteps


def legendre_memory(order: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Legendre Memory Unit's state-space matrices (Voelker et al., NeurIPS 2019) for a
    window of `theta` steps, discretized by zero-order hold over one step: (A (order, order),
    B (order,)) such that m_t = A m_{t-1} + B u_t. Computed in float64, returned in float32."""
    i = torch.arange(order, dtype=torch.float64)[:, None]
    j = torch.arange(order, dtype=torch.float64)[None, :]
    a = (2 * i + 1) / theta * torch.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    b = (2 * i[:, 0] + 1) * (-1.0) ** i[:, 0] / theta
    block = torch.zeros(order + 1, order + 1, dtype=torch.float64)
    block[:order, :order], block[:order, order] = a, b
    discrete = torch.linalg.matrix_exp(block)
    return discrete[:order, :order].float(), discrete[:order, order].float()


class LMU(nn.Module):
    """An LMU-style streaming classifier (as LMUFormer's recurrent form): a digit read row by
    row, one 8-pixel row per step, through a linear Legendre memory of the last `rows` steps.

    Per step: u = encoder(row); memory = A memory + B u per memory channel (A, B fixed, from
    `legendre_memory`); h = relu(hidden([memory, row])); logits = readout(h). `step(row, memory)`
    is the streaming form, with the memory (B, channels, order) as explicit state;
    `forward(image)` reads the rows of (B, 1, 8, 8) images in order and returns the last step's
    logits. `rows(images)` gives the (T, B, 8) sequence the step form is fed.
    """

    def __init__(self, rows: int = 8, features: int = 8, channels: int = 8, order: int = 8, hidden: int = 64,
                 classes: int = 10):
        super().__init__()
        self.timesteps, self.channels, self.order = rows, channels, order
        self.encoder = nn.Linear(features, channels)
        # fixed buffers, not layers: the memory is not trained, and quantization leaves it exact
        a, b = legendre_memory(order, float(rows))
        self.register_buffer("memory_a", a)
        self.register_buffer("memory_b", b[:, None])
        self.hidden = nn.Linear(channels * order + features, hidden)
        self.readout = nn.Linear(hidden, classes)

    @staticmethod
    def rows(images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) images as the (H, B, W) row sequence the step form takes."""
        return images[:, 0].transpose(0, 1)

    def initial_state(self, row: torch.Tensor) -> tuple[torch.Tensor]:
        """An empty memory for a batch like `row` (B, 8)."""
        return (row.new_zeros(row.shape[0], self.channels, self.order),)

    def step(self, row: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One row: (logits, memory')."""
        memory = F.linear(memory, self.memory_a) + F.linear(self.encoder(row).unsqueeze(-1), self.memory_b)
        features = torch.relu(self.hidden(torch.cat([memory.flatten(1), row], dim=1)))
        return self.readout(features), memory

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = self.rows(images)
        (memory,) = self.initial_state(rows[0])
        for row in rows:
            logits, memory = self.step(row, memory)
        return logits


ARCHITECTURES = {"vit-digits": ViT, "cnn-digits": CNN, "snn-digits": SpikingCNN, "cnn-digits-pruned": CNN,
                 "lmu-digits": LMU}


def vit_small_stack(seed: int = 0) -> ViT:
    """A ViT-S-like stack for timing (random weights, not a zoo model): dim 384, 6 blocks,
    6 heads, 16x16 patches of a 224x224 grey image = 196 tokens + class token = 197."""
    torch.manual_seed(seed)
    return ViT(dim=384, depth=6, heads=6, mlp_ratio=4, patch=16, image=224, classes=1000).eval()
