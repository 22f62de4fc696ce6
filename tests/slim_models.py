"""Models for the slimming tests and benchmark: residual bottlenecks, a depthwise chain,
concatenated branches, and token-slimming ViTs (learned aggregation, top-k keeping)."""
from __future__ import annotations

import torch
from torch import nn

from edgeport.zoo.models import Block


class Bottleneck(nn.Module):
    def __init__(self, channels: int, width: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(x + self.bn3(self.conv3(y)))


class BottleneckResNet(nn.Module):
    """Stem, stages of bottlenecks (downsampling between stages), pool, classifier."""

    def __init__(self, widths=(64, 128, 256), blocks=2, classes=10):
        super().__init__()
        layers, channels = [nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                            nn.ReLU()], widths[0]
        for i, width in enumerate(widths):
            if i:
                layers += [nn.Conv2d(channels, width, 1, stride=2, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers += [Bottleneck(channels, channels) for _ in range(blocks)]
        self.features = nn.Sequential(*layers)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics, as a trained network has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


class DepthwiseChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.depthwise, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32)
        self.project = nn.Conv2d(32, 16, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.project(self.act(self.bn2(self.depthwise(self.act(self.bn1(self.expand(x)))))))


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.merge = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.merge(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


class TokenAggregation(nn.Module):
    """Self-slimmed ViT's token slimming: N tokens become M weighted mixtures of them."""

    def __init__(self, dim: int, tokens_out: int):
        super().__init__()
        self.score = nn.Linear(dim, tokens_out)

    def forward(self, x):  # (B, N, C) -> (B, M, C)
        weights = torch.softmax(self.score(x).transpose(1, 2), dim=-1)
        return weights @ x


class TopKTokens(nn.Module):
    """EViT/DynamicViT-style token dropping: keep the k tokens with the highest score."""

    def __init__(self, dim: int, keep: int):
        super().__init__()
        self.score, self.keep = nn.Linear(dim, 1), keep

    def forward(self, x):
        index = self.score(x).squeeze(-1).topk(self.keep, dim=1).indices
        return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class SlimmingViT(nn.Module):
    """Patch embedding, a block, a token-slimming stage, a block, mean pool, head."""

    def __init__(self, slimmer: str, dim: int = 64):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.block1, self.block2 = Block(dim, 4, 2), Block(dim, 4, 2)
        self.slim = TokenAggregation(dim, 6) if slimmer == "aggregate" else TopKTokens(dim, 6)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # 16 tokens
        x = self.block2(self.slim(self.block1(x)))  # 6 tokens
        return self.head(x.mean(1))


class WidthReshapingAttention(nn.Module):
    """timm 0.9's vision_transformer.Attention as that release writes it: the heads' output is
    reshaped to the input's width C, so the module cannot run with fewer heads."""

    def __init__(self, dim: int = 64, num_heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(*qkv.unbind(0))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))
