"""The multi-scale text-conditioned transformer branch of STPNet: MTBlock and UTrans.

At every scale the CNN feature is cut into patches so that all four scales share one token grid of
`(H/stride) x (W/stride)` positions (patch 16/8/4/2 at full, 1/2, 1/4, 1/8 resolution for stride 16).
Tokens are `(B, N, C)` with `N = (H/stride) * (W/stride)`; text tokens are `(B, L, C)`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import ConvBNReLU


class Attention(nn.Module):
    """Multi-head attention on `torch.nn.functional.scaled_dot_product_attention` (fused kernels where available).

    `(B, N, D) [, (B, M, Dkv)] → (B, N, D)`; self-attention when no context is given.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, out_dim: int | None = None) -> torch.Tensor:
        """`out_dim` keeps only the first `out_dim` output channels, computing only those rows of the output
        projection (the MTBlock discards the text half of its joint attention)."""
        b, n, d = x.shape
        context = x if context is None else context
        q = self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)  # heads joined again
        if out_dim is None or out_dim == d:
            return self.out(y)
        return F.linear(y, self.out.weight[:out_dim], self.out.bias[:out_dim])


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float) -> None:
        hidden = max(1, int(dim * ratio))
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP block: `(B, N, C) → (B, N, C)`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MTBlock(nn.Module):
    """Multi-scale Text block: joins one scale's image tokens with its text prompt.

    The text tokens are first mapped onto the image token positions (cross-attention: each position gathers the
    prompt words relevant to it), then image and positioned text are concatenated along channels and one
    multi-head self-attention runs over the joined width `2C`; the image half is kept, followed by an MLP.
    `(B, N, C), (B, L, C) → (B, N, C)`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_image = nn.LayerNorm(dim)
        self.norm_text = nn.LayerNorm(dim)
        self.text_to_positions = Attention(dim, num_heads)
        self.joint_attn = Attention(2 * dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image = self.norm_image(x)
        positioned_text = self.text_to_positions(image, self.norm_text(text))  # (B, N, C)
        # Self-attention over the joined width 2C; only the image half of its output is kept, so only that half
        # of the output projection is computed (the same numbers as slicing a full projection).
        x = x + self.joint_attn(torch.cat([image, positioned_text], dim=-1), out_dim=x.shape[-1])  # (B, N, C)
        return x + self.mlp(self.norm2(x))


class UTrans(nn.Module):
    """U-shaped transformer branch built of per-scale MTBlocks.

    Down path: for scale `s`, tokens = patch-embed(feature_s) + position embedding + projected tokens of scale
    `s-1`, then MTBlock with the scale's prompt. Up path: from the deepest scale, one self-attention block per
    scale on its tokens plus the projected tokens of the deeper scale. Each scale's up tokens are reshaped to the
    token grid; `reconstruct[s]` brings them back to that scale's feature map. The model calls it right before the
    map's fusion block, so a full-size map is never held while the others are made.

    Args:
        channels: widths of the four scales (e.g. 64/128/256/512).
        image_size: training resolution (sets the base position-embedding grid).
        token_stride: input pixels per token at every scale.
        use_text: `False` replaces the MTBlocks by plain self-attention blocks (the no-text ablation).
        feature_strides: strides of the four features (default 1, 2, 4, 8); patch size = token_stride / stride.

    Forward: four features `(B, C_s, H/stride_s, W/stride_s)` and four prompts `(B, L, C_s)` (or `None`) →
    four token-grid maps `(B, C_s, H/stride, W/stride)`.
    """

    def __init__(
        self,
        channels: list[int],
        image_size: int,
        token_stride: int,
        num_heads: int,
        mlp_ratio: float,
        use_text: bool = True,
        feature_strides: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.use_text = use_text
        strides = feature_strides or [2**s for s in range(len(channels))]
        if any(token_stride % s for s in strides):
            raise ValueError(f"token_stride {token_stride} must be a multiple of every feature stride {strides}")
        self.patch_sizes = [token_stride // s for s in strides]
        grid = image_size // token_stride
        self.patch_embeds = nn.ModuleList(
            nn.Conv2d(c, c, kernel_size=p, stride=p) for c, p in zip(channels, self.patch_sizes)
        )
        # Zeros, as TransUNet's and LViT's, and never re-initialised: every result in this repository trained so.
        self.position_embeddings = nn.ParameterList(nn.Parameter(torch.zeros(1, c, grid, grid)) for c in channels)
        self.down_links = nn.ModuleList(nn.Linear(a, b) for a, b in zip(channels[:-1], channels[1:]))
        block = MTBlock if use_text else TransformerBlock
        self.down_blocks = nn.ModuleList(block(c, num_heads, mlp_ratio) for c in channels)
        self.up_links = nn.ModuleList(nn.Linear(b, a) for a, b in zip(channels[:-1], channels[1:]))
        self.up_blocks = nn.ModuleList(TransformerBlock(c, num_heads, mlp_ratio) for c in channels)
        self.up_norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)
        self.reconstruct = nn.ModuleList(TokenGridToMap(c) for c in channels)

    def _embed(self, s: int, feature: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeds[s](feature)  # (B, C, h, w) on the token grid
        # Resampled to the input's grid at every size (bicubic at scale 1 is exactly the identity), so that an
        # exported graph has no branch on the input size.
        pos = F.interpolate(self.position_embeddings[s], size=x.shape[-2:], mode="bicubic", align_corners=False)
        return (x + pos).flatten(2).transpose(1, 2)  # (B, N, C)

    def forward(self, features: list[torch.Tensor], prompts: list[torch.Tensor] | None) -> list[torch.Tensor]:
        grid = features[0].shape[-2] // self.patch_sizes[0], features[0].shape[-1] // self.patch_sizes[0]
        tokens, previous = [], None
        for s, feature in enumerate(features):
            x = self._embed(s, feature)
            if previous is not None:
                x = x + self.down_links[s - 1](previous)
            x = self.down_blocks[s](x, prompts[s]) if self.use_text else self.down_blocks[s](x)
            tokens.append(x)
            previous = x

        outputs: list[torch.Tensor] = [None] * len(features)  # type: ignore[list-item]
        deeper = None
        for s in reversed(range(len(features))):
            x = tokens[s] if deeper is None else tokens[s] + self.up_links[s](deeper)
            x = self.up_norms[s](self.up_blocks[s](x))
            deeper = x
            b, n, c = x.shape
            # contiguous: the transposed view is channels-last in memory, and that layout would spread to the
            # full-resolution maps and make every later convolution convert it back.
            outputs[s] = x.transpose(1, 2).reshape(b, c, *grid).contiguous()
        return outputs


class TokenGridToMap(ConvBNReLU):
    """UTrans's "reconstruct" step: token-grid map → feature map, by bilinear upsampling → 1x1 conv → BN → ReLU.

    `(B, C, h, w), size → (B, C, *size)`.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, kernel_size=1)

    def forward(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return super().forward(F.interpolate(fmap, size=size, mode="bilinear", align_corners=False))
