"""Load, validate and save STPNet datasets: save_to_disk folders, parquet folders, raw layouts and Hub ids."""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from ..text_repository import ScaleAwareTextRepository
from .convert import SPLIT_ORDER, convert_layout
from .io import DataError
from .layouts import detect_layout

_SPLIT_ALIASES = {
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
        split = _SPLIT_ALIASES.get(prefix.lower())
        if split is None:
            raise DataError(
                f"{path}: cannot tell the split from the file name; expected one of "
                f"{sorted(_SPLIT_ALIASES)} (e.g. train.parquet or data/train-00000-of-00001.parquet)"
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

    When ``repository`` (an object or a definition JSON path) is given the result is checked with
    :func:`validate_stpnet_dataset`; for raw layouts it is also the definition used to convert.
    """
    path = Path(path_or_id)
    repo = (
        ScaleAwareTextRepository.from_json_file(repository)
        if isinstance(repository, (str, os.PathLike))
        else repository
    )
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(str(path))
        elif (path / "state.json").is_file():
            raise DataError(f"{path}: holds a single Dataset, not a DatasetDict; save a DatasetDict with splits")
        elif files := _parquet_files(path):
            dataset = datasets.load_dataset("parquet", data_files=files)
        else:
            detected = detect_layout(path) if layout == "auto" else layout
            dataset, report = convert_layout(path, detected, repo, **convert_kwargs)
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
    if repo is not None:
        validate_stpnet_dataset(dataset, repo)
    return dataset


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


def save_stpnet_dataset(
    dataset: datasets.DatasetDict, output: str | os.PathLike | None = None, parquet: str | os.PathLike | None = None
) -> None:
    """``save_to_disk`` into ``output`` and/or one ``{split}.parquet`` per split into ``parquet``."""
    if output is not None:
        dataset.save_to_disk(str(output))
    if parquet is not None:
        folder = Path(parquet)
        folder.mkdir(parents=True, exist_ok=True)
        for split, part in dataset.items():
            part.to_parquet(str(folder / f"{split}.parquet"))


def push_stpnet_dataset(dataset: datasets.DatasetDict, repo_id: str, private: bool = False) -> None:
    """Upload to the Hub (needs a network and a token from ``hf auth login``); tested offline with a stand-in."""
    dataset.push_to_hub(repo_id, private=private)


__all__ = [
    "SPLIT_ORDER",
    "load_stpnet_dataset",
    "push_stpnet_dataset",
    "save_stpnet_dataset",
    "validate_stpnet_dataset",
]
