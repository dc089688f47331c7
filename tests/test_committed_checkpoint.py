"""The models committed in `checkpoints/`: small enough to ship, the Kvasir-SEG one loaded by default and scoring on
the bundled sample what its card says, the QaTa-COV19 one scoring its card on the official valid split when the real
data is present (the remote-code checks are in test_model.py)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from layouts import LUNG
from runs import ROOT, hub_script

from stpnet.inference.predict import DEFAULT_CHECKPOINT, resolve_checkpoint

COMMITTED = ROOT / "checkpoints" / "stpnet-kvasir-seg"
QATA = ROOT / "checkpoints" / "stpnet-qata-cov19"
SHARED = Path(os.environ.get("STPNET_SHARED_DATA", ROOT.parent / "shared" / "data"))
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


def test_the_qata_model_is_small_and_describes_lungs() -> None:
    size = sum(p.stat().st_size for p in QATA.iterdir()) / 2**20
    assert size <= 20, f"{size:.1f} MiB"
    config = json.loads((QATA / "config.json").read_text())
    assert config["text_repository_name"] == "qata-cov19" and config["text_categories"] == LUNG.categories
    assert config["image_size"] == 224
    card = (QATA / "README.md").read_text()
    assert "${" not in card and "evaluated on 1429 images of split `validation`" in card


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "qata-cov19" / "valid_text.csv").is_file(), reason=f"QaTa-COV19 not found under {SHARED}"
)
def test_the_qata_model_scores_its_card_on_the_official_valid_split(tmp_path: Path) -> None:
    from stpnet.data import convert_raw, discover

    raw = discover(SHARED / "qata-cov19")
    raw.splits = {"validation": raw.splits["validation"]}
    dataset, _ = convert_raw(raw, LUNG, progress=False)
    dataset.save_to_disk(str(tmp_path / "qata-valid"))
    evaluate = hub_script("evaluate")
    argv = ["--model", str(QATA), "--dataset", str(tmp_path / "qata-valid"), "--split", "validation"]
    assert evaluate.main([*argv, "--output-dir", str(tmp_path / "eval"), "--no-progress", "--overlays", "0"]) == 0
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    card = json.loads((QATA / "metrics.json").read_text())
    assert got["num_images"] == card["num_images"] == 1429
    assert abs(got["dice"] - card["dice"]) <= 0.005, (got["dice"], card["dice"])
