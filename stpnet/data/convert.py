"""Turn discovered pairs into a ``datasets.DatasetDict`` of image-text pairs.

Columns: ``image`` (RGB, 8-bit), ``mask`` (binary 'L' PNG, 0/255), ``text`` (the full scale-aware description),
one ``ClassLabel`` column per text category (column = category name, names = its sentences), and ``name`` (the
source file stem, for tracing an example back to its files).
"""

from __future__ import annotations

import numbers
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from stpnet.data.descriptions import MaskDescriber
from stpnet.data.io import DataError, encode_jpeg, encode_png, mask_array, mask_to_image, open_image, to_rgb8
from stpnet.data.layouts import PairRecord, RawDataset, Skip, definition_path, discover
from stpnet.messages import first_few
from stpnet.text_repository import ScaleAwareTextRepository

SPLIT_ORDER = ("train", "validation", "test")


def dataset_features(repository: ScaleAwareTextRepository) -> datasets.Features:
    """The features of an STPNet dataset for ``repository``."""
    # mode= makes decoding return RGB / L whatever the stored bytes are, so grayscale sources keep their small
    # original files instead of being re-encoded as three identical channels
    features = {"image": datasets.Image(mode="RGB"), "mask": datasets.Image(mode="L"), "text": datasets.Value("string")}
    for name, sentences in zip(repository.categories, repository.sentences):
        features[name] = datasets.ClassLabel(names=list(sentences))
    features["name"] = datasets.Value("string")
    return datasets.Features(features)


@dataclass
class ConversionReport:
    """What a conversion produced and what it left out, and why."""

    layout: str
    counts: dict[str, int] = field(default_factory=dict)
    skips: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skip_summary(self) -> dict[str, int]:
        """Number of skipped files per (split, reason kind)."""
        return dict(Counter(f"{s.split}: {_reason_kind(s.reason)}" for s in self.skips))

    def format(self) -> str:
        lines = [f"layout: {self.layout}"] + [f"note: {n}" for n in self.notes]
        lines += [f"{split}: {n} pairs" for split, n in self.counts.items()]
        if self.skips:
            lines.append(f"skipped {len(self.skips)} file(s):")
            lines += [f"  {key}: {n}" for key, n in sorted(self.skip_summary().items())]
            lines += [f"  e.g. {s.file}: {s.reason}" for s in self.skips[:5]]
        else:
            lines.append("skipped: 0")
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    # the first few words group reasons like "no mask ..." without the per-file paths
    return " ".join(reason.split()[:4])


def carve_validation(
    records: list[PairRecord], fraction: float, seed: int
) -> tuple[list[PairRecord], list[PairRecord]]:
    """Deterministic (seeded) train/validation split of ``records``: the result does not depend on input order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    ordered = sorted(records, key=lambda r: r.name)
    random.Random(seed).shuffle(ordered)
    count = round(fraction * len(ordered))
    if fraction > 0 and count == 0 and len(ordered) > 1:
        count = 1
    validation = sorted(ordered[:count], key=lambda r: r.name)
    train = sorted(ordered[count:], key=lambda r: r.name)
    return train, validation


def check_options(val_fraction: float = 0.1, image_size: int | None = None, limit: int | None = None) -> None:
    """Raise ``ValueError`` naming the option unless the conversion options are usable.

    0 and negative sizes and limits are refused rather than read as "no limit" (None says that): a negative
    ``limit`` would slice off the last pairs and a negative ``image_size`` would shrink every image to 1x1.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(
            f"val_fraction must be a number in [0, 1) (the share of train carved out as validation), got "
            f"{val_fraction!r}"
        )
    for name, value, meaning in (
        ("image_size", image_size, "the longest image side in pixels"),
        ("limit", limit, "the most pairs kept per split"),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name} must be a positive integer ({meaning}) or None for no limit, got {value!r}")


