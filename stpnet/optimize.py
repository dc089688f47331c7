"""Opt-in rewrites of a model into cheaper forms of the same computation: `optimize_for_inference` and
`optimize_for_training`.

The model's modules have one forward each, the documented computation in standard torch ops, the same in training
and inference; that is what a checkpoint ships and what `from_pretrained` builds. The rewrites here replace some
modules by others that compute the same function from the same parameters, in a form that is cheaper on the CPU
(BatchNorm folded into convolutions, SSA's dilated depthwise convolutions as shifted multiply-adds, ...). The
replacements take over the original modules' submodules and parameters under the same names, so `state_dict()` is
unchanged. Nothing in the modeling files imports this module. Prediction, the demo (through the predictor), the ONNX
export and the speed benchmarks call `optimize_for_inference`, the trainer `optimize_for_training`; each rewrite is
kept only while it pays for itself inside the model (`benchmarks/breakdown.py --optimize`, PERFORMANCE.md section
14).

Modules are matched by class name: a checkpoint loads as remote code, whose classes are copies of this package's
classes rather than the same Python objects.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def optimize_for_inference(model: nn.Module, cpu_kernels: bool = True) -> nn.Module:
    """Put `model` in eval mode and replace its SSA, FusionBlock and TokenGridToMap modules, in place, by cheaper
    forms of the same function; returns `model`.

    Args:
        cpu_kernels: also use the forms that serve eager inference on the CPU (SSA's dilated convolutions as shifted
            multiply-adds, upsampling as matrix products); `False` keeps every rewrite a plain graph of standard
            operators that serves every input size (GPUs, ONNX export, `torch.export`).

    The result is for inference only. The rewritten modules fold BatchNorm's running
    statistics into their arithmetic, so `train()` raises afterwards (load the checkpoint again to train); they
    work in place on their own intermediates, so the model computes no gradients: its parameters stop requiring
    them, and gradients with respect to the input (e.g. saliency maps) need the plain model.
    """
    rewrites: dict[str, Any] = {
        "SSA": lambda m: InferenceSSA(m, cpu_kernels),
        "FusionBlock": lambda m: InferenceFusionBlock(m, cpu_kernels),
        "TokenGridToMap": lambda m: InferenceTokenGridToMap(m, cpu_kernels),
    }
    _replace(model.eval().requires_grad_(False), rewrites)
    return model


def optimize_for_training(model: nn.Module, device: torch.device | str) -> nn.Module:
    """For training on the CPU, replace, in place, SSA's dilated depthwise convolutions by shifted multiply-adds and
    the 1x1 convolutions to one channel (`ConvToOneChannel`: the mask head, SSA's spatial gate) by a matrix product,
    each with its own backward: oneDNN's kernels for both are slow on the CPU, their backward most. Returns `model`.

    The replacements compute the same function in training and eval mode and keep every parameter and BatchNorm
    statistic where it was, so checkpoints saved during training are those of the plain model. On other devices
    `model` is returned unchanged.
    """
    if torch.device(device).type == "cpu":
        _replace(model, {"SSA": ShiftedTapsSSA, "ConvToOneChannel": OneChannelProduct})
    return model


def _replace(model: nn.Module, rewrites: dict[str, Any]) -> None:
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child).__name__ in rewrites
    ]
    for parent, name, child in targets:
        setattr(parent, name, rewrites[type(child).__name__](child))


class _SameParameters(nn.Module):
    """Takes over the submodules, parameters and buffers of `plain` under the same names."""

    def __init__(self, plain: nn.Module) -> None:
        super().__init__()
        for name, child in plain.named_children():
            self.add_module(name, child)
        for name, parameter in plain.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in plain.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        self.training = plain.training


class _EvalOnly(_SameParameters):
    """A rewrite that folds BatchNorm into convolutions: the same function only with BatchNorm's running statistics,
    so it refuses training mode."""

    def __init__(self, plain: nn.Module) -> None:
        super().__init__(plain)
        self.training = False

    def train(self, mode: bool = True) -> nn.Module:
        if mode:
            raise RuntimeError(
                f"{type(self).__name__} comes from optimize_for_inference and only runs in eval mode; "
                "train the plain model (load the checkpoint again)"
            )
        return super().train(False)


class OneChannelProduct(_SameParameters):
    """A 1x1 convolution to one channel (`ConvToOneChannel`) as one batched matrix product, which autograd
    differentiates. `(B, C, H, W) → (B, 1, H, W)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weight = self.weight.view(1, 1, c).expand(b, -1, -1)
        flat = x.reshape(b, c, h * w)
        return torch.baddbmm(self.bias.view(1, 1, 1), weight, flat).view(b, 1, h, w)


class ShiftedTapsSSA(_SameParameters):
    """SSA with the sum of its dilated depthwise convolutions as `shifted_dilated_sum`, in training and eval mode
    alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(x)
        spatial = y * torch.sigmoid(self.spatial_gate(self.spatial_dw(y)))
        multi_scale = y * self.scale_mix(shifted_dilated_sum(y, self.dilated))
        return x + self.fuse(torch.cat([spatial, multi_scale], dim=1))


class InferenceSSA(_EvalOnly):
    """SSA in eval mode: the fusing 1x1 conv runs on the two branches separately with BatchNorm folded into it, so
    neither the gated copy of `y` nor the concatenation is made (the spatial gate is one value per pixel and commutes
    with a 1x1 conv). With `cpu_kernels`, the dilated convolutions' sum is `shifted_dilated_sum`, the second branch
    accumulates into the first one's output (`_add_pointwise_conv_`), and the spatial gate's depthwise 3x3 and its
    1x1 conv to one channel are composed (`_gate_logits`), so the depthwise output is never made."""

    def __init__(self, plain: nn.Module, cpu_kernels: bool) -> None:
        super().__init__(plain)
        self.cpu_kernels = cpu_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(x)
        weight, bias = fold_batchnorm(*self.fuse)
        c = y.shape[1]
        if not self.cpu_kernels:
            gate = torch.sigmoid(self.spatial_gate(self.spatial_dw(y)))  # (B, 1, H, W)
            multi_scale = self.scale_mix(sum(conv(y) for conv in self.dilated)).mul_(y)
            out = F.conv2d(y, weight[:, :c]).mul_(gate).add_(bias.view(1, -1, 1, 1))
            return out.add_(F.conv2d(multi_scale, weight[:, c:])).add_(x)
        gate = torch.sigmoid(self._gate_logits(y))
        multi_scale = self.scale_mix(shifted_dilated_sum(y, self.dilated)).mul_(y)
        out = F.conv2d(y, weight[:, :c]).mul_(gate).add_(bias.view(1, -1, 1, 1))
        return _add_pointwise_conv_(out, multi_scale, weight[:, c:]).add_(x)

    def _gate_logits(self, y: torch.Tensor) -> torch.Tensor:
        """`spatial_gate(spatial_dw(y))` as one linear map: each of the 3x3 taps contracts the channels with
        `gate_weight * dw_weight[:, tap]` (one matrix product for all nine), and the nine one-channel maps are
        summed shifted. `(B, C, H, W) → (B, 1, H, W)`."""
        b, c, h, w = y.shape
        gate_w = self.spatial_gate.weight[0, :, 0, 0]  # (C,)
        bias = self.spatial_gate.bias + (self.spatial_dw.bias * gate_w).sum()
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


class InferenceFusionBlock(_EvalOnly):
    """FusionBlock in eval mode with fewer full-resolution tensors and passes: BatchNorm folded into the convs; the
    merging 1x1 conv applied to `x` and to `t` separately and summed (no concatenated copy; with `cpu_kernels`
    accumulated in place, `_add_pointwise_conv_`); the residual's identity folded into its weight; the two branches
    as one conv with 2 groups (no split copies, no concatenation)."""

    def __init__(self, plain: nn.Module, cpu_kernels: bool) -> None:
        super().__init__(plain)
        self.cpu_kernels = cpu_kernels

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        (merge_conv, merge_norm, _), (residual_conv, residual_norm) = self.merge, self.residual
        c = x.shape[1]
        weight, bias = fold_batchnorm(merge_conv, merge_norm)
        z = F.conv2d(x, weight[:, :c], bias)
        if self.cpu_kernels:
            z = _add_pointwise_conv_(z, t, weight[:, c:]).relu_()
        else:
            z = z.add_(F.conv2d(t, weight[:, c:])).relu_()
        weight, bias = fold_batchnorm(residual_conv, residual_norm)
        identity = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device).view_as(weight)
        z = F.conv2d(z, weight + identity, bias).relu_()  # z + conv(z) = (W + I) z
        (conv_a, norm_a, _), (conv_b, norm_b, _) = self.branch_a, self.branch_b
        (weight_a, bias_a), (weight_b, bias_b) = fold_batchnorm(conv_a, norm_a), fold_batchnorm(conv_b, norm_b)
        y = F.conv2d(z, torch.cat([weight_a, weight_b]), torch.cat([bias_a, bias_b]), padding=conv_a.padding, groups=2)
        return y.relu_().add_(x)


class InferenceTokenGridToMap(_EvalOnly):
    """TokenGridToMap in eval mode: conv and BatchNorm are then one fixed per-pixel affine map and bilinear weights
    sum to one, so they run on the token grid before upsampling (at full resolution it has 256x fewer pixels). With
    `cpu_kernels` the upsampling is two small matrix products with the interpolation matrices."""

    def __init__(self, plain: nn.Module, cpu_kernels: bool) -> None:
        super().__init__(plain)
        self.cpu_kernels = cpu_kernels

    def forward(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        conv, norm, act = self.get_submodule("0"), self.get_submodule("1"), self.get_submodule("2")
        grid = norm(conv(fmap))
        if not self.cpu_kernels:
            return act(F.interpolate(grid, size=size, mode="bilinear", align_corners=False))
        rows = _interpolation_matrix(grid.shape[-2], int(size[0]), grid.dtype, grid.device)
        cols = _interpolation_matrix(grid.shape[-1], int(size[1]), grid.dtype, grid.device)
        return act(rows @ (grid @ cols.t()))


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`(n_out, n_in)` linear-interpolation weights with PyTorch's align_corners=False rule: source position
    `(i + 0.5) * n_in / n_out - 0.5`, clamped at 0, between the two nearest inputs (the last one repeats)."""
    # A normal tensor even when first built under inference_mode, so that a later call with autograd can save it.
    with torch.inference_mode(False), torch.no_grad():
        return _linear_interpolation(n_in, n_out).to(dtype=dtype, device=device)


def _linear_interpolation(n_in: int, n_out: int) -> torch.Tensor:
    source = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = source - low
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix


def _add_pointwise_conv_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`out += F.conv2d(x, weight)` for a 1x1 `weight` `(Co, Ci, 1, 1)`, accumulated in place: one batched matrix
    product into `out`'s memory rather than a new tensor of `out`'s size, which at large batches costs fresh pages.
    Other layouts, mixed dtypes and autocast (the conv casts its operands; a product with out= does not) get the
    conv. `(B, Co, H, W), (B, Ci, H, W) → out`."""
    if torch.is_autocast_enabled(out.device.type) or not (
        out.dtype == x.dtype == weight.dtype and out.is_contiguous() and x.is_contiguous()
    ):
        return out.add_(F.conv2d(x, weight))
    b, co = out.shape[:2]
    flat = out.view(b, co, -1)
    # out= rather than baddbmm_: the same kernel, and torch's FLOP counter sees it (it skips the in-place form).
    torch.baddbmm(flat, weight.reshape(co, -1).expand(b, -1, -1), x.view(b, x.shape[1], -1), out=flat)
    return out


def fold_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight, bias)` such that `F.conv2d(x, weight, bias)` equals `norm(conv(x))` with `norm` in eval mode."""
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.view(-1, *([1] * (conv.weight.ndim - 1))), bias


# ---------------------------------------------------------------------------------------------------- shifted taps
def shifted_dilated_sum(x: torch.Tensor, convs: nn.ModuleList) -> torch.Tensor:
    """`sum(conv(x) for conv in convs)` for depthwise 3x3 convs with padding = dilation, as shifted multiply-adds
    with their own backward (`_DilatedDepthwiseSum`). `(B, C, H, W) → (B, C, H, W)`."""
    return _DilatedDepthwiseSum.apply(x, *_stacked_taps(convs))


def _stacked_taps(convs: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Weights `(K, C, 3, 3)`, summed bias `(C,)` and dilations of depthwise 3x3 convs with padding = dilation."""
    weight = torch.stack([conv.weight[:, 0] for conv in convs])
    return weight, sum(conv.bias for conv in convs), tuple(conv.dilation[0] for conv in convs)


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
    """The summed depthwise convs of `weight` `(K, C, 3, 3)` with padding = dilation; `reverse` runs every shift
    backwards (the adjoint). `(B, C, H, W) → (B, C, H, W)`.

    Each tap adds `weight[k, :, i, j] * x` shifted by `((i-1)d, (j-1)d)` to the overlapping window of the output
    (zero padding contributes nothing, so no padded copy is made); the centre taps share one unshifted product, and
    taps wholly in the padding are skipped. Each tap reads and writes the whole map, so on large maps the channels
    go a few at a time, all taps each, while they stay in the core's cache."""
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
    Under autocast, and for 16-bit inputs, it computes in float32: memory-bound work with no matrix products to gain
    from lower precision, and in-place multiply-adds on 16-bit windows are several times slower per tap on the CPU."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilations: tuple[int, ...]
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilations = dilations
        if x.dtype in (torch.bfloat16, torch.float16):
            return _shifted_taps_sum(x.float(), weight.float(), bias.float(), dilations).to(x.dtype)
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
