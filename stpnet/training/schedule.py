"""Optimizer (AdamW or Adam, as the paper) and learning-rate schedule (warmup + cosine, or cosine restarts)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from stpnet.training.config import TrainSection


def build_optimizer(model: torch.nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam (L2 weight decay, the authors' choice) over trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    kind = torch.optim.AdamW if train.optimizer.lower() == "adamw" else torch.optim.Adam
    return kind(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def lr_factor(step: int, train: TrainSection, updates_per_epoch: int, total_steps: int) -> float:
    """Learning rate at optimizer step ``step`` as a fraction of ``train.lr``.

    ``cosine``: linear warmup over ``warmup_steps``, then half a cosine from ``lr`` down to ``min_lr`` at
    ``total_steps``. ``cosine_restarts`` (the authors' ``CosineAnnealingWarmRestarts(T_0=10, eta_min=1e-4)`` from
    3e-4): after the warmup, a cosine from ``lr`` to ``min_lr`` over ``restart_epochs`` epochs, restarting at
    ``lr``; counted in optimizer steps so it works with any batch size. ``constant``: ``lr`` after the warmup.
    """
    if train.warmup_steps and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    floor = train.min_lr / train.lr
    after = step - train.warmup_steps
    if train.scheduler == "constant":
        return 1.0
    if train.scheduler == "cosine":
        span = max(total_steps - train.warmup_steps, 1)
        progress = min(after / span, 1.0)
    else:
        period = max(round(train.restart_epochs * updates_per_epoch), 1)
        progress = (after % period) / period
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSection, updates_per_epoch: int, total_steps: int
) -> LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; its state (the step count) is saved with the checkpoints."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, train, updates_per_epoch, total_steps))
