"""The Kvasir-SEG model committed in `checkpoints/stpnet-kvasir-seg`: small enough to ship, loaded by default, and
scoring on the bundled sample what its card says (the remote-code check is in test_model.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from runs import ROOT, hub_script

from stpnet.inference.predict import DEFAULT_CHECKPOINT, resolve_checkpoint

COMMITTED = ROOT / "checkpoints" / "stpnet-kvasir-seg"
pytestmark = pytest.mark.usefixtures("one_thread")


def card_sample_dice() -> float:
    card = (COMMITTED / "README.md").read_text()
    match = re.search(r"\| Dice on the bundled sample's (\d+) test images .*\| (0\.\d+) \|", card)
    assert match, "the card quotes no score on the bundled sample"
    return float(match.group(2))


def test_it_is_the_default_and_small_enough_to_ship() -> None:
    assert Path(resolve_checkpoint(DEFAULT_CHECKPOINT)).resolve() == COMMITTED.resolve()
    size = sum(p.stat().st_size for p in COMMITTED.iterdir()) / 2**20
    assert size <= 20, f"{size:.1f} MiB"
    config = json.loads((COMMITTED / "config.json").read_text())
    assert config["text_repository_name"] == "kvasir-seg" and config["backbone_config"]["model_type"] == "mobilenet_v2"
    card = (COMMITTED / "README.md").read_text()
    assert "${" not in card and "official" in card.lower()


def test_it_scores_its_card_on_the_bundled_sample(tmp_path: Path) -> None:
    evaluate = hub_script("evaluate")
    assert evaluate.main(["--model", str(COMMITTED), "--output-dir", str(tmp_path), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == 8
    assert abs(metrics["dice"] - card_sample_dice()) <= 0.01, (metrics["dice"], card_sample_dice())
