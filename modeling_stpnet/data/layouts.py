"""Discover (image, mask, text) pairs in the supported on-disk layouts, without reading pixels yet.

Layouts:
  * ``kvasir-seg``: ``images/`` + ``masks/`` (same stems, any image extension) and split lists of stems:
    ``split_train.txt`` / ``split_val.txt`` / ``split_test.txt`` (e.g. the bundled sample), else the official
    ``split_official_train.txt`` (train) + ``split_official_val.txt`` (test), else every pair goes to train.
  * ``qata-cov19``: ``{train,valid,test}/images``, ``.../masks/mask_<image>`` and ``{split}_text.csv`` (SGSeg
    columns, see :func:`~.lung_text.categories_from_zones`); every split folder present becomes a split.
  * ``lvit``: ``{Train,Val,Test}_Folder/{img,labelcol}`` with LViT text (``*_text*.xlsx`` or ``.csv`` inside the
    folder or next to it, columns ``Image`` and ``Description``), e.g. MosMedData+ and LViT's QaTa copy.

A missing validation split is carved from train later (:func:`~.convert.carve_validation`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .io import DataError, find_by_stem, list_images
from .lung_text import categories_from_zones, parse_lung_description

LAYOUTS = ("kvasir-seg", "qata-cov19", "lvit")
DEFAULT_DEFINITIONS = {"kvasir-seg": "kvasir-seg.json", "qata-cov19": "qata-cov19.json", "lvit": "mosmeddata-plus.json"}
_QATA_SPLITS = {"train": "train", "valid": "validation", "val": "validation", "test": "test"}
_LVIT_SPLITS = {"Train": "train", "Val": "validation", "Test": "test"}


@dataclass
class PairRecord:
    """One example before loading: ``sentences`` maps category -> sentence, or is None (build from the mask)."""

    name: str
    image: Path
    mask: Path
    sentences: dict[str, str] | None = None
    where: str = ""


@dataclass
class Skip:
    split: str
    file: str
    reason: str


@dataclass
class RawDataset:
    layout: str
    splits: dict[str, list[PairRecord]]
    skips: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def definition_path(layout: str) -> Path:
    """The repository's default text definition for a layout (``configuration/text/*.json``)."""
    path = Path(__file__).resolve().parents[2] / "configuration" / "text" / DEFAULT_DEFINITIONS[layout]
    if not path.is_file():
        raise FileNotFoundError(f"Default text definition {path} not found; pass a definition JSON explicitly")
    return path


def detect_layout(source: str | os.PathLike) -> str:
    """Which supported layout ``source`` is; ValueError listing what was looked for otherwise."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: not a folder")
    if (source / "images").is_dir() and (source / "masks").is_dir():
        return "kvasir-seg"
    if any((source / s / "images").is_dir() and (source / f"{s}_text.csv").is_file() for s in _QATA_SPLITS):
        return "qata-cov19"
    if any((source / f"{s}_Folder" / "img").is_dir() for s in _LVIT_SPLITS):
        return "lvit"
    raise DataError(
        f"{source}: unknown layout (found {sorted(p.name for p in source.iterdir())[:20]}); expected images/ + masks/ "
        "(kvasir-seg), {train,valid,test}/images + {split}_text.csv (qata-cov19), or "
        "{Train,Val,Test}_Folder/img + labelcol (lvit)"
    )


def discover(source: str | os.PathLike, layout: str = "auto", on_error: str = "raise") -> RawDataset:
    """Pairs per split for ``source`` (``layout`` "auto" detects it). ``on_error``: "raise" or "skip" (reported)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    source = Path(source)
    layout = detect_layout(source) if layout == "auto" else layout
    handlers = {"kvasir-seg": _discover_kvasir, "qata-cov19": _discover_qata, "lvit": _discover_lvit}
    if layout not in handlers:
        raise ValueError(f"Unknown layout {layout!r}; choose from {['auto', *LAYOUTS]}")
    raw = RawDataset(layout=layout, splits={})
    handlers[layout](source, raw, on_error)
    for split, records in raw.splits.items():
        if not records:
            raise DataError(f"{source}: split {split!r} has no usable pairs (skips: {len(raw.skips)})")
    return raw


