"""Save STPNet datasets (a save_to_disk folder, a parquet folder, the Hub) without losing anything already there."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import datasets

from stpnet.data.convert import SPLIT_ORDER
from stpnet.data.hub import SPLIT_ALIASES, saved_splits
from stpnet.data.io import DataError, blocking_file
from stpnet.messages import first_few

# what DatasetDict.save_to_disk writes into a split folder (cache-*.arrow: datasets' own map/filter caches)
_SAVED_SPLIT_FILE = re.compile(r"data-\d+-of-\d+\.arrow|cache-[\w.-]+\.arrow|dataset_info\.json|state\.json")


def check_save_targets(
    output: str | os.PathLike | None = None, parquet: str | os.PathLike | None = None, overwrite: bool = False
) -> None:
    """Raise :class:`DataError` unless :func:`save_stpnet_dataset` may write ``output`` and ``parquet``.

    A target must be new or empty; with ``overwrite`` it may also hold a dataset saved there earlier (``output``:
    only ``dataset_dict.json`` and its split folders; ``parquet``: only ``{split}.parquet`` files), never anything
    else, so an unrelated folder is not deleted or merged into. Cheap: call it before a long conversion.
    """
    targets = {name: Path(value) for name, value in (("output", output), ("parquet", parquet)) if value is not None}
    if len(targets) == 2:
        first, second = (p.resolve() for p in targets.values())
        if first == second or first in second.parents or second in first.parents:
            raise DataError(
                f"output {targets['output']} and parquet {targets['parquet']} overlap; each replaces its whole "
                "folder, so give two separate folders"
            )
    for kind, path in targets.items():
        problem = _target_problem(path, kind, overwrite)
        if problem is not None:
            raise DataError(problem)


def _target_problem(path: Path, kind: str, overwrite: bool) -> str | None:
    if path.is_symlink():
        return f"{path}: is a symbolic link; give the folder it points to, or a new folder"
    blocking = blocking_file(path)
    if blocking is not None:
        return f"{path}: cannot be created as a folder: {blocking} is a file"
    entries = sorted(path.iterdir()) if path.is_dir() else []
    if not entries:
        return None
    shown = first_few([e.name for e in entries], 5)
    if not overwrite:
        return (
            f"{path}: folder is not empty ({len(entries)} entries: {shown}); choose a new or empty folder, or pass "
            "--overwrite (overwrite=True) to replace a dataset saved there earlier"
        )
    foreign = _foreign_entries(path, kind)
    if foreign:
        written = "a save_to_disk dataset" if kind == "output" else "{split}.parquet files"
        return (
            f"{path}: not replaced, since it does not hold only {written} ({first_few(foreign, 8)}); "
            "--overwrite replaces nothing else, so move the other files away or choose another folder"
        )
    return None


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _foreign_entries(path: Path, kind: str) -> list[str]:
    """Entries of ``path`` that a save by :func:`save_stpnet_dataset` of this ``kind`` does not write."""
    if kind == "parquet":
        ours = {f"{split}.parquet" for split in (*SPLIT_ORDER, *SPLIT_ALIASES)}
        return [e.name for e in sorted(path.iterdir()) if not (e.name in ours and _plain_file(e))]
    try:
        splits = saved_splits(path)
    except DataError:
        return ["no readable dataset_dict.json"]
    foreign = []
    for entry in sorted(path.iterdir()):
        if entry.name == "dataset_dict.json" and _plain_file(entry):
            continue
        if entry.name in splits and entry.is_dir() and not entry.is_symlink():
            foreign += [
                f"{entry.name}/{f.name}"
                for f in sorted(entry.iterdir())
                if not (_plain_file(f) and _SAVED_SPLIT_FILE.fullmatch(f.name))
            ]
            continue
        foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def _replace_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Write into a temporary sibling of ``target`` and swap it in only once complete.

    A failure or interruption while writing leaves ``target`` as it was; the swap is two renames on one file
    system, and if the second fails the old folder is put back. Only a kill between the two renames could leave
    the old folder in ``.<name>.partial-*/old`` beside ``target``, still whole.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staged, replaced = work / "new", work / "old"
    try:
        write(staged)
        try:
            if target.exists():
                target.rename(replaced)
            staged.rename(target)
        except BaseException:
            if replaced.exists() and not target.exists():
                replaced.rename(target)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def save_stpnet_dataset(
    dataset: datasets.DatasetDict,
    output: str | os.PathLike | None = None,
    parquet: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> None:
    """``save_to_disk`` into ``output`` and/or one ``{split}.parquet`` per split into ``parquet``.

    Each target is checked first (:func:`check_save_targets`: new or empty, or with ``overwrite`` an earlier
    dataset of the same kind), then written beside it and moved into place, so it ends up holding exactly this
    dataset (no stale splits) or, after an error, what it held before.
    """
    check_save_targets(output, parquet, overwrite)
    if output is not None:
        _replace_folder(Path(output), lambda folder: dataset.save_to_disk(str(folder)))
    if parquet is not None:

        def write_parquet(folder: Path) -> None:
            folder.mkdir()
            for split, part in dataset.items():
                part.to_parquet(str(folder / f"{split}.parquet"))

        _replace_folder(Path(parquet), write_parquet)


def push_stpnet_dataset(dataset: datasets.DatasetDict, repo_id: str, private: bool = False) -> None:
    """Upload to the Hub (needs a network and a token from ``hf auth login``); tested offline with a stand-in."""
    dataset.push_to_hub(repo_id, private=private)


__all__ = ["check_save_targets", "push_stpnet_dataset", "save_stpnet_dataset"]
