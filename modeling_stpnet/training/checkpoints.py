"""Checkpoints (``accelerator.save_state``) and the selected model (``save_pretrained``), written atomically, and
the guard that keeps a new run from writing over an earlier run's results."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..image_processing_stpnet import STPNetImageProcessor
from .config import ConfigError

CHECKPOINTS = "checkpoints"
# Everything a run writes into its output folder (the test split's evaluation only as the files listed in TEST_FILES):
# --overwrite removes exactly these, so anything else a user keeps in the folder survives.
RUN_OUTPUTS = (
    "best",
    ".best-staging",
    CHECKPOINTS,
    "history.json",
    "history.csv",
    "run.json",
    "train.log",
    "train_config.yaml",
    "training_curves.png",
    "tensorboard",
)
TEST_DIR, TEST_FILES = "test", ("metrics.json", "per_image.csv", "overlays")
# What makes a folder hold results worth keeping; a run killed before its first evaluation leaves only its log and
# config, which a fresh run may take over.
RESULTS = ("best", CHECKPOINTS, "history.json", "history.csv", "run.json", f"{TEST_DIR}/metrics.json")
_STEP = re.compile(r"step-(\d+)")


def save_best(
    model: Any, processor: STPNetImageProcessor, output_dir: Path, row: dict[str, Any], config_yaml: str
) -> Path:
    """``save_pretrained`` (weights as safetensors, config with the text repository, remote code) plus the image
    processor into a staging folder that then replaces ``best/``, so ``best/`` is never half written."""
    best, staging = output_dir / "best", output_dir / ".best-staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "train_config.yaml").write_text(config_yaml)
    (staging / "selection.json").write_text(json.dumps({"selected_on": "validation dice", **row}, indent=2) + "\n")
    shutil.rmtree(best, ignore_errors=True)
    os.replace(staging, best)
    return best


def checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of ``output_dir`` as ``(step, folder)``, oldest first.

    Ordered by the parsed step, not the name: ``step-10000000`` must come after ``step-9999999``.
    """
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """``accelerator.save_state`` into ``checkpoints/step-NNNNNNN`` (every process takes part).

    Written under a staging name and renamed when complete, so a run killed while saving leaves nothing that looks
    like a whole checkpoint; only the newest ``keep`` up to ``step`` are kept. A checkpoint numbered above ``step``
    cannot come from this run's past (steps only grow), so pruning never touches it.
    """
    root = output_dir / CHECKPOINTS
    final, staging = root / f"step-{step:07d}", root / f".staging-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        ours = [path for number, path in checkpoint_steps(output_dir) if number <= step]
        for old in ours[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: Path, resume: bool | str | os.PathLike) -> Path | None:
    """``True``/``"latest"``: the newest complete checkpoint of the run (None, with a note, if there is none);
    otherwise the folder given."""
    if resume is True or resume == "latest":
        found = checkpoint_steps(output_dir)
        if not found:
            print(f"no checkpoint in {output_dir / CHECKPOINTS}: starting from scratch")
            return None
        return found[-1][1]
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {path}: no such checkpoint folder")
    return path


def run_results(output_dir: Path) -> list[str]:
    """The results of an earlier run that ``output_dir`` holds (names relative to it; empty when none)."""
    return [name for name in RESULTS if (output_dir / name).exists()]


def check_output_dir(output_dir: Path, resume: bool | str | os.PathLike | None, overwrite: bool) -> Path | None:
    """Refuses to start a run that would write over an earlier run's results; returns the checkpoint to resume
    from (None to start afresh). Touches nothing, so every process can call it before any of them writes."""
    if resume and overwrite:
        raise ConfigError(
            "--resume and --overwrite exclude each other: --resume continues the run in the output folder, "
            "--overwrite replaces it"
        )
    if overwrite:
        return None
    found = run_results(output_dir)
    if not resume:
        if found:
            raise ConfigError(
                f"{output_dir} already holds the results of a run ({', '.join(found)}); pass --resume (resume=True) "
                "to continue it, --overwrite (overwrite=True) to replace it (only the files a run writes are "
                "removed), or another output folder"
            )
        return None
    checkpoint = find_checkpoint(output_dir, resume)
    if checkpoint is None and found:
        # Starting from scratch here would replace best/ and the history without the user having said so.
        raise ConfigError(
            f"--resume: {output_dir / CHECKPOINTS} has no checkpoint to continue from, but {output_dir} holds the "
            f"results of a run ({', '.join(found)}); pass --overwrite (overwrite=True) instead to replace that run"
        )
    return checkpoint


def clear_run(output_dir: Path) -> list[str]:
    """Removes what a run writes into ``output_dir`` (see ``RUN_OUTPUTS``) and nothing else; returns the names
    removed. Only the main process may call it."""
    removed = []
    targets = [output_dir / name for name in RUN_OUTPUTS] + [output_dir / TEST_DIR / name for name in TEST_FILES]
    for path in targets:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(str(path.relative_to(output_dir)))
    test = output_dir / TEST_DIR
    if test.is_dir() and not any(test.iterdir()):
        test.rmdir()
    return removed