def _problem(raw: RawDataset, on_error: str, split: str, file: Path | str, reason: str) -> None:
    """Raise, or record a skip that the report will count; never drop silently."""
    if on_error == "raise":
        raise DataError(f"{file}: {reason}")
    raw.skips.append(Skip(split, str(file), reason))


def _read_stems(path: Path) -> list[str]:
    stems = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not stems:
        raise DataError(f"{path}: split list is empty")
    # lists sometimes carry the file extension; the stem is what pairs image and mask
    return [
        Path(s).stem if Path(s).suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff") else s
        for s in stems
    ]


# ---------------------------------------------------------------------------- Kvasir-SEG
def _discover_kvasir(source: Path, raw: RawDataset, on_error: str) -> None:
    images, masks = source / "images", source / "masks"
    explicit = {
        split: source / f"split_{key}.txt"
        for key, split in (("train", "train"), ("val", "validation"), ("test", "test"))
    }
    official = {"train": source / "split_official_train.txt", "test": source / "split_official_val.txt"}
    if explicit["train"].is_file():
        lists = {split: path for split, path in explicit.items() if path.is_file()}
        raw.notes.append("splits from split_train/split_val/split_test.txt")
    elif official["train"].is_file():
        lists = {split: path for split, path in official.items() if path.is_file()}
        raw.notes.append("official Kvasir-SEG split: train = split_official_train.txt, test = split_official_val.txt")
    else:
        lists = {}
        raw.notes.append("no split lists found: every pair goes to train")
    if lists:
        stems = {split: _read_stems(path) for split, path in lists.items()}
    else:
        stems = {"train": [p.stem for p in list_images(images)]}
    seen: dict[str, str] = {}
    for split, names in stems.items():
        records = []
        for stem in names:
            if stem in seen:
                raise DataError(f"{lists.get(split, images)}: {stem!r} is also in split {seen[stem]!r}")
            seen[stem] = split
            image = find_by_stem(images, stem)
            if image is None:
                _problem(
                    raw,
                    on_error,
                    split,
                    images / stem,
                    f"image listed in {lists.get(split, 'images/')} not found (looked for any image extension)",
                )
                continue
            mask = find_by_stem(masks, stem)
            if mask is None:
                _problem(raw, on_error, split, image, f"no mask {masks / stem}.* for this image")
                continue
            records.append(PairRecord(stem, image, mask, None, str(image)))
        raw.splits[split] = records


# ---------------------------------------------------------------------------- QaTa-COV19 (SGSeg csv)
def _discover_qata(source: Path, raw: RawDataset, on_error: str) -> None:
    required = ["image", "mask", "pulmonary_infection", "infected_area", "pseudo_label_6zones"]
    for folder, split in _QATA_SPLITS.items():
        csv_path, images = source / f"{folder}_text.csv", source / folder / "images"
        if not images.is_dir():
            continue
        if not csv_path.is_file():
            raise DataError(f"{csv_path}: text csv missing for split folder {source / folder}")
        table = pd.read_csv(csv_path)
        missing = [c for c in required if c not in table.columns]
        if missing:
            raise DataError(f"{csv_path}: missing columns {missing}; found {list(table.columns)}")
        if table.empty:
            raise DataError(f"{csv_path}: split {folder!r} has no rows")
        records, listed = [], set()
        for row_number, row in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
            where = f"{csv_path} line {row_number}"
            image, mask = images / str(row.image), source / folder / "masks" / str(row.mask)
            listed.add(str(row.image))
            if not image.is_file():
                _problem(raw, on_error, split, image, f"image named in {where} not found")
                continue
            if not mask.is_file():
                _problem(raw, on_error, split, image, f"mask {mask} (named in {where}) not found")
                continue
            try:
                zones = str(row.pseudo_label_6zones).split()
                sentences = categories_from_zones(row.pulmonary_infection, row.infected_area, zones, where)
            except (DataError, ValueError) as error:
                _problem(raw, on_error, split, image, str(error))
                continue
            records.append(PairRecord(Path(str(row.image)).stem, image, mask, sentences, where))
        unlisted = [p for p in list_images(images) if p.name not in listed]
        if unlisted:
            # images without text cannot become examples; count them rather than fail, the csv is authoritative
            raw.notes.append(f"{split}: {len(unlisted)} image(s) in {images} have no row in {csv_path.name}; ignored")
            raw.skips.extend(Skip(split, str(p), f"no row in {csv_path.name}") for p in unlisted)
        raw.splits[split] = records


