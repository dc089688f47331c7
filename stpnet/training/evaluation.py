"""Evaluate a segmentation model on an STPNet split: metrics JSON, per-image CSV and best/worst overlays.

Every image is scored twice from one forward pass:

* at the **original** mask resolution (the logits are resized back with
  ``STPNetImageProcessor.post_process_semantic_segmentation`` and compared with the stored mask): the headline
  ``dice``/``iou`` of ``metrics.json``;
* at the model's **input** resolution (the processor's resized mask): ``metrics.json["input_resolution"]``, the
  resolution training selects on and the paper's protocol (224x224).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_stpnet.image_processing_stpnet import STPNetImageProcessor
from stpnet.data.io import mask_array
from stpnet.metrics import (
    at_or_below_floor,
    dice_from_counts,
    iou_from_counts,
    majority_accuracy,
    mask_counts,
    retrieval_accuracy,
    segmentation_scores,
)
from stpnet.safe_write import save_image, write_text
from stpnet.training.data import EpochBatchSampler, SegmentationDataset, make_loader, model_inputs
from stpnet.visualize import LESION_COLOUR, TRUTH_COLOUR, overlay_mask, side_by_side, titled

# What evaluate_split writes into its output folder, so that tools replacing an earlier evaluation (train.py and
# evaluate.py with --overwrite) remove exactly these: the two files, and in OVERLAY_FOLDER the panels named as
# write_overlays names them ({best,worst}_NN_<image name>_dice0.123.png), never a user's own PNGs beside them.
EVALUATION_FILES = ("metrics.json", "per_image.csv")
OVERLAY_FOLDER = "overlays"
OVERLAY_FILE = re.compile(r"(?:best|worst)_\d{2,}_.+_dice(?:\d+\.\d{3}|nan)\.png")


@torch.no_grad()
def validate(
    accelerator: Any, model: torch.nn.Module, dataset: SegmentationDataset, sampler: EpochBatchSampler, with_text: bool
) -> dict[str, Any]:
    """Validation during training, at the model's input size: each process scores its shard, the per-image rows are
    gathered, so every process gets the same ``val_loss``, ``val_dice``/``val_iou`` (per-image means),
    ``val_micro_*`` and ``val_retrieval_<category>`` (when the model retrieves text)."""
    model.eval()
    rows = []
    for batch in make_loader(dataset, sampler, 0, 0):
        outputs = model(**model_inputs(batch, accelerator.device, with_text))
        counts = mask_counts(outputs.logits.float()[:, 0] > 0, batch["labels"])
        loss = torch.full((len(counts), 1), float(outputs.loss), dtype=torch.float64)
        parts = [batch["index"][:, None].double(), counts, loss]
        retrieved = getattr(outputs, "retrieved_indices", None)
        if retrieved is not None:
            parts += [retrieved.cpu().double(), batch["text_labels"].double()]
        rows.append(torch.cat(parts, 1))
    local = torch.cat(rows).to(accelerator.device)
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0, pad_index=-1)).cpu()
    gathered = gathered[gathered[:, 0] >= 0]
    gathered = gathered[torch.argsort(gathered[:, 0], stable=True)]
    first = torch.ones(len(gathered), dtype=torch.bool)
    first[1:] = gathered[1:, 0] != gathered[:-1, 0]  # an image gathered twice counts once
    gathered = gathered[first]
    scores = segmentation_scores(gathered[:, 1:4])
    result = {"val_loss": float(gathered[:, 4].mean())}
    result.update({f"val_{k}": v for k, v in scores.items() if k != "num_images"})
    if gathered.shape[1] > 5:
        k = (gathered.shape[1] - 5) // 2
        accuracy = retrieval_accuracy(gathered[:, 5 : 5 + k], gathered[:, 5 + k :], dataset.categories)
        result.update({f"val_retrieval_{name}": value for name, value in accuracy.items()})
    return result


def text_categories_of(model: torch.nn.Module, split: datasets.Dataset) -> list[str]:
    """The model's text categories when it retrieves text and the split has a label column for each; else []."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_text", False):
        return []
    categories = list(getattr(config, "text_categories", []) or [])
    return categories if all(c in split.features for c in categories) else []


