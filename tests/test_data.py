"""Data pipeline: layouts -> DatasetDict, auto descriptions, robust loading, round trips (CPU, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from modeling_stpnet.data import (
    DataError,
    MaskDescriber,
    class_balance,
    connected_components,
    convert_layout,
    dataset_features,
    describe_mask,
    detect_layout,
    discover,
    load_image,
    load_mask,
    load_stpnet_dataset,
    mask_statistics,
    parse_lung_description,
    save_stpnet_dataset,
    validate_stpnet_dataset,
)
from modeling_stpnet.data.descriptions import _label_union_find
from modeling_stpnet.text_repository import ScaleAwareTextRepository

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "configuration" / "text"
SAMPLE = ROOT / "sample" / "kvasir-seg-mini"
SHARED = Path(os.environ.get("STPNET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
KVASIR = ScaleAwareTextRepository.from_json_file(TEXT / "kvasir-seg.json")
LUNG = ScaleAwareTextRepository.from_json_file(TEXT / "qata-cov19.json")


# ---------------------------------------------------------------------------- helpers
def blob_mask(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Boolean mask with filled rectangles (y0, x0, y1, x1)."""
    mask = np.zeros((height, width), dtype=bool)
    for y0, x0, y1, x1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def write_pair(images: Path, masks: Path, stem: str, boxes, size=(48, 40), mask_ext=".jpg", mask_prefix="") -> None:
    width, height = size
    rng = np.random.default_rng(sum(stem.encode()))  # str hash() is salted per process
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(images / f"{stem}.jpg")
    mask = Image.fromarray(np.where(blob_mask(height, width, boxes), 255, 0).astype(np.uint8))
    mask.save(masks / f"{mask_prefix}{stem}{mask_ext}")


def make_kvasir(root: Path, n_train: int = 10, n_test: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    train = [f"tr{i:02d}" for i in range(n_train)]
    test = [f"te{i:02d}" for i in range(n_test)]
    for stem in train + test:
        write_pair(root / "images", root / "masks", stem, [(8, 10, 24, 30)])
    (root / "split_official_train.txt").write_text("\n".join(train) + "\n")
    (root / "split_official_val.txt").write_text("\n".join(test) + "\n")
    return root


QATA_ROWS = [  # pulmonary_infection, infected_area, zones, expected (laterality, count, left, right)
    (1, 1, "0 0 0 0 0 1", (0, 0, "no lesion in left lung", "lower right lung")),
    (2, 2, "1 0 0 0 0 1", (1, 1, "upper left lung", "lower right lung")),
    (1, 2, "1 0 1 0 0 0", (0, 1, "upper lower left lung", "no lesion in right lung")),
    (2, 6, "1 1 1 1 1 1", (1, 1, "upper middle lower left lung", "upper middle lower right lung")),
]


def make_qata(root: Path, splits=("train", "valid", "test"), rows=QATA_ROWS) -> Path:
    for split in splits:
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        records = []
        for i, (lat, area, zones, _) in enumerate(rows):
            name = f"{split}_{i}.png"
            Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8)).save(root / split / "images" / name)
            Image.fromarray(np.where(blob_mask(32, 32, [(4, 4, 12, 12)]), 255, 0).astype(np.uint8)).save(
                root / split / "masks" / f"mask_{name}"
            )
            records.append(
                {
                    "image": name,
                    "mask": f"mask_{name}",
                    "caption_sgseg": "x",
                    "pulmonary_infection": lat,
                    "infected_area": area,
                    "pseudo_label_6zones": zones,
                }
            )
        pd.DataFrame(records).to_csv(root / f"{split}_text.csv", index=False)
    return root


LVIT_TEXT = [
    "Bilateral pulmonary infection, two infected areas, middle left lung and upper right lung.",
    "Unilateral pulmonary infection, one infected area, all left lung.",
    "Bilateral pulmonary infection, three infected areas,upper midlle left lung and lower right lung.",
]


