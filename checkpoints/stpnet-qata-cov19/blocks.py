"""Convolutional blocks of STPNet's U-shape: plain conv stages, SSA and the fusion block.

Each block does one job, with one forward, the same in training and inference; shapes are `(B, C, H, W)` unless a
comment says otherwise. The package's `stpnet.optimize` (not part of a checkpoint) rewrites some of them
into cheaper forms of the same function for CPU inference and training.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConvBNReLU(nn.Sequential):
    """Conv (no bias: BatchNorm follows) → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ConvToOneChannel(nn.Conv2d):
    """A 1x1 convolution to a single channel (the mask head, SSA's spatial gate): `(B, C, H, W) → (B, 1, H, W)`.

    Its own class so that `_init_weights` can give it the configured He-normal mode (`one_channel_conv_init`).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels, 1, kernel_size=1)


class DoubleConv(nn.Sequential):
    """Two 3x3 ConvBNReLU, the U-Net stage."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


class DownBlock(nn.Module):
    """Max-pool by 2, then a DoubleConv: `(B, Cin, H, W) → (B, Cout, H/2, W/2)`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.max_pool2d(x, 2))


class UpBlock(nn.Module):
    """Upsample to the skip's size, concatenate it, DoubleConv.

    `(B, Cin, h, w), (B, Cskip, 2h, 2w) → (B, Cout, 2h, 2w)`.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


def decoder_widths(encoder_channels: list[int], decoder_channels: list[int] | None) -> list[int]:
    """The four decoder widths, deep to shallow: `decoder_channels`, or the paper's `[4c, 2c, c, c]` for encoder
    widths `[c, 2c, 4c, ...]`."""
    if decoder_channels is not None:
        return list(decoder_channels)
    ch = encoder_channels
    return [ch[2], ch[1], ch[0], ch[0]]


def unet_up_blocks(encoder_channels: list[int], decoder: list[int]) -> nn.ModuleList:
    """The U-Net decoder, deep to shallow (as smp's `UnetDecoder`): stage `i` joins the deeper output with the skip
    `encoder_channels[3 - i]` into `decoder[i]` channels."""
    deep = [encoder_channels[4], *decoder[:-1]]
    return nn.ModuleList(UpBlock(d, s, o) for d, s, o in zip(deep, encoder_channels[3::-1], decoder))


class SSA(nn.Module):
    """Spatial Scale-aware module.

    `x → 1x1 conv → ReLU →` two branches, concatenated, fused by a 1x1 conv, plus the residual `x`:

    * spatial attention: depthwise 3x3 → 1x1 to one channel → sigmoid gate on the features;
    * multi-scale gating: depthwise 3x3 convs with dilations 6, 12, 18, summed, 1x1 conv, multiplied with its input.

    Shape preserving: `(B, C, H, W) → (B, C, H, W)`. `zero_init_residual` marks the fusing BatchNorm so that
    `STPNetPreTrainedModel._init_weights` starts its scale at zero: the module then starts as the identity.
    """

    def __init__(
        self, channels: int, dilations: tuple[int, ...] = (6, 12, 18), zero_init_residual: bool = False
    ) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True))
        self.spatial_dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.spatial_gate = ConvToOneChannel(channels)
        self.dilated = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=d, dilation=d, groups=channels) for d in dilations
        )
        self.scale_mix = nn.Conv2d(channels, channels, 1)
        self.fuse = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.fuse[1].zero_init = zero_init_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(x)
        spatial = y * torch.sigmoid(self.spatial_gate(self.spatial_dw(y)))  # gate: (B, 1, H, W)
        multi_scale = y * self.scale_mix(sum(conv(y) for conv in self.dilated))
        return x + self.fuse(torch.cat([spatial, multi_scale], dim=1))


class FusionBlock(nn.Module):
    """Merge a CNN decoder feature with the transformer branch's feature of the same resolution.

    concat → 1x1 conv → residual 1x1 conv → split into two halves → a 3x3 conv on each → concat, plus the decoder
    feature. Working on halves keeps the block at about a quarter of an up block's cost.
    `(B, C, H, W), (B, Ct, H, W) → (B, C, H, W)`.
    """

    def __init__(self, channels: int, transformer_channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"FusionBlock needs an even channel count, got {channels}")
        half = channels // 2
        self.merge = ConvBNReLU(channels + transformer_channels, channels, kernel_size=1)
        self.residual = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.branch_a = ConvBNReLU(half, half)
        self.branch_b = ConvBNReLU(half, half)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = self.merge(torch.cat([x, t], dim=1))
        z = F.relu(z + self.residual(z))
        a, b = z.chunk(2, dim=1)
        return x + torch.cat([self.branch_a(a), self.branch_b(b)], dim=1)


class TextSimilarityMap(nn.Module):
    """The scale's prompt as one extra input channel of a down block.

    The prompt (mean over its tokens) is projected to the feature width and compared with every pixel, giving a
    text-image similarity map: `(B, C, H, W), (B, L, C) → (B, 1, H, W)`.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Linear(channels, channels)
        self.norm = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        q = self.query(text.mean(dim=1))  # (B, C)
        sim = torch.einsum("bchw,bc->bhw", x, q) / x.shape[1] ** 0.5
        return self.norm(sim.unsqueeze(1))