@torch.no_grad()
def predict_split(
    model: torch.nn.Module,
    processor: STPNetImageProcessor,
    split: datasets.Dataset,
    categories: list[str],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
    indices: list[int] | None = None,
    keep_masks: bool = False,
) -> dict[str, Any]:
    """Run the model over ``split`` (or the rows ``indices``) and count pixels at both resolutions.

    Returns ``{"indices", "counts" (N, 3) original resolution, "input_counts" (N, 3), "sizes" (N, 2),
    "retrieved" (N, K) or None, "true" (N, K) or None}`` and, with ``keep_masks``, ``"masks"``: the predicted
    masks at original resolution.
    """
    model.eval()
    rows = list(range(len(split))) if indices is None else list(indices)
    out: dict[str, list] = {"counts": [], "input_counts": [], "sizes": [], "retrieved": [], "true": [], "masks": []}
    for start in tqdm(range(0, len(rows), batch_size), desc="evaluate", disable=not progress, leave=False):
        batch = split.select(rows[start : start + batch_size])
        images, masks = list(batch["image"]), list(batch["mask"])
        inputs = processor(images, segmentation_maps=masks)
        outputs = model(pixel_values=inputs["pixel_values"].to(device))
        logits = outputs.logits.float()
        out["input_counts"].append(mask_counts(logits[:, 0] > 0, inputs["labels"]))
        sizes = inputs["original_sizes"].tolist()
        predicted = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        for prediction, mask in zip(predicted, masks):
            out["counts"].append(mask_counts(prediction.cpu(), mask_array(mask)))
            if keep_masks:
                out["masks"].append(prediction.cpu().numpy().astype(bool))
        out["sizes"].append(torch.tensor(sizes))
        if categories and getattr(outputs, "retrieved_indices", None) is not None:
            out["retrieved"].append(outputs.retrieved_indices.cpu())
            out["true"].append(torch.tensor([[int(v) for v in batch[c]] for c in categories]).T)
    result: dict[str, Any] = {
        "indices": rows,
        "counts": torch.cat(out["counts"]),
        "input_counts": torch.cat(out["input_counts"]),
        "sizes": torch.cat(out["sizes"]),
        "retrieved": torch.cat(out["retrieved"]) if out["retrieved"] else None,
        "true": torch.cat(out["true"]) if out["true"] else None,
    }
    if keep_masks:
        result["masks"] = out["masks"]
    return result


