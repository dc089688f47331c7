"""Bad input to dataset preparation and loading: clear errors naming file, row and value, and no data lost (CPU)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from layouts import KVASIR, LVIT_TEXT, QATA_ROWS, ROOT, make_kvasir, make_lvit, make_qata
from PIL import Image

from modeling_stpnet.image_processing_stpnet import STPNetImageProcessor
from stpnet.data import (
    DataError,
    check_options,
    convert_layout,
    load_stpnet_dataset,
    save_stpnet_dataset,
)
from stpnet.training.data import SegmentationDataset, carve_validation_split

PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256))


@pytest.fixture
def prepare(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "hub_scripts"))
    import prepare_dataset

    return prepare_dataset.main


def convert(source: Path, **kwargs):
    kwargs.setdefault("progress", False)
    return convert_layout(source, **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


# ---------------------------------------------------------------------------- output folders
def test_output_into_an_unrelated_folder_is_refused(tmp_path, prepare, capsys):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--source", str(root), "--output", str(out), "--no-progress"]
    assert prepare(args) == 2
    err = capsys.readouterr().err
    assert f"{out}: folder is not empty (1 entries: notes.txt)" in err and "--overwrite" in err
    assert prepare([*args, "--overwrite"]) == 2  # not a dataset this tool wrote: never replaced
    err = capsys.readouterr().err
    assert "not replaced, since it does not hold only a save_to_disk dataset (no readable dataset_dict.json)" in err
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_overwrite_replaces_an_earlier_dataset_without_stale_splits(tmp_path, prepare, capsys):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    out, pq = tmp_path / "data" / "out", tmp_path / "data" / "pq"
    args = ["--source", str(root), "--output", str(out), "--parquet", str(pq), "--no-progress"]
    assert prepare(args) == 0
    assert sorted(load_stpnet_dataset(out)) == ["test", "train", "validation"]
    before = snapshot(out), snapshot(pq)
    again = [*args, "--val-fraction", "0"]  # no validation split this time
    assert prepare(again) == 2
    assert "folder is not empty" in capsys.readouterr().err and (snapshot(out), snapshot(pq)) == before
    assert prepare([*again, "--overwrite"]) == 0
    assert sorted(load_stpnet_dataset(out)) == ["test", "train"]
    assert not (out / "validation").exists() and sorted(os.listdir(pq)) == ["test.parquet", "train.parquet"]
    assert sorted(load_stpnet_dataset(pq)) == ["test", "train"]
    assert leftovers(out.parent) == []


def test_overwrite_keeps_a_dataset_folder_holding_other_files(tmp_path, prepare, capsys):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    out, pq = tmp_path / "out", tmp_path / "pq"
    assert prepare(["--source", str(root), "--output", str(out), "--parquet", str(pq), "--no-progress"]) == 0
    (out / "train" / "my-notes.md").write_text("keep")
    (pq / "README.md").write_text("keep")
    before = snapshot(out), snapshot(pq)
    for option, folder, entry in (("--output", out, "train/my-notes.md"), ("--parquet", pq, "README.md")):
        assert prepare(["--source", str(root), option, str(folder), "--overwrite", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{folder}: not replaced" in err and entry in err
    assert (snapshot(out), snapshot(pq)) == before


def test_failed_save_leaves_the_earlier_dataset(tmp_path, prepare, capsys, monkeypatch):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    pq = tmp_path / "pq"
    assert prepare(["--source", str(root), "--parquet", str(pq), "--no-progress"]) == 0
    before = snapshot(pq)
    written = []

    def failing_to_parquet(self, path, *args, **kwargs):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        Path(path).write_bytes(b"partial")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", failing_to_parquet)
    args = ["--source", str(root), "--parquet", str(pq), "--overwrite", "--no-progress", "--val-fraction", "0.5"]
    assert prepare(args) == 1
    err = capsys.readouterr().err
    assert f"saving --parquet {pq} failed" in err and "No space left" in err and "as it was before" in err
    assert snapshot(pq) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("same", [True, False])
def test_output_and_parquet_must_be_separate_folders(tmp_path, prepare, capsys, same):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    parquet = tmp_path / "x" if same else tmp_path / "x" / "pq"
    assert prepare(["--source", str(root), "--output", str(tmp_path / "x"), "--parquet", str(parquet)]) == 2
    assert "overlap" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_output_that_is_a_file(tmp_path, prepare, capsys):
    (tmp_path / "out").write_text("a file")
    assert prepare(["--source", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'out'}: cannot be created as a folder" in capsys.readouterr().err


def test_save_stpnet_dataset_library_refuses_too(tmp_path):
    dataset = convert(make_kvasir(tmp_path / "kv", n_train=4, n_test=2))[0]
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "train.parquet").write_bytes(b"earlier")
    with pytest.raises(DataError, match="folder is not empty"):
        save_stpnet_dataset(dataset, parquet=tmp_path / "pq")
    assert (tmp_path / "pq" / "train.parquet").read_bytes() == b"earlier"
    save_stpnet_dataset(dataset, parquet=tmp_path / "pq", overwrite=True)
    assert len(load_stpnet_dataset(tmp_path / "pq")["train"]) == len(dataset["train"])


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--image-size", "-5", "expected a positive integer, got -5"),
        ("--image-size", "0", "expected a positive integer, got 0"),
        ("--limit", "-1", "expected a positive integer, got -1"),
        ("--limit", "0", "expected a positive integer, got 0"),
        ("--limit", "ten", "expected a positive integer, got 'ten'"),
        ("--val-fraction", "1.0", "expected a number in [0, 1)"),
        ("--val-fraction", "-0.1", "expected a number in [0, 1)"),
        ("--val-fraction", "nan", "expected a number in [0, 1)"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, prepare, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        prepare(["--source", str(tmp_path), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}" in err


def test_conversion_options_are_checked_in_the_library(tmp_path):
    for kwargs, message in (
        ({"limit": 0}, "limit must be a positive integer"),
        ({"limit": -1}, "limit must be a positive integer"),
        ({"image_size": -5}, "image_size must be a positive integer"),
        ({"val_fraction": 1.0}, r"val_fraction must be a number in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=message):
            check_options(**kwargs)
        with pytest.raises(ValueError, match=message):
            convert(tmp_path / "never-listed", **kwargs)
    check_options(0.0, np.int64(5), 3)


def test_value_error_from_conversion_exits_2(tmp_path, prepare, capsys, monkeypatch):
    import prepare_dataset

    def fails(*args, **kwargs):
        raise ValueError("Text definition: category 'size' has 2 sentences but 3 size thresholds")

    monkeypatch.setattr(prepare_dataset, "convert_raw", fails)
    assert prepare(["--source", str(make_kvasir(tmp_path / "kv", n_train=4, n_test=2)), "--no-progress"]) == 2
    assert "error: Text definition: category 'size'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- text files
def test_qata_binary_and_empty_csv(tmp_path):
    root = make_qata(tmp_path / "q", splits=("train",))
    (root / "train_text.csv").write_bytes(PNG_BYTES)
    with pytest.raises(DataError, match=r"train_text\.csv: not a UTF-8 text file .*expected a UTF-8 CSV file whose"):
        convert(root)
    (root / "train_text.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"train_text\.csv: the file is empty; expected .*'pulmonary_infection'"):
        convert(root)


def test_binary_split_list(tmp_path):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    (root / "split_official_train.txt").write_bytes(PNG_BYTES)
    with pytest.raises(DataError, match=r"split_official_train\.txt: not a UTF-8 text file .*one image name per line"):
        convert(root)
    (root / "split_official_train.txt").write_bytes(b"tr00\x00tr01\n")
    with pytest.raises(DataError, match=r"split_official_train\.txt: not a text file \(it contains NUL bytes\)"):
        convert(root)
    (root / "split_train.txt").write_bytes(PNG_BYTES)  # the explicit lists come first
    with pytest.raises(DataError, match=r"split_train\.txt: not a UTF-8 text file \(byte 0 is 0x89\)"):
        convert(root)


def qata_with(root: Path, column: str, value) -> Path:
    make_qata(root, splits=("train",))
    table = pd.read_csv(root / "train_text.csv", dtype=str)
    table.loc[1, column] = value  # the second data row: csv line 3
    table.to_csv(root / "train_text.csv", index=False)
    return root


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (
            "pulmonary_infection",
            "bilateral",
            "column 'pulmonary_infection' must be 1 (unilateral) or 2 (bilateral), got 'bilateral'",
        ),
        (
            "pulmonary_infection",
            None,
            "column 'pulmonary_infection' must be 1 (unilateral) or 2 (bilateral), got empty",
        ),
        ("infected_area", "two", "column 'infected_area' must be the number of infected zones, 1 to 6, got 'two'"),
        ("infected_area", "1.5", "column 'infected_area' must be the number of infected zones, 1 to 6, got 1.5"),
        ("pseudo_label_6zones", None, "column 'pseudo_label_6zones' must be six 0/1 flags separated by spaces"),
        ("pseudo_label_6zones", "1 0 2 0 0 1", "got '1 0 2 0 0 1'"),
        ("image", None, "column 'image' is empty; expected a file name in"),
    ],
)
def test_qata_bad_cells_name_line_column_value(tmp_path, column, value, message):
    root = qata_with(tmp_path / "q", column, value)
    with pytest.raises(DataError) as error:
        convert(root)
    assert "train_text.csv line 3" in str(error.value) and message in str(error.value)
    dataset, report = convert(root, on_error="skip", val_fraction=0.0)
    assert report.counts == {"train": len(QATA_ROWS) - 1} and any(message in s.reason for s in report.skips)


def test_qata_cells_read_as_text_or_float_still_convert(tmp_path):
    make_qata(tmp_path / "q", splits=("train",))
    table = pd.read_csv(tmp_path / "q" / "train_text.csv")
    table["infected_area"] = table["infected_area"].astype(float)  # what a column with a gap is read as
    table.to_csv(tmp_path / "q" / "train_text.csv", index=False)
    assert convert(tmp_path / "q", val_fraction=0.0)[1].counts == {"train": len(QATA_ROWS)}


def test_qata_two_rows_for_one_image(tmp_path):
    root = make_qata(tmp_path / "q", splits=("train",))
    table = pd.read_csv(root / "train_text.csv")
    pd.concat([table, table.iloc[[1]]]).to_csv(root / "train_text.csv", index=False)
    with pytest.raises(
        DataError, match=r"train_1\.png: 2 rows of .*train_text\.csv describe this image \(lines 3, 6\)"
    ):
        convert(root)
    dataset, report = convert(root, on_error="skip", val_fraction=0.0)
    assert report.counts == {"train": len(QATA_ROWS) - 1} and "train_1" not in dataset["train"]["name"]


def test_lvit_two_rows_for_one_image(tmp_path):
    root = make_lvit(tmp_path / "lvit")
    text = root / "Train_Folder" / "Train_text.xlsx"
    table = pd.read_excel(text)
    extra = pd.DataFrame([{"Image": "train1.png", "Description": LVIT_TEXT[0]}])
    pd.concat([table, extra]).to_excel(text, index=False)
    with pytest.raises(DataError) as error:
        convert(root)
    message = str(error.value)
    assert "train1.png: 2 rows describe this image" in message
    assert (
        "Train_text.xlsx row 3 (Image=train1.png)" in message and "Train_text.xlsx row 5 (Image=train1.png)" in message
    )
    dataset, report = convert(root, on_error="skip")
    assert report.counts["train"] == len(LVIT_TEXT) - 1 and "rows describe this image" in report.skips[0].reason


def test_kvasir_two_images_with_one_stem(tmp_path):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    for name in ("split_official_train.txt", "split_official_val.txt"):
        (root / name).unlink()  # every pair goes to train: the listing itself meets both files
    Image.open(root / "images" / "tr01.jpg").save(root / "images" / "tr01.png")
    with pytest.raises(DataError, match=r"images/tr01\.jpg: 2 image files pair as 'tr01' \(tr01\.jpg, tr01\.png\)"):
        convert(root)
    dataset, report = convert(root, on_error="skip", val_fraction=0.0)
    assert report.counts == {"train": 5} and "tr01" not in dataset["train"]["name"]
    (root / "images" / "tr01.png").unlink()
    Image.open(root / "masks" / "tr02.jpg").save(root / "masks" / "tr02.png")
    with pytest.raises(DataError, match=r"2 mask files pair as 'tr02' \(tr02\.jpg, tr02\.png\)"):
        convert(root)


def test_kvasir_stem_listed_twice_names_both_lines(tmp_path):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    (root / "split_official_val.txt").write_text("te00\ntr02.jpg\n")
    with pytest.raises(
        DataError,
        match=r"split_official_val\.txt line 2: 'tr02' is listed again \(first at .*"
        r"split_official_train\.txt line 3, split 'train'\)",
    ):
        convert(root)


# ---------------------------------------------------------------------------- loading prepared datasets
def png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def tiny_split(n: int, mask_sizes: dict[int, tuple[int, int]] | None = None, columns=("image", "mask", "name")):
    mask_sizes = mask_sizes or {}
    rows = {
        "image": [png(np.full((40, 48, 3), i, np.uint8)) for i in range(n)],
        "mask": [png(np.zeros(mask_sizes.get(i, (40, 48)), np.uint8)) for i in range(n)],
        "name": [f"p{i}" for i in range(n)],
    }
    features = {"image": datasets.Image(), "mask": datasets.Image(), "name": datasets.Value("string")}
    return datasets.Dataset.from_dict(
        {c: rows[c] for c in columns}, features=datasets.Features({c: features[c] for c in columns})
    )


def test_empty_split_is_named(tmp_path):
    dataset = datasets.DatasetDict({"train": tiny_split(3), "validation": tiny_split(0)})
    dataset.save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(DataError, match=f"split 'validation' of {tmp_path / 'disk'} has no rows"):
        load_stpnet_dataset(tmp_path / "disk")
    (tmp_path / "pq").mkdir()
    for split, part in dataset.items():
        part.to_parquet(str(tmp_path / "pq" / f"{split}.parquet"))
    with pytest.raises(DataError, match=f"split 'validation' of {tmp_path / 'pq'} has no rows"):
        load_stpnet_dataset(tmp_path / "pq")


def test_missing_mask_column_names_dataset_split_and_columns(tmp_path):
    datasets.DatasetDict({"test": tiny_split(2, columns=("image", "name"))}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError) as error:
        load_stpnet_dataset(tmp_path / "d")
    assert str(error.value).startswith(
        f"split 'test' of {tmp_path / 'd'} lacks column(s) ['mask']: present ['image', 'name'], required ['image', "
        "'mask']"
    )


def test_mask_of_another_size_names_the_row(tmp_path):
    datasets.DatasetDict({"test": tiny_split(5, {3: (48, 48)})}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError) as error:
        load_stpnet_dataset(tmp_path / "d")
    assert str(error.value) == (
        f"row 3 (name 'p3') of split 'test' of {tmp_path / 'd'}: the mask is 48x48 but its image is 48x40 "
        "(width x height); a mask must have its image's size"
    )


def test_training_dataset_names_the_stored_row(tmp_path):
    split = tiny_split(6, {4: (10, 10)}).add_column("count", [0] * 6)
    split = datasets.Dataset.from_dict(split.to_dict(), features=split.features, split="train")
    train, validation = carve_validation_split(split, 0.5, seed=0)
    carved = train if "p4" in train["name"] else validation
    position = carved["name"].index("p4")
    data = SegmentationDataset(carved, STPNetImageProcessor(size={"height": 32, "width": 32}), ["count"])
    with pytest.raises(
        DataError, match=r"row 4 \(name 'p4'\) of split 'train': the mask is 10x10 but its image is 48x40"
    ):
        data[position]
    with pytest.raises(DataError, match=r"split 'train' lacks column\(s\) \['size'\]: present .*required"):
        SegmentationDataset(split, STPNetImageProcessor(), ["size"])
    with pytest.raises(DataError, match="split 'train' has no rows"):
        SegmentationDataset(split.select([]), STPNetImageProcessor(), ["count"])


def test_prepared_dataset_still_loads_and_validates(tmp_path, prepare):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    assert prepare(["--source", str(root), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    loaded = load_stpnet_dataset(tmp_path / "out", KVASIR)
    assert {s: len(p) for s, p in loaded.items()} == {"train": 3, "validation": 1, "test": 2}


def test_train_script_names_an_empty_validation_split(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "hub_scripts"))
    import train

    dataset = convert(make_kvasir(tmp_path / "kv", n_train=4, n_test=2))[0]
    dataset["validation"] = dataset["validation"].select([])
    dataset.save_to_disk(str(tmp_path / "d"))
    config = str(ROOT / "configuration" / "train" / "sample-tiny.yaml")
    args = ["--config", config, "--dataset", str(tmp_path / "d"), "--output-dir", str(tmp_path / "run")]
    assert train.main(args) == 2
    assert f"error: split 'validation' of {tmp_path / 'd'} has no rows" in capsys.readouterr().err


def test_exif_rotated_image_keeps_matching_its_mask(tmp_path):
    root = make_kvasir(tmp_path / "kv", n_train=4, n_test=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° to display": datasets decodes such a file turned, as 40x48
    Image.open(root / "images" / "tr01.jpg").save(root / "images" / "tr01.jpg", exif=exif, quality=95)
    save_stpnet_dataset(convert(root, val_fraction=0.0)[0], tmp_path / "out")
    train = load_stpnet_dataset(tmp_path / "out")["train"]
    row = train[train["name"].index("tr01")]
    assert row["image"].size == row["mask"].size == (48, 40)
    # a stored file with the tag: the load check compares the size datasets will decode
    image = {"bytes": (root / "images" / "tr01.jpg").read_bytes(), "path": None}
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    for mask_shape, fails in (((48, 40), False), ((40, 48), True)):
        split = datasets.Dataset.from_dict({"image": [image], "mask": [png(np.zeros(mask_shape, np.uint8))]}, features)
        folder = tmp_path / f"stored-{fails}"
        datasets.DatasetDict({"test": split}).save_to_disk(str(folder))
        if fails:
            with pytest.raises(DataError, match="row 0 of split 'test' .*: the mask is 48x40 but its image is 40x48"):
                load_stpnet_dataset(folder)
        else:
            assert load_stpnet_dataset(folder)["test"][0]["image"].size == (40, 48)
