"""Bad input to the command-line tools gets a clear error and loses no data: checkpoints whose weights do not fit
their config, invalid preprocessor configs, damaged weights, output folders and arguments of stpnet-predict,
hub_scripts/evaluate.py and hub_scripts/export_onnx.py."""

from __future__ import annotations

import json
import shutil
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image
from runs import hub_script

from stpnet.inference.cli import main
from stpnet.inference.predict import CheckpointError, load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_predict import SAMPLE_IMAGE, read_csv, tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


script = cache(hub_script)  # one module per script for the whole file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("cli-errors") / "checkpoint")


def edited_copy(checkpoint: Path, folder: Path, **changes: object) -> Path:
    """The checkpoint with ``changes`` written into its config.json (the weights stay as saved)."""
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------------------------------------- checkpoints
def test_saved_checkpoints_load_without_problems(checkpoint: Path, tmp_path: Path) -> None:
    model, processor, notes = load_checkpoint(checkpoint)
    assert notes == [] and processor.size == {"height": 128, "width": 128}
    # A trained model (weights and BatchNorm statistics moved), with the recipe training saves beside it.
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 64, 64), labels=(torch.rand(2, 64, 64) > 0.5).float()).loss.backward()
    optimizer.step()
    model.eval().save_pretrained(tmp_path / "trained")
    overrides = "{base_channels: 8, retrieval_backbone: shared}"
    (tmp_path / "trained" / "train_config.yaml").write_text(
        f"model:\n  preset: stpnet-tiny\n  overrides: {overrides}\n"
    )
    loaded, _, notes = load_checkpoint(tmp_path / "trained")
    assert notes == [f"the checkpoint has no preprocessor_config.json; using {model.config.image_size}x"
                     f"{model.config.image_size} and ImageNet statistics"]  # fmt: skip
    saved, restored = model.state_dict(), loaded.state_dict()
    assert set(saved) == set(restored) and any(k.startswith("text_embeddings_") for k in saved)
    assert all(torch.equal(saved[k], restored[k]) for k in saved)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"use_text": False}, "missing from the file"),
        ({"use_ssa": False}, "does not use: ssa.0."),
        ({"base_channels": 16}, "of another shape: "),
    ],
)
def test_weights_that_do_not_fit_the_config_are_refused(
    checkpoint: Path, tmp_path: Path, change: dict, expected: str
) -> None:
    folder = edited_copy(checkpoint, tmp_path / "edited", **change)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(folder)
    message = str(raised.value)
    assert str(folder) in message and expected in message and "Restore the `config.json`" in message


def test_config_change_without_a_weight_to_show_it_is_found_through_the_recipe(
    checkpoint: Path, tmp_path: Path
) -> None:
    folder = edited_copy(checkpoint, tmp_path / "heads", num_attention_heads=2)
    load_checkpoint(folder)  # no recipe: nothing to compare with (the weights have the same shapes)
    (folder / "train_config.yaml").write_text(
        "model:\n  preset: stpnet-tiny\n  overrides: {base_channels: 8, retrieval_backbone: shared}\n"
    )
    with pytest.raises(CheckpointError, match=r"`num_attention_heads` is 2 in config.json but 4 in the training"):
        load_checkpoint(folder)


