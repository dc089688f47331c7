"""What ``stpnet-predict`` writes per image: the mask and overlay PNGs and a row of ``predictions.csv``.

Rows are appended as predictions arrive, so an interrupted run keeps what it did; every file is whole or absent:
PNGs are written under a temporary name and renamed, and a row that cannot be written whole is cut off again, so
``predictions.csv`` never ends in half a row and never names a mask that is not there.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from stpnet.safe_write import OutputWriteError, append_whole, save_image, write_error, write_text

MASKS, OVERLAYS = "masks", "overlays"


def unique_stem(path: Path, used: set[str]) -> str:
    """``path``'s stem, numbered (``name-2``) when an earlier input of the run had the same one."""
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}-{n}"
    used.add(stem)
    return stem


def _csv_line(values: dict[str, Any] | list[Any], columns: list[str] | None = None) -> str:
    buffer = io.StringIO(newline="")
    if columns is None:
        csv.writer(buffer).writerow(values)
    else:
        csv.DictWriter(buffer, fieldnames=columns).writerow(values)
    return buffer.getvalue()


class PredictionWriter:
    """Writes masks, overlays and CSV rows as predictions arrive; failures raise ``OutputWriteError``."""

    def __init__(self, output_dir: Path, categories: list[str]) -> None:
        self.output_dir = output_dir
        self.path = output_dir / "predictions.csv"
        self.used: set[str] = set()
        # description: the mask's verdict first ("No lesion found..." for an empty mask), then what was retrieved
        columns = ["file", "mask", "overlay", "width", "height", "lesion_pixels", "lesion_percent", "description"]
        columns += ["retrieved_description"] if categories else []
        columns += [c for name in categories for c in (name, f"{name}_probability")]
        self.columns = columns + ["seconds", "notes"]
        try:
            (output_dir / MASKS).mkdir(parents=True, exist_ok=True)
            (output_dir / OVERLAYS).mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "wb", buffering=0)  # unbuffered: a row is on disk whole or not at all
        except OSError as error:
            raise write_error(self.path, error, "nothing was written") from error
        self._append(_csv_line(dict(zip(self.columns, self.columns)), self.columns))

    def _append(self, text: str) -> None:
        kept = "predictions.csv keeps the rows written before, whole; their masks and overlays are intact"
        append_whole(self.handle, text.encode("utf-8"), self.path, kept)

    def write(self, path: Path, prediction: Any) -> None:
        stem = unique_stem(path, self.used)
        mask_file, overlay_file = Path(MASKS) / f"{stem}.png", Path(OVERLAYS) / f"{stem}.png"
        row = {
            "file": str(path),
            "mask": mask_file.as_posix(),
            "overlay": overlay_file.as_posix(),
            "width": prediction.mask.shape[1],
            "height": prediction.mask.shape[0],
            "lesion_pixels": prediction.lesion_pixels,
            "lesion_percent": f"{prediction.lesion_percent:.3f}",
            "description": prediction.description or "",
            "seconds": f"{prediction.seconds:.4f}",
            "notes": "; ".join(prediction.notes),
        }
        if getattr(prediction, "retrieved_description", None) is not None:
            row["retrieved_description"] = prediction.retrieved_description
        for item in prediction.categories:
            row[item["category"]] = item["sentence"]
            row[f"{item['category']}_probability"] = f"{item['probability']:.4f}"
        written: list[Path] = []
        try:
            for file, image in ((mask_file, prediction.mask_image()), (overlay_file, prediction.overlay())):
                save_image(image, self.output_dir / file)
                written.append(self.output_dir / file)
            self._append(_csv_line(row, self.columns))
        except OutputWriteError:
            # No row names them, so a rerun could neither use nor remove them: take this image's files back.
            for file in written:
                file.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        self.handle.close()


def write_skipped(output_dir: Path, skipped: list[tuple[str, str]]) -> Path:
    """``skipped.csv``: one row (file, reason) per input that was not processed."""
    text = _csv_line(["file", "reason"]) + "".join(_csv_line(list(item)) for item in skipped)
    return write_text(output_dir / "skipped.csv", text)


def remove_earlier(paths: list[Path]) -> None:
    """Deletes an earlier run's results (``--overwrite``); a folder that forbids it raises ``OutputWriteError``."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise write_error(path, error, "the earlier results that could not be removed are unchanged") from error


__all__ = ["PredictionWriter", "remove_earlier", "unique_stem", "write_skipped"]
