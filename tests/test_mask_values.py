"""One mask rule and one colour rule for every path: io (converters, CLI), the image processor (Python API).

Masks with any two values {0, v} keep their lesion; near-binary (JPEG) masks are thresholded; label maps, images
and masks whose lesion would vanish raise errors that name the file, the values and what is accepted.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import blob_mask, make_kvasir
from PIL import Image

from modeling_stpnet import STPNetImageProcessor
from modeling_stpnet.image_processing_stpnet import mask_to_bool
from stpnet.data.io import DataError, load_image, load_mask, mask_array

TRUTH = blob_mask(40, 48, [(8, 10, 24, 30), (28, 30, 36, 44)])
SHARED = Path(os.environ.get("STPNET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def processor() -> STPNetImageProcessor:
    return STPNetImageProcessor(size={"height": 64, "width": 64}, do_resize=False)


def labels_of(processor: STPNetImageProcessor, mask) -> np.ndarray:
    image = np.zeros((*TRUTH.shape, 3), np.uint8)
    return processor(image, segmentation_maps=mask)["labels"][0].numpy().astype(bool)


def two_valued(value, dtype) -> np.ndarray:
    return np.where(TRUTH, value, 0).astype(dtype)


def jpeg_mask(truth: np.ndarray, quality: int = 30) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(np.where(truth, 255, 0).astype(np.uint8)).convert("RGB").save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer)


# ------------------------------------------------------------------------------------------- accepted masks
TWO_VALUES = {
    "0/1 uint8": two_valued(1, np.uint8),
    "0/2 uint8": two_valued(2, np.uint8),
    "0/255 uint8": two_valued(255, np.uint8),
    "0/1 uint16": two_valued(1, np.uint16),
    "0/1000 uint16": two_valued(1000, np.uint16),
    "0/4095 uint16 (12-bit)": two_valued(4095, np.uint16),
    "0/65535 uint16": two_valued(65535, np.uint16),
}


@pytest.mark.parametrize("name", list(TWO_VALUES))
def test_two_valued_masks_keep_their_lesion_from_files_and_the_processor(processor, tmp_path, name) -> None:
    array = TWO_VALUES[name]
    Image.fromarray(array).save(tmp_path / "mask.png")
    assert (load_mask(tmp_path / "mask.png") == TRUTH).all()
    assert (labels_of(processor, array) == TRUTH).all()
    assert (labels_of(processor, Image.open(tmp_path / "mask.png")) == TRUTH).all()


@pytest.mark.parametrize("mask", [TRUTH, TRUTH * np.float32(0.3), torch.from_numpy(TRUTH * np.float32(0.3))])
def test_bool_and_soft_float_masks(processor, mask) -> None:
    assert (labels_of(processor, mask) == TRUTH).all()
    assert (mask_to_bool(mask) == TRUTH).all()


def test_near_binary_masks_are_thresholded(processor) -> None:
    rng = np.random.default_rng(0)
    noisy = np.clip(two_valued(255, int) + rng.integers(-40, 40, TRUTH.shape), 0, 255).astype(np.uint8)
    for mask in (noisy, jpeg_mask(TRUTH, 30), jpeg_mask(TRUTH, 75)):
        assert (labels_of(processor, mask) != TRUTH).mean() < 0.02
        assert (mask_array(mask if isinstance(mask, Image.Image) else Image.fromarray(mask)) != TRUTH).mean() < 0.02


def test_empty_and_full_masks() -> None:
    assert not mask_to_bool(np.zeros((16, 16), np.uint8)).any()
    assert mask_to_bool(np.full((16, 16), 255, np.uint8)).all()


@pytest.mark.skipif(not (SHARED / "kvasir-seg" / "masks").is_dir(), reason="real Kvasir-SEG not present")
def test_real_kvasir_jpeg_masks_are_accepted() -> None:
    for path in sorted((SHARED / "kvasir-seg" / "masks").glob("*.jpg"))[:40]:
        expected = np.asarray(Image.open(path)).max(axis=2) > 127
        assert (load_mask(path) == expected).all(), path.name


# ------------------------------------------------------------------------------------------- refused masks
def gradient() -> np.ndarray:
    return np.tile(np.linspace(0, 255, TRUTH.shape[1]), (TRUTH.shape[0], 1)).astype(np.uint8)


def photo() -> np.ndarray:
    rng = np.random.default_rng(1)
    return (rng.random((*TRUTH.shape, 3)) * 255).astype(np.uint8)


def three_classes() -> np.ndarray:
    array = two_valued(255, np.uint8)
    array[:, :10] = 128  # a fifth of the image: a class region, not compression noise
    return array


REFUSED = [
    ("{0,128,255} label map", three_classes(), "label map"),
    ("{0,1,2} label map", np.where(TRUTH, 1, 0).astype(np.uint8) + np.eye(40, 48, dtype=np.uint8) * 2, "label map"),
    ("{0,1,2} uint16", (np.where(TRUTH, 2, 0) + np.eye(40, 48, dtype=int)).astype(np.uint16), "label map"),
    ("gradient", gradient(), "not a binary mask"),
    ("RGB photo", photo(), "not a binary mask"),
    ("faint many-valued", np.where(TRUTH, 60, 0).astype(np.uint8) + np.eye(40, 48, dtype=np.uint8) * 7, "is above"),
]


@pytest.mark.parametrize(("name", "array", "match"), REFUSED, ids=[r[0] for r in REFUSED])
def test_ambiguous_masks_raise_naming_the_file_values_and_what_is_accepted(tmp_path, name, array, match) -> None:
    path = tmp_path / "bad_mask.png"
    Image.fromarray(array).save(path)
    with pytest.raises(DataError, match=rf"bad_mask\.png: .*{match}") as info:
        load_mask(path)
    assert "{0, " in str(info.value) and "ccepted: a binary mask with exactly two values" in str(info.value)
    with pytest.raises(DataError, match=r"bad_mask\.png"):  # the converters go through open_image + mask_array
        from stpnet.data.io import open_image

        mask_array(open_image(path))


@pytest.mark.parametrize(("name", "array", "match"), REFUSED, ids=[r[0] for r in REFUSED])
def test_processor_refuses_the_same_masks(processor, name, array, match) -> None:
    with pytest.raises(ValueError, match=rf"mask 0: .*{match}"):
        labels_of(processor, array)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.full((16, 16), np.nan, np.float32), "NaN"),
        (np.where(TRUTH, 1.0, -0.5).astype(np.float32), "negative"),
        (np.where(TRUTH, 70000, 0).astype(np.int32) + np.eye(40, 48, dtype=np.int32), "16 bits"),
    ],
)
def test_impossible_mask_values(mask, match) -> None:
    with pytest.raises(ValueError, match=match):
        mask_to_bool(mask, where="m.png")


def test_label_map_message_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"several classes; STPNet segments one lesion class: map your lesion label"):
        mask_to_bool(REFUSED[1][1])


def test_kvasir_converter_reports_a_label_map_instead_of_skipping_it_as_empty(tmp_path) -> None:
    from stpnet.data import convert_layout

    root = make_kvasir(tmp_path / "kv", n_train=3, n_test=1)
    (root / "masks" / "tr01.jpg").unlink()
    Image.fromarray(REFUSED[1][1]).save(root / "masks" / "tr01.png")
    with pytest.raises(DataError, match=r"tr01\.png: .*label map"):
        convert_layout(root, progress=False, val_fraction=0.0)
    Image.fromarray(two_valued(2, np.uint8)).save(root / "masks" / "tr01.png")  # {0, 2}: lesion kept
    dataset, report = convert_layout(root, progress=False, val_fraction=0.0)
    assert report.counts["train"] == 3 and not report.skips
    row = next(r for r in dataset["train"] if r["name"] == "tr01")
    assert (np.asarray(row["mask"]) > 0).sum() == TRUTH.sum()


# ------------------------------------------------------------------------------------------- colour modes
RED = (200, 30, 30)


@pytest.mark.parametrize("mode", ["HSV", "LAB", "YCbCr", "CMYK"])
def test_other_colour_spaces_are_converted_not_read_as_rgb(processor, mode) -> None:
    rgb = Image.new("RGB", (48, 40), RED)
    out = processor(rgb.convert(mode))["pixel_values"]
    assert torch.allclose(out, processor(rgb)["pixel_values"], atol=0.05)  # HSV red read as RGB would be cyan


def test_load_image_converts_a_lab_tiff(tmp_path) -> None:
    Image.new("RGB", (16, 16), RED).convert("LAB").save(tmp_path / "lab.tif")
    assert np.abs(np.asarray(load_image(tmp_path / "lab.tif"))[0, 0].astype(int) - RED).max() <= 3


def test_modes_pil_cannot_convert_are_refused_clearly(processor) -> None:
    with pytest.raises(ValueError, match=r"Cannot convert PIL mode La .*accepted"):
        processor(Image.new("La", (16, 16)))


def test_rgba_gives_the_same_input_from_a_file_and_from_the_python_api(processor, tmp_path) -> None:
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., :3] = (np.arange(48) * 5)[None, :, None]
    rgba[..., 3] = np.linspace(0, 255, 40).astype(np.uint8)[:, None]  # alpha from transparent to opaque
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    from_file = processor(load_image(tmp_path / "rgba.png"))["pixel_values"]  # the CLI's path
    from_api = processor(Image.open(tmp_path / "rgba.png"))["pixel_values"]
    assert torch.allclose(from_file, from_api, atol=0.02)
    mean = torch.tensor(processor.image_mean).view(3, 1)
    std = torch.tensor(processor.image_std).view(3, 1)
    assert (from_api[0, :, 0] * std + mean).abs().max() < 1e-5  # the transparent top row is black
