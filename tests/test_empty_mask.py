"""Where the predicted mask is empty, every output says that no lesion was found before any retrieved sentence:
post-processing, stpnet-predict's CSV, the demo and the model card's example (which calls post-processing)."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import ROOT
from test_predict import tiny_checkpoint

from modeling_stpnet.image_processing_stpnet import NO_LESION_DESCRIPTION, STPNetImageProcessor
from stpnet.inference.cli import main as predict_main
from stpnet.inference.predict import load_predictor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("empty-mask") / "checkpoint")


@pytest.fixture
def finds_nothing(checkpoint: Path) -> Iterator[Path]:
    """The cached predictor of ``checkpoint`` (the one the CLI and the demo get) with every mask logit at -20, as for
    a noise image in which the model sees no lesion; restored afterwards."""
    model = load_predictor(str(checkpoint), device="cpu").model

    def no_lesion(module: torch.nn.Module, args: tuple, output: object) -> object:
        output.logits = torch.full_like(output.logits, -20.0)
        return output

    handle = model.register_forward_hook(no_lesion)
    try:
        yield checkpoint
    finally:
        handle.remove()


def noise_image(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


class Outputs(dict):
    """Model outputs as post-processing reads them (a dict, like transformers' ModelOutput)."""


def test_post_processing_puts_the_masks_verdict_first(checkpoint: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    processor = STPNetImageProcessor()
    retrieval = [torch.randn(2, len(sentences)) for sentences in config.text_sentences]
    logits = torch.full((2, 1, 8, 8), -5.0)
    logits[1, 0, 3, 3] = 5.0  # one lesion pixel in the second image only
    described = processor.post_process_description(Outputs(logits=logits, retrieval_logits=retrieval), config)
    assert [d["lesion_found"] for d in described] == [False, True]
    assert described[0]["description"] == NO_LESION_DESCRIPTION
    assert described[1]["description"] == described[1]["retrieved_description"] != NO_LESION_DESCRIPTION
    assert described[0]["retrieved_description"] and described[0]["categories"]  # still there, after the verdict
    # given masks decide (e.g. after resizing), and outputs without logits get no verdict
    masks = [np.ones((4, 4), bool), np.zeros((4, 4), bool)]
    with_masks = processor.post_process_description(Outputs(logits=logits, retrieval_logits=retrieval), config, masks)
    assert [d["lesion_found"] for d in with_masks] == [True, False]
    unknown = processor.post_process_description(Outputs(retrieval_logits=retrieval), config)
    assert unknown[0]["lesion_found"] is None and unknown[0]["description"] == unknown[0]["retrieved_description"]


def test_csv_says_no_lesion_found(finds_nothing: Path, tmp_path: Path) -> None:
    image = noise_image(tmp_path / "noise.png")
    assert predict_main(["--model", str(finds_nothing), str(image), "--output-dir", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["lesion_pixels"] == "0" and row["description"] == NO_LESION_DESCRIPTION
    assert row["count"] in row["retrieved_description"]  # the retrieved sentences stay, after the verdict


def test_demo_says_no_lesion_found_first(finds_nothing: Path, tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    sys.path.insert(0, str(ROOT / "demo"))
    import app

    outputs = app.segment(str(noise_image(tmp_path / "noise.png")), str(finds_nothing), 0.5)
    description, details = outputs[2], outputs[5]
    assert details["lesion_pixels"] == 0 and details["description"] == NO_LESION_DESCRIPTION
    verdict = description.index(NO_LESION_DESCRIPTION)
    assert description.index(details["retrieved_description"]) > verdict and "not a finding" in description
