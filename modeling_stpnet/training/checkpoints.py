"""Checkpoints (``accelerator.save_state``) and the selected model (``save_pretrained``), written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..image_processing_stpnet import STPNetImageProcessor
from .config import ConfigError

CHECKPOINTS = "checkpoints"


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


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """``accelerator.save_state`` into ``checkpoints/step-NNNNNNN`` (every process takes part).

    Written under a staging name and renamed when complete, so a run killed while saving leaves nothing that looks
    like a whole checkpoint; only the newest ``keep`` are kept.
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
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: Path, resume: bool | str | os.PathLike) -> Path | None:
    """``True``/``"latest"``: the newest complete checkpoint of the run (None, with a note, if there is none);
    otherwise the folder given."""
    if resume is True or resume == "latest":
        found = sorted((output_dir / CHECKPOINTS).glob("step-*"))
        if not found:
            print(f"no checkpoint in {output_dir / CHECKPOINTS}: starting from scratch")
            return None
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {path}: no such checkpoint folder")
    return path