def make_lvit(root: Path, texts=LVIT_TEXT, mask_named_text: bool = False) -> Path:
    for prefix in ("Train", "Val", "Test"):
        folder = root / f"{prefix}_Folder"
        (folder / "img").mkdir(parents=True)
        (folder / "labelcol").mkdir()
        rows = []
        for i, text in enumerate(texts):
            name = f"{prefix.lower()}{i}.png"
            Image.fromarray(np.full((24, 24), 30 * i, dtype=np.uint8)).save(folder / "img" / name)
            Image.fromarray(np.where(blob_mask(24, 24, [(2, 2, 9, 9)]), 255, 0).astype(np.uint8)).save(
                folder / "labelcol" / name
            )
            rows.append({"Image": f"mask_{name}" if mask_named_text else name, "Description": text})
        pd.DataFrame(rows).to_excel(folder / f"{prefix}_text.xlsx", index=False)
    return root


def convert(source: Path, **kwargs):
    kwargs.setdefault("progress", False)
    return convert_layout(source, **kwargs)


# ---------------------------------------------------------------------------- converters
def test_kvasir_official_layout(tmp_path):
    dataset, report = convert(make_kvasir(tmp_path / "kv", n_train=10, n_test=3), val_fraction=0.2, seed=1)
    assert report.counts == {"train": 8, "validation": 2, "test": 3} and not report.skips
    assert set(dataset["validation"]["name"]).isdisjoint(dataset["train"]["name"])
    row = dataset["test"][0]
    assert row["image"].mode == "RGB" and row["mask"].mode == "L"
    assert set(np.unique(np.asarray(row["mask"]))) <= {0, 255}
    assert row["text"] == KVASIR.describe([row[c] for c in KVASIR.categories])
    again, _ = convert(tmp_path / "kv", val_fraction=0.2, seed=1)
    assert again["validation"]["name"] == dataset["validation"]["name"]  # seeded carve is deterministic
    validate_stpnet_dataset(dataset, KVASIR)


def test_kvasir_explicit_split_lists_and_limit(tmp_path):
    root = make_kvasir(tmp_path / "kv", n_train=6, n_test=2)
    (root / "split_train.txt").write_text("tr00\ntr01\ntr02\n")
    (root / "split_val.txt").write_text("tr03\n")
    (root / "split_test.txt").write_text("te00.jpg\n")  # extensions in lists are tolerated
    dataset, report = convert(root)
    assert report.counts == {"train": 3, "validation": 1, "test": 1}
    limited, report = convert(root, limit=2)
    assert report.counts["train"] == 2


def test_bundled_sample_converts():
    assert detect_layout(SAMPLE) == "kvasir-seg"
    dataset, report = convert(SAMPLE)
    assert report.counts == {"train": 32, "validation": 8, "test": 8} and not report.skips
    assert min(dataset["train"][0]["image"].size) == 160
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file()) < 1.5e6
    assert "Jha" in (SAMPLE / "SOURCE.md").read_text()


def test_qata_layout_all_splits(tmp_path):
    dataset, report = convert(make_qata(tmp_path / "qata"))
    assert report.counts == {"train": 4, "validation": 4, "test": 4}
    for row, (*_, expected) in zip(dataset["test"], QATA_ROWS):
        got = (
            row["laterality"],
            row["count"],
            LUNG.sentences[2][row["left_location"]],
            LUNG.sentences[3][row["right_location"]],
        )
        assert got == expected
    assert dataset["train"][0]["image"].mode == "RGB"  # grayscale source, decoded as RGB


