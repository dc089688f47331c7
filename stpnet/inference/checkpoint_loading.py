"""Finding and loading a trained STPNet checkpoint, with every check that refuses one that would run wrongly: the
one loader of prediction, the demo, evaluation, ONNX export and fine-tuning (re-exported by :mod:`.predict`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling_stpnet.image_processing_stpnet import STPNetImageProcessor
from stpnet.messages import first_few

# The Kvasir-SEG model committed with the repository (its card: checkpoints/stpnet-kvasir-seg/README.md).
DEFAULT_CHECKPOINT = "checkpoints/stpnet-kvasir-seg"
CHECKPOINT_ENV = "STPNET_CHECKPOINT"
REPO_ROOT = Path(__file__).resolve().parents[2]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PROCESSOR_FILE = "preprocessor_config.json"
# safetensors only: a pickled pytorch_model.bin can run code when it is loaded, and this package never writes one
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Config fields that change what the network computes but no weight's name or shape, so weights load under an
# edited value without any report; they are compared with the training recipe instead.
SHAPELESS_FIELDS = ("num_attention_heads", "ssa_dilations")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or loaded; the message says what to do."""


# ---------------------------------------------------------------------------------------------- checkpoints
def missing_checkpoint_help(name: str) -> str:
    """What to do when there is no checkpoint at ``name`` (Markdown; shared by the demo and the CLI)."""
    return (
        f"No STPNet checkpoint at `{name}`. The demo and `stpnet-predict` need a trained checkpoint:\n"
        f"1. The trained Kvasir-SEG model `{DEFAULT_CHECKPOINT}` comes with the repository (a full clone has it), and "
        "`bash scripts/main.sh` trains a small sample model into `outputs/sample-tiny/best` (CPU, a few minutes).\n"
        "2. Or point to another checkpoint, a local folder or a Hugging Face Hub id: "
        f"`python demo/app.py --checkpoint PATH_OR_ID`, the environment variable `{CHECKPOINT_ENV}`, the Checkpoint "
        "box of the demo, or `stpnet-predict --model PATH_OR_ID`.\n\n"
        "A checkpoint folder holds `config.json`, `model.safetensors` and `preprocessor_config.json` "
        "(written by `save_pretrained`)."
    )


def resolve_checkpoint(name: str | os.PathLike | None = None) -> str:
    """The checkpoint to use: ``name``, else ``$STPNET_CHECKPOINT``, else the committed Kvasir-SEG model.

    Relative folders are looked up in the working directory first, then in the repository root, so the demo
    finds ``checkpoints/stpnet-kvasir-seg`` whether it is started from the repository or from ``demo/``.
    """
    value = str(name or os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT).strip()
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return str(path.resolve()) if path.exists() else str(path)
    in_repo = REPO_ROOT / path
    return str(in_repo) if in_repo.exists() else value


