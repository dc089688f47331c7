"""Run records: the per-evaluation history as CSV and JSON, the training-curve PNG, and tensorboard."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from stpnet.safe_write import atomic_file, write_text


def write_history(history: list[dict[str, Any]], output_dir: Path) -> None:
    """``history.json`` (rows as written) and ``history.csv`` (union of the rows' columns, in first-seen order);
    each replaced whole, so a failed write keeps the previous history."""
    write_text(output_dir / "history.json", json.dumps(history, indent=2) + "\n")
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    write_text(output_dir / "history.csv", table.getvalue())


def plot_history(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Losses (train, validation) and validation Dice/IoU against the optimizer step; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [row["step"] for row in history]

    def series(key: str) -> list[float]:
        return [row.get(key, math.nan) if row.get(key) is not None else math.nan for row in history]

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        left.plot(steps, series(key), marker="o", markersize=3, label=label)
    left.set_xlabel("optimizer step")
    left.set_ylabel("loss")
    left.legend()
    left.grid(alpha=0.3)
    for key, label in (("val_dice", "validation Dice"), ("val_iou", "validation IoU")):
        right.plot(steps, series(key), marker="o", markersize=3, label=label)
    best = [row for row in history if row.get("is_best")]
    if best:
        right.axvline(best[-1]["step"], color="grey", linestyle="--", linewidth=1, label="selected")
    right.set_xlabel("optimizer step")
    right.set_ylim(0, 1)
    right.legend()
    right.grid(alpha=0.3)
    figure.tight_layout()
    try:
        with atomic_file(path) as temporary:
            figure.savefig(temporary, dpi=110, format="png")
    finally:
        plt.close(figure)
    return path


def scalar_items(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a history row, for ``accelerator.log`` (tensorboard takes scalars only)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def append_log(output_dir: Path, line: str) -> None:
    """One timestamped line in ``train.log`` (the run's plain-text record, next to the history files)."""
    with (output_dir / "train.log").open("a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def tensorboard_available() -> bool:
    """Whether TensorBoard logging can run (the package is optional)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
