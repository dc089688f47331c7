"""``stpnet-predict``: segment image files and folders with a trained STPNet, writing masks, overlays and CSVs.

    stpnet-predict --model outputs/sample-tiny/best sample/kvasir-seg-mini/images --output-dir predictions

Unreadable inputs are skipped and reported; the exit status is 0 when at least one image was processed, 1 when
none was, 2 for bad arguments, an unusable output folder (also when writing fails on the way: a full disk, a read-only
folder; what was written until then is whole) or an unusable checkpoint. Results of an earlier run in
the output folder are never replaced without ``--overwrite``, and files there that no earlier run wrote (say a
dataset's ground-truth ``masks/``) are never replaced at all: such a folder is refused.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from stpnet.cpu_memory import keep_freed_memory
from stpnet.data.io import ACCEPTED_IMAGES, DataError, blocking_file
from stpnet.inference.predict import (
    CHECKPOINT_ENV,
    DEFAULT_CHECKPOINT,
    MAX_PIXELS,
    CheckpointError,
    PreparedImage,
    STPNetPredictor,
    load_predictor,
    prepare_image,
    resolve_checkpoint,
)
from stpnet.inference.prediction_files import PredictionWriter, remove_earlier, unique_stem, write_skipped
from stpnet.messages import first_few
from stpnet.safe_write import OutputWriteError

# The smallest model input is 128x128 px; downscaling below it only throws detail away and gives blocky masks.
MIN_MAX_PIXELS = 128 * 128
RESULT_FILES = ("predictions.csv", "skipped.csv")
RESULT_FOLDERS = ("masks", "overlays")


class OutputDirError(ValueError):
    """An output folder that cannot be used as it is; the message says why and what to do."""


def collect_inputs(
    inputs: Iterable[str | os.PathLike], recursive: bool = False, exclude: Iterable[str | os.PathLike] = ()
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to try (every visible file of a folder, so non-images get reported) and inputs that cannot be used
    (missing, or folders without files). Folder scans leave out ``exclude`` and everything under it (the results
    of :func:`run`: a rerun must not read its own masks and overlays as inputs)."""
    excluded = [Path(e).resolve() for e in exclude]
    files, unusable, seen = [], [], set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            candidates = sorted(
                p
                for p in found
                if p.is_file()
                and not p.name.startswith(".")
                and not any(p.resolve().is_relative_to(e) for e in excluded)
            )
            if not candidates:
                nested = not recursive and any(p.is_dir() for p in path.iterdir())
                hint = "; its sub-folders are searched with --recursive" if nested else ""
                unusable.append((str(path), f"no images found in {path} (accepted: {ACCEPTED_IMAGES}){hint}"))
        elif path.is_file():
            candidates = [path]
        else:
            unusable.append((str(path), "not found"))
            continue
        for candidate in candidates:
            if candidate.resolve() not in seen:
                seen.add(candidate.resolve())
                files.append(candidate)
    return files, unusable


def _csv_rows(path: Path, required: set[str]) -> list[dict[str, str]] | None:
    """The rows of one of our CSVs; None when ``path`` is not one (another header, unreadable): then it is the
    user's file, which ``--overwrite`` must not replace."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not required <= set(reader.fieldnames or ()):
                return None
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _written_names(rows: list[dict[str, str]], folder: str) -> set[str]:
    """File names in ``folder`` (masks or overlays) that an earlier run's predictions.csv says it wrote."""
    column = folder.removesuffix("s")
    if rows and column in rows[0]:
        names = set()
        for row in rows:
            entry = Path(row.get(column) or "")
            # Only a plain "masks/NAME.png": a hand-edited row must not point the deletion anywhere else.
            if entry.parent == Path(folder) and entry.suffix == ".png":
                names.add(entry.name)
        return names
    # No mask/overlay column: the names follow from the input files, as PredictionWriter derives them.
    used: set[str] = set()
    return {f"{unique_stem(Path(row['file']), used)}.png" for row in rows if row.get("file")}