def is_hub_id(name: str) -> bool:
    """True for ``owner/name``-shaped strings that are not an existing local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists() and not name.startswith(".")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA, then Apple MPS, then CPU; an explicit device must exist."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available here; use --device cpu")
    return resolved


def load_checkpoint(
    name_or_path: str | os.PathLike, model_types: Sequence[str] = ("stpnet",)
) -> tuple[torch.nn.Module, Any, list[str]]:
    """(model, image processor, notes) of a checkpoint: the one loader of the CLI, the demo, evaluation and export.

    Loads with ``AutoModel``/``AutoImageProcessor`` and ``trust_remote_code=True``. Raises :class:`CheckpointError`
    naming the checkpoint and what to do when it is missing or damaged, when its weights do not fit its
    ``config.json`` (missing, unexpected or reshaped weights) or when its ``preprocessor_config.json`` is invalid.
    """
    name = str(name_or_path)
    model = _load_model(name, tuple(model_types))
    processor, notes = _load_processor(name, model.config)
    return model, processor, notes


def _load_model(name: str, model_types: tuple[str, ...]) -> torch.nn.Module:
    from transformers import AutoModel

    folder = Path(name)
    local = folder.is_dir()
    if not local and not is_hub_id(name):
        raise CheckpointError(missing_checkpoint_help(name))
    if local and not (folder / "config.json").is_file():
        raise CheckpointError(
            f"`{name}` exists but holds no `config.json`, so it is not a saved checkpoint (training may "
            "still be running).\n\n" + missing_checkpoint_help(name)
        )
    if local and not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        raise CheckpointError(
            f"`{name}` holds `config.json` but no weights (`model.safetensors`): the copy is incomplete or training "
            "has not saved yet.\n\n" + missing_checkpoint_help(name)
        )
    try:
        with _quiet_load_report():  # our own message below names the keys; transformers' table would repeat them
            model, info = AutoModel.from_pretrained(
                name,
                trust_remote_code=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                use_safetensors=True,
            )
    except Exception as error:  # transformers and safetensors raise OSError, ValueError, SafetensorError...
        if local:  # the files are there, so help on finding a checkpoint would only mislead
            raise CheckpointError(
                f"Could not load the checkpoint `{name}`: {type(error).__name__}: {error}\nIts files are damaged or "
                "do not belong together (e.g. a truncated `model.safetensors` from an interrupted copy): copy or save "
                "the checkpoint again."
            ) from error
        raise CheckpointError(
            f"Could not load the checkpoint `{name}` (no local folder of that name; it was tried as a Hugging Face "
            f"Hub id): {error}\n\n" + missing_checkpoint_help(name)
        ) from error
    model_type = getattr(model.config, "model_type", None)
    if model_type not in model_types:
        raise CheckpointError(
            f"`{name}` is a {model_type!r} model; accepted here: {', '.join(repr(t) for t in model_types)}"
        )
    problems = _loading_problems(info) + _sentence_mismatch(model.config)
    problems += _recipe_mismatches(folder, model.config) if local else []
    if problems:
        raise CheckpointError(
            f"The weights of `{name}` do not fit its `config.json`:\n- " + "\n- ".join(problems) + "\nThe config "
            "was probably edited after training (use_text, use_ssa, num_attention_heads, base_channels...) or comes "
            "from another checkpoint. Restore the `config.json` saved with these weights, or train a model with the "
            "new settings; the weights are not used as they are."
        )
    return model


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    # A filter, not a higher level: transformers 5 checks this logger's level to decide other warnings.
    logger = logging.getLogger("transformers.modeling_utils")

    def drop_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


def _loading_problems(info: dict[str, Any]) -> list[str]:
    """Readable lines for every weight transformers could not load as saved."""
    problems = []
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing:
        problems.append(f"{len(missing)} weight(s) missing from the file (they would be random): {first_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} weight(s) in the file that the model does not use: {first_few(unexpected)}")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shapes = [f"{key} (file {tuple(saved)}, model {tuple(wanted)})" for key, saved, wanted in mismatched]
        problems.append(f"{len(mismatched)} weight(s) of another shape: {first_few(shapes)}")
    problems += [str(message) for message in info.get("error_msgs") or ()]
    return problems


def _sentence_mismatch(config: Any) -> list[str]:
    """The stored text embeddings were encoded from other sentences than ``config.json`` lists (an edited
    ``text_sentences``/``text_categories``): no shape shows it while the counts agree, but every retrieved
    description would be wrong. Checkpoints saved before the fingerprint existed have none and are not checked."""
    from modeling_stpnet.configuration_stpnet import repository_fingerprint

    stored = getattr(config, "text_embeddings_fingerprint", None)
    if not stored or not getattr(config, "use_text", True):
        return []
    if repository_fingerprint(config.text_categories, config.text_sentences) == stored:
        return []
    return [
        "`text_categories`/`text_sentences` in config.json are not the ones the stored text embeddings were encoded "
        f"from (fingerprint {stored}); re-encode them (training does) instead of editing the sentences"
    ]


def _recipe_mismatches(folder: Path, config: Any) -> list[str]:
    """Fields of ``SHAPELESS_FIELDS`` where ``config.json`` differs from the training recipe that training saves
    beside the weights (``train_config.yaml``: preset + overrides); nothing when the recipe cannot be read."""
    recipe = folder / "train_config.yaml"
    if not recipe.is_file():
        return []
    try:
        import yaml  # a dependency of transformers

        section = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("model") or {}
        # A fine-tuned model's architecture came from its init_from checkpoint, not from the (unused) preset.
        preset = "" if section.get("init_from") else str(section.get("preset") or "")
        candidates = [Path(preset), REPO_ROOT / preset, REPO_ROOT / "configuration" / "models" / f"{preset}.json"]
        found = next((p for p in candidates if preset and p.is_file()), None)
        expected = json.loads(found.read_text(encoding="utf-8")) if found else {}
        expected.update(section.get("overrides") or {})
    except Exception:  # an unreadable recipe proves nothing either way; the weights were checked already
        return []

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    return [
        f"`{key}` is {plain(getattr(config, key))!r} in config.json but {plain(expected[key])!r} in the "
        "training recipe (train_config.yaml); no weight shows this, yet the network computes something else"
        for key in SHAPELESS_FIELDS
        if key in expected and hasattr(config, key) and plain(getattr(config, key)) != plain(expected[key])
    ]


def _load_processor(name: str, config: Any) -> tuple[Any, list[str]]:
    """The checkpoint's image processor; the training size with ImageNet statistics (and a note) when it has none."""
    from transformers import AutoImageProcessor

    size = int(getattr(config, "image_size", 224))
    source = _processor_file(name)
    if source is None:  # a checkpoint saved without its processor still works at the training resolution
        note = f"the checkpoint has no {PROCESSOR_FILE}; using {size}x{size} and ImageNet statistics"
        return STPNetImageProcessor(size={"height": size, "width": size}), [note]
    try:
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=True)
        problem = _processor_problem(processor)
    except Exception as error:  # invalid JSON, a size the processor refuses...
        problem = f"{type(error).__name__}: {error}"
    if problem:
        # Falling back to defaults would silently drop the file's settings (its statistics, its size).
        raise CheckpointError(
            f"`{source}` is invalid: {problem}\nAccepted: `size` with `height` and `width` positive multiples of 32, "
            "`image_mean` and `image_std` three numbers each (std above 0). Fix the file, or delete it to use the "
            f"model's training size ({size}x{size}) with ImageNet statistics."
        )
    return processor, []


def _processor_file(name: str) -> Path | None:
    if Path(name).is_dir():
        path = Path(name) / PROCESSOR_FILE
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(name, PROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
    except Exception:  # offline without a cached copy: the model loaded, so only the processor is unavailable
        return None
    return Path(found) if found else None


def _processor_problem(processor: Any) -> str | None:
    """What is wrong with a loaded processor's settings, or None."""
    size = getattr(processor, "size", None) or {}
    if not isinstance(size, dict) or not all(
        isinstance(size.get(side), int) and size[side] >= 32 and size[side] % 32 == 0 for side in ("height", "width")
    ):
        return f"`size` is {size!r}"
    for field_name, low in (("image_mean", None), ("image_std", 0.0)):
        values = getattr(processor, field_name, None)
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            return f"`{field_name}` is {values!r}"
        if len(numbers) != 3 or not all(np.isfinite(numbers)) or (low is not None and min(numbers) <= low):
            return f"`{field_name}` is {values!r}"
    return None


# ---------------------------------------------------------------------------------------------- images
