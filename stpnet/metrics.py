"""Segmentation and retrieval metrics of STPNet: the one implementation used by training, evaluation and the
``evaluate`` module in ``metrics/dice_iou``.

Conventions (the paper reports per-image Dice and IoU averaged over the test images):

* **per image** (macro): ``dice = 2|P∩G| / (|P| + |G|)``, ``iou = |P∩G| / |P∪G|`` for each image, then the mean.
  When prediction and ground truth are both empty the image scores **1** for both (a correct "no lesion"); when
  exactly one is empty it scores 0.
* **global** (micro): the same formulas over the pixels of all images pooled; 1 when every mask is empty.
* **retrieval accuracy**: per text category, the fraction of images whose retrieved entry equals the true entry,
  over images whose true entry is known (labels equal to ``IGNORE_INDEX`` = -100 are left out; ``None`` when no
  image of a category is labelled).

Everything works from per-image *counts* ``(intersection, predicted, target)``, so predictions of any size can be
scored one image at a time and pooled later (and gathered across processes) without keeping the masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from modeling_stpnet.losses import IGNORE_INDEX

COUNT_COLUMNS = ("intersection", "predicted", "target")


def _as_bool_tensor(mask: Any) -> torch.Tensor:
    if isinstance(mask, torch.Tensor):
        tensor = mask.detach().cpu()
    else:
        tensor = torch.from_numpy(np.asarray(mask))
    return tensor > 0 if tensor.dtype != torch.bool else tensor


def mask_counts(predictions: Any, targets: Any) -> torch.Tensor:
    """Per-image ``(intersection, predicted, target)`` pixel counts, float64 ``(B, 3)``.

    Args:
        predictions, targets: binary masks (bool, or numbers where > 0 is lesion) shaped ``(H, W)`` for one image
            or ``(B, H, W)`` / ``(B, 1, H, W)`` for a batch; torch tensors or numpy arrays. Shapes must match.
    """
    pred, target = _as_bool_tensor(predictions), _as_bool_tensor(targets)
    if pred.shape != target.shape:
        raise ValueError(f"Prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if pred.ndim < 3:
        raise ValueError(f"Expected masks shaped (H, W) or (B, ..., H, W), got {tuple(pred.shape)}")
    pred, target = pred.flatten(1), target.flatten(1)
    return torch.stack(
        [(pred & target).sum(1), pred.sum(1), target.sum(1)],
        dim=1,
    ).double()


def counts_of_masks(predictions: Iterable[Any], targets: Iterable[Any]) -> torch.Tensor:
    """``mask_counts`` for lists of masks that may differ in size from image to image. ``(N, 3)``."""
    rows = [mask_counts(p, t) for p, t in zip(predictions, targets, strict=True)]
    return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Per-image Dice from ``(N, 3)`` counts; both masks empty → 1."""
    inter, pred, target = counts.double().unbind(-1)
    denominator = pred + target
    return torch.where(denominator > 0, 2 * inter / denominator.clamp(min=1), torch.ones_like(denominator))


def iou_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Per-image IoU (Jaccard) from ``(N, 3)`` counts; both masks empty → 1."""
    inter, pred, target = counts.double().unbind(-1)
    union = pred + target - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def segmentation_scores(counts: torch.Tensor) -> dict[str, float]:
    """Macro (per-image mean) and micro (pooled) Dice and IoU of ``(N, 3)`` counts.

    Returns ``{"dice", "iou", "micro_dice", "micro_iou", "num_images"}``; the means are NaN for zero images.
    """
    counts = counts.double().reshape(-1, 3)
    if len(counts) == 0:
        nan = float("nan")
        return {"dice": nan, "iou": nan, "micro_dice": nan, "micro_iou": nan, "num_images": 0}
    pooled = counts.sum(0, keepdim=True)
    return {
        "dice": float(dice_from_counts(counts).mean()),
        "iou": float(iou_from_counts(counts).mean()),
        "micro_dice": float(dice_from_counts(pooled)[0]),
        "micro_iou": float(iou_from_counts(pooled)[0]),
        "num_images": len(counts),
    }


def retrieval_accuracy(
    retrieved: Any, true_labels: Any, categories: Sequence[str] | None = None
) -> dict[str, float | None]:
    """Accuracy of the retrieved entry per category, over images whose true entry is known.

    Args:
        retrieved: ``(N, K)`` retrieved entry indices.
        true_labels: ``(N, K)`` true entry indices, ``IGNORE_INDEX`` (-100) where unknown.
        categories: the K category names (default ``category_0`` ...).

    Returns:
        ``{name: accuracy or None}`` per category plus ``"mean"``: the mean over categories that have labels.
    """
    retrieved = torch.as_tensor(np.asarray(retrieved)).long().reshape(len(retrieved), -1)
    true_labels = torch.as_tensor(np.asarray(true_labels)).long().reshape(len(true_labels), -1)
    if retrieved.shape != true_labels.shape:
        raise ValueError(f"Retrieved shape {tuple(retrieved.shape)} differs from labels {tuple(true_labels.shape)}")
    names = list(categories) if categories is not None else [f"category_{k}" for k in range(retrieved.shape[1])]
    if len(names) != retrieved.shape[1]:
        raise ValueError(f"{len(names)} category names for {retrieved.shape[1]} columns")
    out: dict[str, float | None] = {}
    for k, name in enumerate(names):
        known = true_labels[:, k] != IGNORE_INDEX
        out[name] = float((retrieved[known, k] == true_labels[known, k]).double().mean()) if known.any() else None
    scored = [v for v in out.values() if v is not None]
    out["mean"] = float(np.mean(scored)) if scored else None
    return out


def majority_accuracy(true_labels: Any, categories: Sequence[str] | None = None) -> dict[str, float | None]:
    """The retrieval accuracy of always answering each category's most frequent true entry: the floor that
    `retrieval_accuracy` must beat to show that the model reads the image. Same shapes and output as it."""
    true_labels = torch.as_tensor(np.asarray(true_labels)).long().reshape(len(true_labels), -1)
    majority = torch.full_like(true_labels, IGNORE_INDEX)
    for k in range(true_labels.shape[1]):
        known = true_labels[:, k][true_labels[:, k] != IGNORE_INDEX]
        if len(known):
            majority[:, k] = torch.bincount(known).argmax()
    return retrieval_accuracy(majority, true_labels, categories)


def at_or_below_floor(accuracy: dict[str, float | None], floor: dict[str, float | None]) -> list[str]:
    """The keys of ``accuracy`` (categories, and ``"mean"``) whose retrieval accuracy does not beat the majority-class
    floor of :func:`majority_accuracy`: there the model does no better than always giving the most frequent
    sentence. Keys without a value on either side are left out."""
    return [
        name
        for name, value in (accuracy or {}).items()
        if value is not None and (floor or {}).get(name) is not None and value <= floor[name] + 1e-12
    ]
