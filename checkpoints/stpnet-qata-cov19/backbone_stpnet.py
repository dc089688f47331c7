"""A transformers vision model as STPNet's image encoder (the U-shape's encoder or the retrieval network's).

The backbone is configured the way transformers' own segmentation models do it: `backbone_config` (stored in
STPNet's config.json, so a checkpoint builds it without a network), `backbone` (the Hub id or folder its pretrained
weights come from, read only by training) and `backbone_kwargs`:

* models with a Backbone class (ResNet, PVTv2, ConvNeXt, ...) are built with `AutoBackbone`; `backbone_kwargs`
  (e.g. `out_features`) are set on their config, as `transformers.backbone_utils.load_backbone` does;
* other models (MobileNetV2) are built with `AutoModel`, and `backbone_kwargs["out_features"]` names the submodules
  whose outputs are the feature maps (e.g. `["conv_stem", "layer.1", "layer.4", "layer.11", "conv_1x1"]`).

STPNet's U-shape needs five maps at strides 2, 4, 8, 16 and 32. Most backbones have no stride-2 stage: when four
maps at strides 4-32 are given, a small convolutional stem trained from scratch makes the stride-2 map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import ConvBNReLU

FEATURE_STRIDES = (2, 4, 8, 16, 32)
# The probe that measures the maps' channels and strides: large enough for stride 32 to leave a 2x2 map.
_PROBE_SIZE = 64


def build_backbone_config(backbone_config: dict[str, Any], backbone_kwargs: dict[str, Any] | None) -> Any:
    """The transformers config of a backbone stored as a dict (with `model_type`), `backbone_kwargs` applied."""
    from transformers import AutoConfig

    values = {k: v for k, v in backbone_config.items() if k != "transformers_version"}
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError("backbone_config must name its model_type (e.g. 'mobilenet_v2', 'resnet')")
    config = AutoConfig.for_model(model_type, **values)
    if has_backbone_class(model_type):
        for key, value in (backbone_kwargs or {}).items():
            setattr(config, key, value)
    return config


def has_backbone_class(model_type: str) -> bool:
    """Whether transformers has a Backbone class (`AutoBackbone`) for this model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

    return model_type in MODEL_FOR_BACKBONE_MAPPING_NAMES


class STPNetBackbone(nn.Module):
    """Feature maps at strides 2, 4, 8, 16, 32 from a transformers vision model: `(B, 3, H, W) → 5 x (B, C_i, ...)`.

    Args:
        backbone_config: the backbone's config as a dict with `model_type`.
        backbone_kwargs: `out_features` (and for Backbone classes any other config field).
        num_channels: input channels.
        name: how errors name the backbone (its Hub id or folder).

    Attributes:
        channels: widths of the five maps; strides: their strides, `FEATURE_STRIDES`.
    """

    def __init__(
        self,
        backbone_config: dict[str, Any],
        backbone_kwargs: dict[str, Any] | None = None,
        num_channels: int = 3,
        name: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoBackbone, AutoModel

        config = build_backbone_config(backbone_config, backbone_kwargs)
        self.label = name or config.model_type
        self.uses_backbone_class = has_backbone_class(config.model_type)
        self.out_features: list[str] = []
        if self.uses_backbone_class:
            self.model = AutoBackbone.from_config(config)
        else:
            self.model = AutoModel.from_config(config)
            self.out_features = list((backbone_kwargs or {}).get("out_features") or [])
            modules = dict(self.model.named_modules())
            unknown = [n for n in self.out_features if n not in modules or not n]
            if not self.out_features or unknown:
                raise ValueError(
                    f"backbone {self.label!r} ({config.model_type}) has no Backbone class: backbone_kwargs."
                    f"out_features must name the submodules whose outputs are the feature maps"
                    + (f"; not submodules: {unknown}" if unknown else "")
                    + f" (top-level submodules: {[n for n, _ in self.model.named_children()]})"
                )
            self._taps = [modules[n] for n in self.out_features]
        channels, strides = self._probe(num_channels)
        self.stem: nn.Module | None = None
        if strides == list(FEATURE_STRIDES[1:]):
            # No stride-2 stage: a stem of half the first stage's width, from scratch.
            width = max(8, channels[0] // 2)
            self.stem = nn.Sequential(ConvBNReLU(num_channels, width), ConvBNReLU(width, width))
            channels, strides = [width, *channels], [2, *strides]
        if strides != list(FEATURE_STRIDES):
            raise ValueError(
                f"backbone {self.label!r} gives feature maps at strides {strides} (channels {channels}); STPNet needs "
                f"five at strides {list(FEATURE_STRIDES)}, or four at {list(FEATURE_STRIDES[1:])}: choose them with "
                "backbone_kwargs.out_features"
            )
        self.channels: list[int] = channels
        self.strides: list[int] = strides

    @classmethod
    def from_config(cls, config: Any) -> STPNetBackbone | None:
        """The backbone an STPNet or U-Net config names, or None for the paper's from-scratch encoder."""
        if config.backbone_config is None:
            return None
        return cls(config.backbone_config, config.backbone_kwargs, config.num_channels, config.backbone)

    @torch.no_grad()
    def _probe(self, num_channels: int) -> tuple[list[int], list[int]]:
        """Channels and strides of the selected maps, from one forward pass at 64x64 in eval mode."""
        parameter = next(self.model.parameters())
        probe = torch.zeros(1, num_channels, _PROBE_SIZE, _PROBE_SIZE, device=parameter.device, dtype=parameter.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            maps = self._maps(probe)
        except Exception as error:  # noqa: BLE001 - any failure here means the backbone cannot serve as an encoder
            size = f"{_PROBE_SIZE}x{_PROBE_SIZE}"
            raise ValueError(f"backbone {self.label!r} failed on a {size} probe: {error}") from error
        finally:
            self.model.train(was_training)
        for name, fmap in zip(self.out_features or range(len(maps)), maps):
            if fmap.ndim != 4:
                raise ValueError(
                    f"backbone {self.label!r}: feature {name!r} has shape {tuple(fmap.shape)}, not (B, C, H, W)"
                )
        return [m.shape[1] for m in maps], [_PROBE_SIZE // m.shape[-1] for m in maps]

    def _maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.uses_backbone_class:
            return list(self.model(pixel_values).feature_maps)
        captured: list[torch.Tensor | None] = [None] * len(self._taps)

        def keep(index: int):  # a slot per tap: the maps come back in out_features' order, whatever runs first
            return lambda _module, _inputs, output: captured.__setitem__(index, _tensor(output))

        handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(self._taps)]
        try:
            self.model(pixel_values)
        finally:
            for handle in handles:
                handle.remove()
        return captured  # type: ignore[return-value]

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """`(B, C, H, W)` → five maps `(B, channels[i], H/strides[i], W/strides[i])`."""
        maps = self._maps(pixel_values)
        if self.stem is not None:
            maps = [self.stem(nn.functional.avg_pool2d(pixel_values, 2)), *maps]
        return maps


def _tensor(output: Any) -> torch.Tensor:
    """A submodule's output as one tensor (some return tuples or ModelOutputs whose first field is the map)."""
    return output if isinstance(output, torch.Tensor) else output[0]
