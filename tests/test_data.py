"""Data pipeline: layouts -> DatasetDict, robust loading, round trips (CPU, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from layouts import KVASIR, LUNG, LVIT_TEXT, QATA_ROWS, ROOT, TEXT, blob_mask, make_kvasir, make_lvit, make_qata
from PIL import Image

from stpnet.data import (
    DataError,
    class_balance,
    convert_layout,
    dataset_features,
    detect_layout,
    discover,
    load_image,
    load_mask,
    load_stpnet_dataset,
    parse_lung_description,
    save_stpnet_dataset,
    validate_stpnet_dataset,
)

SAMPLE = ROOT / "sample" / "kvasir-seg-mini"
SHARED = Path(os.environ.get("STPNET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


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
        (3, 1, "0 0 0 0 0 1", "column .pulmonary_infection. must be 1 .unilateral. or 2 .bilateral., got 3"),
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


def test_auto_description_empty_mask_is_reported(tmp_path):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "tr01.jpg")
    dataset, report = convert(root, val_fraction=0.0)
    assert report.counts["train"] == 3 and "empty mask" in report.skips[0].reason and "tr01" in report.skips[0].file


# ---------------------------------------------------------------------------- robust loading and bad input
def test_load_image_modes(tmp_path):
    sixteen = np.full((8, 8), 65535, dtype=np.uint16)
    sixteen[0, 0] = 257
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "rgba.png")  # fully transparent
    Image.new("P", (8, 8), 3).save(tmp_path / "p.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "l.jpg")
    image = load_image(tmp_path / "16.png")
    assert image.mode == "RGB" and np.asarray(image)[0, 0, 0] == 1 and np.asarray(image)[1, 1, 0] == 255
    # alpha is composited over black, as the image processor does (tests/test_mask_values.py checks they agree)
    assert np.asarray(load_image(tmp_path / "rgba.png"))[0, 0].tolist() == [0, 0, 0]
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
    from stpnet.data import convert_raw

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