def _previous_results(path: Path) -> tuple[list[Path], list[str], list[str]]:
    """What ``path`` holds from an earlier run: (our files, which ``--overwrite`` may delete; labels of them for
    messages; the user's files in the way, as "folder/name", which nothing may delete).

    Masks and overlays count as ours only when the earlier predictions.csv names them: a dataset's ground-truth
    ``masks/`` looks just like our output and must never be taken for it."""
    ours: list[Path] = []
    labels: list[str] = []
    foreign: list[str] = []
    rows: list[dict[str, str]] | None = None
    for name, required in zip(RESULT_FILES, ({"file", "mask", "overlay"}, {"file", "reason"})):
        if (path / name).is_dir():
            foreign.append(f"{name}/")
        elif (path / name).exists():
            found = _csv_rows(path / name, required)
            if found is None:
                foreign.append(name)
                continue
            ours.append(path / name)
            labels.append(name)
            if name == "predictions.csv":
                rows = found
    for folder in RESULT_FOLDERS:
        if not (path / folder).is_dir():
            if (path / folder).exists():
                foreign.append(folder)
            continue
        written = _written_names(rows, folder) if rows is not None else set()
        entries = sorted(p for p in (path / folder).iterdir() if not p.name.startswith("."))
        mine = [p for p in entries if p.name in written and p.is_file()]
        foreign += [f"{folder}/{p.name}" for p in entries if p not in mine]
        if mine:
            ours += mine
            labels.append(f"{folder}/")
    return ours, labels, foreign


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Raise :class:`OutputDirError` when ``output_dir`` cannot hold the results: it holds files of the user's
    where results go (always), or an earlier run's results and ``overwrite`` is off. Returns the earlier run's
    files, which ``overwrite`` replaces. Changes nothing, so it can run before the model is loaded."""
    path = Path(output_dir)
    blocking = blocking_file(path)
    if blocking is not None:
        raise OutputDirError(f"--output-dir `{path}` cannot be used: `{blocking}` is a file; give a folder")
    if not path.is_dir():
        return []
    ours, earlier, foreign = _previous_results(path)
    if foreign:
        shown = first_few(foreign)
        raise OutputDirError(
            f"--output-dir `{path}` holds files that no earlier stpnet-predict run there wrote ({shown}), where "
            "the results would go (they may be ground truth); they are left alone, even with --overwrite: "
            "choose another --output-dir, e.g. a new folder"
        )
    if earlier and not overwrite:
        raise OutputDirError(
            f"--output-dir `{path}` already holds results of an earlier run ({', '.join(earlier)}); pass "
            "--overwrite to replace them, or choose another folder"
        )
    return ours


def result_paths(output_dir: str | os.PathLike) -> list[Path]:
    """What :func:`run` writes into ``output_dir`` (files and folders)."""
    return [Path(output_dir) / name for name in (*RESULT_FILES, *RESULT_FOLDERS)]


def run(
    predictor: STPNetPredictor,
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    threshold: float = 0.5,
    batch_size: int = 8,
    recursive: bool = False,
    max_pixels: int = MAX_PIXELS,
    progress: bool | None = None,
    overwrite: bool = False,
    tta: bool = False,
) -> tuple[int, list[tuple[str, str]]]:
    """Predict every readable image of ``inputs``; returns (number processed, [(file, why skipped)]).

    Raises :class:`OutputDirError` (before writing anything) when ``output_dir`` is unusable or holds an earlier
    run's results and ``overwrite`` is off; with ``overwrite`` those results are replaced. A write that fails on the
    way (full disk, read-only folder) raises ``OutputWriteError``: every file written until then is whole.
    """
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    earlier = check_output_dir(output_dir, overwrite)
    files, skipped = collect_inputs(inputs, recursive, exclude=result_paths(output_dir))
    # Only the earlier run's CSVs and the masks and overlays its predictions.csv names, so results do not mix;
    # anything else in the folder made check_output_dir refuse it.
    remove_earlier(earlier)
    categories = list(predictor.config.text_categories) if getattr(predictor.config, "use_text", True) else []
    writer = PredictionWriter(output_dir, categories)
    processed = 0
    bar = tqdm(total=len(files), unit="image", disable=None if progress is None else not progress)

    def skip(name: str, reason: str) -> None:
        skipped.append((name, reason))
        if not bar.disable:  # live news for long runs; the full list is printed at the end anyway
            bar.write(f"skipped {name}: {reason}", file=sys.stderr)

    def flush(batch: list[tuple[Path, PreparedImage]]) -> None:
        nonlocal processed
        try:
            predictions = predictor.predict([p.image for _, p in batch], threshold, tta=tta)
        except (RuntimeError, ValueError) as error:
            if len(batch) > 1:  # one image can break a batch (e.g. out of memory on a big one): isolate it
                for item in batch:
                    flush([item])
            else:
                skip(str(batch[0][0]), f"inference failed: {error}")
                bar.update(1)
            return
        for (path, prepared), prediction in zip(batch, predictions):
            for text in prepared.notes:  # e.g. downscaled: the mask and areas refer to the smaller image
                bar.write(f"note: {path}: {text}", file=sys.stderr)  # tqdm.write prints with or without a bar
            prediction.notes = prepared.notes + prediction.notes
            writer.write(path, prediction)
            processed += 1
        bar.update(len(batch))

    batch: list[tuple[Path, PreparedImage]] = []
    try:
        for path in files:
            try:
                batch.append((path, prepare_image(path, max_pixels=max_pixels)))
            except DataError as error:
                skip(str(path), str(error).removeprefix(f"{path}: ").removeprefix(f"{path.name}: "))
                bar.update(1)
                continue
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        bar.close()
        writer.close()
    write_skipped(output_dir, skipped)
    return processed, skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stpnet-predict",
        description="Segment lesions with a trained STPNet: masks, overlays and predictions.csv (description and "
        "lesion area per image). Unreadable files are skipped and listed in skipped.csv.",
    )
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (every file in a folder is tried)")
    parser.add_argument(
        "--model",
        default=None,
        help=f"checkpoint folder or Hugging Face Hub id (default: ${CHECKPOINT_ENV} or {DEFAULT_CHECKPOINT})",
    )
    parser.add_argument(
        "--output-dir",
        default="predictions",
        help="where masks/, overlays/ and the CSVs go (these are never read as inputs, even inside an input folder)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --output-dir (its CSVs and the masks and overlays its "
        "predictions.csv names; other files there are never deleted, and make the command refuse the folder)",
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="lesion probability threshold (default 0.5)")
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average the mask over horizontally and vertically mirrored copies (3x the compute; the description "
        "comes from the image as given)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--recursive", action="store_true", help="also look into sub-folders of input folders")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"downscale larger images to this size (default {MAX_PIXELS}, at least {MIN_MAX_PIXELS})",
    )
    parser.add_argument(
        "--release-memory",
        action="store_true",
        help="on CPU, let the allocator return freed memory after every batch (slower; see cpu_memory.py)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stpnet-predict``; returns the exit status (0 when at least one image was processed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_pixels < MIN_MAX_PIXELS:
        parser.error(
            f"--max-pixels must be at least {MIN_MAX_PIXELS} (128x128, the smallest model input), got {args.max_pixels}"
        )
    try:  # before the model loads: a wrong folder should not cost the loading time
        check_output_dir(args.output_dir, args.overwrite)
    except OutputDirError as error:
        print(f"stpnet-predict: {error}", file=sys.stderr)
        return 2
    # Likewise the inputs: when none can be used, say so before loading the model or creating the output folder.
    files, unusable = collect_inputs(args.inputs, args.recursive, exclude=result_paths(args.output_dir))
    if not files:
        reasons = "\n".join(f"  {name}: {reason}" for name, reason in unusable)
        print(f"stpnet-predict: nothing to process; nothing was written:\n{reasons}", file=sys.stderr)
        return 1
    name = resolve_checkpoint(args.model)
    try:
        predictor = load_predictor(name, device=args.device)
    except (CheckpointError, ValueError) as error:
        print(f"stpnet-predict: {error}", file=sys.stderr)
        return 2
    if predictor.device.type == "cpu" and not args.release_memory:
        keep_freed_memory()
    try:
        processed, skipped = run(
            predictor,
            args.inputs,
            args.output_dir,
            threshold=args.threshold,
            batch_size=args.batch_size,
            recursive=args.recursive,
            max_pixels=args.max_pixels,
            overwrite=args.overwrite,
            tta=args.tta,
        )
    except OutputWriteError as error:
        print(f"stpnet-predict: {error}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    if skipped:
        print(f"Skipped {len(skipped)} input(s):", file=sys.stderr)
        for file, reason in skipped:
            print(f"  {file}: {reason}", file=sys.stderr)
    print(
        f"stpnet-predict: {processed} processed, {len(skipped)} skipped; results in {out / 'predictions.csv'}"
        + (f", skipped files listed in {out / 'skipped.csv'}" if skipped else "")
    )
    return 0 if processed else 1


if __name__ == "__main__":
    sys.exit(main())
