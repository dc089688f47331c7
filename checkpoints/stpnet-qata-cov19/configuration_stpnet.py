"""STPNet configuration."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from typing import Any

from transformers import PretrainedConfig

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RETRIEVAL_BACKBONES = ("resnet101", "resnet50", "resnet34", "resnet18", "shared", "backbone")

# STPNet's four QaTa-COV19 categories (configuration/text/qata-cov19.json), the default repository.
_QATA_CATEGORIES = ["laterality", "count", "left_location", "right_location"]
_LOCATIONS = ["upper", "middle", "lower", "upper lower", "upper middle", "middle lower", "upper middle lower"]
_QATA_SENTENCES = [
    ["Unilateral pulmonary infection", "Bilateral pulmonary infection"],
    ["one infected area", "multiple infected areas"],
    ["no lesion in left lung"] + [f"{loc} left lung" for loc in _LOCATIONS],
    ["no lesion in right lung"] + [f"{loc} right lung" for loc in _LOCATIONS],
]


class STPNetBaseConfig(PretrainedConfig):
    r"""The fields STPNet and its U-Net baseline share: the input, the encoder (the paper's widths or a transformers
    backbone), the decoder widths, the Dice + BCE weights and the initialisation. Subclasses add their own fields
    and call `validate()` at the end of `__init__`.

    Args:
        image_size (`int`, defaults to 224): training resolution (any multiple of 32 runs); STPNet's position
            embeddings are made for it and interpolated for other sizes.
        num_channels (`int`, defaults to 3): input channels (grayscale images are repeated to RGB by the processor).
        base_channels (`int`, defaults to 64): width of the full-resolution stage of the paper's from-scratch
            encoder; its widths are `[c, 2c, 4c, 8c, 8c]` from full resolution to 1/16. Unused with a `backbone_config`.
        backbone (`str`, *optional*): Hub id or folder of a pretrained transformers vision model (e.g.
            `google/mobilenet_v2_1.0_224`) whose architecture replaces the paper's encoder; its config is read into
            `backbone_config` when that is not given. Its weights are loaded only by training, when
            `use_pretrained_backbone` is true; a checkpoint carries the trained backbone itself.
        backbone_config (`dict`, *optional*): the backbone's transformers config (with `model_type`). The backbone
            gives five maps at strides 2-32 (or four at 4-32, plus a small stem).
        use_pretrained_backbone (`bool`, defaults to False): whether training starts the backbone from `backbone`'s
            weights. The model never loads them itself.
        backbone_kwargs (`dict`, *optional*): `out_features` selecting the maps (see `backbone_stpnet.py`).
        decoder_channels (`list[int]`, *optional*): widths of the four decoder stages from deep to shallow; default
            `[4c, 2c, c, c]` of the encoder's widths `[c, 2c, 4c, 8c, ...]`, as the paper.
        dice_weight, bce_weight (`float`): segmentation loss weights (authors: .5, .5).
        one_channel_conv_init (`str`, defaults to `"fan_in"`): He-normal mode of the convolutions to one channel
            (the mask head, STPNet's SSA gates); every other convolution uses `fan_out`. In `fan_out` mode their
            fan is 1, so their weights have std sqrt(2) whatever their input width and a fresh model's logits have
            std 3-6; `fan_in` scales the same draws by 1/sqrt(width). Chosen on the CPU recipes' selection splits:
            with `fan_out` one Kvasir-SEG seed in three stalled (`benchmarks/QUALITY.md`). Only a fresh model's init
            changes; trained weights load unchanged.
        initializer_range (`float`): std of the normal init of linear layers.
    """

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
        if backbone_config is None and backbone is not None:  # as transformers' segmentation configs do
            from transformers import AutoConfig

            backbone_config = AutoConfig.from_pretrained(backbone)
        if isinstance(backbone_config, PretrainedConfig):  # stored in config.json as a plain dict
            backbone_config = {k: v for k, v in backbone_config.to_dict().items() if k != "transformers_version"}
        self.backbone = backbone
        self.backbone_config = backbone_config
        self.use_pretrained_backbone = use_pretrained_backbone
        self.backbone_kwargs = dict(backbone_kwargs) if backbone_kwargs else None
        self.decoder_channels = list(decoder_channels) if decoder_channels is not None else None
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.one_channel_conv_init = one_channel_conv_init
        self.initializer_range = initializer_range

    @classmethod
    def field_names(cls) -> list[str]:
        """The settings this class and its bases define (the named arguments of their `__init__`), base fields first:
        what a preset may set and what decides the architecture, the init and the losses."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            if isinstance(klass, type) and issubclass(klass, STPNetBaseConfig) and "__init__" in vars(klass):
                parameters = inspect.signature(klass.__init__).parameters.values()
                names += [p.name for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
        return list(dict.fromkeys(names))

    @property
    def encoder_channels(self) -> list[int]:
        """Channels of the paper's CNN encoder from full resolution to 1/16: `[c, 2c, 4c, 8c, 8c]` (a backbone's
        widths are known once it is built: `STPNetBackbone.channels`)."""
        c = self.base_channels
        return [c, 2 * c, 4 * c, 8 * c, 8 * c]

    def validate(self) -> None:
        """Raise `ValueError` naming the first shared field whose value cannot build a model."""
        name = type(self).__name__
        self._require_positive_ints("image_size", "num_channels", "base_channels")
        if self.image_size % 32:
            raise ValueError(f"{name}.image_size must be a multiple of 32, got {self.image_size}")
        backbone_config = self.backbone_config
        if backbone_config is not None and not (
            isinstance(backbone_config, dict) and isinstance(backbone_config.get("model_type"), str)
        ):
            raise ValueError(
                f"{name}.backbone_config must be a transformers config dict with a model_type, "
                f"got {str(backbone_config)[:80]!r}"
            )
        if not isinstance(self.use_pretrained_backbone, bool):
            value = self.use_pretrained_backbone
            raise ValueError(f"{name}.use_pretrained_backbone must be true or false, got {value!r}")
        if self.use_pretrained_backbone and not self.backbone:
            raise ValueError(f"{name}.use_pretrained_backbone needs `backbone`, the Hub id or folder of the weights")
        decoder = self.decoder_channels
        if decoder is not None and (len(decoder) != 4 or not all(_is_positive_int(c) and c % 2 == 0 for c in decoder)):
            raise ValueError(f"{name}.decoder_channels must be four even positive integers, got {decoder!r}")
        if self.one_channel_conv_init not in ("fan_in", "fan_out"):
            mode = self.one_channel_conv_init
            raise ValueError(f"{name}.one_channel_conv_init must be 'fan_in' or 'fan_out', got {mode!r}")
        self._require_numbers("dice_weight", "bce_weight", "initializer_range")
        self._require_non_negative("dice_weight", "bce_weight")

    # The three checks every config field of a count, a size or a loss weight goes through, named after the class.
    def _require_positive_ints(self, *fields: str) -> None:
        for field in fields:
            value = getattr(self, field)
            if not _is_positive_int(value):
                raise ValueError(f"{type(self).__name__}.{field} must be a positive integer, got {value!r}")

    def _require_numbers(self, *fields: str) -> None:
        # Checked by type first: a string or None in a weight would only fail deep inside the loss.
        for field in fields:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"{type(self).__name__}.{field} must be a number, got {value!r}")

    def _require_non_negative(self, *fields: str) -> None:
        for field in fields:
            if getattr(self, field) < 0:
                raise ValueError(f"{type(self).__name__}.{field} must be >= 0, got {getattr(self, field)}")


class STPNetConfig(STPNetBaseConfig):
    r"""Configuration of an STPNet model ([`STPNetForSemanticSegmentation`]).

    Args:
        image_size, num_channels, base_channels, backbone, backbone_config, use_pretrained_backbone,
        backbone_kwargs, decoder_channels, dice_weight, bce_weight, one_channel_conv_init, initializer_range:
            as [`STPNetBaseConfig`]. With a backbone, the U-shape's skips, SSA and the transformer branch run on its
            maps, and the prompt does not enter the encoder (a pretrained stage has no input for the text channel).
        text_hidden_size (`int`, defaults to 384): width of the text encoder's token states stored in the repository.
        text_max_length (`int`, defaults to 30): tokens per repository sentence.
        text_encoder_name_or_path (`str`): encoder used by `ScaleAwareTextRepository.encode` to build the
            repository embeddings (only at training time; inference never loads it).
        text_categories (`list[str]`), text_sentences (`list[list[str]]`): the scale-aware text repository.
            Category `k` enters the prompt of scale `k` and of every deeper scale.
        text_repository_name (`str`), text_description_template (`str`): the dataset the repository belongs to and
            the template that joins one sentence per category into the full description.
        num_attention_heads (`int`, defaults to 4): heads of every attention block of the transformer branch.
        mlp_ratio (`float`, defaults to 2.0): hidden width of the transformer MLPs, relative to the token width.
        token_stride (`int`, defaults to 16): the transformer branch works on a grid of `H/token_stride` tokens at
            every scale (patch sizes 16/8/4/2 at 1/1, 1/2, 1/4, 1/8 resolution).
        retrieval_backbone (`str`, defaults to `"resnet101"`): image encoder of the text retrieval network, one of
            `resnet101`, `resnet50`, `resnet34`, `resnet18` (a separate ResNet, as the paper) or `shared` (reuse the
            segmentation encoder's deepest features: far cheaper; the text then enters only the transformer branch
            and the decoder, because the encoder runs before retrieval) or `backbone` (a second copy of
            `backbone_config`, pretrained like the encoder when `use_pretrained_backbone`).
        retrieval_backbone_pretrained (`str`, *optional*): Hub id of ResNet weights (e.g. `microsoft/resnet-101`)
            that the training script loads into the retrieval backbone; never loaded by the model itself.
        retrieval_top_k (`int`, defaults to 4): top-k max pooling over image tokens for the image embedding.
        shared_retrieval_detach (`bool`, defaults to True): with the `shared` backbone, the retrieval network reads
            the encoder's features without passing its gradients back into the encoder (training only; the encoder
            then learns from the segmentation alone, as beside a separate retrieval backbone). Without it the
            retrieval losses reshape the encoder: on QaTa-COV19 at 600 CPU steps that cost 0.055 Dice on the
            selection split (STPNet repository, `benchmarks/QUALITY.md`, section 4).
        use_ssa (`bool`), use_text (`bool`): ablation switches (no Spatial Scale-aware modules; no text at all,
            which leaves the U-shape with its transformer branch but no prompts and no retrieval).
        ssa_dilations (`list[int]`, defaults to `[6, 12, 18]`): dilations of the SSA modules' parallel depthwise
            convolutions, the paper's for 224 px inputs (SSA runs at 1/2, 1/4 and 1/8 resolution, so a dilation
            larger than the map leaves only the centre tap).
        zero_init_ssa (`bool`, defaults to True): start the last BatchNorm of every SSA's residual branch at zero
            scale, so each SSA starts as the identity and a fresh encoder as the one without SSA (torchvision's
            `zero_init_residual`). With `False` (the usual BatchNorm init; the paper does not say) each SSA adds a
            unit-variance random branch to features of std about 0.6. Chosen on the selection splits of the CPU
            recipes (`benchmarks/QUALITY.md`, section 10). Only a fresh model's init changes; trained
            weights load unchanged.
        encoder_text_channel (`bool`, defaults to True): with a separate retrieval backbone, the scale's prompt
            enters each down block as an extra text-similarity channel, as the paper; `False` is the ablation
            without it (the prompts still reach the transformer branch and the decoder, as with `shared`).
        retrieval_weight, classifier_weight (`float`): retrieval loss weights (authors: 1, 1).
        focal_gamma (`float`, defaults to 2.0): focusing parameter of the retrieval focal losses.
        teacher_forcing_prob (`float`, defaults to 0.0): probability, per training batch, that the segmentation
            branch receives the true description instead of the retrieved one.
        text_embeddings_fingerprint (`str`, *optional*): digest of the categories and sentences the stored text
            embeddings were encoded from (set by `STPNetModel.set_text_embeddings`), so loading can tell when
            `text_sentences` was edited without re-encoding; `None` in checkpoints saved before it existed.
    """

    model_type = "stpnet"

    def __init__(
        self,
        text_hidden_size: int = 384,
        text_max_length: int = 30,
        text_encoder_name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2",
        text_categories: list[str] | None = None,
        text_sentences: list[list[str]] | None = None,
        text_repository_name: str = "qata-cov19",
        text_description_template: str | None = "{laterality}, {count}, {left_location}, {right_location}.",
        num_attention_heads: int = 4,
        mlp_ratio: float = 2.0,
        token_stride: int = 16,
        retrieval_backbone: str = "resnet101",
        retrieval_backbone_pretrained: str | None = None,
        retrieval_top_k: int = 4,
        shared_retrieval_detach: bool = True,
        use_ssa: bool = True,
        use_text: bool = True,
        ssa_dilations: list[int] | None = None,
        zero_init_ssa: bool = True,
        encoder_text_channel: bool = True,
        retrieval_weight: float = 1.0,
        classifier_weight: float = 1.0,
        focal_gamma: float = 2.0,
        teacher_forcing_prob: float = 0.0,
        text_embeddings_fingerprint: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # the shared fields: STPNetBaseConfig
        self.text_hidden_size = text_hidden_size
        self.text_max_length = text_max_length
        self.text_encoder_name_or_path = text_encoder_name_or_path
        self.text_categories = list(text_categories) if text_categories is not None else list(_QATA_CATEGORIES)
        self.text_sentences = (
            [list(s) for s in text_sentences] if text_sentences is not None else [list(s) for s in _QATA_SENTENCES]
        )
        self.text_repository_name = text_repository_name
        self.text_description_template = text_description_template
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.token_stride = token_stride
        self.retrieval_backbone = retrieval_backbone
        self.retrieval_backbone_pretrained = retrieval_backbone_pretrained
        self.retrieval_top_k = retrieval_top_k
        self.shared_retrieval_detach = shared_retrieval_detach
        self.use_ssa = use_ssa
        self.use_text = use_text
        self.ssa_dilations = list(ssa_dilations) if ssa_dilations is not None else [6, 12, 18]
        self.zero_init_ssa = zero_init_ssa
        self.encoder_text_channel = encoder_text_channel
        self.retrieval_weight = retrieval_weight
        self.classifier_weight = classifier_weight
        self.focal_gamma = focal_gamma
        self.teacher_forcing_prob = teacher_forcing_prob
        self.text_embeddings_fingerprint = text_embeddings_fingerprint
        self.validate()

    @property
    def num_text_categories(self) -> int:
        return len(self.text_categories)

    @property
    def scale_categories(self) -> list[int]:
        """How many categories (a prefix of the repository) each of the four scales averages: 1, 2, 3, 4 for four."""
        n = len(self.text_categories)
        return [max(1, -(-n * (s + 1) // 4)) for s in range(4)]

    def validate(self) -> None:
        """Raise `ValueError` naming the first field whose value cannot build a model."""
        super().validate()
        self._require_positive_ints("text_hidden_size", "text_max_length", "num_attention_heads", "retrieval_top_k")
        if not self.ssa_dilations or not all(_is_positive_int(d) for d in self.ssa_dilations):
            raise ValueError(
                f"STPNetConfig.ssa_dilations must be a non-empty list of positive integers, got {self.ssa_dilations!r}"
            )
        if self.token_stride not in (16, 32):
            raise ValueError(f"STPNetConfig.token_stride must be 16 or 32, got {self.token_stride}")
        if self.retrieval_backbone not in RETRIEVAL_BACKBONES:
            raise ValueError(
                f"STPNetConfig.retrieval_backbone must be one of {RETRIEVAL_BACKBONES}, got {self.retrieval_backbone!r}"
            )
        if self.retrieval_backbone == "backbone" and self.backbone_config is None:
            raise ValueError("STPNetConfig.retrieval_backbone='backbone' needs a backbone_config (or backbone)")
        if self.backbone_config is None:  # a backbone's widths are checked when it is built
            check_transformer_widths(self, self.encoder_channels[:4], f"base_channels={self.base_channels}")
        # Checked by type first: a string "false" is truthy and would silently switch a module on.
        for name in ("shared_retrieval_detach", "use_ssa", "use_text", "zero_init_ssa", "encoder_text_channel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"STPNetConfig.{name} must be true or false, got {getattr(self, name)!r}")
        weights = ("retrieval_weight", "classifier_weight", "focal_gamma")
        self._require_numbers("mlp_ratio", *weights, "teacher_forcing_prob")
        if self.mlp_ratio <= 0:
            raise ValueError(f"STPNetConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        self._require_non_negative(*weights)
        if not 0.0 <= self.teacher_forcing_prob <= 1.0:
            raise ValueError(f"STPNetConfig.teacher_forcing_prob must be in [0, 1], got {self.teacher_forcing_prob}")
        validate_repository(self.text_categories, self.text_sentences)


def repository_fingerprint(categories: list[str], sentences: list[list[str]]) -> str:
    """Short digest of a repository's categories and sentences, exactly as written (order matters: it is the
    entry index the retrieval heads learned)."""
    payload = json.dumps([list(categories), [list(s) for s in sentences]], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def validate_repository(categories: list[str], sentences: list[list[str]]) -> None:
    """Raise `ValueError` with the exact problem if the categories/sentences are not a usable repository."""
    if not categories:
        raise ValueError("The text repository needs at least one category")
    if len(categories) != len(sentences):
        raise ValueError(f"{len(categories)} category names but {len(sentences)} sentence lists")
    if len(set(categories)) != len(categories):
        raise ValueError(f"Category names must be unique, got {categories}")
    for name, entries in zip(categories, sentences):
        if not _NAME_RE.match(name):
            raise ValueError(f"Category name {name!r} must be a Python identifier (letters, digits, underscore)")
        if len(entries) < 2:
            raise ValueError(f"Category {name!r} needs at least 2 sentences, got {len(entries)}")
        normalised = [normalise_sentence(s) for s in entries]
        if len(set(normalised)) != len(normalised) or any(not s for s in normalised):
            raise ValueError(f"Category {name!r} has empty or duplicate sentences: {entries}")


def normalise_sentence(sentence: str) -> str:
    """A sentence as repository lookups compare it: case and surrounding spaces and periods ignored."""
    return sentence.strip().strip(".").strip().lower()


def check_transformer_widths(config: STPNetConfig, widths: list[int], source: str) -> None:
    """The transformer branch joins two tokens of each scale's width: the heads must divide every `2 * width`."""
    for c in widths:
        if (2 * c) % config.num_attention_heads:
            raise ValueError(
                f"STPNetConfig.num_attention_heads={config.num_attention_heads} must divide the joined token width "
                f"2*{c} of every scale (encoder widths {widths} from {source})"
            )


def _is_positive_int(value: Any) -> bool:
    """True for an `int` of at least 1 (booleans are ints in Python but never a valid count or size here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