# ---------------------------------------------------------------------------- LViT / STPNet folders
def _lvit_text_file(source: Path, prefix: str) -> Path | None:
    folder = source / f"{prefix}_Folder"
    candidates = []
    for base in (folder, source):
        for ext in ("xlsx", "csv"):
            candidates += sorted(base.glob(f"{prefix}_text*.{ext}"))
            if base == folder:
                candidates += sorted(p for p in base.glob(f"*text*.{ext}") if p not in candidates)
    return candidates[0] if candidates else None


def _read_text_table(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_excel(path) if path.suffix == ".xlsx" else pd.read_csv(path)
    except Exception as error:  # pandas raises many types for a broken spreadsheet
        raise DataError(f"{path}: unreadable text table ({error})") from error
    columns = {str(c).strip().lower(): c for c in table.columns}
    if "image" not in columns or "description" not in columns:
        raise DataError(f"{path}: needs columns 'Image' and 'Description'; found {list(table.columns)}")
    return table.rename(columns={columns["image"]: "Image", columns["description"]: "Description"})


def _key(name: str) -> str:
    """Pairing key: LViT's QaTa text names the *mask* file (mask_<image>), MosMedData+ names the image."""
    stem = Path(str(name).strip()).stem
    return stem.removeprefix("mask_")


def _discover_lvit(source: Path, raw: RawDataset, on_error: str) -> None:
    for prefix, split in _LVIT_SPLITS.items():
        folder = source / f"{prefix}_Folder"
        if not (folder / "img").is_dir():
            continue
        labels = folder / "labelcol"
        if not labels.is_dir():
            raise DataError(f"{labels}: mask folder missing for {folder}")
        text_path = _lvit_text_file(source, prefix)
        if text_path is None:
            raise DataError(f"{folder}: no text file ({prefix}_text.xlsx or .csv with columns Image, Description)")
        table = _read_text_table(text_path)
        texts: dict[str, tuple[str, str]] = {}
        for row_number, row in enumerate(table.itertuples(index=False), start=2):
            texts[_key(row.Image)] = (row.Description, f"{text_path} row {row_number} (Image={row.Image})")
        masks = {_key(p.name): p for p in list_images(labels)}
        images = list_images(folder / "img")
        if not images:
            raise DataError(f"{folder / 'img'}: split {split!r} has no images")
        records = []
        for image in images:
            key = _key(image.name)
            if key not in masks:
                _problem(raw, on_error, split, image, f"no mask for this image in {labels}")
                continue
            if key not in texts:
                _problem(raw, on_error, split, image, f"no description row in {text_path}")
                continue
            description, where = texts[key]
            try:
                sentences = parse_lung_description(description, where)
            except DataError as error:
                _problem(raw, on_error, split, image, str(error))
                continue
            records.append(PairRecord(key, image, masks[key], sentences, where))
        unused = len(set(texts) - {_key(p.name) for p in images})
        if unused:
            raw.notes.append(f"{split}: {unused} row(s) of {text_path.name} name no image in {folder / 'img'}")
        raw.splits[split] = records