@pytest.mark.parametrize(
    ("lat", "area", "zones", "message"),
    [
        (2, 0, "0 0 0 0 0 0", "infected_area is 0"),
        (2, 1, "0 0 0 0 0 1", "disagrees with the zones"),
        (1, 3, "1 0 0 0 0 1", "positive zones"),
        (3, 1, "0 0 0 0 0 1", "pulmonary_infection must be"),
    ],
)
def test_qata_bad_rows_name_csv_line(tmp_path, lat, area, zones, message):
    root = make_qata(tmp_path / "q", splits=("train",), rows=[*QATA_ROWS[:2], (lat, area, zones, None)])
    with pytest.raises(DataError, match=message) as error:
        convert(root)
    assert "train_text.csv line 4" in str(error.value)
    dataset, report = convert(root, on_error="skip", val_fraction=0.0)
    assert len(report.skips) == 1 and report.counts == {"train": 2}


def test_lvit_layout_with_xlsx(tmp_path):
    dataset, report = convert(make_lvit(tmp_path / "lvit", mask_named_text=True))
    assert report.counts == {"train": 3, "validation": 3, "test": 3}
    first = dataset["train"][0]
    assert first["text"] == (
        "Bilateral pulmonary infection, multiple infected areas, middle left lung, upper right lung."
    )
    assert LUNG.sentences[2][dataset["train"][1]["left_location"]] == "upper middle lower left lung"


def test_lvit_unparseable_description(tmp_path):
    root = make_lvit(tmp_path / "lvit", texts=[*LVIT_TEXT, "Pulmonary infection somewhere."])
    with pytest.raises(DataError, match=r"Train_text.xlsx row 5 .*unilateral from bilateral"):
        convert(root)
    dataset, report = convert(root, on_error="skip")
    assert report.counts["train"] == 3 and len(report.skips) == 3  # one per split
    assert "skipped 3" in report.format()


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


# ---------------------------------------------------------------------------- automatic descriptions
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


def test_auto_description_empty_mask_is_reported(tmp_path):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "tr01.jpg")
    dataset, report = convert(root, val_fraction=0.0)
    assert report.counts["train"] == 3 and "empty mask" in report.skips[0].reason and "tr01" in report.skips[0].file


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


