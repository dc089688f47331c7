"""Metrics on hand-made masks, the offline ``evaluate`` module, and hub_scripts/evaluate.py end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import ROOT, SAMPLE_CONFIG, hub_script

from modeling_stpnet import STPNetImageProcessor
from stpnet.metrics import (
    at_or_below_floor,
    counts_of_masks,
    dice_from_counts,
    iou_from_counts,
    majority_accuracy,
    mask_counts,
    retrieval_accuracy,
    segmentation_scores,
)
from stpnet.training import build_stpnet_model, load_repository, load_train_config
from stpnet.training.evaluation import retrieval_report
from stpnet.visualize import TRUTH_COLOUR


def box(height: int, width: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


# (prediction, target, dice, iou): worked out by hand
CASES = [
    (box(10, 10, 0, 0, 2, 2), box(10, 10, 0, 0, 2, 4), 2 * 4 / (4 + 8), 4 / 8),  # 4 px inside 8 px
    (box(10, 10, 0, 0, 3, 3), box(10, 10, 0, 0, 3, 3), 1.0, 1.0),  # identical
    (box(10, 10, 0, 0, 2, 2), box(10, 10, 5, 5, 7, 7), 0.0, 0.0),  # disjoint
    (box(10, 10, 0, 0, 0, 0), box(10, 10, 0, 0, 0, 0), 1.0, 1.0),  # both empty: a correct "no lesion"
    (box(10, 10, 0, 0, 0, 0), box(10, 10, 0, 0, 2, 2), 0.0, 0.0),  # missed lesion
    (box(10, 10, 0, 0, 2, 2), box(10, 10, 0, 0, 0, 0), 0.0, 0.0),  # false alarm on an empty image
    (box(6, 8, 1, 1, 4, 5), box(6, 8, 2, 2, 5, 6), 2 * 6 / (12 + 12), 6 / 18),  # 3x4 boxes shifted by (1, 1)
]


@pytest.mark.parametrize(("prediction", "target", "dice", "iou"), CASES)
def test_per_image_dice_and_iou_by_hand(prediction, target, dice: float, iou: float) -> None:
    counts = mask_counts(prediction, target)
    assert float(dice_from_counts(counts)[0]) == pytest.approx(dice)
    assert float(iou_from_counts(counts)[0]) == pytest.approx(iou)


def test_macro_micro_and_shapes() -> None:
    predictions, targets = [c[0] for c in CASES], [c[1] for c in CASES]
    counts = counts_of_masks(predictions, targets)  # images of different sizes
    scores = segmentation_scores(counts)
    assert scores["num_images"] == len(CASES)
    assert scores["dice"] == pytest.approx(np.mean([c[2] for c in CASES]))
    assert scores["iou"] == pytest.approx(np.mean([c[3] for c in CASES]))
    inter = sum(float((p & t).sum()) for p, t in zip(predictions, targets))
    pred_px, target_px = sum(float(p.sum()) for p in predictions), sum(float(t.sum()) for t in targets)
    assert scores["micro_dice"] == pytest.approx(2 * inter / (pred_px + target_px))
    assert scores["micro_iou"] == pytest.approx(inter / (pred_px + target_px - inter))
    # a batch (B, 1, H, W) of torch masks gives the same counts as one image at a time
    batch_pred = torch.from_numpy(np.stack([CASES[0][0], CASES[2][0]]))[:, None]
    batch_true = torch.from_numpy(np.stack([CASES[0][1], CASES[2][1]]))[:, None]
    assert torch.equal(mask_counts(batch_pred, batch_true), counts[[0, 2]])
    assert segmentation_scores(mask_counts(np.zeros((2, 4, 4)), np.zeros((2, 4, 4))))["micro_dice"] == 1.0
    with pytest.raises(ValueError, match="differs"):
        mask_counts(np.zeros((4, 4)), np.zeros((4, 5)))


def test_retrieval_accuracy_ignores_unknown_labels() -> None:
    retrieved = [[0, 1, 2], [1, 1, 0], [0, 0, 0]]
    truth = [[0, -100, 2], [0, -100, 0], [0, -100, 1]]
    result = retrieval_accuracy(retrieved, truth, ["a", "b", "c"])
    assert result["a"] == pytest.approx(2 / 3) and result["b"] is None and result["c"] == pytest.approx(2 / 3)
    assert result["mean"] == pytest.approx(2 / 3)
    floor = majority_accuracy([[1, 3], [1, -100], [0, 3], [1, 2]], ["a", "b"])
    assert floor == pytest.approx({"a": 3 / 4, "b": 2 / 3, "mean": (3 / 4 + 2 / 3) / 2})


def test_metric_module_loads_offline_and_agrees() -> None:
    import evaluate

    metric = evaluate.load(str(ROOT / "metrics" / "dice_iou"))
    for prediction, target, *_ in CASES[:4]:
        metric.add_batch(predictions=[prediction], references=[target])
    metric.add_batch(predictions=[c[0] for c in CASES[4:]], references=[c[1] for c in CASES[4:]])
    result = metric.compute(
        return_per_image=True, retrieved_indices=[[1]] * 7, text_labels=[[1]] * 6 + [[0]], categories=["k"]
    )
    expected = segmentation_scores(counts_of_masks([c[0] for c in CASES], [c[1] for c in CASES]))
    for key in ("dice", "iou", "micro_dice", "micro_iou"):
        assert result[key] == pytest.approx(expected[key])
    assert result["per_image_dice"] == pytest.approx([c[2] for c in CASES])
    assert result["retrieval_accuracy"]["k"] == pytest.approx(6 / 7)


def test_evaluate_script_on_the_bundled_sample(tmp_path: Path) -> None:
    overrides = ["data.image_size=64", "model.overrides={base_channels: 8, retrieval_backbone: shared}"]
    config = load_train_config(SAMPLE_CONFIG, overrides)
    torch.manual_seed(0)
    model = build_stpnet_model(config, load_repository(config))
    model.save_pretrained(tmp_path / "model")
    STPNetImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "model")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, str(ROOT / "hub_scripts" / "evaluate.py"), "--model", str(tmp_path / "model")]
    command += ["--output-dir", str(tmp_path / "eval"), "--no-progress"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 8 and metrics["resolution"] == "original"
    assert (metrics["input_resolution"]["height"], metrics["input_resolution"]["width"]) == (64, 64)
    for scores in (metrics, metrics["input_resolution"]):
        assert 0 <= scores["dice"] <= 1 and 0 <= scores["iou"] <= scores["dice"] + 1e-9
    assert set(metrics["retrieval_accuracy"]) == {"count", "size", "horizontal", "vertical", "mean"}
    assert set(metrics["retrieval_majority_baseline"]) == set(metrics["retrieval_accuracy"])
    assert "retrieval accuracy (majority-class floor): count " in result.stdout
    accuracy, floor = metrics["retrieval_accuracy"], metrics["retrieval_majority_baseline"]
    flagged = metrics["retrieval_at_or_below_floor"]  # every category not above its floor
    assert flagged == [c for c, v in accuracy.items() if v <= floor[c]]
    assert ("warning: retrieval does not beat" in result.stdout) == bool(flagged)
    with (tmp_path / "eval" / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(metrics["dice"], abs=1e-5)
    assert int(rows[0]["height"]) == 160  # scored at the stored mask's size, not the 64 px input
    overlays = sorted(p.name for p in (tmp_path / "eval" / "overlays").glob("*.png"))
    assert len(overlays) == 8 and overlays[0].startswith("best_01") and overlays[-1].startswith("worst_04")
    # the one colour code: ground truth blue, prediction green, under titles with a colour legend
    panel = np.asarray(Image.open(tmp_path / "eval" / "overlays" / overlays[0]).convert("RGB"))
    colours = {tuple(c) for c in panel.reshape(-1, 3)}
    assert TRUTH_COLOUR in colours and (255, 0, 0) not in colours and (0, 255, 0) not in colours
    assert panel.shape[0] > 160 and (panel[0] == 255).all()  # a white title band above the 160 px images

    missing = subprocess.run(
        [sys.executable, str(ROOT / "hub_scripts" / "evaluate.py"), "--model", str(tmp_path), "--output-dir", "x"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "not a checkpoint folder" in missing.stderr


def test_evaluate_script_scores_at_another_input_size_with_flips(tmp_path: Path, capsys) -> None:
    cli = hub_script("evaluate")
    config = load_train_config(SAMPLE_CONFIG, ["data.image_size=64", "model.overrides={base_channels: 8}"])
    build_stpnet_model(config, load_repository(config)).save_pretrained(tmp_path / "model")
    STPNetImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--no-progress", "--overlays", "0"]
    assert cli.main([*args, "--output-dir", str(tmp_path / "eval"), "--image-size", "96", "--tta"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["input_resolution"]["height"] == 96 and metrics["test_time_augmentation"] == "flips"
    with pytest.raises(SystemExit):
        cli.main([*args, "--output-dir", str(tmp_path / "bad"), "--image-size", "100"])
    assert "--image-size must be a positive multiple of 32, got 100" in capsys.readouterr().err


def test_retrieval_at_or_below_its_floor_is_flagged() -> None:
    accuracy = {"count": 0.942, "size": 0.5, "horizontal": 0.3, "mean": 0.58}
    floor = {"count": 0.942, "size": 0.4, "horizontal": 0.408, "mean": 0.583}
    assert at_or_below_floor(accuracy, floor) == ["count", "horizontal", "mean"]  # equal to the floor counts
    lines = retrieval_report({"retrieval_accuracy": accuracy, "retrieval_majority_baseline": floor})
    assert lines[0].startswith("retrieval accuracy (majority-class floor): count 0.942 (0.942) <= floor, size 0.500")
    assert "horizontal 0.300 (0.408) <= floor" in lines[0] and "size 0.500 (0.400)," in lines[0]
    assert lines[1].startswith("warning: retrieval does not beat its majority-class floor for count, horizontal, mean")
    assert retrieval_report({"retrieval_accuracy": None}) == []
