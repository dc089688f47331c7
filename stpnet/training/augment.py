"""Geometric augmentation applied identically to an image and its mask, reproducible from (seed, epoch, index).

Works on the image processor's output (normalised ``(3, H, W)`` tensor and ``(H, W)`` {0, 1} mask), so resizing
and normalisation stay in one place (``STPNetImageProcessor``). Every random choice comes from a generator seeded
with ``(seed, epoch, index)``: a resumed run, another worker count or another process count sees exactly the same
augmented examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from modeling_stpnet.losses import IGNORE_INDEX
from stpnet.training.config import AugmentSection


@dataclass
class AugmentResult:
    pixel_values: torch.Tensor
    labels: torch.Tensor
    reoriented: bool  # a flip or rot90 was applied: left/right or up/down may have swapped
    changed: bool  # any geometric change at all


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one example in one epoch (independent of the order examples are drawn in)."""
    return np.random.default_rng([seed, epoch, index])


def augment_pair(
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    settings: AugmentSection,
    rng: np.random.Generator,
    fill: torch.Tensor | None = None,
) -> AugmentResult:
    """Flip / rot90 / rotate / scale an image and its mask with the same transform.

    Args:
        pixel_values: ``(C, H, W)`` image.
        labels: ``(H, W)`` mask in {0, 1}.
        settings: probabilities and ranges (``AugmentSection``).
        rng: the example's generator (:func:`sample_generator`).
        fill: ``(C,)`` value for pixels rotated/scaled in from outside the image (default 0); pass the normalised
            value of black so padding looks like the authors' zero padding.

    Each transform is drawn independently with its own probability: a quarter turn (``k`` in 1..3 on square
    images, a half turn otherwise), a horizontal and a vertical flip, a rotation in ±``rotation_degrees`` and a zoom
    by a factor in ``scale_range`` about the centre. The authors' recipe (rot90 + flip, else a ±20° rotation) is
    close to the defaults.
    """
    image, mask = pixel_values, labels.to(pixel_values.dtype)[None]
    reoriented = False
    # Draw every number whether or not it is used, so one switch never shifts the others' random streams.
    u = rng.random(5)
    k = int(rng.integers(1, 4))
    angle = float(rng.uniform(-settings.rotation_degrees, settings.rotation_degrees))
    factor = float(rng.uniform(*settings.scale_range))
    if u[0] < settings.rot90:
        if image.shape[-1] != image.shape[-2]:
            k = 2  # a quarter turn would change the shape of a non-square input
        image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
        reoriented = True
    if u[1] < settings.hflip:
        image, mask = image.flip(-1), mask.flip(-1)
        reoriented = True
    if u[2] < settings.vflip:
        image, mask = image.flip(-2), mask.flip(-2)
        reoriented = True
    rotate = u[3] < settings.rotation and settings.rotation_degrees > 0
    zoom = u[4] < settings.scale and factor != 1.0
    if rotate or zoom:
        image, mask = _affine(image, mask, angle if rotate else 0.0, factor if zoom else 1.0, fill)
    return AugmentResult(image.contiguous(), (mask[0] > 0.5).to(labels.dtype), reoriented, reoriented or rotate or zoom)


def _affine(
    image: torch.Tensor, mask: torch.Tensor, degrees: float, factor: float, fill: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate by ``degrees`` and zoom by ``factor`` about the centre; the mask is resampled bilinearly and later
    thresholded at 0.5, which keeps its edges where nearest-neighbour sampling would make them jagged."""
    radians = math.radians(degrees)
    cos, sin = math.cos(radians) / factor, math.sin(radians) / factor
    height, width = image.shape[-2:]
    aspect = width / height
    # affine_grid works in [-1, 1] coordinates per axis; the aspect terms keep rotations rigid on non-square inputs
    theta = torch.tensor([[cos, -sin / aspect, 0.0], [sin * aspect, cos, 0.0]], dtype=image.dtype)[None]
    grid = F.affine_grid(theta, [1, 1, height, width], align_corners=False)
    offset = fill.view(-1, 1, 1).to(image) if fill is not None else torch.zeros(1, 1, 1, dtype=image.dtype)
    warped = F.grid_sample((image - offset)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped_mask = F.grid_sample(mask[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[0] + offset, warped_mask[0]


class TextLabelPolicy:
    """What the true description of an augmented example becomes (see ``AugmentSection.text_labels``)."""

    def __init__(self, mode: str, describer: object | None) -> None:
        if mode == "auto":
            mode = "recompute" if describer is not None else "ignore"
        if mode == "recompute" and describer is None:
            raise ValueError(
                "augment.text_labels=recompute needs a text repository with 'auto_description' thresholds "
                "(descriptions built from masks); use 'ignore' or 'keep' for datasets with written text"
            )
        self.mode = mode
        self.describer = describer

    def __call__(self, text_labels: torch.Tensor, result: AugmentResult) -> torch.Tensor:
        if self.mode == "keep" or not result.changed:
            return text_labels
        if self.mode == "recompute":
            indices = self.describer.describe(result.labels.numpy() > 0)
            if indices is None:  # the lesion left the image: nothing true to retrieve
                return torch.full_like(text_labels, IGNORE_INDEX)
            return torch.tensor(indices, dtype=text_labels.dtype)
        # "ignore": small rotations and zooms keep left/right and up/down; flips and quarter turns do not
        return torch.full_like(text_labels, IGNORE_INDEX) if result.reoriented else text_labels
