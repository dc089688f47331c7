"""Scale-aware descriptions built automatically from binary masks, for datasets without text (e.g. Kvasir-SEG).

The definition's ``auto_description`` block holds the thresholds::

    {"mask_threshold": 127,              # 0..255, for JPEG-compressed masks
     "min_component_fraction": 0.001,    # components smaller than this fraction of the image are noise
     "size_thresholds": [t0, t1],        # total lesion area fraction: small < t0 <= medium < t1 <= large
     "position_bounds": [lo, hi]}        # lesion centre (x or y, fraction of width/height): < lo, [lo, hi), >= hi

Supported categories (by name, any subset, any order): ``count`` (one / multiple lesions: 2 entries), ``size``
(``len(size_thresholds) + 1`` entries, smallest first), ``horizontal`` (left / centre / right) and ``vertical``
(upper / middle / lower), each with ``len(position_bounds) + 1`` entries.

Empty masks: a mask with no component of at least ``min_component_fraction`` of the image has no description in
such a vocabulary (no "no lesion" entry), so :meth:`MaskDescriber.describe` returns ``None`` and the converters
skip the pair and report it ("empty mask"). Components below the fraction are ignored for every category.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stpnet.text_repository import ScaleAwareTextRepository

SUPPORTED_CATEGORIES = ("count", "size", "horizontal", "vertical")

try:  # scipy is optional: the fallback below gives identical labels, only slower
    from scipy import ndimage as _ndimage
except ImportError:  # pragma: no cover - scipy is installed in the dev environment
    _ndimage = None


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of a boolean mask: (labels with 0 = background, number of components)."""
    mask = np.asarray(mask, dtype=bool)
    if _ndimage is not None:
        labels, count = _ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        return labels.astype(np.int32), int(count)
    return _label_union_find(mask)


def _label_union_find(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Two-pass union-find labelling, used when scipy is missing."""
    height, width = mask.shape
    labels = np.zeros((height, width), dtype=np.int32)
    parent = [0]

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for y in range(height):
        for x in range(width):
            if not mask[y, x]:
                continue
            neighbours = []
            for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny and 0 <= nx < width and labels[ny, nx]:
                    neighbours.append(labels[ny, nx])
            if not neighbours:
                parent.append(len(parent))
                labels[y, x] = len(parent) - 1
                continue
            roots = sorted({find(int(n)) for n in neighbours})
            labels[y, x] = roots[0]
            for root in roots[1:]:
                parent[root] = roots[0]
    roots = np.array([find(i) for i in range(len(parent))], dtype=np.int32)
    unique = np.unique(roots[1:]) if len(parent) > 1 else np.array([], dtype=np.int32)
    remap = np.zeros(len(parent), dtype=np.int32)
    for new, root in enumerate(unique, start=1):
        remap[roots == root] = new
    return remap[labels], len(unique)


@dataclass(frozen=True)
class MaskStatistics:
    """What the description is computed from (components below the minimum size already removed)."""

    num_components: int
    area_fraction: float
    centre_x: float  # centre of mass, fraction of the width (0 = left edge)
    centre_y: float  # fraction of the height (0 = top edge)


def mask_statistics(mask: np.ndarray, min_component_fraction: float = 0.0) -> MaskStatistics | None:
    """Component count, area fraction and centre of mass of a binary mask; ``None`` if nothing remains."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"Expected a 2-D mask, got shape {mask.shape}")
    labels, count = connected_components(mask)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= max(min_component_fraction * mask.size, 1)
    keep[0] = False
    if not keep.any():
        return None
    kept = keep[labels]
    ys, xs = np.nonzero(kept)
    height, width = mask.shape
    return MaskStatistics(
        num_components=int(keep.sum()),
        area_fraction=float(kept.sum() / mask.size),
        # pixel centres, so a blob filling the image sits exactly at 0.5
        centre_x=float((xs.mean() + 0.5) / width),
        centre_y=float((ys.mean() + 0.5) / height),
    )


class MaskDescriber:
    """Maps a binary mask to one entry index per category of a repository with ``auto_description``."""

    def __init__(self, repository: ScaleAwareTextRepository, settings: dict[str, Any] | None = None) -> None:
        settings = settings if settings is not None else repository.auto_description
        if not settings:
            raise ValueError(
                f"Text repository {repository.name!r} has no 'auto_description' thresholds, so descriptions cannot "
                "be built from masks; the dataset needs text annotations"
            )
        unknown = [c for c in repository.categories if c not in SUPPORTED_CATEGORIES]
        if unknown:
            raise ValueError(
                f"Automatic descriptions support the categories {list(SUPPORTED_CATEGORIES)}; repository "
                f"{repository.name!r} also has {unknown}"
            )
        self.repository = repository
        self.mask_threshold = int(settings.get("mask_threshold", 127))
        self.min_component_fraction = float(settings.get("min_component_fraction", 0.0))
        self.size_thresholds = [float(t) for t in settings.get("size_thresholds", [])]
        self.position_bounds = [float(t) for t in settings.get("position_bounds", [])]
        expected = {
            "count": 2,
            "size": len(self.size_thresholds) + 1,
            "horizontal": len(self.position_bounds) + 1,
            "vertical": len(self.position_bounds) + 1,
        }
        for name, entries in zip(repository.categories, repository.num_entries):
            if entries != expected[name]:
                raise ValueError(
                    f"Category {name!r} has {entries} sentences but the auto_description thresholds define "
                    f"{expected[name]} classes (size_thresholds={self.size_thresholds}, "
                    f"position_bounds={self.position_bounds})"
                )
        for values, key in ((self.size_thresholds, "size_thresholds"), (self.position_bounds, "position_bounds")):
            if values != sorted(values):
                raise ValueError(f"auto_description {key} must be increasing, got {values}")

    def indices_from_statistics(self, stats: MaskStatistics) -> list[int]:
        values = {
            "count": 0 if stats.num_components == 1 else 1,
            "size": int(np.searchsorted(self.size_thresholds, stats.area_fraction, side="right")),
            "horizontal": int(np.searchsorted(self.position_bounds, stats.centre_x, side="right")),
            "vertical": int(np.searchsorted(self.position_bounds, stats.centre_y, side="right")),
        }
        return [values[name] for name in self.repository.categories]

    def describe(self, mask: np.ndarray) -> list[int] | None:
        """Entry index per category, or ``None`` for an empty mask (see the module docstring)."""
        stats = mask_statistics(mask, self.min_component_fraction)
        return None if stats is None else self.indices_from_statistics(stats)


def describe_mask(mask: np.ndarray, repository: ScaleAwareTextRepository) -> list[int] | None:
    """One-off convenience: entry indices for ``mask`` under ``repository.auto_description`` (None if empty)."""
    return MaskDescriber(repository).describe(mask)