def _resize(image: Image.Image, mask: np.ndarray, long_side: int | None) -> tuple[Image.Image, np.ndarray, bool]:
    if long_side is None or max(image.size) <= long_side:
        return image, mask, False
    scale = long_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    # bilinear on 0/255 then re-threshold gives smoother edges than nearest neighbour
    mask_image = mask_to_image(mask).resize(size, Image.Resampling.BILINEAR)
    return image, np.asarray(mask_image) >= 128, True


def _is_binary_255(image: Image.Image) -> bool:
    return bool(np.isin(np.asarray(image), (0, 255)).all())


def convert_pair(
    record: PairRecord,
    repository: ScaleAwareTextRepository,
    describer: MaskDescriber | None,
    mask_threshold: int,
    image_size: int | None = None,
) -> dict | str:
    """One dataset row for ``record``, or the reason it must be skipped (e.g. an empty mask). Raises DataError."""
    raw_image = open_image(record.image)
    image = to_rgb8(raw_image)
    raw_mask = open_image(record.mask)
    mask = mask_array(raw_mask, mask_threshold)
    if image.size != (mask.shape[1], mask.shape[0]):
        raise DataError(
            f"{record.image}: image is {image.size[0]}x{image.size[1]} but its mask {record.mask} is "
            f"{mask.shape[1]}x{mask.shape[0]} (width x height)"
        )
    if record.sentences is None:
        if describer is None:
            raise DataError(f"{record.image}: no description and the text definition has no auto_description")
        indices = describer.describe(mask)
        if indices is None:
            return f"empty mask {record.mask} (no lesion of at least min_component_fraction)"
    else:
        try:
            indices = [repository.index_of(c, record.sentences[c]) for c in repository.categories]
        except (KeyError, ValueError) as error:
            where = record.where or record.image
            raise DataError(f"{where}: description does not fit {repository.name!r}: {error}") from error
    image, mask, resized = _resize(image, mask, image_size)
    # datasets turns an image by its EXIF orientation when decoding, while the mask matches the stored pixel grid:
    # such a file is re-encoded without the tag
    turned = raw_image.getexif().get(0x0112, 1) != 1
    if not resized and not turned and raw_image.mode in ("RGB", "L") and raw_image.format in ("JPEG", "PNG"):
        image_bytes = record.image.read_bytes()  # the original file: no re-encoding, no generation loss
    elif resized and raw_image.format == "JPEG":
        image_bytes = encode_jpeg(image, quality=90)  # a downsized copy of a photo: PNG would be several times larger
    else:
        image_bytes = encode_png(image)
    if not resized and raw_mask.format == "PNG" and raw_mask.mode == "L" and _is_binary_255(raw_mask):
        mask_bytes = Path(record.mask).read_bytes()  # already the stored form (0/255 'L' PNG)
    else:
        mask_bytes = encode_png(mask_to_image(mask))
    row = {
        "image": {"bytes": image_bytes, "path": record.image.name},
        "mask": {"bytes": mask_bytes, "path": Path(record.mask).stem + ".png"},
        "text": repository.describe(indices),
        "name": record.name,
    }
    row.update(zip(repository.categories, indices))
    return row


