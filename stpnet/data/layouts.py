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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stpnet.data.io import IMAGE_EXTENSIONS, DataError, list_images
from stpnet.data.lung_text import categories_from_zones, parse_lung_description

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


def _read_text(path: Path, expected: str) -> str:
    """A small text file as str; a binary or non-UTF-8 file is a DataError naming it and what it should hold."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark from Windows editors is not a name
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not a UTF-8 text file (byte {error.start} is {error.object[error.start]:#04x}); "
            f"expected {expected}"
        ) from error
    if "\x00" in text:
        raise DataError(f"{path}: not a text file (it contains NUL bytes); expected {expected}")
    return text


def _read_stems(path: Path) -> list[tuple[int, str]]:
    """(line number, stem) for each name in a split list."""
    expected = "one image name per line, with or without its extension (e.g. 'cju0qkwl35piu0993l0dewei2.jpg')"
    lines = _read_text(path, expected).splitlines()
    entries = [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]
    if not entries:
        raise DataError(f"{path}: split list is empty")
    # lists sometimes carry the file extension; the stem is what pairs image and mask
    return [(n, Path(s).stem if Path(s).suffix.lower() in IMAGE_EXTENSIONS else s) for n, s in entries]


def _by_stem(folder: Path, key: Callable[[str], str] = lambda name: Path(name).stem) -> dict[str, list[Path]]:
    """Image files of ``folder`` per pairing key (the stem by default), in name order."""
    index: dict[str, list[Path]] = {}
    for path in list_images(folder):
        index.setdefault(key(path.name), []).append(path)
    return index


def _one_file(files: list[Path], what: str, key: str) -> str | None:
    """Why ``files`` (the images with one pairing key) cannot pair, or None when there is at most one."""
    if len(files) < 2:
        return None
    # pairs are matched by stem, so with p1.png and p1.jpg it is a guess which one the mask (or text) belongs to
    names = ", ".join(p.name for p in files)
    return f"{len(files)} {what} files pair as {key!r} ({names}); rename or remove all but one"


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
    image_files, mask_files = _by_stem(images), _by_stem(masks)
    if lists:
        entries = {
            split: [(f"{path} line {n}", stem) for n, stem in _read_stems(path)] for split, path in lists.items()
        }
    else:
        entries = {"train": [(str(images), stem) for stem in image_files]}
    seen: dict[str, str] = {}
    for split, names in entries.items():
        records = []
        for where, stem in names:
            if stem in seen:
                raise DataError(f"{where}: {stem!r} is listed again (first at {seen[stem]}); list each image once")
            seen[stem] = f"{where}, split {split!r}"
            found = image_files.get(stem, [])
            if not found:
                reason = f"image listed in {where} not found (looked for any image extension)"
                _problem(raw, on_error, split, images / stem, reason)
                continue
            reason = _one_file(found, "image", stem) or _one_file(mask_files.get(stem, []), "mask", stem)
            if reason is not None:
                _problem(raw, on_error, split, found[0], reason)
                continue
            image = found[0]
            if stem not in mask_files:
                _problem(raw, on_error, split, image, f"no mask {masks / stem}.* for this image")
                continue
            records.append(PairRecord(stem, image, mask_files[stem][0], None, str(image)))
        raw.splits[split] = records


# ---------------------------------------------------------------------------- QaTa-COV19 (SGSeg csv)
_QATA_COLUMNS = ["image", "mask", "pulmonary_infection", "infected_area", "pseudo_label_6zones"]


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """A text csv, or a DataError naming the file, what is wrong and what it should hold."""
    expected = f"a UTF-8 CSV file whose first line names the columns {columns}"
    try:
        return pd.read_csv(path, encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a UTF-8 text file (byte {error.start}); expected {expected}") from error
    except pd.errors.EmptyDataError as error:
        raise DataError(f"{path}: the file is empty; expected {expected}") from error
    except (pd.errors.ParserError, ValueError) as error:
        raise DataError(f"{path}: unreadable CSV ({error}); expected {expected}") from error


def _blank(value: object) -> bool:
    return value is None or (not isinstance(value, str) and pd.isna(value)) or not str(value).strip()


def _lines_per_name(names: list[str], first_line: int = 2) -> dict[str, list[int]]:
    """Table lines (line 1 is the header) per name, to find names given by more than one row."""
    lines: dict[str, list[int]] = {}
    for line, name in enumerate(names, start=first_line):
        lines.setdefault(name, []).append(line)
    return lines


def _discover_qata(source: Path, raw: RawDataset, on_error: str) -> None:
    for folder, split in _QATA_SPLITS.items():
        csv_path, images = source / f"{folder}_text.csv", source / folder / "images"
        if not images.is_dir():
            continue
        if not csv_path.is_file():
            raise DataError(f"{csv_path}: text csv missing for split folder {source / folder}")
        table = _read_csv(csv_path, _QATA_COLUMNS)
        missing = [c for c in _QATA_COLUMNS if c not in table.columns]
        if missing:
            raise DataError(f"{csv_path}: missing columns {missing}; found {list(table.columns)}")
        if table.empty:
            raise DataError(f"{csv_path}: split {folder!r} has no rows")
        lines = _lines_per_name([str(n).strip() for n in table["image"]])
        records, listed = [], set()
        for row_number, row in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
            where = f"{csv_path} line {row_number}"
            blank = [c for c in ("image", "mask") if _blank(getattr(row, c))]
            if blank:
                folders = {"image": images, "mask": source / folder / "masks"}
                reason = f"column {blank[0]!r} is empty; expected a file name in {folders[blank[0]]}"
                _problem(raw, on_error, split, where, reason)
                continue
            name = str(row.image).strip()
            image, mask = images / name, source / folder / "masks" / str(row.mask).strip()
            listed.add(name)
            if len(lines[name]) > 1:
                # which row is right is unknowable, so none is used; reported once, naming every row
                if lines[name][0] == row_number:
                    numbers = ", ".join(str(n) for n in lines[name])
                    reason = f"{len(lines[name])} rows of {csv_path} describe this image (lines {numbers}); keep one"
                    _problem(raw, on_error, split, image, reason)
                continue
            if not image.is_file():
                _problem(raw, on_error, split, image, f"image named in {where} not found")
                continue
            if not mask.is_file():
                _problem(raw, on_error, split, image, f"mask {mask} (named in {where}) not found")
                continue
            try:
                sentences = categories_from_zones(
                    row.pulmonary_infection, row.infected_area, row.pseudo_label_6zones, where
                )
            except DataError as error:
                _problem(raw, on_error, split, image, str(error))
                continue
            records.append(PairRecord(Path(name).stem, image, mask, sentences, where))
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
        texts: dict[str, list[tuple[str, str]]] = {}  # key -> (description, where) of every row naming it
        for row_number, row in enumerate(table.itertuples(index=False), start=2):
            if _blank(row.Image):
                reason = "column 'Image' is empty; expected the file name of an image in img/ or of its mask"
                _problem(raw, on_error, split, f"{text_path} row {row_number}", reason)
                continue
            where = f"{text_path} row {row_number} (Image={row.Image})"
            texts.setdefault(_key(row.Image), []).append((row.Description, where))
        masks = _by_stem(labels, _key)
        images = _by_stem(folder / "img", _key)
        if not images:
            raise DataError(f"{folder / 'img'}: split {split!r} has no images")
        records = []
        for key, files in images.items():
            image = files[0]
            reason = _one_file(files, "image", key) or _one_file(masks.get(key, []), "mask", key)
            if reason is not None:
                _problem(raw, on_error, split, image, reason)
                continue
            if key not in masks:
                _problem(raw, on_error, split, image, f"no mask for this image in {labels}")
                continue
            if key not in texts:
                _problem(raw, on_error, split, image, f"no description row in {text_path}")
                continue
            if len(texts[key]) > 1:
                # which row is right is unknowable; taking the last one would silently drop the other
                rows = "; ".join(where for _, where in texts[key])
                _problem(raw, on_error, split, image, f"{len(texts[key])} rows describe this image: {rows}; keep one")
                continue
            description, where = texts[key][0]
            try:
                sentences = parse_lung_description(description, where)
            except DataError as error:
                _problem(raw, on_error, split, image, str(error))
                continue
            records.append(PairRecord(key, image, masks[key][0], sentences, where))
        unused = len(set(texts) - set(images))
        if unused:
            raw.notes.append(f"{split}: {unused} row(s) of {text_path.name} name no image in {folder / 'img'}")
        raw.splits[split] = records
