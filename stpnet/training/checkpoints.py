"""Checkpoints (``accelerator.save_state``) and the selected model (``save_pretrained``), written atomically, and
the guard that keeps a new run from writing over an earlier run's results."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from modeling_stpnet.image_processing_stpnet import STPNetImageProcessor
from stpnet.data.io import blocking_file
from stpnet.messages import first_few
from stpnet.safe_write import is_write_failure, replace_folder, swap_in, write_error
from stpnet.training.config import ConfigError
from stpnet.training.evaluation import EVALUATION_FILES, OVERLAY_FILE, OVERLAY_FOLDER

CHECKPOINTS = "checkpoints"
# Everything a run writes into its output folder, removed whole by --overwrite; checkpoints/ and test/overlays/ only
# as the entries a run names so (see clear_run), so anything else a user keeps in the folder survives.
RUN_OUTPUTS = (
    "best",
    ".best-staging",
    ".best.previous",
    "history.json",
    "history.csv",
    "run.json",
    "train.log",
    "train_config.yaml",
    "training_curves.png",
    "tensorboard",
)
TEST_DIR = "test"  # the test split's evaluation (evaluation.EVALUATION_FILES and its overlays)
# What makes a folder hold results worth keeping; a run killed before its first evaluation leaves only its log and
# config, which a fresh run may take over.
RESULTS = ("best", CHECKPOINTS, "history.json", "history.csv", "run.json", f"{TEST_DIR}/metrics.json")
_STEP = re.compile(r"step-(\d+)")
_CHECKPOINT_DIRS = re.compile(r"(?:\.staging-)?step-\d+|\.step-\d+\.previous")
# What the config of a run's checkpoints decides about the network: resuming with other values would either fail in
# load_state with a long size-mismatch error or silently train a model its config no longer describes.
MODEL_KEYS = ("model", "text", "data.image_size")
CONFIG_FILE = "train_config.yaml"
BEST_STAGING = ".best-staging"


def save_best(
    model: Any, processor: STPNetImageProcessor, output_dir: Path, row: dict[str, Any], config_yaml: str
) -> Path:
    """``save_pretrained`` (weights as safetensors, config with the text repository, remote code) plus the image
    processor into a staging folder that then replaces ``best/``, so ``best/`` is never half written: a failed write
    (full disk, read-only folder) keeps the previous ``best/`` and raises ``OutputWriteError`` naming it."""

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "train_config.yaml").write_text(config_yaml)
        (staging / "selection.json").write_text(json.dumps({"selected_on": "validation dice", **row}, indent=2) + "\n")

    return replace_folder(output_dir / "best", write, staging=output_dir / BEST_STAGING)


def checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of ``output_dir`` as ``(step, folder)``, oldest first.

    Ordered by the parsed step, not the name: ``step-10000000`` must come after ``step-9999999``.
    """
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, keep: int, config_yaml: str | None = None
) -> Path:
    """``accelerator.save_state`` into ``checkpoints/step-NNNNNNN`` (every process takes part), with the run's
    ``train_config.yaml`` beside it so that a resume can be checked against the config the weights were built from.

    Written under a staging name and renamed when complete, so a run killed while saving leaves nothing that looks
    like a whole checkpoint, and a failed write (full disk, read-only folder) removes the staging folder, keeps the
    earlier checkpoints and raises ``OutputWriteError``; only the newest ``keep`` up to ``step`` are kept. A
    checkpoint numbered above ``step`` cannot come from this run's past (steps only grow), so pruning never touches
    it.
    """
    root = output_dir / CHECKPOINTS
    final, staging = root / f"step-{step:07d}", root / f".staging-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        if accelerator.is_main_process and config_yaml is not None:
            (staging / CONFIG_FILE).write_text(config_yaml)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_write_failure(error):
            kept = "the earlier checkpoints are kept unchanged; free space and resume with --resume"
            raise write_error(final, error, kept) from error
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        swap_in(staging, final)
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


def check_checkpoint_folder(path: Path) -> None:
    """Refuses a folder ``accelerator.save_state`` did not write, which ``load_state`` would only report as a missing
    ``pytorch_model.bin`` after the data and the model are loaded."""
    names = sorted(p.name for p in path.iterdir())
    has_model = any(n.startswith(("model", "pytorch_model")) for n in names)
    has_optimizer = any(n.startswith("optimizer") for n in names)
    if has_model and has_optimizer:
        return
    hint = ""
    if (path / CHECKPOINTS).is_dir() or (path / "best").is_dir():
        hint = f"; {path} looks like a run folder: to continue it, pass --output-dir {path} --resume (no folder)"
    shown = first_few(names, 8) if names else "nothing"
    raise ConfigError(
        f"--resume {path}: not a checkpoint folder written by train.py (expected model.safetensors and optimizer.bin, "
        f"as in <output-dir>/{CHECKPOINTS}/step-NNNNNNN; found {shown}){hint}"
    )


