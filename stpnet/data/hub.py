"""Load and validate STPNet datasets: save_to_disk folders, parquet folders, raw layouts and Hub ids (saving:
:mod:`stpnet.data.saving`)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import datasets
from PIL import Image, UnidentifiedImageError

from stpnet.data.convert import SPLIT_ORDER, convert_layout
from stpnet.data.io import DataError
from stpnet.data.layouts import detect_layout
from stpnet.text_repository import ScaleAwareTextRepository

SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


def _parquet_files(folder: Path) -> dict[str, list[str]]:
    """Parquet files per split: ``{split}.parquet``, ``{split}-*.parquet`` or the Hub's ``data/{split}-*``."""
    files: dict[str, list[str]] = {}
    for path in sorted(list(folder.glob("*.parquet")) + list(folder.glob("data/*.parquet"))):
        prefix = path.stem.split("-")[0]
        split = SPLIT_ALIASES.get(prefix.lower())
        if split is None:
            raise DataError(
                f"{path}: cannot tell the split from the file name; expected one of "
                f"{sorted(SPLIT_ALIASES)} (e.g. train.parquet or data/train-00000-of-00001.parquet)"
            )
        files.setdefault(split, []).append(str(path))
    return files


def _looks_local(text: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that does not exist is a mistyped local path
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def load_stpnet_dataset(
    path_or_id: str | os.PathLike,
    repository: ScaleAwareTextRepository | str | os.PathLike | None = None,
    *,
    layout: str = "auto",
    **convert_kwargs,
) -> datasets.DatasetDict:
    """Load an STPNet dataset from wherever it lives.

    Accepts, in this order:
      1. a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json`` inside);
      2. a folder of parquet files (``{split}.parquet`` or the Hub's ``data/{split}-*.parquet``);
      3. a raw on-disk layout (Kvasir-SEG, QaTa-COV19, LViT folders; auto-detected unless ``layout`` is given),
         converted on the fly with :func:`~.convert.convert_layout` (``convert_kwargs``: val_fraction, seed,
         image_size, limit, on_error, progress);
      4. anything else is treated as a Hub dataset id: ``datasets.load_dataset(path_or_id)``.

    Every split must have rows, ``image`` and ``mask`` columns and masks of their images' size
    (:func:`check_stpnet_splits`); :class:`DataError` names the dataset, split and row otherwise. When
    ``repository`` (an object or a definition JSON path) is given the result is also checked with
    :func:`validate_stpnet_dataset`; for raw layouts it is also the definition used to convert.
    """
    path = Path(path_or_id)
    repo = (
        ScaleAwareTextRepository.from_json_file(repository)
        if isinstance(repository, (str, os.PathLike))
        else repository
    )
    converted = False
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            _check_saved_splits(path)
            dataset = datasets.load_from_disk(str(path))
        elif (path / "state.json").is_file():
            raise DataError(f"{path}: holds a single Dataset, not a DatasetDict; save a DatasetDict with splits")
        elif files := _parquet_files(path):
            _check_parquet_rows(path, files)
            dataset = datasets.load_dataset("parquet", data_files=files)
        else:
            detected = detect_layout(path) if layout == "auto" else layout
            dataset, report = convert_layout(path, detected, repo, **convert_kwargs)
            converted = True  # every pair was checked while converting
            if report.skips:
                print(report.format())
    elif path.exists():
        raise DataError(f"{path}: is a file; expected a dataset folder, a raw layout folder or a Hub dataset id")
    elif _looks_local(str(path_or_id)):
        raise DataError(f"{path}: no such folder (and it does not look like a Hub id 'owner/name')")
    else:
        dataset = datasets.load_dataset(str(path_or_id))
    if not isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path_or_id}: expected splits (a DatasetDict), got {type(dataset).__name__}")
    check_stpnet_splits(dataset, str(path_or_id), check_sizes=not converted)
    if repo is not None:
        try:
            validate_stpnet_dataset(dataset, repo)
        except ValueError as error:
            raise DataError(f"{path_or_id}: {error}") from error
    return dataset


def _check_parquet_rows(path: Path, files: dict[str, list[str]]) -> None:
    """``load_dataset`` says only 'Instruction "x" corresponds to no data!' for a split without rows."""
    import pyarrow.parquet as pq

    for split, names in files.items():
        try:
            rows = sum(pq.read_metadata(name).num_rows for name in names)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: a parquet file of split {split!r} is unreadable ({error})") from error
        if rows == 0:
            raise DataError(f"split {split!r} of {path} has no rows; {_EMPTY_HINT}")


