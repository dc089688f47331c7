"""STPNet: Scale-aware Text Prompt Network for medical lesion segmentation (arXiv 2504.01561).

A CNN U-shape (with SSA modules) and a multi-scale text-conditioned transformer branch (UTrans of MTBlocks),
fused at every decoder scale. The text comes from a scale-aware text repository stored in the checkpoint: the
model retrieves one sentence per category from the image itself, so inference needs no text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .backbone_stpnet import STPNetBackbone
from .blocks import (
    SSA,
    ConvToOneChannel,
    DoubleConv,
    DownBlock,
    FusionBlock,
    TextSimilarityMap,
    decoder_widths,
    unet_up_blocks,
)
from .configuration_stpnet import STPNetConfig, check_transformer_widths, repository_fingerprint
from .losses import IGNORE_INDEX, bce_loss, dice_loss, focal_loss
from .retrieval_stpnet import TextRetrievalNetwork
from .transformer_stpnet import UTrans


@dataclass
class STPNetSegmentationOutput(ModelOutput):
    """Output of [`STPNetForSemanticSegmentation`].

    Args:
        loss: total weighted loss, when `labels` were given.
        logits: mask logits `(B, 1, H, W)` at the input resolution (sigmoid > threshold = lesion).
        retrieval_logits: per category `(B, n_k)` similarity logits over the repository entries.
        classifier_logits: per category `(B, n_k)` logits of the auxiliary classifier heads.
        retrieved_indices: `(B, K)` the entry retrieved per category (argmax of `retrieval_logits`).
        dice_loss, bce_loss, retrieval_loss, classifier_loss: unweighted parts of `loss`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    retrieval_logits: tuple[torch.Tensor, ...] | None = None
    classifier_logits: tuple[torch.Tensor, ...] | None = None
    retrieved_indices: torch.Tensor | None = None
    dice_loss: torch.Tensor | None = None
    bce_loss: torch.Tensor | None = None
    retrieval_loss: torch.Tensor | None = None
    classifier_loss: torch.Tensor | None = None


class STPNetPreTrainedModel(PreTrainedModel):
    """Init scheme, validation and auto-class wiring shared by STPNet and its U-Net baseline."""

    config_class = STPNetConfig
    base_model_prefix = "stpnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: STPNetConfig) -> None:
        super().__init__(config)
        config.validate()
        # One class answers both auto classes; register_for_auto_class adds the semantic-segmentation entry.
        config.auto_map = {
            **(getattr(config, "auto_map", None) or {}),
            "AutoModel": f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}",
        }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            # fan_out of a conv to one channel is 1, which would give it weights of std sqrt(2) at any width.
            mode = self.config.one_channel_conv_init if isinstance(module, ConvToOneChannel) else "fan_out"
            init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            # A module without parameters of its own (SSA) never reaches this method as remote code, so the norm
            # carries the flag.
            (init.zeros_ if getattr(module, "zero_init", False) else init.ones_)(module.weight)
            init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, TextRetrievalNetwork):
            init.constant_(module.logit_scale, float(torch.log(torch.tensor(1 / 0.07))))


