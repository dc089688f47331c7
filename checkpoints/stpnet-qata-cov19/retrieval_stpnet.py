"""Text retrieval network: scores every entry of the scale-aware text repository for an image."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .backbone_stpnet import STPNetBackbone
from .configuration_stpnet import STPNetConfig

# name → (block type, depths, stage widths), the torchvision/timm ResNet shapes.
RESNET_SPECS = {
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    "resnet101": ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048]),
}
MAX_LOGIT_SCALE = math.log(100.0)


def build_resnet_backbone(name: str, num_channels: int = 3) -> nn.Module:
    """A randomly initialised transformers ResNetBackbone returning stages 3 and 4 (1/16 and 1/32)."""
    from transformers import ResNetBackbone, ResNetConfig

    layer_type, depths, widths = RESNET_SPECS[name]
    config = ResNetConfig(
        num_channels=num_channels,
        depths=depths,
        hidden_sizes=widths,
        layer_type=layer_type,
        out_features=["stage3", "stage4"],
    )
    return ResNetBackbone(config)


class TextRetrievalNetwork(nn.Module):
    """Image → embedding → one set of logits per text category.

    Image tokens come from a ResNet or the configured transformers backbone (the 1/16 map ++ the upsampled 1/32
    map, at 1/16 resolution) or, with the "shared"
    backbone, from the segmentation encoder's own 1/16 and 1/8 features. A token MLP projects them to the text
    width `D`, top-k max pooling over all tokens gives one embedding, and per category:

    * retrieval logits = learned scale x cosine(LayerNorm(embedding), LayerNorm(adapted entry prototypes));
    * classifier logits from a small MLP head (auxiliary).

    Forward: pixel values `(B, 3, H, W)` (or the pair of shared features) and prototypes `[(n_k, D)]` →
    two lists of `(B, n_k)` logits.
    """

    def __init__(self, config: STPNetConfig, encoder_channels: list[int] | None = None) -> None:
        super().__init__()
        dim = config.text_hidden_size
        self.top_k = config.retrieval_top_k
        if config.retrieval_backbone == "shared":
            self.backbone = None
            channels = encoder_channels or config.encoder_channels
            in_channels = channels[4] + channels[3]
        elif config.retrieval_backbone == "backbone":
            self.backbone = STPNetBackbone.from_config(config)
            in_channels = self.backbone.channels[3] + self.backbone.channels[4]
        else:
            self.backbone = build_resnet_backbone(config.retrieval_backbone, config.num_channels)
            in_channels = sum(RESNET_SPECS[config.retrieval_backbone][2][2:])
        self.token_mlp = nn.Sequential(nn.Linear(in_channels, dim), nn.GELU(), nn.Linear(dim, dim))
        self.embedding_norm = nn.LayerNorm(dim)
        # Sentences of one category ("upper left lung", "upper middle left lung") sit close together in a frozen
        # encoder's space; a learned adapter lets training pull them apart.
        self.prototype_adapter = nn.Linear(dim, dim)
        self.prototype_norm = nn.LayerNorm(dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.classifiers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, n))
            for n in (len(s) for s in config.text_sentences)
        )

    def image_tokens(self, pixel_values: torch.Tensor | None, shared: tuple[torch.Tensor, torch.Tensor] | None):
        """`(B, N, Cin)` tokens on the 1/16 grid."""
        if self.backbone is None:
            deep, mid = shared  # the encoder's two deepest maps, e.g. (B, 8c, H/16, W/16), (B, 8c, H/8, W/8)
            fmap = torch.cat([deep, F.avg_pool2d(mid, 2)], dim=1)
        else:
            if isinstance(self.backbone, STPNetBackbone):
                stage3, stage4 = self.backbone(pixel_values)[3:]  # the two deepest maps, 1/16 and 1/32
            else:
                stage3, stage4 = self.backbone(pixel_values).feature_maps  # 1/16 and 1/32
            stage4 = F.interpolate(stage4, size=stage3.shape[-2:], mode="bilinear", align_corners=False)
            fmap = torch.cat([stage3, stage4], dim=1)
        return fmap.flatten(2).transpose(1, 2)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Top-k max pooling: per channel, the mean of its k largest token activations. `(B, N, D) → (B, D)`."""
        tokens = self.token_mlp(tokens)
        k = min(self.top_k, tokens.shape[1])
        return tokens.topk(k, dim=1).values.mean(dim=1)

    def forward(
        self,
        prototypes: list[torch.Tensor],
        pixel_values: torch.Tensor | None = None,
        shared_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        embedding = self.embed(self.image_tokens(pixel_values, shared_features))
        image = F.normalize(self.embedding_norm(embedding), dim=-1)
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        retrieval = [
            scale * image @ F.normalize(self.prototype_norm(p + self.prototype_adapter(p)), dim=-1).t()
            for p in prototypes
        ]
        classifier = [head(embedding) for head in self.classifiers]
        return retrieval, classifier