def saved_splits(path: Path) -> list[str]:
    """The splits a ``save_to_disk`` folder's ``dataset_dict.json`` lists; :class:`DataError` when unreadable."""
    try:
        return [str(split) for split in json.loads((path / "dataset_dict.json").read_text())["splits"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f'{path / "dataset_dict.json"}: unreadable ({error!r}); expected {{"splits": [...]}} as written by '
            "DatasetDict.save_to_disk"
        ) from error


def _check_saved_splits(path: Path) -> None:
    """``load_from_disk`` fails with a bare IndexError on a split saved without rows: name the split instead."""
    for split in saved_splits(path):
        state = path / str(split) / "state.json"
        try:
            files = json.loads(state.read_text()).get("_data_files")
        except (OSError, ValueError, AttributeError) as error:
            raise DataError(
                f"{state}: unreadable ({error!r}); split {split!r} is listed in {path / 'dataset_dict.json'} but "
                "its save_to_disk folder is missing or damaged"
            ) from error
        if not files:
            raise DataError(f"split {split!r} of {path} has no rows; {_EMPTY_HINT}")


_EMPTY_HINT = "every split needs at least one example (prepare the dataset again, e.g. hub_scripts/prepare_dataset.py)"
_REQUIRED = ["image", "mask"]
# columns that say which source image a row came from, for error messages ("name" is what the converters write)
ID_COLUMNS = ("name", "image_id", "id", "file_name", "filename", "image_name")


def check_stpnet_splits(dataset: datasets.DatasetDict, source: str, check_sizes: bool = True) -> None:
    """Raise :class:`DataError` naming ``source`` and the split unless every split is usable for segmentation.

    Every split needs rows and ``image`` and ``mask`` columns, and (``check_sizes``) each stored mask must have its
    image's size; that reads only the image headers, and names the row (its index in the split, and its ``name``
    or id column if there is one). The text columns are checked by :func:`validate_stpnet_dataset`.
    """
    for split, part in dataset.items():
        where = f"split {split!r} of {source}"
        if len(part) == 0:
            raise DataError(f"{where} has no rows; {_EMPTY_HINT}")
        missing = [c for c in _REQUIRED if c not in part.column_names]
        if missing:
            raise DataError(
                f"{where} lacks column(s) {missing}: present {part.column_names}, required {_REQUIRED} (training "
                "also needs 'text' and one label column per text category)"
            )
        if check_sizes:
            _check_mask_sizes(part, where)


def _check_mask_sizes(part: datasets.Dataset, where: str, chunk: int = 256) -> None:
    features = part.features
    if not all(isinstance(features[c], datasets.Image) for c in _REQUIRED):
        return  # paths or arrays: decoded (and checked) by whoever reads them
    ident = next((c for c in ID_COLUMNS if c in part.column_names), None)
    # the arrow format hands over the stored bytes without decoding any pixels
    table = part.select_columns(_REQUIRED + ([ident] if ident else [])).with_format("arrow")
    for start in range(0, len(part), chunk):
        block = table[start : start + chunk]
        ids = block.column(ident).to_pylist() if ident else [None] * len(block)
        rows = zip(block.column("image").to_pylist(), block.column("mask").to_pylist(), ids)
        for row, (image, mask, name) in enumerate(rows, start=start):
            label = f"row {row}" + (f" ({ident} {name!r})" if ident else "") + f" of {where}"
            image_size, mask_size = _stored_size(image, "image", label), _stored_size(mask, "mask", label)
            if image_size and mask_size and image_size != mask_size:
                raise DataError(
                    f"{label}: the mask is {mask_size[0]}x{mask_size[1]} but its image is "
                    f"{image_size[0]}x{image_size[1]} (width x height); a mask must have its image's size"
                )


def _stored_size(value: dict | None, what: str, label: str) -> tuple[int, int] | None:
    """(width, height) as ``datasets.Image`` will decode it, or None for an image stored as a path only."""
    if not value or value.get("bytes") is None:
        return None
    try:
        with Image.open(io.BytesIO(value["bytes"])) as image:
            width, height = image.size
            if image.format == "PNG":  # getexif() would decode a PNG's pixels to look for a late eXIf chunk
                exif = Image.Exif()
                if "exif" in image.info:
                    exif.load(image.info["exif"])
            else:
                exif = image.getexif()
            # datasets applies the EXIF orientation when decoding; 5..8 are the quarter turns
            turned = exif.get(0x0112) in (5, 6, 7, 8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{label}: the stored {what} is not a readable image ({error})") from error
    return (height, width) if turned else (width, height)


def validate_stpnet_dataset(
    dataset: datasets.DatasetDict | datasets.Dataset, repository: ScaleAwareTextRepository, check_text: bool = True
) -> None:
    """Raise ``ValueError`` with what is present and what is expected unless ``dataset`` fits ``repository``.

    Checks every split: ``image``, ``mask`` and ``text`` columns; one ClassLabel column per category whose names
    equal the repository's sentences (same order, since labels are indices); with ``check_text`` also that each
    row's text is the description of its labels (reads only the text and label columns).
    """
    parts = dataset.items() if isinstance(dataset, datasets.DatasetDict) else [("dataset", dataset)]
    for split, part in parts:
        present = list(part.features)
        expected = ["image", "mask", "text", *repository.categories]
        missing = [c for c in expected if c not in present]
        if missing:
            raise ValueError(
                f"Split {split!r} lacks column(s) {missing} for text repository {repository.name!r}: present "
                f"{present}, expected {expected}"
            )
        for name, sentences in zip(repository.categories, repository.sentences):
            feature = part.features[name]
            if not isinstance(feature, datasets.ClassLabel):
                raise ValueError(  # noqa: TRY004 - one error type for every schema mismatch
                    f"Split {split!r}: column {name!r} must be a ClassLabel, got {feature}"
                )
            if list(feature.names) != list(sentences):
                raise ValueError(
                    f"Split {split!r}: ClassLabel names of {name!r} differ from repository {repository.name!r}: "
                    f"dataset {list(feature.names)}, repository {list(sentences)}"
                )
        if check_text and len(part):
            columns = part.select_columns(["text", *repository.categories])[:]
            for i in range(len(part)):
                wanted = repository.describe([columns[c][i] for c in repository.categories])
                if columns["text"][i] != wanted:
                    raise ValueError(f"Split {split!r} row {i}: text {columns['text'][i]!r} != labels' {wanted!r}")


__all__ = [
    "SPLIT_ORDER",
    "check_stpnet_splits",
    "load_stpnet_dataset",
    "validate_stpnet_dataset",
]
