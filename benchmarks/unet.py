"""A classic U-Net baseline built from STPNet's own blocks, for speed and quality comparisons.

It lives with the benchmarks that compare against it and imports its blocks from the installed `modeling_stpnet`,
so a saved U-Net carries `unet.py` only and loads where the package is installed.

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

from modeling_stpnet.backbone_stpnet import STPNetBackbone
from modeling_stpnet.blocks import ConvToOneChannel, DoubleConv, DownBlock, decoder_widths, unet_up_blocks
from modeling_stpnet.configuration_stpnet import STPNetBaseConfig
from modeling_stpnet.losses import bce_loss, dice_loss
from modeling_stpnet.modeling_stpnet import STPNetPreTrainedModel, STPNetSegmentationOutput


class UNetConfig(STPNetBaseConfig):
    r"""Configuration of the U-Net baseline ([`UNetForSemanticSegmentation`]): exactly the fields STPNet shares with
    it ([`STPNetBaseConfig`]: input, encoder widths or backbone, decoder widths, Dice + BCE weights, init), so a
    preset's U-Net is `UNetConfig(**{field: preset's value})` and the two differ only by STPNet's additions."""

    model_type = "stpnet-unet"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validate()


class UNetForSemanticSegmentation(STPNetPreTrainedModel):
    """U-Net: DoubleConv stem, 4 down blocks (1/2..1/16) or a transformers backbone (1/2..1/32), 4 bilinear up
    blocks with skips, 1x1 head.

    `forward(pixel_values (B, C, H, W), labels=None)` → `STPNetSegmentationOutput(loss, logits (B, 1, H, W))`;
    the retrieval fields stay `None`.
    """

    config_class = UNetConfig
    base_model_prefix = "unet"

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config)  # STPNet's init scheme, so the baseline starts from a comparable place
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
