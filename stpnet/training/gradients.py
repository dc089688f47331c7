"""Gradient clipping by parameter group, with the norms it saw, for the training history.

STPNet trains two networks with one optimizer: the segmentation network (Dice + BCE) and the text retrieval network
(focal losses on its similarity and classifier logits). Their gradients differ widely: at initialisation the
retrieval network's norm is tens of times the segmentation network's, and in stpnet-tiny's 600-step Kvasir-SEG run
it averages 5.9 against 2.3 over the first 100 steps, later 1.5-3.2 against 1.0-1.2. Clipping their joint norm lets
the retrieval losses set the size of every segmentation step; `clip_retrieval_separately` clips each network's
norm on its own (measured: no better selection Dice at 600 steps, too early for the stall it was meant to address;
one full-recipe run that stalled without it did not with it: `benchmarks/QUALITY.md`, section 6).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

# Accelerate clips these itself (sharded or engine-managed gradients); the trainer then logs only the total norm.
_ENGINE_CLIPPED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA)


def gradient_groups(model: nn.Module, accelerator: Accelerator) -> dict[str, list[nn.Parameter]] | None:
    """`{"segmentation": [...], "retrieval": [...]}` for a model with a `retrieval` network, else None."""
    retrieval = getattr(accelerator.unwrap_model(model), "retrieval", None)
    if not isinstance(retrieval, nn.Module):
        return None
    ids = {id(p) for p in retrieval.parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = {
        "segmentation": [p for p in params if id(p) not in ids],
        "retrieval": [p for p in params if id(p) in ids],
    }
    return groups if all(groups.values()) else None


def clip_gradients(
    accelerator: Accelerator,
    model: nn.Module,
    groups: dict[str, list[nn.Parameter]] | None,
    max_norm: float,
    separately: bool = False,
) -> dict[str, float]:
    """Clip to `max_norm` (the joint norm, or each group's own with `separately`) and return the norms before
    clipping: `grad_norm` (all parameters) and `<group>_grad_norm` per group."""
    if groups is None or accelerator.distributed_type in _ENGINE_CLIPPED:
        if separately and groups is not None:
            raise ValueError(f"clip_retrieval_separately is not supported with {accelerator.distributed_type}")
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return {} if norm is None else {"grad_norm": float(norm)}
    accelerator.unscale_gradients()  # fp16: the norms must be those of the true gradients (once per step)
    norms = {
        name: torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        for name, params in groups.items()
    }
    # The joint norm as torch.nn.utils.clip_grad_norm_ computes it (same tensors, same order): joint clipping is
    # then bit for bit what it was before the groups were logged.
    everything = list(model.parameters())
    total = torch.nn.utils.get_total_norm([p.grad for p in everything if p.grad is not None])
    if separately:
        for name, params in groups.items():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norms[name])
    else:
        torch.nn.utils.clip_grads_with_norm_(everything, max_norm, total)
    return {"grad_norm": float(total), **{f"{name}_grad_norm": float(norm) for name, norm in norms.items()}}
