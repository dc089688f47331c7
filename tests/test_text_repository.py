"""ScaleAwareTextRepository: definitions, lookups, encoding with the offline encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modeling_stpnet import STPNetConfig
from stpnet.text_repository import ScaleAwareTextRepository

TEXT_DIR = Path(__file__).resolve().parents[1] / "configuration" / "text"
QATA_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "qata-cov19" / "stpnet_text_categories"


@pytest.mark.parametrize("name", ["qata-cov19", "kvasir-seg", "mosmeddata-plus"])
def test_definitions_load(name: str) -> None:
    repo = ScaleAwareTextRepository.from_json_file(TEXT_DIR / f"{name}.json")
    assert len(repo.categories) == 4
    assert repo.describe([0, 0, 0, 0]).endswith(".")


def test_qata_definition_is_the_default_config_repository() -> None:
    repo = ScaleAwareTextRepository.from_json_file(TEXT_DIR / "qata-cov19.json")
    config = STPNetConfig()
    assert config.text_categories == repo.categories
    assert config.text_sentences == repo.sentences
    assert ScaleAwareTextRepository.from_config(config).describe([1, 1, 7, 0]) == (
        "Bilateral pulmonary infection, multiple infected areas, upper middle lower left lung, no lesion in right lung."
    )


@pytest.mark.skipif(not QATA_VOCAB.is_dir(), reason="../shared/data/qata-cov19 is not present")
def test_qata_definition_matches_the_official_stpnet_vocabulary() -> None:
    repo = ScaleAwareTextRepository.from_json_file(TEXT_DIR / "qata-cov19.json")
    files = ["BUnilateral.txt", "num.txt", "left_loc.txt", "right_loc.txt"]
    for sentences, file in zip(repo.sentences, files):
        official = [line.strip() for line in (QATA_VOCAB / file).read_text().splitlines() if line.strip()]
        assert sentences == official


def test_index_of_and_unknown_description() -> None:
    repo = ScaleAwareTextRepository.from_json_file(TEXT_DIR / "qata-cov19.json")
    assert repo.index_of("left_location", " Upper Middle Left Lung. ") == 5
    with pytest.raises(ValueError, match="Unknown description 'left-ish'.*accepted"):
        repo.index_of("left_location", "left-ish")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "categories"),
        ({"categories": [{"name": "a"}]}, "name' and a 'sentences' list"),
        ({"categories": [{"name": "a", "sentences": "one polyp"}]}, "'sentences' of 'a' must be a list of strings"),
        (
            {"categories": [{"name": "a", "sentences": ["x", "y"]}], "description_template": "{a} {nope}"},
            r"names \['nope'\], which are not categories; accepted: \{a\}",
        ),
        ({"categories": [{"name": "a", "sentences": ["x", "y"]}], "description_template": "{a"}, "not a valid format"),
        ({"categories": [{"name": "a", "sentences": ["x", "y"]}], "auto_description": "yes"}, "mapping of thresholds"),
        ({"categories": [{"name": "bad name", "sentences": ["x", "y"]}]}, "identifier"),
        ({"categories": [{"name": "a", "sentences": ["x", "X."]}]}, "duplicate"),
        ({"categories": [{"name": "a", "sentences": ["x"]}]}, "at least 2"),
        ({"categories": []}, "at least one category"),
    ],
)
def test_bad_definitions(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScaleAwareTextRepository.from_dict(data, source="defs.json")
    if "categories" in data and data["categories"]:  # past the structural checks, every error names its file
        with pytest.raises(ValueError, match="^defs.json: "):
            ScaleAwareTextRepository.from_dict(data, source="defs.json")


def test_unreadable_definition_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        ScaleAwareTextRepository.from_json_file(path)


def test_round_trip_through_dict(tmp_path: Path) -> None:
    repo = ScaleAwareTextRepository.from_json_file(TEXT_DIR / "kvasir-seg.json")
    path = tmp_path / "copy.json"
    path.write_text(json.dumps(repo.to_dict()))
    again = ScaleAwareTextRepository.from_json_file(path)
    assert again == repo
    assert STPNetConfig(**again.config_kwargs()).text_categories == repo.categories


def test_encode_with_the_offline_encoder() -> None:
    repo = ScaleAwareTextRepository.from_json_file(TEXT_DIR / "kvasir-seg.json")
    embeddings = repo.encode(max_length=16)
    assert [tuple(e.shape) for e in embeddings] == [(2, 16, 384), (3, 16, 384), (3, 16, 384), (3, 16, 384)]
    first = embeddings[0]
    assert (first[:, -1].abs().sum(-1) == 0).all()  # padding positions are zero
    assert (first[:, 0].abs().sum(-1) > 0).all()
    # Real sentence embeddings: different sentences, different states.
    assert not torch.allclose(first[0], first[1])
