"""A classic U-Net baseline built from STPNet's own blocks, for speed and quality comparisons.

segmentation_models_pytorch cannot be installed beside the CPU torch build, so the baseline reuses
`DoubleConv`/`DownBlock`/`UpBlock` from `blocks.py`: the same encoder widths `[c, 2c, 4c, 8c, 8c]` and the same
decoder as STPNet, minus SSA, the transformer branch, the fusion blocks and text retrieval. Its output is an
`STPNetSegmentationOutput` with the same Dice + BCE loss, so one training loop and one evaluation serve both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig, PreTrainedModel

from .backbone_stpnet import STPNetBackbone
from .blocks import ConvToOneChannel, DoubleConv, DownBlock, decoder_widths, unet_up_blocks
from .configuration_stpnet import set_backbone_fields, validate_backbone_fields, validate_init_mode
from .losses import bce_loss, dice_loss
from .modeling_stpnet import STPNetPreTrainedModel, STPNetSegmentationOutput


class UNetConfig(PretrainedConfig):
    r"""Configuration of the U-Net baseline ([`UNetForSemanticSegmentation`]).

    Args:
        image_size (`int`, defaults to 224): nominal training resolution (any multiple of 32 runs).
        num_channels (`int`, defaults to 3): input channels.
        base_channels (`int`, defaults to 64): encoder widths are `[c, 2c, 4c, 8c, 8c]`, as in STPNet.
        backbone, backbone_config, use_pretrained_backbone, backbone_kwargs, decoder_channels: a transformers
            backbone as the encoder and the decoder widths, exactly as `STPNetConfig`'s (the `unet-<encoder>` rows).
        dice_weight, bce_weight (`float`): loss weights, STPNet's defaults (.5, .5).
        one_channel_conv_init (`str`, defaults to `"fan_in"`): He-normal mode of the 1x1 head, as
            `STPNetConfig.one_channel_conv_init`.
        initializer_range (`float`): kept for parity with `STPNetConfig` (the U-Net has no linear layers).
    """

    model_type = "stpnet-unet"

    def __init__(
        self,
        image_size: int = 224,
        num_channels: int = 3,
        base_channels: int = 64,
        backbone: str | None = None,
        backbone_config: dict[str, Any] | PretrainedConfig | None = None,
        use_pretrained_backbone: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        decoder_channels: list[int] | None = None,
        dice_weight: float = 0.5,
        bce_weight: float = 0.5,
        one_channel_conv_init: str = "fan_in",
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("id2label", {0: "background", 1: "lesion"})
        super().__init__(**kwargs)
        self.image_size = image_size
        self.num_channels = num_channels
        self.base_channels = base_channels
        set_backbone_fields(self, backbone, backbone_config, use_pretrained_backbone, backbone_kwargs, decoder_channels)
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.one_channel_conv_init = one_channel_conv_init
        self.initializer_range = initializer_range
        self.validate()

    @property
    def encoder_channels(self) -> list[int]:
        c = self.base_channels
        return [c, 2 * c, 4 * c, 8 * c, 8 * c]

    def validate(self) -> None:
        """Raise `ValueError` naming the first field that cannot build a model."""
        for name in ("image_size", "num_channels", "base_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size % 32:
            raise ValueError(f"UNetConfig.image_size must be a multiple of 32, got {self.image_size}")
        for name in ("dice_weight", "bce_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"UNetConfig.{name} must be >= 0, got {getattr(self, name)}")
        validate_init_mode("UNetConfig", self.one_channel_conv_init)
        validate_backbone_fields(self)


class UNetForSemanticSegmentation(PreTrainedModel):
    """U-Net: DoubleConv stem, 4 down blocks (1/2..1/16) or a transformers backbone (1/2..1/32), 4 bilinear up
    blocks with skips, 1x1 head.

    `forward(pixel_values (B, C, H, W), labels=None)` → `STPNetSegmentationOutput(loss, logits (B, 1, H, W))`;
    the retrieval fields stay `None`.
    """

    config_class = UNetConfig
    base_model_prefix = "unet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config)
        config.validate()
        config.auto_map = {
            **(getattr(config, "auto_map", None) or {}),
            "AutoModel": f"{__name__.split('.')[-1]}.{type(self).__name__}",
        }
        self.encoder = STPNetBackbone.from_config(config)
        if self.encoder is not None:
            ch = self.encoder.channels
        else:
            ch = config.encoder_channels
            self.stem = DoubleConv(config.num_channels, ch[0])
            self.down_blocks = nn.ModuleList(DownBlock(ch[s], ch[s + 1]) for s in range(4))
        # The decoder STPNet builds from the same widths, so the two differ only by STPNet's additions.
        decoder = decoder_widths(ch, config.decoder_channels)
        self.up_blocks = unet_up_blocks(ch, decoder)
        self.head = ConvToOneChannel(decoder[-1])
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # STPNet's own scheme, so the baseline starts from a comparable place.
        STPNetPreTrainedModel._init_weights(self, module)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> STPNetSegmentationOutput | tuple:
        r"""
        Args:
            pixel_values: `(B, C, H, W)` normalised images, H and W multiples of 32.
            labels: `(B, H, W)` or `(B, 1, H, W)` binary masks; adds the Dice + BCE loss.
            kwargs: ignored (e.g. `text_labels` from a shared training loop: the U-Net has no text).
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[-2] % 32 or pixel_values.shape[-1] % 32:
            raise ValueError(f"Height and width must be multiples of 32, got {tuple(pixel_values.shape[-2:])}")
        if self.encoder is not None:
            features = self.encoder(pixel_values)
        else:
            features = [self.stem(pixel_values)]
            for block in self.down_blocks:
                features.append(block(features[-1]))
        x = features[4]
        for block, skip in zip(self.up_blocks, (features[3], features[2], features[1], features[0])):
            x = block(x, skip)
        logits = self.head(x)
        if logits.shape[-2:] != pixel_values.shape[-2:]:  # a backbone's shallowest map is at stride 2
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        output = STPNetSegmentationOutput(logits=logits)
        if labels is not None:
            self._add_loss(output, labels)
        if return_dict is False:
            return output.to_tuple()
        return output

    def _add_loss(self, output: STPNetSegmentationOutput, labels: torch.Tensor) -> None:
        logits = output.logits
        target = labels if labels.ndim == 4 else labels.unsqueeze(1)
        if target.shape[-2:] != logits.shape[-2:] or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels must be (B, H, W) or (B, 1, H, W) matching the images; got {tuple(labels.shape)} "
                f"for logits {tuple(logits.shape)}"
            )
        target = (target > 0).float()
        output.dice_loss = dice_loss(logits.float(), target)
        output.bce_loss = bce_loss(logits.float(), target)
        output.loss = self.config.dice_weight * output.dice_loss + self.config.bce_weight * output.bce_loss


UNetConfig.register_for_auto_class()
UNetForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
