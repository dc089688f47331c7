"""Losses of STPNet: soft Dice + BCE for the mask, focal loss for text retrieval."""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image, averaged over the batch. `logits`, `target`: `(B, 1, H, W)`, target in {0, 1}."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    intersection = (prob * target).sum(1)
    dice = (2 * intersection + eps) / (prob.sum(1) + target.sum(1) + eps)
    return 1 - dice.mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Multi-class focal loss `(1 - p_t)^gamma * CE`; targets equal to -100 are ignored.

    `logits`: `(B, n)`, `target`: `(B,)` long. Returns 0 (with a graph) when every target is ignored, so the
    caller can always add it.
    """
    valid = target != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.sum() * 0.0
    logits, target = logits[valid], target[valid]
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()