def _flatten(data: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}"))
    return flat or {prefix: {}}


def _model_settings(config: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for key in MODEL_KEYS:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        settings.update(_flatten(value, key))
    return settings


def check_resume_config(checkpoint: Path, config_yaml: str) -> None:
    """Refuses to resume ``checkpoint`` with a config that builds another network (see ``MODEL_KEYS``).

    The checkpoint's own ``train_config.yaml`` is used, else (checkpoints written before it was saved there) the
    run's, when the checkpoint lies in ``<run>/checkpoints``; without either there is nothing to compare.
    """
    candidates = [checkpoint / CONFIG_FILE]
    if checkpoint.parent.name == CHECKPOINTS:
        candidates.append(checkpoint.parent.parent / CONFIG_FILE)
    saved_file = next((path for path in candidates if path.is_file()), None)
    if saved_file is None:
        return
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, yaml.YAMLError):
        return  # an unreadable record must not block a resume; load_state still checks the shapes
    if not isinstance(saved, dict):
        return
    before, now = _model_settings(saved), _model_settings(yaml.safe_load(config_yaml))
    differing = [key for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]
    if differing:
        changes = "; ".join(f"{key}: {before.get(key)!r} in the run, {now.get(key)!r} now" for key in differing)
        raise ConfigError(
            f"--resume {checkpoint}: the checkpoint was trained with another model config ({saved_file}): {changes}. "
            "Resume with the run's settings, or start a new run (another --output-dir, or --overwrite)"
        )


def run_results(output_dir: Path) -> list[str]:
    """The results of an earlier run that ``output_dir`` holds (names relative to it; empty when none)."""
    return [name for name in RESULTS if (output_dir / name).exists()]


def check_is_folder(output_dir: Path) -> None:
    """A file where the run folder (or one above it) should be would only fail at the first write, after the data
    and the model are loaded."""
    path = blocking_file(output_dir)
    if path is not None:
        where = "" if path == output_dir else f" (a folder above output_dir {output_dir})"
        raise ConfigError(
            f"output_dir: {path}{where} is a file, not a folder; pass --output-dir a new folder or one that holds a run"
        )


def check_output_dir(output_dir: Path, resume: bool | str | os.PathLike | None, overwrite: bool) -> Path | None:
    """Refuses to start a run that would write over an earlier run's results; returns the checkpoint to resume
    from (None to start afresh). Touches nothing, so every process can call it before any of them writes."""
    if resume and overwrite:
        raise ConfigError(
            "--resume and --overwrite exclude each other: --resume continues the run in the output folder, "
            "--overwrite replaces it"
        )
    check_is_folder(output_dir)
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
    if checkpoint is not None:
        check_checkpoint_folder(checkpoint)
    return checkpoint


def _remove(path: Path) -> None:
    # A link is removed, never followed: what it points to was not written by this run.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _clear_folder(folder: Path, ours: re.Pattern[str], output_dir: Path) -> list[str]:
    """Removes the entries of ``folder`` whose names match ``ours``, then ``folder`` itself if that emptied it.

    A linked folder (checkpoints on another disk) is cleared through the link, since the run writes through it too,
    but the link itself stays."""
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if ours.fullmatch(path.name):
            _remove(path)
            removed.append(str(path.relative_to(output_dir)))
    if not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()
    return removed


def clear_run(output_dir: Path) -> list[str]:
    """Removes what a run writes into ``output_dir`` (see ``RUN_OUTPUTS``) and nothing else; returns the names
    removed. In ``checkpoints/`` and ``test/overlays/`` only the entries a run names so are removed, and a folder
    only once that leaves it empty. Only the main process may call it."""
    removed = _clear_folder(output_dir / CHECKPOINTS, _CHECKPOINT_DIRS, output_dir)
    removed += _clear_folder(output_dir / TEST_DIR / OVERLAY_FOLDER, OVERLAY_FILE, output_dir)
    targets = [output_dir / name for name in RUN_OUTPUTS] + [output_dir / TEST_DIR / n for n in EVALUATION_FILES]
    for path in targets:
        if not (path.exists() or path.is_symlink()):
            continue
        _remove(path)
        removed.append(str(path.relative_to(output_dir)))
    test = output_dir / TEST_DIR
    if test.is_dir() and not test.is_symlink() and not any(test.iterdir()):
        test.rmdir()
    return removed
