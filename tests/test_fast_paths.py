"""The opt-in rewrites of `stpnet.optimize` (the speed work of benchmarks/PERFORMANCE.md): each computes
the plain model's function from the same parameters, in values and gradients, in either memory layout and in
16-bit inputs, on every preset."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from benchmarks import common
from modeling_stpnet import STPNetForSemanticSegmentation
from modeling_stpnet import optimize as opt

pytestmark = pytest.mark.usefixtures("one_thread")
PRESETS = common.preset_configs(None)


def _plain_and_optimized(config, randomise_batchnorm, **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = STPNetForSemanticSegmentation(config).eval()
    with torch.no_grad():
        randomise_batchnorm(plain)
    return plain, opt.optimize_for_inference(copy.deepcopy(plain), **options)


@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_optimize_for_inference_computes_the_plain_model(preset: str, cpu_kernels: bool, randomise_batchnorm) -> None:
    """Logits, retrieval logits and masks of the rewritten model are those of the plain model in eval mode, and its
    state_dict is the plain model's (a backbone preset builds its MobileNetV2 without weights)."""
    config = copy.deepcopy(PRESETS[preset])
    config.zero_init_ssa = False  # an SSA that starts as the identity would check nothing
    plain, fast = _plain_and_optimized(config, randomise_batchnorm, cpu_kernels=cpu_kernels)
    kinds = {type(m).__name__ for m in fast.modules()}
    assert {"InferenceSSA", "InferenceFusionBlock", "InferenceTokenGridToMap"} <= kinds
    assert not {"SSA", "FusionBlock", "TokenGridToMap"} & kinds
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(1))  # non-square
    with torch.no_grad():
        expected, got = plain(x), fast(x)
    scale = expected.logits.abs().max()
    assert (got.logits - expected.logits).abs().max() <= 1e-5 * scale
    assert torch.equal(got.logits > 0, expected.logits > 0)
    for a, b in zip(got.retrieval_logits, expected.retrieval_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.retrieved_indices, expected.retrieved_indices)


def test_a_checkpoint_loaded_as_remote_code_is_rewritten(tmp_path, randomise_batchnorm) -> None:
    """The predictor loads checkpoints as remote code, whose classes are copies of the package's: the rewrites find
    them by class name."""
    from transformers import AutoModel

    plain, _ = _plain_and_optimized(PRESETS["stpnet-tiny"], randomise_batchnorm)
    plain.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__module__.startswith("transformers_modules")
    fast = opt.optimize_for_inference(loaded)
    kinds = {type(m).__name__ for m in fast.modules()}
    assert {"InferenceSSA", "InferenceFusionBlock", "InferenceTokenGridToMap"} <= kinds
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, plain(x).logits, atol=1e-4, rtol=1e-4)


def test_optimize_for_inference_in_channels_last_and_bfloat16(randomise_batchnorm) -> None:
    config = common.variant_config(PRESETS["stpnet-tiny"], "shared")
    config.zero_init_ssa = False
    plain, fast = _plain_and_optimized(config, randomise_batchnorm)
    x = torch.randn(2, 3, 160, 128)  # the 1/8 maps are smaller than the largest dilation
    with torch.no_grad():
        expected = plain(x).logits
        fast.to(memory_format=torch.channels_last)
        got = fast(x.contiguous(memory_format=torch.channels_last)).logits
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        low = fast.to(torch.bfloat16)(x.to(torch.bfloat16)).logits
    assert low.dtype == torch.bfloat16 and (low.float() > 0).eq(expected > 0).float().mean() > 0.95


def test_an_optimized_model_refuses_training(randomise_batchnorm) -> None:
    _, fast = _plain_and_optimized(PRESETS["stpnet-tiny"], randomise_batchnorm)
    with pytest.raises(RuntimeError, match="optimize_for_inference"):
        fast.train()


def test_an_optimized_model_runs_without_no_grad(randomise_batchnorm) -> None:
    """Its parameters are frozen, so a call with autograd on builds no graph; that works after a first call under
    inference_mode too (which builds the cached interpolation matrices)."""
    plain, fast = _plain_and_optimized(PRESETS["stpnet-tiny"], randomise_batchnorm)
    assert not any(p.requires_grad for p in fast.parameters())
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        first = fast(x).logits
    again = fast(x).logits
    assert not again.requires_grad and torch.equal(again, first)
    with torch.no_grad():
        torch.testing.assert_close(again, plain(x).logits, atol=1e-5 * first.abs().max().item(), rtol=0)


