"""stpnet-predict and the shared inference/overlay code: mixed folders, bad files, limits, caching, exit codes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_stpnet import STPNetConfig, STPNetForSemanticSegmentation, STPNetImageProcessor
from modeling_stpnet.image_processing_stpnet import NO_LESION_DESCRIPTION
from stpnet.data.io import DataError
from stpnet.inference.cli import main
from stpnet.inference.predict import (
    CheckpointError,
    FlipAveraged,
    is_hub_id,
    load_predictor,
    prepare_image,
    resolve_checkpoint,
)
from stpnet.text_repository import ScaleAwareTextRepository
from stpnet.visualize import (
    LESION_COLOUR,
    TRUTH_COLOUR,
    comparison_overlay,
    mask_boundary,
    overlay_mask,
    side_by_side,
    titled,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = ROOT / "sample" / "kvasir-seg-mini" / "images" / "cju16jgnyzp970878melv7r25.jpg"


# ---------------------------------------------------------------------------------------------- shared helpers
@cache
def _encoded_kvasir() -> tuple[torch.Tensor, ...]:
    repo = ScaleAwareTextRepository.from_json_file(ROOT / "configuration" / "text" / "kvasir-seg.json")
    return tuple(repo.encode())


def tiny_checkpoint(folder: Path) -> Path:
    """A small random-weight STPNet with the Kvasir-SEG repository (real MiniLM embeddings), saved like training does.

    Also used by tests/test_demo.py, so neither depends on the training job's checkpoint.
    """
    data = json.loads((ROOT / "configuration" / "models" / "stpnet-tiny.json").read_text())
    repo = ScaleAwareTextRepository.from_json_file(ROOT / "configuration" / "text" / "kvasir-seg.json")
    data.update(base_channels=8, retrieval_backbone="shared", **repo.config_kwargs())
    torch.manual_seed(0)
    model = STPNetForSemanticSegmentation(STPNetConfig(**data)).eval()
    model.set_text_embeddings(list(_encoded_kvasir()), "sentence-transformers/all-MiniLM-L6-v2")
    model.save_pretrained(folder)
    STPNetImageProcessor(size={"height": 128, "width": 128}).save_pretrained(folder)
    return folder


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds no pixels: a decompression bomb in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write_bad_and_odd_files(folder: Path) -> dict[str, Path]:
    """One of each kind of upload the tools must cope with; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / name for name in ("good.jpg", "corrupt.jpg", "notes.txt", "rgba.png", "gray16.png")}
    shutil.copy(SAMPLE_IMAGE, files["good.jpg"])
    files["corrupt.jpg"].write_bytes(SAMPLE_IMAGE.read_bytes()[:2500])  # truncated JPEG
    files["notes.txt"].write_text("not an image\n")
    rgba = np.zeros((60, 90, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    rgba[20:40, 30:60, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(files["rgba.png"])
    gray = (np.linspace(0, 65535, 70 * 50).reshape(50, 70)).astype(np.uint16)  # values far above 255
    Image.fromarray(gray).save(files["gray16.png"])
    assert Image.open(files["gray16.png"]).mode.startswith("I;16")
    return files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("predict") / "checkpoint")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------- command line
def test_cli_on_a_mixed_folder(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_bad_and_odd_files(tmp_path / "in")
    (tmp_path / "in" / ".hidden.png").write_bytes(b"ignored")
    out = tmp_path / "out"
    kept = []  # on CPU the command keeps freed memory (tests/test_cpu_memory.py); not in the test process itself
    monkeypatch.setattr("stpnet.inference.cli.keep_freed_memory", lambda: kept.append(True))
    code = main(["--model", str(checkpoint), str(tmp_path / "in"), str(tmp_path / "missing.png"),
                 "--output-dir", str(out), "--batch-size", "2", "--threshold", "0.4", "--device", "cpu"])  # fmt: skip
    assert code == 0 and kept == [True]
    captured = capsys.readouterr()
    assert "3 processed, 3 skipped" in captured.out.splitlines()[-1]
    rows = {Path(r["file"]).name: r for r in read_csv(out / "predictions.csv")}
    assert set(rows) == {"good.jpg", "rgba.png", "gray16.png"}
    for name, row in rows.items():
        size = Image.open(files[name]).size
        mask = Image.open(out / row["mask"])
        assert mask.mode == "L" and mask.size == size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(out / row["overlay"]).size == size
        assert (int(row["width"]), int(row["height"])) == size
        assert int(row["lesion_pixels"]) == int((np.asarray(mask) > 0).sum())
        assert float(row["lesion_percent"]) == pytest.approx(100 * int(row["lesion_pixels"]) / (size[0] * size[1]))
        lesion = int(row["lesion_pixels"]) > 0  # the mask's verdict decides the description
        assert row["description"] == (row["retrieved_description"] if lesion else NO_LESION_DESCRIPTION)
        for category in ("count", "size", "horizontal", "vertical"):
            assert row[category] in row["retrieved_description"]
            assert 0 < float(row[f"{category}_probability"]) <= 1
    skipped = {Path(r["file"]).name: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert set(skipped) == {"corrupt.jpg", "notes.txt", "missing.png"}
    assert "truncated" in skipped["corrupt.jpg"] and "unreadable image" in skipped["notes.txt"]
    assert skipped["missing.png"] == "not found"
    assert "corrupt.jpg" in captured.err and "notes.txt" in captured.err

    main(["--model", str(checkpoint), str(files["good.jpg"]), "--output-dir", str(tmp_path / "out2"),
          "--device", "cpu", "--release-memory"])  # fmt: skip
    assert kept == [True]  # --release-memory leaves the allocator alone


def test_cli_exit_status_when_nothing_is_processed(checkpoint: Path, tmp_path: Path) -> None:
    """Through ``python -m`` (as a user runs it): only unreadable files -> non-zero exit and a summary."""
    files = write_bad_and_odd_files(tmp_path / "in")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "stpnet.inference.cli", "--model", str(checkpoint), str(files["notes.txt"]),
         str(files["corrupt.jpg"]), "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 processed, 2 skipped" in result.stdout
    assert read_csv(tmp_path / "out" / "predictions.csv") == []


def test_cli_missing_checkpoint_explains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["--model", str(tmp_path / "no" / "checkpoint"), str(SAMPLE_IMAGE), "--output-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "No STPNet checkpoint" in err and "scripts/main.sh" in err and "STPNET_CHECKPOINT" in err


def test_cli_checks_inputs_before_loading_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = main(
        ["--model", str(tmp_path / "no" / "checkpoint"), str(tmp_path / "missing.png"), "--output-dir", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()  # nothing written, and the (missing) model never loaded
    assert "missing.png: not found" in err and "No STPNet checkpoint" not in err


def test_cli_says_on_the_console_that_an_input_was_downscaled(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (150, 60, 50)).save(image)
    out = str(tmp_path / "out")
    assert main(["--model", str(checkpoint), str(image), "--output-dir", out, "--max-pixels", "16384"]) == 0
    assert f"note: {image}: downscaled from 300x200 to " in capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--threshold", "1.5", str(SAMPLE_IMAGE)])
    assert raised.value.code == 2 and "--threshold" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- images and limits
def test_rgba_and_16_bit_are_read_not_refused(tmp_path: Path) -> None:
    files = write_bad_and_odd_files(tmp_path)
    rgba = prepare_image(files["rgba.png"]).image
    assert rgba.mode == "RGB" and rgba.size == (90, 60)
    gray = np.asarray(prepare_image(files["gray16.png"]).image)
    assert gray.shape == (50, 70, 3) and gray[0, 0, 0] == 0 and gray[-1, -1, 0] == 255  # scaled, not clipped


def test_huge_images_are_downscaled_or_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 300), (120, 40, 30)).save(big)
    prepared = prepare_image(big, max_pixels=30_000)
    assert prepared.original_size == (400, 300)
    assert prepared.image.width * prepared.image.height <= 30_000 and "downscaled from 400x300" in prepared.notes[0]
    over_limit = tmp_path / "over.png"
    over_limit.write_bytes(png_header(12_000, 10_000))  # 120 MP: over our limit, under PIL's bomb limit
    with pytest.raises(DataError, match="megapixels"):
        prepare_image(over_limit)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(30_000, 30_000))  # 900 MP: PIL's DecompressionBombError, not an OSError
    with pytest.raises(DataError, match="too large"):
        prepare_image(bomb)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    with pytest.raises(DataError, match="1x1"):
        prepare_image(tiny)


# ---------------------------------------------------------------------------------------------- loading
def test_predictor_is_cached_and_reloaded_after_retraining(checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    first = load_predictor(copy, device="cpu")
    assert load_predictor(str(copy), device="cpu") is first
    weights = copy / "model.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 10))  # a new checkpoint was written
    assert load_predictor(copy, device="cpu") is not first


def test_checkpoint_resolution_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STPNET_CHECKPOINT", "someone/stpnet")
    assert resolve_checkpoint() == "someone/stpnet"
    assert resolve_checkpoint(tmp_path) == str(tmp_path.resolve())
    monkeypatch.delenv("STPNET_CHECKPOINT")
    assert resolve_checkpoint().endswith("checkpoints/stpnet-kvasir-seg")
    assert is_hub_id("someone/stpnet") and not is_hub_id("outputs/sample-tiny/best") and not is_hub_id("./x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no `config.json`"):
        load_predictor(tmp_path / "empty")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network here
    with pytest.raises(CheckpointError, match="Hub id"):
        load_predictor("nobody-stpnet-test/does-not-exist")


# ---------------------------------------------------------------------------------------------- overlays
def test_overlays() -> None:
    image = Image.new("RGB", (40, 30), (0, 0, 0))
    mask = np.zeros((30, 40), dtype=bool)
    mask[10:20, 10:30] = True
    drawn = np.asarray(overlay_mask(image, mask, alpha=0.5))
    assert tuple(drawn[10, 10]) == LESION_COLOUR  # outline in full colour
    assert tuple(drawn[15, 20]) == tuple(round(0.5 * c) for c in LESION_COLOUR)  # tint inside
    assert tuple(drawn[0, 0]) == (0, 0, 0)  # background untouched
    assert mask_boundary(mask).sum() == 2 * (20 + 10) - 4
    truth = np.zeros_like(mask)
    truth[10:20, 20:35] = True
    compared = np.asarray(comparison_overlay(image, mask, truth))
    assert compared[15, 12, 0] > compared[15, 12, 1]  # false positive: red
    assert compared[15, 25, 1] > compared[15, 25, 0]  # true positive: green
    assert compared[15, 33, 2] > compared[15, 33, 0]  # false negative: blue
    assert side_by_side([image, image.resize((20, 15))]).size == (40 + 4 + 40, 30)
    labelled = titled(Image.new("RGB", (200, 160)), "ground truth", TRUTH_COLOUR)
    assert labelled.width == 200 and labelled.height > 160 and TRUTH_COLOUR in set(labelled.getdata())
    with pytest.raises(ValueError, match="30x40"):
        overlay_mask(image, mask[:, :20])


# ---------------------------------------------------------------------------------------------- test-time flips
def test_flip_averaging_is_the_mean_probability_of_the_mirrors(checkpoint: Path, tmp_path: Path, capsys) -> None:
    model = STPNetForSemanticSegmentation.from_pretrained(checkpoint).eval()
    pixels = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(pixel_values=pixels)
        averaged = FlipAveraged(model)(pixels)
        mirrors = [model(pixel_values=pixels.flip(d)).logits.sigmoid().flip(d) for d in (-1, -2)]
    expected = (plain.logits.sigmoid() + sum(mirrors)) / 3
    assert torch.allclose(averaged.logits.sigmoid(), expected, atol=1e-6)
    assert not torch.allclose(averaged.logits, plain.logits)  # the mirrors count
    # what the model says comes from the image as given: a mirror would swap left and right
    assert torch.equal(averaged.retrieved_indices, plain.retrieved_indices)

    image = Image.open(SAMPLE_IMAGE).convert("RGB")
    predictor = load_predictor(str(checkpoint), device="cpu")
    with_flips, without = predictor.predict([image], tta=True)[0], predictor.predict([image])[0]
    assert with_flips.description == without.description and with_flips.mask.shape == without.mask.shape
    assert main(["--model", str(checkpoint), str(SAMPLE_IMAGE), "--output-dir", str(tmp_path / "out"),
                 "--device", "cpu", "--tta"]) == 0  # fmt: skip
    row = read_csv(tmp_path / "out" / "predictions.csv")[0]
    assert int(row["lesion_pixels"]) == int(with_flips.mask.sum())
