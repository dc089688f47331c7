"""The inference fast paths of the model's blocks (the speed work of benchmarks/PERFORMANCE.md): each computes the
documented function of the plain code, in values and gradients, in either memory layout and in 16-bit inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from benchmarks import common


@pytest.mark.parametrize(
    ("backbone", "layout"),
    [("shared", torch.contiguous_format), ("resnet18", torch.contiguous_format), ("shared", torch.channels_last)],
)
def test_inference_fast_paths_compute_the_documented_function(
    backbone: str, layout: torch.memory_format, randomise_batchnorm
) -> None:
    """SSA, FusionBlock and TokenGridToMap run cheaper code in eval mode; it must give the numbers of the plain
    (training-mode) code with BatchNorm in eval mode, in either memory layout."""
    from modeling_stpnet import STPNetForSemanticSegmentation
    from modeling_stpnet.blocks import SSA, FusionBlock
    from modeling_stpnet.transformer_stpnet import TokenGridToMap

    config = common.variant_config(common.preset_configs(["stpnet-tiny"])["stpnet-tiny"], "default")
    config.retrieval_backbone = backbone
    torch.manual_seed(0)
    model = STPNetForSemanticSegmentation(config).eval()
    with torch.no_grad():
        randomise_batchnorm(model)
        model.to(memory_format=layout)
        x = torch.randn(2, 3, 160, 128).contiguous(memory_format=layout)  # non-square; 1/8 maps < largest dilation
        fast = model(x)
        for module in model.modules():
            if isinstance(module, (SSA, FusionBlock, TokenGridToMap)):
                module.training = True  # the plain code path; BatchNorm and everything else stay in eval mode
        plain = model(x)
    scale = plain.logits.abs().max()
    assert (fast.logits - plain.logits).abs().max() <= 1e-5 * scale
    assert torch.equal(fast.retrieved_indices, plain.retrieved_indices)


def test_conv_to_one_channel_equals_the_convolution() -> None:
    """The mask head and SSA's gate run as a matrix product on CPU: the outputs and gradients of `nn.Conv2d` in
    any memory layout, and exporters still see one convolution."""
    from modeling_stpnet.blocks import ConvToOneChannel

    torch.manual_seed(0)
    head = ConvToOneChannel(8)
    x = torch.randn(3, 8, 10, 12, requires_grad=True)
    out, expected = head(x), F.conv2d(x, head.weight, head.bias)
    assert out.shape == (3, 1, 10, 12) and torch.allclose(out, expected, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, head.weight, head.bias])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, head.weight, head.bias])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads, expected_grads))
    channels_last = x.detach().contiguous(memory_format=torch.channels_last)
    assert torch.allclose(head(channels_last), expected.detach(), atol=1e-5)
    graph = torch.export.export(head.eval(), (x.detach(),)).graph
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [torch.ops.aten.conv2d.default]


def test_add_pointwise_conv_accumulates_in_place_and_is_counted() -> None:
    """The in-place 1x1 accumulation must equal a conv, write into `out`'s memory, and show in the GMAC count."""
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_stpnet.blocks import add_pointwise_conv_

    torch.manual_seed(0)
    out, x, weight = torch.randn(3, 6, 5, 7), torch.randn(3, 4, 5, 7), torch.randn(6, 4, 1, 1)
    expected = out + F.conv2d(x, weight)
    pointer = out.data_ptr()
    with FlopCounterMode(display=False) as counter:
        result = add_pointwise_conv_(out, x, weight)
    assert result.data_ptr() == pointer
    assert torch.allclose(result, expected, atol=1e-5)
    assert counter.get_total_flops() == 2 * 3 * 6 * 4 * 5 * 7

    # Under autograd (e.g. input saliency in eval mode) and autocast it falls back to the conv, with gradients.
    x.requires_grad_(True)
    add_pointwise_conv_(torch.zeros(3, 6, 5, 7), x, weight).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = add_pointwise_conv_(F.conv2d(x.detach(), torch.ones(6, 4, 1, 1)), x.detach(), weight)
    assert low.dtype == torch.bfloat16


@pytest.mark.parametrize("chunked", [False, True])  # large maps go a few channels per pass (`blocks._CHUNK_BYTES`)
def test_dilated_depthwise_sum_matches_the_convolutions(chunked: bool, monkeypatch) -> None:
    from modeling_stpnet import blocks
    from modeling_stpnet.blocks import dilated_depthwise_sum

    if chunked:  # passes of 3, 3 and 2 of the 8 channels at 40 x 40, every channel at once on the smaller maps
        monkeypatch.setattr(blocks, "_CHUNK_BYTES", 3 * 2 * 40 * 40 * 4)
    torch.manual_seed(0)
    convs = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=d, dilation=d, groups=8) for d in (6, 12, 18))
    for h, w in [(28, 20), (7, 9), (40, 40)]:
        x = torch.randn(2, 8, h, w)
        with torch.no_grad():
            expected = sum(conv(x) for conv in convs)
            assert torch.allclose(dilated_depthwise_sum(x, convs), expected, atol=1e-5)
    # 16-bit eval inputs are summed in float32 and come back in their dtype and memory layout
    low = convs.to(torch.bfloat16)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 28, 20).to(torch.bfloat16, memory_format=layout)
        with torch.no_grad():
            got = dilated_depthwise_sum(x, low)
            expected = sum(conv.float()(x.float()) for conv in copy.deepcopy(low))
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=layout)
        torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("size", [(28, 20), (7, 9)])  # with every tap, and with taps wholly in the padding
@pytest.mark.parametrize("chunked", [False, True])
def test_dilated_depthwise_sum_has_the_gradients_of_the_convolutions(
    size: tuple[int, int], chunked: bool, monkeypatch
) -> None:
    """Training uses the shifted sum's own backward on CPU: input, weight and bias gradients of the three convs."""
    from modeling_stpnet import blocks
    from modeling_stpnet.blocks import dilated_depthwise_sum

    if chunked:
        monkeypatch.setattr(blocks, "_CHUNK_BYTES", 3 * 2 * size[0] * size[1] * 4)  # passes of 3, 3 and 2 channels
    torch.manual_seed(0)
    convs = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=d, dilation=d, groups=8) for d in (6, 12, 18))
    x = torch.randn(2, 8, *size, requires_grad=True)
    grad_out = torch.randn(2, 8, *size)
    parameters = [x, *convs.parameters()]
    got = torch.autograd.grad(dilated_depthwise_sum(x, convs), parameters, grad_out)
    expected = torch.autograd.grad(sum(conv(x) for conv in convs), parameters, grad_out)
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 under autocast, and differentiable
        y = dilated_depthwise_sum(x.to(torch.bfloat16), convs)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad is not None and convs[0].weight.grad is not None