def test_optimize_for_training_has_the_plain_models_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    config = copy.deepcopy(PRESETS["stpnet-tiny"])
    config.zero_init_ssa = False
    plain = STPNetForSemanticSegmentation(config).train()
    fast = opt.optimize_for_training(copy.deepcopy(plain), "cpu")
    assert {"ShiftedTapsSSA", "OneChannelProduct"} <= {type(m).__name__ for m in fast.modules()}
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 64, 96)
    labels = (torch.rand(2, 64, 96) > 0.7).float()
    text_labels = torch.zeros(2, config.num_text_categories, dtype=torch.long)
    losses = [m(x, labels=labels, text_labels=text_labels).loss for m in (plain, fast)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)
    running = [(n, b) for n, b in fast.named_buffers() if "running" in n]
    for name, buffer in running:  # BatchNorm updated the same statistics
        torch.testing.assert_close(buffer, plain.get_buffer(name), msg=name)
    assert opt.optimize_for_training(plain, "cuda") is plain and "ShiftedTapsSSA" not in {
        type(m).__name__ for m in plain.modules()
    }


def test_one_channel_product_equals_the_convolution() -> None:
    from modeling_stpnet.blocks import ConvToOneChannel

    torch.manual_seed(0)
    conv = ConvToOneChannel(8)
    product = opt.OneChannelProduct(conv)
    x = torch.randn(3, 8, 10, 12, requires_grad=True)
    out, expected = product(x), conv(x)
    assert out.shape == (3, 1, 10, 12) and torch.allclose(out, expected, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, product.weight, product.bias])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, conv.weight, conv.bias])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads, expected_grads, strict=True))
    channels_last = x.detach().contiguous(memory_format=torch.channels_last)
    assert torch.allclose(product(channels_last), expected.detach(), atol=1e-5)


def _dilated_convs() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=d, dilation=d, groups=8) for d in (6, 12, 18))


@pytest.mark.parametrize("chunked", [False, True])  # large maps go a few channels per pass (`_CHUNK_BYTES`)
def test_shifted_taps_sum_matches_the_convolutions(chunked: bool, monkeypatch) -> None:
    if chunked:  # passes of 3, 3 and 2 of the 8 channels at 40 x 40, every channel at once on the smaller maps
        monkeypatch.setattr(opt, "_CHUNK_BYTES", 3 * 2 * 40 * 40 * 4)
    convs = _dilated_convs()
    for h, w in [(28, 20), (7, 9), (40, 40)]:
        x = torch.randn(2, 8, h, w)
        with torch.no_grad():
            expected = sum(conv(x) for conv in convs)
            got = opt.shifted_dilated_sum(x, convs)
        assert torch.allclose(got, expected, atol=1e-5)
    # 16-bit inputs are summed in float32 and come back in their dtype and memory layout
    low = convs.to(torch.bfloat16)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 28, 20).to(torch.bfloat16, memory_format=layout)
        with torch.no_grad():
            got = opt.shifted_dilated_sum(x, low)
            expected = sum(
                F.conv2d(x.float(), c.weight.float(), c.bias.float(), 1, c.padding, c.dilation, 8) for c in low
            )
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=layout)
        torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("size", [(28, 20), (7, 9)])  # with every tap, and with taps wholly in the padding
@pytest.mark.parametrize("chunked", [False, True])
def test_dilated_depthwise_sum_has_the_gradients_of_the_convolutions(
    size: tuple[int, int], chunked: bool, monkeypatch
) -> None:
    """The rewritten SSA uses the shifted sum's own backward: input, weight and bias gradients."""
    if chunked:
        monkeypatch.setattr(opt, "_CHUNK_BYTES", 3 * 2 * size[0] * size[1] * 4)  # passes of 3, 3 and 2 channels
    convs = _dilated_convs()
    x = torch.randn(2, 8, *size, requires_grad=True)
    grad_out = torch.randn(2, 8, *size)
    parameters = [x, *convs.parameters()]
    got = torch.autograd.grad(opt.shifted_dilated_sum(x, convs), parameters, grad_out)
    expected = torch.autograd.grad(sum(conv(x) for conv in convs), parameters, grad_out)
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 under autocast, and differentiable
        y = opt.shifted_dilated_sum(x.to(torch.bfloat16), convs)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad is not None and convs[0].weight.grad is not None