# ---------------------------------------------------------------------------- robust loading and bad input
def test_load_image_modes(tmp_path):
    sixteen = np.full((8, 8), 65535, dtype=np.uint16)
    sixteen[0, 0] = 257
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("P", (8, 8), 3).save(tmp_path / "p.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "l.jpg")
    image = load_image(tmp_path / "16.png")
    assert image.mode == "RGB" and np.asarray(image)[0, 0, 0] == 1 and np.asarray(image)[1, 1, 0] == 255
    assert np.asarray(load_image(tmp_path / "rgba.png"))[0, 0].tolist() == [10, 20, 30]
    assert load_image(tmp_path / "p.png").mode == "RGB"
    assert load_image(tmp_path / "l.jpg").mode == "RGB"


def test_load_mask_modes(tmp_path):
    truth = blob_mask(16, 16, [(4, 4, 12, 12)])
    Image.fromarray(truth.astype(np.uint8)).save(tmp_path / "01.png")  # 0/1 mask
    red = np.zeros((16, 16, 3), np.uint8)
    red[truth, 0] = 200
    Image.fromarray(red).save(tmp_path / "red.png")
    palette = Image.fromarray(truth.astype(np.uint8), mode="L").convert("P")
    palette.save(tmp_path / "p.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = np.where(truth, 255, 0)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    Image.fromarray((truth * 65535).astype(np.uint16)).save(tmp_path / "16.png")
    Image.fromarray(np.where(truth, 255, 0).astype(np.uint8)).save(tmp_path / "jpeg.jpg", quality=50)
    for name in ("01.png", "red.png", "p.png", "alpha.png", "16.png"):
        assert (load_mask(tmp_path / name) == truth).all(), name
    assert (load_mask(tmp_path / "jpeg.jpg") != truth).mean() < 0.05


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad\.jpg: unreadable image.*accepted"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(DataError, match=r"nope\.png: file not found"):
        load_mask(tmp_path / "nope.png")


def test_bad_pairs_in_a_layout(tmp_path):
    root = make_kvasir(tmp_path / "kv", n_train=5, n_test=2)
    (root / "masks" / "tr01.jpg").unlink()
    with pytest.raises(DataError, match=r"tr01\.jpg: no mask"):
        convert(root)
    Image.new("L", (10, 10)).save(root / "masks" / "tr01.jpg")  # wrong size
    with pytest.raises(DataError, match=r"tr01\.jpg: image is 48x40 but its mask .*tr01\.jpg is 10x10"):
        convert(root)
    (root / "masks" / "tr01.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"masks/tr01\.jpg: unreadable image"):
        convert(root)
    dataset, report = convert(root, on_error="skip", val_fraction=0.0)
    assert report.counts["train"] == 4 and len(report.skips) == 1 and "train: " in report.format()
    (root / "split_official_val.txt").write_text("\n")
    with pytest.raises(DataError, match=r"split_official_val\.txt: split list is empty"):
        convert(root)


def test_unknown_layout_is_explained(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DataError, match="unknown layout.*kvasir-seg"):
        detect_layout(tmp_path)


# ---------------------------------------------------------------------------- storage round trips and validation
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = make_kvasir(tmp_path_factory.mktemp("kv") / "kv", n_train=6, n_test=2)
    return convert(root)[0]


def test_save_to_disk_and_parquet_round_trips(small_dataset, tmp_path):
    save_stpnet_dataset(small_dataset, tmp_path / "disk", tmp_path / "pq")
    for source in (tmp_path / "disk", tmp_path / "pq"):
        loaded = load_stpnet_dataset(source, TEXT / "kvasir-seg.json")
        assert {s: len(d) for s, d in loaded.items()} == {s: len(d) for s, d in small_dataset.items()}
        assert loaded["train"].features == dataset_features(KVASIR)
        assert loaded["train"][0]["text"] == small_dataset["train"][0]["text"]
        assert (np.asarray(loaded["test"][1]["mask"]) == np.asarray(small_dataset["test"][1]["mask"])).all()
    files = {s: str(tmp_path / "pq" / f"{s}.parquet") for s in small_dataset}
    direct = datasets.load_dataset("parquet", data_files=files)
    validate_stpnet_dataset(direct, KVASIR)
    assert isinstance(direct["train"].features["count"], datasets.ClassLabel)
    assert direct["train"][0]["image"].mode == "RGB"


def test_load_raw_layout_and_hub_style_parquet(small_dataset, tmp_path):
    raw = load_stpnet_dataset(SAMPLE, TEXT / "kvasir-seg.json", progress=False)
    assert len(raw["train"]) == 32
    (tmp_path / "hub" / "data").mkdir(parents=True)
    small_dataset["train"].to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    assert len(load_stpnet_dataset(tmp_path / "hub")["train"]) == len(small_dataset["train"])
    with pytest.raises(DataError, match="no such folder"):
        load_stpnet_dataset(tmp_path / "missing" / "dataset")


def test_validation_errors(small_dataset):
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['size'\].*present.*expected"):
        validate_stpnet_dataset(small_dataset.remove_columns("size"), KVASIR)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['laterality'"):
        validate_stpnet_dataset(small_dataset, LUNG)
    renamed = small_dataset["train"].cast_column("count", datasets.ClassLabel(names=["one", "many"]))
    with pytest.raises(ValueError, match="ClassLabel names of 'count' differ"):
        validate_stpnet_dataset(renamed, KVASIR)
    assert set(class_balance(small_dataset)["train"]) == set(KVASIR.categories)


def test_prepare_dataset_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "hub_scripts"))
    import prepare_dataset

    root = make_kvasir(tmp_path / "kv", n_train=6, n_test=2)
    code = prepare_dataset.main(
        [
            "--source",
            str(root),
            "--output",
            str(tmp_path / "out"),
            "--parquet",
            str(tmp_path / "pq"),
            "--image-size",
            "24",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "validation: 1 pairs" in out and "train / size:" in out
    assert max(load_stpnet_dataset(tmp_path / "out")["train"][0]["image"].size) == 24
    (root / "masks" / "tr02.jpg").unlink()
    assert prepare_dataset.main(["--source", str(root), "--no-progress"]) == 1
    assert "tr02.jpg: no mask" in capsys.readouterr().err
    assert prepare_dataset.main(["--source", str(root), "--no-progress", "--skip-bad"]) == 0
    assert "skipped 1" in capsys.readouterr().out


def test_prepare_dataset_push_to_hub(tmp_path, capsys, monkeypatch):
    """The upload path with DatasetDict.push_to_hub replaced (no network here), and its failure message."""
    monkeypatch.syspath_prepend(str(ROOT / "hub_scripts"))
    import prepare_dataset

    pushed = []

    def fake_push(self, repo_id, private=False):
        if repo_id == "me/offline":
            raise OSError("Connection refused")
        pushed.append((repo_id, private, sorted(self), self["train"].column_names))

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    root = make_kvasir(tmp_path / "kv", n_train=6, n_test=2)
    args = ["--source", str(root), "--image-size", "24", "--no-progress"]
    assert prepare_dataset.main([*args, "--push-to-hub", "me/kvasir", "--private"]) == 0
    assert "pushed: https://huggingface.co/datasets/me/kvasir" in capsys.readouterr().out
    [(repo_id, private, splits, columns)] = pushed
    assert (repo_id, private, splits) == ("me/kvasir", True, ["test", "train", "validation"])
    assert {"image", "mask", "text", "count", "size"} <= set(columns)
    assert prepare_dataset.main([*args, "--output", str(tmp_path / "out"), "--push-to-hub", "me/offline"]) == 1
    err = capsys.readouterr().err
    assert "upload to https://huggingface.co/datasets/me/offline failed: Connection refused" in err
    assert "local copies above are complete" in err and (tmp_path / "out" / "dataset_dict.json").is_file()


# ---------------------------------------------------------------------------- real data (skipped on user machines)
needs_qata = pytest.mark.skipif(
    not (SHARED / "qata-cov19" / "valid_text.csv").is_file(),
    reason=f"QaTa-COV19 not found under {SHARED} (set STPNET_SHARED_DATA)",
)
needs_kvasir = pytest.mark.skipif(
    not (SHARED / "kvasir-seg" / "split_official_train.txt").is_file(),
    reason=f"Kvasir-SEG not found under {SHARED} (set STPNET_SHARED_DATA)",
)


@needs_qata
@pytest.mark.realdata
def test_real_qata_valid_agrees_with_captions():
    raw = discover(SHARED / "qata-cov19")
    raw.splits = {"validation": raw.splits["validation"]}
    from modeling_stpnet.data import convert_raw

    dataset, report = convert_raw(raw, LUNG, progress=False)
    valid = dataset["validation"]
    assert len(valid) == 1429 and not report.skips
    captions = pd.read_csv(SHARED / "qata-cov19" / "valid_text.csv").set_index("image")["caption_sgseg"]
    columns = valid.select_columns(["name", *LUNG.categories])[:]
    for i, name in enumerate(columns["name"]):
        parsed = parse_lung_description(captions[f"{name}.png"], where=name)
        assert [LUNG.sentences[k][columns[c][i]] for k, c in enumerate(LUNG.categories)] == [
            parsed[c] for c in LUNG.categories
        ], name


@needs_kvasir
@pytest.mark.realdata
def test_real_kvasir_official_split():
    raw = discover(SHARED / "kvasir-seg")
    assert {s: len(r) for s, r in raw.splits.items()} == {"train": 880, "test": 120}
    dataset, report = convert(SHARED / "kvasir-seg", limit=3, image_size=64)
    assert report.counts == {"train": 3, "validation": 3, "test": 3}
    assert max(dataset["train"][0]["image"].size) == 64
