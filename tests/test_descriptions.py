"""Scale-aware descriptions: parsing the LViT/QaTa lung sentences and describing masks automatically."""

from __future__ import annotations

import numpy as np
import pytest
from layouts import KVASIR, LUNG, blob_mask

from stpnet.data import (
    DataError,
    MaskDescriber,
    connected_components,
    describe_mask,
    mask_statistics,
    parse_lung_description,
)
from stpnet.data.descriptions import _label_union_find


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Bilateral pulmonary infection, two infected areas, all left lung and all right lung.",
            (
                "Bilateral pulmonary infection",
                "multiple infected areas",
                "upper middle lower left lung",
                "upper middle lower right lung",
            ),
        ),
        (
            "Unilateral pulmonary infection, one infected area, middle lower right lung.",
            (
                "Unilateral pulmonary infection",
                "one infected area",
                "no lesion in left lung",
                "middle lower right lung",
            ),
        ),
        (
            "Bilateral pulmonary infection, two infected areas, middle upper left lung and lower right lung.",
            ("Bilateral pulmonary infection", "multiple infected areas", "upper middle left lung", "lower right lung"),
        ),
        (
            "bilateral pulmonary infection, six infected areas, upper middle lower left lung and upper lower right lung"
            ".",
            (
                "Bilateral pulmonary infection",
                "multiple infected areas",
                "upper middle lower left lung",
                "upper lower right lung",
            ),
        ),
    ],
)
def test_parse_lung_description(text, expected):
    got = parse_lung_description(text)
    assert tuple(got[c] for c in LUNG.categories) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "Unilateral pulmonary infection, one infected area, upper left lung and lower right lung.",
            "names lesions in 2",
        ),
        ("Bilateral pulmonary infection, two infected areas, left lung.", "no zone given"),
        ("Bilateral pulmonary infection, lower left lung and lower right lung.", "infected area"),
        ("Bilateral pulmonary infection, two infected areas, lower left lung and posterior right lung.", "posterior"),
    ],
)
def test_parse_lung_description_errors(text, message):
    with pytest.raises(DataError, match=message):
        parse_lung_description(text, where="f.xlsx row 9")


def _sentences(indices):
    return [KVASIR.sentences[k][i] for k, i in enumerate(indices)]


def test_auto_descriptions_known_answers():
    settings = {"min_component_fraction": 0.001, "size_thresholds": [0.05, 0.15], "position_bounds": [0.4, 0.6]}
    describer = MaskDescriber(KVASIR, settings)
    # one 40x40 blob (16% of 100x100) in the centre
    assert _sentences(describer.describe(blob_mask(100, 100, [(30, 30, 70, 70)]))) == [
        "one polyp",
        "large polyp",
        "in the horizontal centre of the image",
        "in the vertical middle of the image",
    ]
    # one small blob (1%) top-left, plus a 2-pixel speck below min_component_fraction (10 px) that is ignored
    mask = blob_mask(100, 100, [(5, 5, 15, 15), (90, 90, 91, 92)])
    assert _sentences(describer.describe(mask)) == [
        "one polyp",
        "small polyp",
        "in the left part of the image",
        "in the upper part of the image",
    ]
    # two medium blobs (2 x 5% = 10%), bottom right
    mask = blob_mask(100, 100, [(70, 62, 95, 82), (70, 85, 95, 100)])
    assert _sentences(describer.describe(mask)) == [
        "multiple polyps",
        "medium-sized polyp",
        "in the right part of the image",
        "in the lower part of the image",
    ]
    # empty, or only noise -> None (the converters skip and report it)
    assert describer.describe(np.zeros((50, 50), bool)) is None
    assert describer.describe(blob_mask(100, 100, [(0, 0, 1, 1)])) is None


def test_connected_components_fallback_matches_scipy():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) > 0.6
    labels, count = connected_components(mask)
    labels2, count2 = _label_union_find(mask)
    assert count == count2
    # same partition up to label numbering
    assert len({(a, b) for a, b in zip(labels.ravel(), labels2.ravel())}) == count + 1
    assert connected_components(blob_mask(10, 10, [(0, 0, 3, 3), (3, 3, 5, 5)]))[1] == 1  # 8-connected diagonal


def test_describer_rejects_unsupported_definitions():
    with pytest.raises(ValueError, match="no 'auto_description'"):
        MaskDescriber(LUNG)
    assert describe_mask(blob_mask(20, 20, [(5, 5, 15, 15)]), KVASIR)[0] == 0
    stats = mask_statistics(blob_mask(10, 10, [(0, 0, 10, 10)]))
    assert stats.centre_x == pytest.approx(0.5) and stats.area_fraction == 1.0
