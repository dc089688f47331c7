"""Convolutional blocks of STPNet's U-shape: plain conv stages, SSA and the fusion block.

Each block does one job; shapes are `(B, C, H, W)` unless a comment says otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def is_tracing() -> bool:
    """True inside torch.export / the ONNX exporters, which need one graph for every input size."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


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

    On CPU it runs as one batched matrix product: oneDNN's convolution with a single output channel is slow there
    (on the 2-core development machine with 2 threads, 5-60x slower forward and 3-6x slower forward + backward than
    the product, e.g. 1.2 against 0.2 ms for 64 channels at 224 px and batch 1, 12 against 2 ms forward + backward for
    stpnet-tiny's 16 channels at its CPU training batch, 8 x 128 px). Same parameters as `nn.Conv2d`; exporters and
    other devices get the plain convolution (one Conv node, cuDNN).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_tracing() or x.device.type != "cpu":
            return super().forward(x)
        b, c, h, w = x.shape
        weight = self.weight.view(1, 1, c).expand(b, -1, -1)
        flat = x.reshape(b, c, h * w)
        out = torch.bmm(weight, flat) if self.bias is None else torch.baddbmm(self.bias.view(1, 1, 1), weight, flat)
        return out.view(b, 1, h, w)


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
        if not self.training:
            return self._inference_forward(x)
        y = self.reduce(x)
        spatial = y * torch.sigmoid(self.spatial_gate(self.spatial_dw(y)))  # gate: (B, 1, H, W)
        multi_scale = y * self.scale_mix(dilated_depthwise_sum(y, self.dilated))
        return x + self.fuse(torch.cat([spatial, multi_scale], dim=1))

    def _inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function, cheaper on CPU, for eval mode (BatchNorm is then a fixed affine map).

        * the dilated depthwise convolutions' sum as shifted multiply-adds (`dilated_depthwise_sum`, as in training);
        * the spatial gate's depthwise 3x3 and its 1x1 conv to one channel are composed into one linear map to one
          channel (`_gate_logits`), so the depthwise output is never materialised;
        * the fusing 1x1 conv runs on the two branches separately, with BatchNorm folded into it, so neither the
          gated copy of `y` nor the concatenation is materialised (the spatial gate is one value per pixel and
          commutes with a 1x1 conv), and the second branch accumulates into the first one's output.
        """
        y = self.reduce(x)
        gate = torch.sigmoid(self._gate_logits(y))  # (B, 1, H, W)
        multi_scale = self.scale_mix(dilated_depthwise_sum(y, self.dilated)).mul_(y)
        weight, bias = fold_batchnorm(*self.fuse)
        c = y.shape[1]
        out = F.conv2d(y, weight[:, :c]).mul_(gate).add_(bias.view(1, -1, 1, 1))
        return add_pointwise_conv_(out, multi_scale, weight[:, c:]).add_(x)

    def _gate_logits(self, y: torch.Tensor) -> torch.Tensor:
        """`spatial_gate(spatial_dw(y))` as one linear map: each of the 3x3 taps contracts the channels with
        `gate_weight * dw_weight[:, tap]` (one matrix product for all nine), and the nine one-channel maps are
        summed shifted. `(B, C, H, W) → (B, 1, H, W)`."""
        b, c, h, w = y.shape
        gate_w = self.spatial_gate.weight[0, :, 0, 0]  # (C,)
        bias = self.spatial_gate.bias + (self.spatial_dw.bias * gate_w).sum()
        if is_tracing():  # exporters: one dense 3x3 conv to one channel
            weight = (self.spatial_dw.weight[:, 0] * gate_w[:, None, None]).unsqueeze(0)
            return F.conv2d(y, weight, bias, padding=1)
        taps = (gate_w[:, None] * self.spatial_dw.weight.view(c, 9)).t()  # (9, C)
        if y.is_contiguous():
            taps = (taps @ y.view(b, c, h * w)).view(b, 9, h, w)
        else:  # channels-last: as a product it would copy `y` first; oneDNN's 1x1 conv reads it in place
            taps = F.conv2d(y, taps[:, :, None, None])
        taps = F.pad(taps, (1, 1, 1, 1))  # zero padding of the conv
        out = bias.view(1, 1, 1).expand(b, h, w).clone()
        for k in range(9):
            i, j = divmod(k, 3)
            out += taps[:, k, i : i + h, j : j + w]
        return out.unsqueeze(1)


def fold_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight, bias)` such that `F.conv2d(x, weight, bias)` equals `norm(conv(x))` with `norm` in eval mode."""
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.view(-1, *([1] * (conv.weight.ndim - 1))), bias


def dilated_depthwise_sum(x: torch.Tensor, convs: nn.ModuleList) -> torch.Tensor:
    """`sum(conv(x) for conv in convs)` for depthwise 3x3 convs with padding = dilation, as shifted multiply-adds.

    Each tap adds `weight[:, 0, i, j] * x` shifted by `((i-1)d, (j-1)d)` to the overlapping window of the output
    (zero padding contributes nothing, so no padded copy is made); the centre taps share one unshifted product, and
    taps that fall wholly into the padding (large dilations on small maps) are skipped. oneDNN has no fast kernel for
    dilated depthwise convolutions on CPU (3-10x slower than dilation 1 forward; forward + backward 1.4-3x slower
    than this at the training shapes here), so where gradients are needed on CPU a custom autograd function computes
    the backward from the same shifted products. Exporters (three Conv nodes, no branching on the input size) and
    training on other devices get the convs. `(B, C, H, W) → (B, C, H, W)`.
    """
    weight = torch.stack([conv.weight[:, 0] for conv in convs])  # (K, C, 3, 3)
    bias = sum(conv.bias for conv in convs)  # (C,)
    dilations = tuple(conv.dilation[0] for conv in convs)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    if is_tracing() or (needs_grad and x.device.type != "cpu"):
        return sum(conv(x) for conv in convs)
    if needs_grad:
        return _DilatedDepthwiseSum.apply(x, weight, bias, dilations)
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        # CPU in-place multiply-adds on 16-bit windows ran 4x slower per tap than in float32 (1.06 against 0.25 ms at
        # 128 x 112 x 112 on a 2-core Xeon), so the sum is made in float32 (in the input's layout) and cast back.
        return _shifted_taps_sum(x.float(), weight.float(), bias.float(), dilations).to(x.dtype)
    return _shifted_taps_sum(x, weight, bias, dilations)


def _taps(dilations: tuple[int, ...], h: int, w: int) -> list[tuple[int, int, int, int, int]]:
    """`(conv, i, j, dy, dx)` of every tap of the summed convs except the centres and those wholly in the padding."""
    taps = []
    for k, d in enumerate(dilations):
        for i in range(3):
            for j in range(3):
                dy, dx = (i - 1) * d, (j - 1) * d
                if not (i == j == 1 or abs(dy) >= h or abs(dx) >= w):
                    taps.append((k, i, j, dy, dx))
    return taps


def _windows(h: int, w: int, dy: int, dx: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Index of the output window and of the input window it reads for a tap shifted by `(dy, dx)`."""
    out = (Ellipsis, slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)))
    source = (Ellipsis, slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx)))
    return out, source


_CHUNK_BYTES = 2 << 20  # `_shifted_taps_sum` works on about this many bytes of input channels at a time


def _shifted_taps_sum(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilations: tuple[int, ...], reverse: bool = False
) -> torch.Tensor:
    """The summed depthwise convs of `weight` `(K, C, 3, 3)`; `reverse` runs every shift backwards (the adjoint).

    Each tap reads and writes the whole map, so on large maps the channels go a few at a time, all taps each, while
    they stay in the core's cache: 6.1 against 4.3 ms for 128 channels at 112 px on a 2-core Xeon, 2 threads."""
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    chunk = max(1, _CHUNK_BYTES // (b * h * w * x.element_size()))
    taps = _taps(dilations, h, w)
    for start in range(0, c, chunk):
        part = slice(start, start + chunk)
        xs, ws, outs = x[:, part], weight[:, part], out[:, part]
        center = ws[:, :, 1, 1].sum(0).view(1, -1, 1, 1)
        if bias is None:
            torch.mul(xs, center, out=outs)
        else:
            torch.addcmul(bias[part].view(1, -1, 1, 1), xs, center, out=outs)
        for k, i, j, dy, dx in taps:
            target, source = _windows(h, w, -dy, -dx) if reverse else _windows(h, w, dy, dx)
            outs[target].addcmul_(xs[source], ws[k, :, i, j].view(1, -1, 1, 1))
    return out


class _DilatedDepthwiseSum(torch.autograd.Function):
    """Forward and backward of `_shifted_taps_sum`: the input's gradient is the same sum with the shifts reversed;
    a tap's weight gradient is the per-channel sum of the output gradient times the input shifted by that tap.
    Under autocast it computes in float32 (memory-bound work, no matrix products to gain from lower precision)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilations: tuple[int, ...]
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilations = dilations
        return _shifted_taps_sum(x, weight, bias, dilations)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        h, w = x.shape[-2:]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _shifted_taps_sum(grad, weight, None, ctx.dilations, reverse=True)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            grad_weight[:, :, 1, 1] = (grad * x).sum((0, 2, 3))  # every centre tap reads the unshifted input
            for k, i, j, dy, dx in _taps(ctx.dilations, h, w):
                target, source = _windows(h, w, dy, dx)
                grad_weight[k, :, i, j] = (grad[target] * x[source]).sum((0, 2, 3))
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


def add_pointwise_conv_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`out += F.conv2d(x, weight)` for a 1x1 `weight` `(Co, Ci, 1, 1)`, accumulated in place (one batched matrix
    product into `out`'s memory) rather than through a new tensor of `out`'s size. Exporters, autocast, mixed dtypes and
    autograd get the plain conv.
    `(B, Co, H, W), (B, Ci, H, W) → out`."""
    plain = (
        is_tracing()
        or torch.is_autocast_enabled(out.device.type)  # the conv casts its operands; a matrix product with out= won't
        or not (out.dtype == x.dtype == weight.dtype and out.is_contiguous() and x.is_contiguous())
        or (torch.is_grad_enabled() and (out.requires_grad or x.requires_grad or weight.requires_grad))  # no autograd
    )
    if plain:
        return out.add_(F.conv2d(x, weight))
    b, co = out.shape[:2]
    flat = out.view(b, co, -1)
    # out= rather than baddbmm_: the same kernel, and torch's FLOP counter sees it (it skips the in-place form).
    torch.baddbmm(flat, weight.reshape(co, -1).expand(b, -1, -1), x.view(b, x.shape[1], -1), out=flat)
    return out


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
        if not self.training:
            return self._inference_forward(x, t)
        z = self.merge(torch.cat([x, t], dim=1))
        z = F.relu(z + self.residual(z))
        a, b = z.chunk(2, dim=1)
        return x + torch.cat([self.branch_a(a), self.branch_b(b)], dim=1)

    def _inference_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The same function in eval mode with fewer full-resolution tensors and passes (on CPU every new large
        tensor also costs fresh pages, the more so at large batches): BatchNorm folded into the convs; the
        merging 1x1 conv applied to `x`, with `t`'s half accumulated into the same tensor (no concatenated copy,
        no second output); the residual's identity folded into its weight; the two branches as one conv with 2
        groups (no split copies, no concatenation of their outputs)."""
        (merge_conv, merge_norm, _), (residual_conv, residual_norm) = self.merge, self.residual
        c = x.shape[1]
        weight, bias = fold_batchnorm(merge_conv, merge_norm)
        z = add_pointwise_conv_(F.conv2d(x, weight[:, :c], bias), t, weight[:, c:]).relu_()
        weight, bias = fold_batchnorm(residual_conv, residual_norm)
        identity = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device).view_as(weight)
        z = F.conv2d(z, weight + identity, bias).relu_()  # z + conv(z) = (W + I) z
        (conv_a, norm_a, _), (conv_b, norm_b, _) = self.branch_a, self.branch_b
        (weight_a, bias_a), (weight_b, bias_b) = fold_batchnorm(conv_a, norm_a), fold_batchnorm(conv_b, norm_b)
        y = F.conv2d(z, torch.cat([weight_a, weight_b]), torch.cat([bias_a, bias_b]), padding=conv_a.padding, groups=2)
        return y.relu_().add_(x)


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
