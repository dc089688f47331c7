"""STPNetImageProcessor on every accepted input kind, and clear errors on bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_stpnet import STPNetImageProcessor

RNG = np.random.default_rng(0)
GRAY8 = (RNG.random((60, 90)) * 255).astype(np.uint8)


@pytest.fixture
def processor() -> STPNetImageProcessor:
    return STPNetImageProcessor(size={"height": 64, "width": 64})


def as_unit(processor: STPNetImageProcessor, pixel_values: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return pixel_values * std + mean


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(GRAY8, mode="L"),
        Image.fromarray(GRAY8, mode="L").convert("RGB"),
        Image.fromarray(GRAY8, mode="L").convert("RGBA"),
        Image.fromarray(GRAY8, mode="L").convert("LA"),
        Image.fromarray(GRAY8, mode="L").convert("P"),
        Image.fromarray(GRAY8.astype(np.uint16) * 257),  # 16-bit PNG-style, mode I;16
        GRAY8,
        np.repeat(GRAY8[..., None], 3, -1),
        np.repeat(GRAY8[None], 3, 0),  # channels first
        GRAY8.astype(np.uint16) * 257,
        GRAY8.astype(np.float32) / 255,
        torch.from_numpy(np.repeat(GRAY8[None], 3, 0)),
        torch.from_numpy(GRAY8.astype(np.float32) / 255),
    ],
    ids=[
        "L",
        "RGB",
        "RGBA",
        "LA",
        "P",
        "I16",
        "np-hw",
        "np-hwc",
        "np-chw",
        "np-u16",
        "np-f32",
        "torch-u8",
        "torch-f32",
    ],
)
def test_every_input_kind_gives_the_same_pixels(processor: STPNetImageProcessor, image) -> None:
    reference = processor(Image.fromarray(GRAY8, mode="L"))["pixel_values"]
    out = processor(image)
    assert out["pixel_values"].shape == (1, 3, 64, 64)
    assert out["pixel_values"].dtype == torch.float32
    assert out["original_sizes"].tolist() == [[60, 90]]
    # P mode quantises gray levels; everything else must match to rounding.
    assert torch.allclose(as_unit(processor, out["pixel_values"]), as_unit(processor, reference), atol=0.02)


def test_16_bit_uses_the_full_range(processor: STPNetImageProcessor) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    unit = as_unit(processor, processor(Image.fromarray(ramp))["pixel_values"])
    assert unit.min() < 0.01 and unit.max() > 0.99


def test_rgba_is_composited_over_black(processor: STPNetImageProcessor) -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, 32:, 3] = 255  # left half transparent
    unit = as_unit(processor, processor(Image.fromarray(rgba, mode="RGBA"))["pixel_values"])[0]
    assert unit[:, :, :28].max() < 0.01 and unit[:, :, 36:].min() > 0.75


def test_masks_are_binarised_and_resized(processor: STPNetImageProcessor) -> None:
    mask = np.zeros((60, 90), np.uint8)
    mask[10:40, 20:60] = 255
    noisy = np.clip(mask.astype(int) + RNG.integers(-40, 40, mask.shape), 0, 255).astype(np.uint8)  # JPEG-like
    labels01 = (mask > 0).astype(np.uint8)  # 0/1 label image
    for m in (Image.fromarray(noisy), labels01, mask > 0, Image.fromarray(mask).convert("RGB")):
        out = processor(GRAY8, segmentation_maps=m)
        labels = out["labels"]
        assert labels.shape == (1, 64, 64)
        assert set(labels.unique().tolist()) == {0.0, 1.0}
        assert abs(labels.mean().item() - (30 * 40) / (60 * 90)) < 0.03


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((1, 1, 3), np.uint8), "at least 8x8"),
        (np.full((32, 32), np.nan, np.float32), "NaN"),
        (np.full((32, 32), 3.0, np.float32), r"\[0, 1\]"),
        (np.zeros((32, 32, 5), np.uint8), "Unsupported image 0 shape"),
        ("not an image", "Unsupported image 0 type str"),
        (np.full((32, 32), -5, np.int32), r"\[0, 65535\]"),
    ],
)
def test_bad_images_raise_clear_errors(processor: STPNetImageProcessor, image, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        processor(image)


def test_error_names_which_image(processor: STPNetImageProcessor) -> None:
    with pytest.raises(ValueError, match="image 1"):
        processor([GRAY8, np.zeros((1, 1), np.uint8)])


def test_wrong_mask_size_is_refused(processor: STPNetImageProcessor) -> None:
    with pytest.raises(ValueError, match=r"Mask 0 is 80x60 but its image is 90x60"):
        processor(GRAY8, segmentation_maps=np.zeros((60, 80), np.uint8))
    with pytest.raises(ValueError, match="1 images but 2 masks"):
        processor(GRAY8, segmentation_maps=[GRAY8, GRAY8])


def test_size_must_be_a_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        STPNetImageProcessor(size={"height": 100, "width": 100})


def test_post_process_back_to_original_sizes(processor: STPNetImageProcessor) -> None:
    logits = torch.full((2, 1, 64, 64), -5.0)
    logits[:, :, 16:48, 16:48] = 5.0
    masks = processor.post_process_semantic_segmentation({"logits": logits}, target_sizes=[(60, 90), (128, 32)])
    assert masks[0].shape == (60, 90) and masks[1].shape == (128, 32)
    assert masks[0].dtype == torch.long and set(masks[0].unique().tolist()) == {0, 1}
    assert masks[1][64, 16] == 1 and masks[1][0, 0] == 0
    with pytest.raises(ValueError, match="target sizes"):
        processor.post_process_semantic_segmentation({"logits": logits}, target_sizes=[(60, 90)])
    # The threshold moves the boundary.
    soft = torch.linspace(-3, 3, 64).view(1, 1, 1, 64).expand(1, 1, 64, 64)
    low = processor.post_process_semantic_segmentation({"logits": soft}, threshold=0.2)[0].sum()
    high = processor.post_process_semantic_segmentation({"logits": soft}, threshold=0.8)[0].sum()
    assert low > high


def test_save_and_reload(processor: STPNetImageProcessor, tmp_path: Path) -> None:
    processor.save_pretrained(tmp_path)
    again = STPNetImageProcessor.from_pretrained(tmp_path)
    assert again.size == {"height": 64, "width": 64}
    assert torch.equal(again(GRAY8)["pixel_values"], processor(GRAY8)["pixel_values"])


def test_tensors_numpy_cannot_hold_are_widened_or_refused(processor: STPNetImageProcessor) -> None:
    """Found by the property tests: bfloat16 tensors (common from GPU pipelines) ended in torch's TypeError."""
    image = torch.rand(3, 40, 40)
    widened = processor(image.to(torch.bfloat16))["pixel_values"]
    assert torch.allclose(widened, processor(image.to(torch.bfloat16).float())["pixel_values"])
    with pytest.raises(ValueError, match="Unsupported image 0 tensor"):
        processor(torch.rand(3, 40, 40).to_sparse())
