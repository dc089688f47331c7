"""U-Net baseline: same widths as STPNet's encoder, STPNet's output type and loss, training signal, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.unet import UNetConfig, UNetForSemanticSegmentation
from modeling_stpnet import STPNetSegmentationOutput
from modeling_stpnet.blocks import DoubleConv, DownBlock, UpBlock
from modeling_stpnet.losses import bce_loss, dice_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with one bright disc each, and its mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for _ in range(batch):
        cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=g)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2).float()
        images.append(mask[None].repeat(3, 1, 1) * 1.5 + 0.3 * torch.randn(3, size, size, generator=g))
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)


def build(base: int = 8, seed: int = 0) -> UNetForSemanticSegmentation:
    torch.manual_seed(seed)
    return UNetForSemanticSegmentation(UNetConfig(base_channels=base, image_size=64))


@pytest.mark.parametrize(("size", "batch"), [(64, 1), (96, 2), (128, 3)])
def test_output_shapes_and_type(size: int, batch: int) -> None:
    model = build().eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, size, size))
    assert isinstance(out, STPNetSegmentationOutput)
    assert out.logits.shape == (batch, 1, size, size)
    assert out.loss is None and out.retrieval_logits is None and out.retrieved_indices is None
    assert model(torch.randn(1, 3, 64, 64), return_dict=False)[0].shape == (1, 1, 64, 64)


def test_built_from_the_package_blocks_at_stpnet_widths() -> None:
    model = build(base=16)
    assert model.config.encoder_channels == [16, 32, 64, 128, 128]
    assert isinstance(model.stem, DoubleConv)
    assert all(isinstance(b, DownBlock) for b in model.down_blocks)
    assert all(isinstance(b, UpBlock) for b in model.up_blocks)
    widths = [b.conv[1][0].out_channels for b in model.down_blocks]
    assert widths == [32, 64, 128, 128]
    assert [b.conv[1][0].out_channels for b in model.up_blocks] == [64, 32, 16, 16]


def test_loss_is_stpnets_dice_plus_bce() -> None:
    model = build().train()
    x, y = blobs(2, 64)
    out = model(x, labels=y, text_labels=torch.zeros(2, 4, dtype=torch.long))  # text labels are ignored
    cfg = model.config
    assert torch.allclose(out.dice_loss, dice_loss(out.logits, y[:, None]))
    assert torch.allclose(out.bce_loss, bce_loss(out.logits, y[:, None]))
    assert torch.allclose(out.loss, cfg.dice_weight * out.dice_loss + cfg.bce_weight * out.bce_loss)


def test_loss_decreases_and_every_parameter_learns() -> None:
    model = build(seed=1).train()
    x, y = blobs(3, 64, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):  # from logits near zero (the default head init) the loss starts low and falls slower
        optimizer.zero_grad()
        out = model(x, labels=y)
        out.loss.backward()
        if step == 0:
            dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert dead == []
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = build().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "stpnet-unet" and config["base_channels"] == 8
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "unet.py").is_file()
    loaded = UNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(before, loaded(x).logits)


def test_bad_inputs_and_config() -> None:
    model = build().eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 50, 64))
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="labels must be"):
        model(torch.randn(1, 3, 64, 64), labels=torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="base_channels"):
        UNetConfig(base_channels=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        UNetConfig(image_size=100)
    with pytest.raises(ValueError, match="one_channel_conv_init must be 'fan_in' or 'fan_out'"):
        UNetConfig(one_channel_conv_init="normal")


def test_head_init_mode_is_stpnets() -> None:
    """The baseline's 1x1 head follows `one_channel_conv_init` as STPNet's does: std sqrt(2) or sqrt(2 / C)."""
    for mode, expected in (("fan_out", 2**0.5), ("fan_in", (2 / 64) ** 0.5)):
        torch.manual_seed(0)
        head = UNetForSemanticSegmentation(UNetConfig(base_channels=64, one_channel_conv_init=mode)).head.weight
        assert abs(float(head.detach().std()) / expected - 1) < 0.25