def test_edited_sentences_are_found_by_the_embeddings_fingerprint(checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["text_embeddings_fingerprint"]  # set_text_embeddings records it
    swapped = [list(reversed(config["text_sentences"][0])), *config["text_sentences"][1:]]  # same counts
    folder = edited_copy(checkpoint, tmp_path / "sentences", text_sentences=swapped)
    with pytest.raises(CheckpointError, match="not the ones the stored text embeddings were encoded from"):
        load_checkpoint(folder)
    # a checkpoint saved before the fingerprint existed cannot be checked and still loads
    load_checkpoint(edited_copy(checkpoint, tmp_path / "old", text_embeddings_fingerprint=None))


def test_damaged_weights_are_named_without_the_missing_checkpoint_help(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "truncated"
    shutil.copytree(checkpoint, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code = main(["--model", str(folder), str(SAMPLE_IMAGE), "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and str(folder) in err and "truncated `model.safetensors`" in err
    assert "No STPNet checkpoint" not in err
    weights.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"size": {"height": 100, "width": 100}}, "positive multiples of 32"), ({"image_std": [0.2, 0.0, 0.2]}, "std")],
)
def test_an_invalid_preprocessor_config_is_an_error_not_replaced_by_defaults(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, expected: str
) -> None:
    folder = tmp_path / "processor"
    shutil.copytree(checkpoint, folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings.update(image_mean=[0.5, 0.5, 0.5], **change)  # custom statistics must not be swapped for ImageNet's
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=expected) as raised:
        load_checkpoint(folder)
    assert str(folder / "preprocessor_config.json") in str(raised.value)
    code = main(["--model", str(folder), str(SAMPLE_IMAGE), "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2 and "preprocessor_config.json` is invalid" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- stpnet-predict
def predict(checkpoint: Path, *args: str) -> int:
    return main(["--model", str(checkpoint), "--device", "cpu", *args])


def test_predict_output_dir_is_checked_and_earlier_results_are_kept(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine\n")
    for target in (a_file, a_file / "sub"):
        assert predict(checkpoint, str(SAMPLE_IMAGE), "--output-dir", str(target)) == 2
        assert "is a file; give a folder" in capsys.readouterr().err
    assert a_file.read_text() == "mine\n"

    # Inputs and outputs in one folder, as after `stpnet-predict data --output-dir data/predictions`.
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    shutil.copy(SAMPLE_IMAGE, data / "more" / "polyp.jpg")
    shutil.copy(SAMPLE_IMAGE, data / "more" / "gone.jpg")
    out = data / "predictions"
    assert predict(checkpoint, str(data), "--recursive", "--output-dir", str(out)) == 0
    assert "2 processed, 0 skipped" in capsys.readouterr().out
    (data / "more" / "gone.jpg").unlink()
    before = (out / "predictions.csv").read_text()

    assert predict(checkpoint, str(data), "--recursive", "--output-dir", str(out)) == 2
    err = capsys.readouterr().err
    assert "already holds results of an earlier run (predictions.csv, skipped.csv, masks/, overlays/)" in err
    assert "--overwrite" in err and (out / "predictions.csv").read_text() == before

    assert predict(checkpoint, str(data), "--recursive", "--output-dir", str(out), "--overwrite") == 0
    assert "1 processed, 0 skipped" in capsys.readouterr().out  # its own masks and overlays were not inputs
    assert [Path(r["file"]).name for r in read_csv(out / "predictions.csv")] == ["polyp.jpg"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["polyp.png"]  # no mask of an earlier run left

    # A PNG the earlier predictions.csv does not name is not the run's to delete, --overwrite or not.
    (out / "masks" / "old.png").write_bytes(b"mine")
    for extra in ([], ["--overwrite"]):
        assert predict(checkpoint, str(data), "--recursive", "--output-dir", str(out), *extra) == 2
        err = capsys.readouterr().err
        assert "no earlier stpnet-predict run there wrote (masks/old.png)" in err and "another --output-dir" in err
    assert (out / "masks" / "old.png").read_bytes() == b"mine" and (out / "masks" / "polyp.png").exists()

    # The output folder may even be the input folder: its images are read, the results of a run are not.
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(SAMPLE_IMAGE, same / "polyp.jpg")
    for extra in ([], ["--overwrite"]):
        assert predict(checkpoint, str(same), "--output-dir", str(same), *extra) == 0
        assert "1 processed, 0 skipped" in capsys.readouterr().out
    assert (same / "polyp.jpg").read_bytes() == SAMPLE_IMAGE.read_bytes()


def test_predict_never_deletes_ground_truth_masks_of_a_dataset_copy(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # `stpnet-predict kv_in --output-dir kv`, kv a copy of a dataset: its masks/ are ground truth, not our results.
    inputs, dataset = tmp_path / "kv_in", tmp_path / "kv"
    inputs.mkdir()
    shutil.copy(SAMPLE_IMAGE, inputs / "polyp.jpg")
    (dataset / "masks").mkdir(parents=True)
    truth = {f"case{i}.png": f"truth {i}".encode() for i in range(5)} | {"polyp.png": b"truth of polyp"}
    for name, data in truth.items():
        (dataset / "masks" / name).write_bytes(data)

    def masks_untouched() -> bool:
        return {p.name: p.read_bytes() for p in (dataset / "masks").iterdir()} == truth

    for extra in ([], ["--overwrite"]):
        assert predict(checkpoint, str(inputs), "--output-dir", str(dataset), *extra) == 2
        err = capsys.readouterr().err
        assert "masks/case0.png, masks/case1.png, masks/case2.png and 3 more" in err
        assert "no earlier stpnet-predict run" in err and "ground truth" in err and "another --output-dir" in err
        assert masks_untouched() and not (dataset / "predictions.csv").exists()

    # Not even beside an earlier run's predictions.csv that names masks of the same names elsewhere.
    earlier = tmp_path / "earlier"
    assert predict(checkpoint, str(inputs), "--output-dir", str(earlier)) == 0
    shutil.copy(earlier / "predictions.csv", dataset / "predictions.csv")
    assert predict(checkpoint, str(inputs), "--output-dir", str(dataset), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "masks/case0.png" in err and "masks/polyp.png" not in err  # the CSV names polyp.png: that one is ours
    assert (dataset / "predictions.csv").exists() and masks_untouched()

    # A predictions.csv of the user's (not our columns) is not ours to replace either.
    (earlier / "predictions.csv").write_text("patient,score\n1,0.5\n")
    assert predict(checkpoint, str(inputs), "--output-dir", str(earlier), "--overwrite") == 2
    # Without our predictions.csv nothing tells the earlier masks from the user's: all stay.
    assert "(predictions.csv, masks/polyp.png, overlays/polyp.png)" in capsys.readouterr().err
    assert (earlier / "masks" / "polyp.png").exists()
    assert (earlier / "predictions.csv").read_text() == "patient,score\n1,0.5\n"


def test_predict_empty_folder_and_bad_max_pixels(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    Image.open(SAMPLE_IMAGE).save(tmp_path / "empty" / "nested" / "polyp.png")
    assert predict(checkpoint, str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")) == 1
    captured = capsys.readouterr()
    assert f"no images found in {tmp_path / 'empty'} (accepted: PNG/JPEG" in captured.err
    assert "--recursive" in captured.err and "nothing to process" in captured.err  # said before the model loads
    assert not (tmp_path / "out").exists()

    with pytest.raises(SystemExit) as raised:
        predict(checkpoint, str(SAMPLE_IMAGE), "--max-pixels", "0")
    assert raised.value.code == 2 and "--max-pixels must be at least 16384" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def small_split() -> object:
    from datasets import DatasetDict

    from stpnet.data import load_stpnet_dataset

    test = load_stpnet_dataset(str(ROOT / "sample" / "kvasir-seg-mini"), progress=False)["test"].select(range(2))
    return DatasetDict(test=test.remove_columns("size"))


def test_evaluate_refuses_bad_arguments_checkpoints_and_output_dirs(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    evaluate = script("evaluate").main
    with pytest.raises(SystemExit) as raised:
        evaluate(["--model", str(checkpoint), "--output-dir", str(tmp_path / "e"), "--batch-size", "0"])
    assert raised.value.code == 2 and "--batch-size must be at least 1" in capsys.readouterr().err

    a_file = tmp_path / "file.json"
    a_file.write_text("{}")
    assert evaluate(["--model", str(checkpoint), "--output-dir", str(a_file)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"dice": 0.9}')
    assert evaluate(["--model", str(checkpoint), "--output-dir", str(earlier)]) == 2
    assert "already holds an evaluation (metrics.json)" in capsys.readouterr().err
    assert (earlier / "metrics.json").read_text() == '{"dice": 0.9}'

    wider = edited_copy(checkpoint, tmp_path / "wider", base_channels=16)
    assert evaluate(["--model", str(wider), "--output-dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    # transformers may draw its "Loading weights" bar first: the message is the first line that is not the bar.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line and not line.startswith("Loading weights")]
    assert lines[0].startswith("error: The weights of")
    assert "of another shape" in err and "Traceback" not in err
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    (truncated / "model.safetensors").write_bytes(b"\x00" * 100)
    assert evaluate(["--model", str(truncated), "--output-dir", str(tmp_path / "e")]) == 2
    assert "Could not load the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_evaluate_notes_a_missing_text_column_and_overwrites_on_request(
    checkpoint: Path,
    tmp_path: Path,
    small_split: object,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = script("evaluate")
    monkeypatch.setattr(module, "load_stpnet_dataset", lambda *args, **kwargs: small_split)
    out = tmp_path / "evaluation"
    (out / "overlays").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "overlays" / "worst_09_old-image_dice0.125.png").write_bytes(b"old")
    (out / "overlays" / "my_figure.png").write_bytes(b"the user's")
    args = ["--model", str(checkpoint), "--output-dir", str(out), "--no-progress", "--overlays", "1", "--device", "cpu"]
    assert module.main([*args, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "no label column 'size'" in err and "retrieval accuracy is left out" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and "no label column 'size'" in metrics["notes"][0]
    panels = sorted(p.name for p in (out / "overlays").iterdir())
    assert panels[0].startswith("best_01_") and panels[-1].startswith("worst_01_")  # the old panel is gone
    assert len(panels) == 3 and (out / "overlays" / "my_figure.png").read_bytes() == b"the user's"
    # The panels just written are what the next run recognises as an earlier evaluation's.
    assert module.output_dir_problem(out, False) == (
        f"--output-dir {out} already holds an evaluation (metrics.json, per_image.csv, overlays/); pass "
        "--overwrite to replace it, or choose another folder"
    )


def test_evaluate_takes_only_its_own_overlays_for_an_earlier_evaluation(tmp_path: Path) -> None:
    problem, panels = script("evaluate").output_dir_problem, script("evaluate").earlier_overlays
    figures = tmp_path / "evalout" / "overlays"
    figures.mkdir(parents=True)
    for name in ("my_figure.png", "best.png", "worst_1_x_dice0.5.png", "best_01_x_dice0.500.png.bak"):
        (figures / name).write_bytes(b"the user's")
    assert problem(tmp_path / "evalout", False) is None and panels(tmp_path / "evalout") == []
    ours = ["best_01_cju16jgnyzp970878melv7r25_dice0.913.png", "worst_02_case_7_dicenan.png"]
    for name in ours:
        (figures / name).write_bytes(b"panel")
    assert [p.name for p in panels(tmp_path / "evalout")] == ours
    assert "already holds an evaluation (overlays/)" in problem(tmp_path / "evalout", False)
    assert problem(tmp_path / "evalout", True) is None


# ---------------------------------------------------------------------------------------------- export_onnx.py
def test_export_refuses_an_existing_output_and_bad_checkpoints(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    export = script("export_onnx").main
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"someone's model")
    with pytest.raises(SystemExit) as raised:
        export(["--model", str(checkpoint), "--output", str(existing)])
    assert raised.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"someone's model"

    edited = edited_copy(checkpoint, tmp_path / "no-ssa", use_ssa=False)
    with pytest.raises(SystemExit) as raised:
        export(["--model", str(edited), "--output", str(tmp_path / "new.onnx")])
    assert raised.value.code == 2 and "do not fit its `config.json`" in capsys.readouterr().err
    assert not (tmp_path / "new.onnx").exists()


def test_export_never_writes_over_the_checkpoint(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    export = script("export_onnx").main
    folder = shutil.copytree(checkpoint, tmp_path / "exp")
    weights = (folder / "model.safetensors").read_bytes()
    (tmp_path / "linked-exp").symlink_to(folder)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.onnx").symlink_to(folder / "model.safetensors")
    for output in (
        folder / "model.safetensors",
        tmp_path / "linked-exp" / "config.json",
        tmp_path / "elsewhere" / "model.onnx",
        tmp_path / "elsewhere" / ".." / "exp" / "model.safetensors",
    ):
        for model in (folder, tmp_path / "linked-exp"):
            with pytest.raises(SystemExit) as raised:
                export(["--model", str(model), "--output", str(output), "--overwrite"])
            err = capsys.readouterr().err
            assert raised.value.code == 2 and "of the checkpoint folder --model" in err, err
            assert "even with --overwrite" in err
    assert (folder / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in checkpoint.iterdir())


def test_export_that_fails_its_check_leaves_no_file(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = script("export_onnx")

    def fake_export(model: object, output: Path, *args: object) -> str:  # the real one takes ~20 s
        Path(output).write_bytes(b"onnx that disagrees")
        return "dynamo"

    nan = float("nan")
    report = {"input_shape": [1, 3, 32, 32], "max_abs_logit_diff": nan, "max_abs_logit": nan, "mask_agreement": 0.02}
    monkeypatch.setattr(module, "export", fake_export)
    monkeypatch.setattr(module, "verify", lambda *args: dict(report, masks_equal=False))
    kept = tmp_path / "model.onnx"
    kept.write_bytes(b"the working export")
    for output, extra, left in (
        (kept, ["--overwrite"], f"; {kept} was left as it was."),
        (tmp_path / "new.onnx", [], "."),
    ):
        with pytest.raises(SystemExit) as raised:
            module.main(["--model", str(checkpoint), "--output", str(output), "--image-size", "32", *extra])
        message = str(raised.value.code)  # a message, so the exit status is 1
        assert "onnxruntime disagrees with PyTorch on [1, 3, 32, 32]: NaN logits" in message
        assert f"The export was discarded{left} Try another --image-size" in message
    assert kept.read_bytes() == b"the working export" and not (tmp_path / "new.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no partial file either
    assert module.agrees(dict(report, max_abs_logit_diff=0.0, max_abs_logit=nan), 1e-4) is False
