"""Building blocks of the RDEIC compression module (spec section 2).

Module and parameter names follow the reference state dict exactly
(``conv1``/``conv2``/``adaptor``, ``subpel_conv.0``, ``fushion.0`` ...), so an
official checkpoint loads after stripping its ``preprocess_model.`` prefix.
Submodules are registered in the reference's order, so a seeded random
initialisation draws the same numbers as the reference would.

Differences from compressai's similarly named blocks are deliberate (they are
what the checkpoints were trained with): no GDN, LeakyReLU slopes of 0.01 and
0.1, and 1x1 (not 3x3) sub-pixel convolutions for upsampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "conv1x1",
    "conv3x3",
    "conv5x5",
    "subpel_conv1x1",
    "ResidualBlock",
    "ResidualBlockWithStride",
    "ResidualBlockUpsample",
    "EntropyParametersEX",
    "ChannelContextEX",
]


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (no padding needed)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 (compressai's ``conv3x3``)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1)


def conv5x5(in_ch: int, out_ch: int) -> nn.Conv2d:
    """5x5 'same' convolution, used by the spatial and channel context models."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=5, stride=1, padding=2)


def subpel_conv1x1(in_ch: int, out_ch: int, r: int = 2) -> nn.Sequential:
    """1x1 conv to ``out_ch * r**2`` channels followed by PixelShuffle(r).

    A Sequential so that the parameter names are ``<name>.0.weight`` as in the
    reference checkpoints.
    """
    return nn.Sequential(nn.Conv2d(in_ch, out_ch * r**2, kernel_size=1, padding=0), nn.PixelShuffle(r))


class ResidualBlock(nn.Module):
    """conv3x3 -> LReLU -> conv3x3 -> LReLU, plus a (1x1-adapted when i != o) skip."""

    def __init__(self, in_ch: int, out_ch: int, leaky_relu_slope: float = 0.01) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch)
        self.leaky_relu = nn.LeakyReLU(negative_slope=leaky_relu_slope)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.adaptor = conv1x1(in_ch, out_ch) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.adaptor is None else self.adaptor(x)
        out = self.leaky_relu(self.conv1(x))
        out = self.leaky_relu(self.conv2(out))
        return out + identity


class ResidualBlockWithStride(nn.Module):
    """Downsampling block: conv3x3/s -> LReLU(0.01) -> conv3x3 -> LReLU(0.1), skip conv1x1/s."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=stride)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.01)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.leaky_relu2 = nn.LeakyReLU(negative_slope=0.1)
        self.downsample = conv1x1(in_ch, out_ch, stride=stride) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.leaky_relu(self.conv1(x))
        out = self.leaky_relu2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class ResidualBlockUpsample(nn.Module):
    """Upsampling block: [1x1 conv + PixelShuffle] -> LReLU(0.01) -> conv3x3 -> LReLU(0.1).

    The skip goes through a second, independent [1x1 conv + PixelShuffle].
    """

    def __init__(self, in_ch: int, out_ch: int, upsample: int = 2) -> None:
        super().__init__()
        self.subpel_conv = subpel_conv1x1(in_ch, out_ch, upsample)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.01)
        self.conv = conv3x3(out_ch, out_ch)
        self.leaky_relu2 = nn.LeakyReLU(negative_slope=0.1)
        self.upsample = subpel_conv1x1(in_ch, out_ch, upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.leaky_relu(self.subpel_conv(x))
        out = self.leaky_relu2(self.conv(out))
        return out + self.upsample(x)


class EntropyParametersEX(nn.Module):
    """Three 1x1 convs (in -> 5o/3 -> 4o/3 -> o) with GELU; output = cat(scales, means).

    Being pointwise, it can equally be applied to a checkerboard-squeezed map,
    which the entropy coder uses to halve its work.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        h1, h2 = out_dim * 5 // 3, out_dim * 4 // 3
        self.fusion = nn.Sequential(
            nn.Conv2d(in_dim, h1, 1),
            nn.GELU(),
            nn.Conv2d(h1, h2, 1),
            nn.GELU(),
            nn.Conv2d(h2, out_dim, 1),
        )

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        return self.fusion(params)


class ChannelContextEX(nn.Module):
    """Channel context: three 5x5 convs (in -> hidden[0] -> hidden[1] -> out) with GELU.

    The attribute is spelled ``fushion`` because the reference checkpoints are.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (224, 128)) -> None:
        super().__init__()
        if len(hidden) != 2:
            raise ValueError(f"ChannelContextEX needs exactly 2 hidden widths, got {tuple(hidden)}")
        h1, h2 = int(hidden[0]), int(hidden[1])
        self.fushion = nn.Sequential(
            conv5x5(in_dim, h1),
            nn.GELU(),
            conv5x5(h1, h2),
            nn.GELU(),
            conv5x5(h2, out_dim),
        )

    def forward(self, channel_params: torch.Tensor) -> torch.Tensor:
        return self.fushion(channel_params)