def evaluate_split(
    model: torch.nn.Module,
    processor: STPNetImageProcessor,
    split: datasets.Dataset,
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    num_overlays: int = 4,
    progress: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``split``; with ``output_dir`` write ``metrics.json``, ``per_image.csv`` and overlays.

    Returns the metrics: ``dice``, ``iou`` (per-image means at original resolution), ``micro_dice``,
    ``micro_iou``, ``num_images``, ``input_resolution`` (the same at the model's input size) and
    ``retrieval_accuracy`` (per category, or None for models without text or splits without labels) with
    ``retrieval_majority_baseline`` beside it (always answering the split's most frequent entry) and
    ``retrieval_at_or_below_floor``: the categories (and ``"mean"``) whose accuracy does not beat that floor.
    """
    model = model.to(device)
    categories = text_categories_of(model, split)
    pred = predict_split(model, processor, split, categories, batch_size, device, progress)
    size = processor.size
    metrics: dict[str, Any] = {
        "resolution": "original",
        **segmentation_scores(pred["counts"]),
        "input_resolution": {
            "height": size["height"],
            "width": size["width"],
            **segmentation_scores(pred["input_counts"]),
        },
        "retrieval_accuracy": (
            retrieval_accuracy(pred["retrieved"], pred["true"], categories) if pred["retrieved"] is not None else None
        ),
        "retrieval_majority_baseline": (
            majority_accuracy(pred["true"], categories) if pred["retrieved"] is not None else None
        ),
        "retrieval_at_or_below_floor": None,
        "threshold": 0.5,
        "empty_mask_convention": "both empty: dice = iou = 1; one empty: 0",
        **(extra or {}),
    }
    if metrics["retrieval_accuracy"] is not None:
        metrics["retrieval_at_or_below_floor"] = at_or_below_floor(
            metrics["retrieval_accuracy"], metrics["retrieval_majority_baseline"]
        )
    if output_dir is not None:
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        write_text(output / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        dice = dice_from_counts(pred["counts"]).numpy()
        _write_per_image(output / "per_image.csv", split, pred, categories)
        if num_overlays > 0:
            write_overlays(model, processor, split, dice, output / "overlays", num_overlays, device)
    return metrics


def retrieval_report(metrics: dict[str, Any]) -> list[str]:
    """Console lines on retrieval: the accuracy per category with its majority-class floor, each one at or below
    the floor marked, and a warning naming them; no lines for a model without text."""
    accuracy, floor = metrics.get("retrieval_accuracy"), metrics.get("retrieval_majority_baseline") or {}
    if not accuracy:
        return []
    flagged = at_or_below_floor(accuracy, floor)
    pairs = ", ".join(
        f"{c} {v:.3f} ({floor[c]:.3f}){' <= floor' if c in flagged else ''}"
        for c, v in accuracy.items()
        if v is not None and floor.get(c) is not None
    )
    lines = [f"retrieval accuracy (majority-class floor): {pairs}"]
    if flagged:
        lines.append(
            f"warning: retrieval does not beat its majority-class floor for {', '.join(flagged)}: there the "
            "retrieved sentence is no better than always giving the split's most frequent one"
        )
    return lines


def _write_per_image(path: Path, split: datasets.Dataset, pred: dict[str, Any], categories: list[str]) -> None:
    names = list(split["name"]) if "name" in split.features else [str(i) for i in range(len(split))]
    dice, iou = dice_from_counts(pred["counts"]), iou_from_counts(pred["counts"])
    dice_in, iou_in = dice_from_counts(pred["input_counts"]), iou_from_counts(pred["input_counts"])
    table = io.StringIO(newline="")  # written whole at the end: a failed write keeps the previous file
    writer = csv.writer(table)
    header = [
        "index",
        "name",
        "height",
        "width",
        "dice",
        "iou",
        "dice_input",
        "iou_input",
        "predicted_px",
        "target_px",
    ]
    header += (
        [f"{c}_{kind}" for c in categories for kind in ("true", "retrieved")] if pred["retrieved"] is not None else []
    )
    writer.writerow(header)
    for n, i in enumerate(pred["indices"]):
        row = [i, names[i], *pred["sizes"][n].tolist()]
        row += [f"{float(v[n]):.6f}" for v in (dice, iou, dice_in, iou_in)]
        row += [int(pred["counts"][n, 1]), int(pred["counts"][n, 2])]
        if pred["retrieved"] is not None:
            row += [int(v) for k in range(len(categories)) for v in (pred["true"][n, k], pred["retrieved"][n, k])]
        writer.writerow(row)
    write_text(path, table.getvalue())


def write_overlays(
    model: torch.nn.Module,
    processor: STPNetImageProcessor,
    split: datasets.Dataset,
    dice: np.ndarray,
    folder: Path,
    count: int,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Titled PNG panels (image | ground truth in blue | prediction in green, with its Dice) of the ``count`` best
    and worst images, in the colour code of every other overlay (``visualize``)."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.argsort(dice, kind="stable")
    picks = [("worst", int(i)) for i in order[:count]] + [("best", int(i)) for i in order[::-1][:count]]
    rows = [i for _, i in picks]
    masks = predict_split(model, processor, split, [], len(rows), device, indices=rows, keep_masks=True)["masks"]
    names = list(split["name"]) if "name" in split.features else [str(i) for i in range(len(split))]
    written = []
    for rank, ((kind, index), predicted) in enumerate(zip(picks, masks)):
        row = split[index]
        image = row["image"].convert("RGB")
        panel = side_by_side(
            [
                titled(image, "image"),
                titled(overlay_mask(image, mask_array(row["mask"]), TRUTH_COLOUR), "ground truth", TRUTH_COLOUR),
                titled(
                    overlay_mask(image, predicted, LESION_COLOUR), f"prediction, Dice {dice[index]:.3f}", LESION_COLOUR
                ),
            ]
        )
        position = rank + 1 if kind == "worst" else rank - min(count, len(order)) + 1
        path = folder / f"{kind}_{position:02d}_{names[index]}_dice{dice[index]:.3f}.png"
        save_image(panel, path)
        written.append(path)
    return written