def convert_raw(
    raw: RawDataset,
    repository: ScaleAwareTextRepository,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
    on_error: str = "raise",
    progress: bool = True,
) -> tuple[datasets.DatasetDict, ConversionReport]:
    """Load every pair of ``raw`` into a DatasetDict (a missing validation split is carved from train).

    Raises ``ValueError`` for unusable options (see :func:`check_options`) and :class:`DataError` for bad data.
    """
    check_options(val_fraction, image_size, limit)
    splits = dict(raw.splits)
    report = ConversionReport(layout=raw.layout, skips=list(raw.skips), notes=list(raw.notes))
    if "validation" not in splits and "train" in splits and val_fraction > 0:
        splits["train"], splits["validation"] = carve_validation(splits["train"], val_fraction, seed)
        report.notes.append(f"validation carved from train: fraction {val_fraction}, seed {seed}")
    settings = repository.auto_description or {}
    describer = MaskDescriber(repository) if settings else None
    mask_threshold = int(settings.get("mask_threshold", 127))
    features = dataset_features(repository)
    result = {}
    for split in sorted(splits, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER)):
        records = splits[split][:limit] if limit is not None else splits[split]
        rows = []
        for record in _progress(records, f"{raw.layout} {split}", progress):
            try:
                row = convert_pair(record, repository, describer, mask_threshold, image_size)
            except DataError as error:
                if on_error == "raise":
                    raise
                report.skips.append(Skip(split, str(record.image), str(error)))
                continue
            if isinstance(row, str):
                report.skips.append(Skip(split, str(record.image), row))
                continue
            rows.append(row)
        if not rows:
            # The report with the skips never reaches a caller once this raises, so the message carries them.
            reasons = [f"{skip.file}: {skip.reason}" for skip in report.skips if skip.split == split]
            raise DataError(
                f"split {split!r} is empty after conversion: all {len(records)} candidates were skipped "
                f"({first_few(reasons, 2) if reasons else 'none listed'})"
            )
        columns = {key: [row[key] for row in rows] for key in features}
        result[split] = datasets.Dataset.from_dict(columns, features=features, split=split)
        report.counts[split] = len(rows)
    return datasets.DatasetDict(result), report


def convert_layout(
    source: str | os.PathLike,
    layout: str = "auto",
    repository: ScaleAwareTextRepository | str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
    on_error: str = "raise",
    progress: bool = True,
) -> tuple[datasets.DatasetDict, ConversionReport]:
    """Convert a raw layout folder (auto-detected by default) into a DatasetDict plus a report.

    Args:
        repository: a repository, a definition JSON path, or None for the layout's default definition.
        val_fraction, seed: carve validation from train when the layout has no validation split.
        image_size: downsize so the long side is at most this many pixels (masks follow).
        limit: keep at most this many pairs per split (the first ones in sorted order), for quick subsets.
        on_error: "raise" (default) stops at the first bad pair with a message naming the file; "skip" leaves it
            out and records it in the report.
    """
    check_options(val_fraction, image_size, limit)  # before listing a large folder
    raw = discover(source, layout, on_error)
    repository = resolve_repository(repository, raw.layout)
    return convert_raw(
        raw,
        repository,
        val_fraction=val_fraction,
        seed=seed,
        image_size=image_size,
        limit=limit,
        on_error=on_error,
        progress=progress,
    )


def resolve_repository(
    repository: ScaleAwareTextRepository | str | os.PathLike | None, layout: str
) -> ScaleAwareTextRepository:
    if isinstance(repository, ScaleAwareTextRepository):
        return repository
    return ScaleAwareTextRepository.from_json_file(repository or definition_path(layout))


def class_balance(dataset: datasets.Dataset | datasets.DatasetDict) -> dict:
    """Counts per category entry: ``{category: {sentence: n}}`` (per split for a DatasetDict)."""
    if isinstance(dataset, datasets.DatasetDict):
        return {split: class_balance(part) for split, part in dataset.items()}
    out = {}
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            counts = Counter(dataset[name])  # reads one column only: no image decoding
            out[name] = {sentence: counts.get(i, 0) for i, sentence in enumerate(feature.names)}
    return out


def format_class_balance(balance: dict) -> str:
    lines = []
    for split, categories in balance.items():
        total = None
        for category, counts in categories.items():
            total = total or sum(counts.values())
            parts = ", ".join(f"{s!r}: {n} ({100.0 * n / max(total, 1):.1f}%)" for s, n in counts.items())
            lines.append(f"{split} / {category}: {parts}")
    return "\n".join(lines)


def _progress(items: list, description: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with datasets, but the bar is only cosmetic
        return items
    return tqdm(items, desc=description, unit="pair")