class STPNetForSemanticSegmentation(STPNetPreTrainedModel):
    """STPNet for binary lesion segmentation.

    Both `AutoModel` and `AutoModelForSemanticSegmentation` resolve to this class.
    """

    def __init__(self, config: STPNetConfig) -> None:
        super().__init__(config)
        # The encoder: the paper's from-scratch U-shape (stem + down blocks) or a transformers backbone.
        self.encoder = STPNetBackbone.from_config(config)
        if self.encoder is not None:
            ch, strides = self.encoder.channels, self.encoder.strides
            check_transformer_widths(config, ch[:4], f"backbone {self.encoder.label!r}")
        else:
            ch, strides = config.encoder_channels, [1, 2, 4, 8, 16]
        self.use_text = config.use_text
        # The encoder sees the prompt only when retrieval can run before it (a separate retrieval backbone) and has
        # an input for it (the paper's encoder; a pretrained stage has none).
        self.retrieve_first = config.use_text and config.retrieval_backbone != "shared"
        self.text_in_encoder = self.retrieve_first and config.encoder_text_channel and self.encoder is None

        if config.use_text:
            self._register_text_embeddings(config)
            self.text_projections = nn.ModuleList(nn.Linear(config.text_hidden_size, c) for c in ch[:4])
            self.retrieval = TextRetrievalNetwork(config, ch)
        if self.text_in_encoder:
            self.text_maps = nn.ModuleList(TextSimilarityMap(c) for c in ch[:4])
        extra = 1 if self.text_in_encoder else 0

        if self.encoder is None:
            self.stem = DoubleConv(config.num_channels, ch[0])
            self.down_blocks = nn.ModuleList(DownBlock(ch[s] + extra, ch[s + 1]) for s in range(4))
        self.ssa = nn.ModuleList(
            SSA(c, tuple(config.ssa_dilations), zero_init_residual=config.zero_init_ssa)
            if config.use_ssa
            else nn.Identity()
            for c in ch[1:4]
        )
        self.utrans = UTrans(
            ch[:4],
            config.image_size,
            config.token_stride,
            config.num_attention_heads,
            config.mlp_ratio,
            config.use_text,
            feature_strides=strides[:4],
        )
        # Decoder, deep to shallow: each up block's output fuses the transformer map of its scale.
        decoder = decoder_widths(ch, config.decoder_channels)
        self.up_blocks = unet_up_blocks(ch, decoder)
        self.fusions = nn.ModuleList(FusionBlock(out, t) for out, t in zip(decoder, ch[3::-1]))
        self.head = ConvToOneChannel(decoder[-1])
        self.post_init()

    # ------------------------------------------------------------------ text repository
    def _register_text_embeddings(self, config: STPNetConfig) -> None:
        # Deterministic random embeddings until `set_text_embeddings` stores encoded ones, so a fresh model still
        # has distinct prototypes; checkpoints always carry the real tensors.
        generator = torch.Generator().manual_seed(0)
        for k, sentences in enumerate(config.text_sentences):
            emb = torch.randn(len(sentences), config.text_max_length, config.text_hidden_size, generator=generator)
            self.register_buffer(f"text_embeddings_{k}", emb * 0.1, persistent=True)

    def text_embeddings(self) -> list[torch.Tensor]:
        """Per category `(n_k, L, D)` token states of every repository sentence."""
        return [getattr(self, f"text_embeddings_{k}") for k in range(self.config.num_text_categories)]

    @torch.no_grad()
    def set_text_embeddings(self, embeddings: list[torch.Tensor], encoder_name: str | None = None) -> None:
        """Store the encoded repository (from `ScaleAwareTextRepository.encode`) in the model's buffers."""
        if not self.use_text:
            raise ValueError("This model was built with use_text=False and has no text repository")
        expected = [
            (len(s), self.config.text_max_length, self.config.text_hidden_size) for s in self.config.text_sentences
        ]
        got = [tuple(e.shape) for e in embeddings]
        if got != expected:
            raise ValueError(
                f"Text embeddings have shapes {got}, but this config expects {expected} "
                "(entries per category, text_max_length, text_hidden_size)"
            )
        for k, emb in enumerate(embeddings):
            buffer = getattr(self, f"text_embeddings_{k}")
            buffer.copy_(emb.to(buffer))
        self.config.text_embeddings_fingerprint = repository_fingerprint(
            self.config.text_categories, self.config.text_sentences
        )
        if encoder_name is not None:
            self.config.text_encoder_name_or_path = encoder_name

    def _prototypes(self) -> list[torch.Tensor]:
        """One vector per entry: the mean of its non-padding token states. `[(n_k, D)]`."""
        out = []
        for emb in self.text_embeddings():
            valid = (emb.abs().sum(-1, keepdim=True) > 0).to(emb.dtype)
            out.append((emb * valid).sum(1) / valid.sum(1).clamp(min=1))
        return out

    def _select_text(
        self, retrieval_logits: list[torch.Tensor], text_labels: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Token states of the chosen sentence per category, `[(B, L, D)]`.

        In training the hard choice passes gradients to the retrieval logits straight through (softmax), so the
        segmentation loss reaches the retrieval network (the authors' version cut this path). With teacher forcing,
        the true entry replaces the retrieved one where it is known.
        """
        force = (
            self.training
            and text_labels is not None
            and self.config.teacher_forcing_prob > 0
            and bool(torch.rand(()) < self.config.teacher_forcing_prob)
        )
        chosen = []
        for k, (logits, emb) in enumerate(zip(retrieval_logits, self.text_embeddings())):
            weights = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(emb.dtype)
            if self.training:
                soft = logits.softmax(-1).to(emb.dtype)
                weights = weights + soft - soft.detach()
            if force:
                known = text_labels[:, k] != IGNORE_INDEX
                truth = F.one_hot(text_labels[:, k].clamp(min=0), logits.shape[-1]).to(emb.dtype)
                weights = torch.where(known[:, None], truth, weights)
            chosen.append(torch.einsum("bn,nld->bld", weights, emb))
        return chosen

    def _scale_prompts(self, chosen: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scale `s` averages the first `scale_categories[s]` categories, projected to its width. `[(B, L, C_s)]`."""
        cumulative = torch.stack(chosen).cumsum(0)  # (K, B, L, D)
        prompts = []
        for s, n in enumerate(self.config.scale_categories):
            prompts.append(self.text_projections[s](cumulative[n - 1] / n))
        return prompts

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}; use STPNetImageProcessor to prepare images"
            )
        h, w = pixel_values.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"Height and width must be multiples of 32, got {h}x{w}")

    def _encode(self, pixel_values: torch.Tensor, prompts: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Five encoder maps, shallow to deep (strides 1-16 for the paper's encoder, 2-32 for a backbone), SSA
        applied to the middle three."""
        if self.encoder is not None:
            maps = self.encoder(pixel_values)
            return [maps[0], *(ssa(m) for ssa, m in zip(self.ssa, maps[1:4])), maps[4]]
        features = [self.stem(pixel_values)]  # full resolution, then 1/2, 1/4, 1/8, 1/16
        for s in range(4):
            x = features[-1]
            if self.text_in_encoder:
                x = torch.cat([x, self.text_maps[s](x, prompts[s])], dim=1)
            x = self.down_blocks[s](x)
            features.append(self.ssa[s](x) if s < 3 else x)
        return features

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        text_labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> STPNetSegmentationOutput | tuple:
        r"""
        Args:
            pixel_values: `(B, 3, H, W)` normalised images, H and W multiples of 32.
            labels: `(B, H, W)` or `(B, 1, H, W)` binary masks; adds the Dice + BCE loss.
            text_labels: `(B, K)` long, the true entry per category (-100 where unknown); adds the retrieval
                losses and enables teacher forcing.
        """
        self._check_inputs(pixel_values)
        retrieval_logits = classifier_logits = None
        prompts = None
        if self.retrieve_first:
            retrieval_logits, classifier_logits = self.retrieval(self._prototypes(), pixel_values=pixel_values)
            prompts = self._scale_prompts(self._select_text(retrieval_logits, text_labels))

        features = self._encode(pixel_values, prompts)

        if self.use_text and not self.retrieve_first:  # shared backbone: retrieve from the encoder's features
            shared = (features[4], features[3])
            if self.config.shared_retrieval_detach:
                shared = tuple(f.detach() for f in shared)
            retrieval_logits, classifier_logits = self.retrieval(self._prototypes(), shared_features=shared)
            prompts = self._scale_prompts(self._select_text(retrieval_logits, text_labels))

        token_maps = self.utrans(features[:4], prompts)  # (B, C_s, H/stride, W/stride)
        x = features[4]
        for i, s in enumerate((3, 2, 1, 0)):
            x = self.up_blocks[i](x, features[s])
            # Made only now, each transformer map goes straight from cache into its fusion instead of being held
            # (at full resolution it is as large as a decoder feature).
            x = self.fusions[i](x, self.utrans.reconstruct[s](token_maps[s], features[s].shape[-2:]))
        logits = self.head(x)
        if logits.shape[-2:] != pixel_values.shape[-2:]:  # a backbone's shallowest map is at stride 2
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)

        output = STPNetSegmentationOutput(
            logits=logits,
            retrieval_logits=tuple(retrieval_logits) if retrieval_logits is not None else None,
            classifier_logits=tuple(classifier_logits) if classifier_logits is not None else None,
            retrieved_indices=torch.stack([r.argmax(-1) for r in retrieval_logits], 1) if retrieval_logits else None,
        )
        if labels is not None or text_labels is not None:
            self._add_losses(output, labels, text_labels)
        if return_dict is False:
            return output.to_tuple()
        return output

    def _add_losses(
        self, output: STPNetSegmentationOutput, labels: torch.Tensor | None, text_labels: torch.Tensor | None
    ) -> None:
        cfg = self.config
        logits = output.logits
        total = logits.new_zeros(())
        if labels is not None:
            target = labels if labels.ndim == 4 else labels.unsqueeze(1)
            if target.shape[-2:] != logits.shape[-2:] or target.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"labels must be (B, H, W) or (B, 1, H, W) matching the images; got {tuple(labels.shape)} "
                    f"for logits {tuple(logits.shape)}"
                )
            target = (target > 0).to(logits.dtype)
            output.dice_loss = dice_loss(logits.float(), target.float())
            output.bce_loss = bce_loss(logits.float(), target.float())
            total = total + cfg.dice_weight * output.dice_loss + cfg.bce_weight * output.bce_loss
        if text_labels is not None and output.retrieval_logits is not None:
            if text_labels.ndim != 2 or text_labels.shape[1] != cfg.num_text_categories:
                raise ValueError(
                    f"text_labels must be (B, {cfg.num_text_categories}) entry indices, got {tuple(text_labels.shape)}"
                )
            text_labels = text_labels.long()
            output.retrieval_loss = sum(
                focal_loss(r, text_labels[:, k], cfg.focal_gamma) for k, r in enumerate(output.retrieval_logits)
            )
            output.classifier_loss = sum(
                focal_loss(c, text_labels[:, k], cfg.focal_gamma) for k, c in enumerate(output.classifier_logits)
            )
            total = (
                total + cfg.retrieval_weight * output.retrieval_loss + cfg.classifier_weight * output.classifier_loss
            )
        output.loss = total


STPNetConfig.register_for_auto_class()
STPNetForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
