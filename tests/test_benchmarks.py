"""The benchmarks run end to end on tiny settings and write results in the agreed shape (no timing assertions)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import breakdown, common, device_checks, quality, quality_report, speed
from stpnet.training import load_repository

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED_SPEED_KEYS = {"model", "latency_ms", "ratio_to_unet", "params", "gmacs", "unet_reference", "peak_memory_mb"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_model_names_and_unet_references() -> None:
    presets = common.preset_configs(None)
    specs = common.model_specs(presets, ["default", "shared"])
    names = {name: ref for name, ref, _ in specs}
    assert names["unet"] == "unet" and names["unet-c32"] == "unet-c32" and names["unet-c16"] == "unet-c16"
    assert names["stpnet-paper"] == names["stpnet-paper-shared"] == "unet"
    assert names["stpnet-small-shared"] == "unet-c32" and names["stpnet-tiny"] == "unet-c16"
    assert common.variant_name("stpnet-tiny", "no-text") == "stpnet-tiny-no-text"


def test_speed_writes_rows_with_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [
        "--small", "--presets", "stpnet-tiny", "--sizes", "64", "--repeats", "2", "--throughput-batch", "2",
        "--throughput-repeats", "1", "--train-batch", "1", "--train-repeats", "1", "--threads", "1",
        "--memory-all", "--output-dir", str(tmp_path), "--name", "speed-test", "--variants", "fp32", "bf16",
    ]  # fmt: skip
    written = []  # the results file is rewritten after every setting, so a run cut off keeps its rows
    real_write = common.write_results
    monkeypatch.setattr(
        common, "write_results", lambda path, data: written.append(copy.deepcopy(data)) or real_write(path, data)
    )
    speed.main(argv)
    assert [len(w["rows"]) for w in written] == [3, 6, 9, 12, 15, 15]  # 5 settings of 3 models, then the whole
    assert [w["complete"] for w in written] == [False] * 5 + [True]
    assert all(r["peak_memory_mb"] is None for r in written[0]["rows"])
    payload = json.loads((tmp_path / "speed-test.json").read_text())
    assert payload["complete"] and {"machine", "command", "rows"} <= set(payload)
    assert payload["machine"]["load_average_1_5_15_min_at_start"] is not None
    rows = payload["rows"]
    assert {r["model"] for r in rows} == {"unet-c16", "stpnet-tiny", "stpnet-tiny-shared"}
    assert {(r["mode"], r["batch_size"]) for r in rows} == {("inference", 1), ("inference", 2), ("train", 1)}
    assert {r["dtype"] for r in rows if r["mode"] == "inference"} == {"fp32", "bf16"}
    for row in rows:
        assert REQUIRED_SPEED_KEYS <= set(row), row
        assert row["latency_ms"] > 0 and row["ratio_to_unet"] > 0 and row["gmacs"] > 0
        assert row["peak_memory_mb"] is not None and row["peak_memory_mb"] >= 0
        low, high = row["ratio_to_unet_iqr"]
        assert low <= row["ratio_to_unet"] <= high
        if row["model"] == "unet-c16":
            assert row["ratio_to_unet"] == 1.0 and row["ratio_to_unet_iqr"] == [1.0, 1.0]
    assert (tmp_path / "speed-test.png").stat().st_size > 0

    # --show prints the file as one Markdown row per model and one ratio column per setting, without running
    capsys.readouterr()
    speed.main(["--show", str(tmp_path / "speed-test.json")])
    table = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    settings = {"64 px b1", "64 px b1 bf16", "64 px b2", "64 px b2 bf16", "train 64 px b1"}
    assert header[0] == "model" and {f"x U-Net, {s}" for s in settings} <= set(header)
    lines = {line.split("|")[1].strip(): line for line in table[2:5]}
    assert set(lines) == {"unet-c16", "stpnet-tiny", "stpnet-tiny-shared"}
    first = next(r for r in rows if r["model"] == "stpnet-tiny" and r["batch_size"] == 1 and r["dtype"] == "fp32")
    low, high = first["ratio_to_unet_iqr"]
    assert f"| {first['ratio_to_unet']:.2f} ({low:.2f}-{high:.2f}) |" in lines["stpnet-tiny"]


def test_speed_times_the_plain_model_the_deploy_path_and_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    argv = [
        "--presets", "stpnet-tiny", "--no-shared", "--sizes", "64", "--repeats", "1", "--throughput-batch", "2",
        "--throughput-repeats", "1", "--train-batch", "0", "--threads", "1", "--no-memory", "--no-chart",
        "--output-dir", str(tmp_path), "--name", "speed-forms", "--variants", "fp32-plain", "fp32", "fp32-onnx",
    ]  # fmt: skip
    rows = speed.main(argv)["rows"]
    forms = {(r["model"], r["form"], r["batch_size"]) for r in rows}
    expected_forms = {
        (m, f, b) for m in ("unet-c16", "stpnet-tiny") for f in ("plain", "optimized", "onnx") for b in (1, 2)
    }
    assert forms == expected_forms
    assert all(r["ratio_to_unet"] > 0 for r in rows)
    # the ONNX rows time the same computation: onnxruntime's logits are the model's
    specs = common.model_specs(common.preset_configs(["stpnet-tiny"]), ["default"])
    models = speed.ModelSet({name: build for name, _, build in specs}, torch.device("cpu"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    logits = models.onnx_session("stpnet-tiny", 64, 2).run(None, {"pixel_values": x.numpy()})[0]
    with torch.inference_mode():
        expected = models.fp32["stpnet-tiny"](pixel_values=x).logits
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-3 * max(1.0, expected.abs().max().item()))


def test_speed_channels_last_converts_models_and_inputs(tmp_path: Path) -> None:
    """`--channels-last` puts the weights and every input in NHWC and says so in each row."""
    specs = common.model_specs(common.preset_configs(["stpnet-tiny"]), ["shared"])
    models = speed.ModelSet({name: build for name, _, build in specs}, torch.device("cpu"), channels_last=True)
    conv = models.fp32["unet-c16"].stem[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    seen = []
    conv.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    models.steps(speed.Setting("inference", "fp32", "optimized", 64, 2, 1))["unet-c16"]()
    assert seen == [True]
    argv = [
        "--presets", "stpnet-tiny", "--no-shared", "--sizes", "64", "--repeats", "1", "--throughput-batch", "0",
        "--train-batch", "0", "--no-memory", "--no-chart", "--threads", "1", "--channels-last",
        "--output-dir", str(tmp_path), "--name", "speed-cl",
    ]  # fmt: skip
    speed.main(argv)
    rows = json.loads((tmp_path / "speed-cl.json").read_text())["rows"]
    assert {r["memory_format"] for r in rows} == {"channels_last"} and len(rows) == 2


def test_quality_settings_pick_the_recipe(tmp_path: Path) -> None:
    """small: the CPU recipe on stpnet-tiny; full: the paper's GPU recipe on the preset it names."""
    presets = common.preset_configs(["stpnet-tiny", "stpnet-small", "stpnet-mobilenetv2"])
    tiny, small_preset = presets["stpnet-tiny"], presets["stpnet-small"]
    small = quality.parse_args(["--runs-dir", str(tmp_path)])
    name, run_dir, config = quality.row_config(small, "qata-cov19", "no-ssa", 1, tiny)
    assert small.preset == "stpnet-tiny" and name == "stpnet-tiny-no-ssa"
    assert run_dir == tmp_path / "small" / "qata-cov19" / "stpnet-tiny-no-ssa-seed1"
    assert (config.data.image_size, config.train.max_steps, config.train.optimizer) == (128, 150, "adamw")
    assert config.model.overrides == {"use_ssa": False} and config.train.seed == 1

    full = quality.parse_args(["--settings", "full", "--runs-dir", str(tmp_path), "--set", "train.batch_size=12"])
    assert full.preset == "stpnet-small"
    name, _, config = quality.row_config(full, "kvasir-seg", "shared", 0, small_preset)
    assert name == "stpnet-small-shared" and config.model.preset == "stpnet-small"
    assert (config.data.image_size, config.train.optimizer, config.train.scheduler) == (224, "adam", "cosine_restarts")
    assert config.train.early_stopping_patience == 100 and config.train.batch_size == 12
    assert quality.row_config(full, "kvasir-seg", "unet", 0, small_preset)[0] == "unet-c32"
    assert quality.parse_args(["--settings", "full", "--preset", "stpnet-paper"]).preset == "stpnet-paper"

    cpu = quality.parse_args(["--settings", "cpu", "--runs-dir", str(tmp_path), "--datasets", "kvasir-seg"])
    name, _, config = quality.row_config(cpu, "kvasir-seg", "unet", 0, tiny)
    assert cpu.preset == "stpnet-tiny" and name == "unet-c16"
    assert (config.data.image_size, config.train.epochs, config.train.max_steps) == (128, 18, None)

    # a model setting the U-Net shares (its head's init) reaches the baseline too; STPNet-only ones do not
    extra = ["--set", "model.overrides.one_channel_conv_init=fan_in", "--set", "model.overrides.use_ssa=false"]
    cpu = quality.parse_args(["--settings", "cpu", "--runs-dir", str(tmp_path), *extra])
    built = {}
    for variant in ("unet", "default"):
        _, _, config = quality.row_config(cpu, "kvasir-seg", variant, 0, tiny)
        built[variant] = quality.row_model_config(variant, tiny, config, load_repository(config))
    assert built["unet"].one_channel_conv_init == built["default"].one_channel_conv_init == "fan_in"
    assert built["unet"].base_channels == 16 and not hasattr(built["unet"], "use_ssa")
    assert built["default"].use_ssa is False

    # the pretrained recipes: the U-Net row takes the preset's backbone and decoder
    pretrained = quality.parse_args(["--settings", "pretrained-cpu", "--runs-dir", str(tmp_path)])
    mobilenet = presets["stpnet-mobilenetv2"]
    name, _, config = quality.row_config(pretrained, "qata-cov19", "unet", 0, mobilenet)
    assert pretrained.preset == "stpnet-mobilenetv2" and name == "unet-mobilenetv2"
    assert (config.data.image_size, config.train.max_steps) == (128, 1000)
    unet = quality.row_model_config("unet", mobilenet, config, load_repository(config))
    for key in common.BACKBONE_FIELDS:
        assert getattr(unet, key) == getattr(mobilenet, key), key


def test_quality_smoke_writes_all_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quality.main(["--smoke", "--threads", "1", "--runs-dir", str(tmp_path / "runs"), "--output-dir", str(tmp_path)])
    payload = json.loads((tmp_path / "quality-smoke.json").read_text())
    assert payload["status"] == "complete"
    rows = {r["model"]: r for r in payload["rows"]}
    assert set(rows) == {
        "unet-c16",
        "stpnet-tiny",
        "stpnet-tiny-shared",
        "stpnet-tiny-no-text",
        "stpnet-tiny-no-ssa",
    }
    for name, row in rows.items():
        assert {"model", "dataset", "dice", "iou", "split", "seeds"} <= set(row)
        assert row["dataset"] == "sample" and row["split"] == "test" and row["num_images"] == 8
        assert 0 <= row["dice"] <= 1 and 0 <= row["iou"] <= row["dice"] + 1e-9
        has_text = name.startswith("stpnet") and not name.endswith("no-text")
        assert bool(row.get("retrieval_accuracy")) == has_text, name
        if has_text:  # the split's majority-class floor beside the accuracy, for every category
            assert set(row["retrieval_majority_baseline"]) == set(row["retrieval_accuracy"]), name
    assert rows["unet-c16"]["params"] < rows["stpnet-tiny-shared"]["params"] < rows["stpnet-tiny"]["params"]

    assert rows["stpnet-tiny"]["per_seed"][0]["model_settings"]["zero_init_ssa"] is True
    assert rows["stpnet-tiny-no-ssa"]["per_seed"][0]["model_settings"]["use_ssa"] is False

    # a second run reuses the finished runs (same configs) instead of training again, with the same numbers, except
    # a run whose saved model predates a model setting (here: as if trained before zero_init_ssa existed)
    saved = tmp_path / "runs" / "smoke" / "sample" / "stpnet-tiny-seed0" / "best" / "config.json"
    stale = {k: v for k, v in json.loads(saved.read_text()).items() if k != "zero_init_ssa"}
    saved.write_text(json.dumps(stale))
    args = ["--smoke", "--variants", "unet", "default", "--runs-dir", str(tmp_path / "runs"), "--name", "again"]
    capsys.readouterr()
    again = quality.main([*args, "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("reusing the finished run") == 1
    assert "stpnet-tiny-seed0: its model was built with other settings: zero_init_ssa (was absent, now true)" in out
    assert json.loads(saved.read_text())["zero_init_ssa"] is True  # retrained under today's default
    assert again["rows"][0]["dice"] == rows["unet-c16"]["dice"]

    assert (tmp_path / "again.png").read_bytes().startswith(PNG_MAGIC)

    chart = tmp_path / "quality-smoke.png"
    chart.unlink()
    quality.main(["--show", str(tmp_path / "quality-smoke.json")])
    table = capsys.readouterr().out
    assert table.startswith("| model | dataset |") and "| stpnet-tiny-no-ssa | sample | test |" in table
    assert "(majority-class floor)" in table
    assert chart.read_bytes().startswith(PNG_MAGIC)  # --show charts the results file beside it
    chart.unlink()
    quality.main(["--show", str(tmp_path / "quality-smoke.json"), "--no-chart"])
    assert not chart.exists()


def test_quality_chart_from_partial_results(tmp_path: Path) -> None:
    """A results file of a run still in progress (one seed, no retrieval rows, missing numbers) still charts."""
    payload = {
        "machine": {"cpu": "test cpu"},
        "settings": {"level": "small", "preset": "stpnet-tiny"},
        "rows": [
            {"model": "unet-c16", "dataset": "kvasir-seg", "split": "test", "dice": 0.5, "num_images": 3,
             "seeds": [0], "per_seed": [{"dice": 0.5}], "dice_std_over_seeds": None},
            {"model": "stpnet-tiny-no-text", "dataset": "qata-cov19", "split": "validation", "dice": None,
             "num_images": 2, "seeds": [0], "per_seed": [{"dice": None}]},
        ],
    }  # fmt: skip
    assert quality_report.plot(payload, tmp_path / "q.png").read_bytes().startswith(PNG_MAGIC)


def test_paired_ratio_is_the_median_and_quartiles_of_same_round_ratios() -> None:
    times, reference = [2.0, 3.0, 4.0, 12.0, 5.0], [1.0, 1.0, 1.0, 2.0, 1.0]  # ratios 2, 3, 4, 6, 5
    assert common.paired_ratio(times, reference) == (4.0, 3.0, 5.0)
    assert common.paired_ratio([3.0], [2.0]) == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError):  # rounds must pair up
        common.paired_ratio([1.0, 2.0], [1.0])


def test_breakdown_times_every_block(tmp_path: Path) -> None:
    out = tmp_path / "breakdown.json"
    argv = ["--preset", "stpnet-tiny", "--size", "64", "--rounds", "1", "--optimize", "--json", str(out)]
    result = breakdown.main(argv)
    (unet, stpnet, optimized) = result["rows"]
    assert unet["model"] == "unet-c16" and stpnet["model"] == "stpnet-tiny-shared"
    assert optimized["model"] == "stpnet-tiny-shared (optimized)" and result["setting"]["optimize"]
    assert result["optimized_vs_plain"]["median"] > 0
    for row in (stpnet, optimized):  # the rewritten modules keep their names, so their blocks are timed too
        assert {"ssa.0", "utrans", "utrans.reconstruct.0", "fusions.3", "retrieval"} <= set(row["blocks_ms"])
    assert json.loads(out.read_text())["rows"][1]["ratio_to_unet"] > 0
    if breakdown.resource is not None:  # page faults counted per model and forward pass
        assert all(
            isinstance(r["page_faults_per_forward"], int) and r["page_faults_per_forward"] >= 0 for r in result["rows"]
        )


@pytest.mark.skipif(not (common.ROOT / ".git").exists(), reason="needs the git history of a checkout")
def test_breakdown_against_a_git_revision() -> None:
    """`--baseline-ref` runs the model code of a commit beside the working tree's, with the same weights."""
    result = breakdown.main(["--preset", "stpnet-tiny", "--size", "64", "--rounds", "3", "--baseline-ref", "HEAD"])
    names = [r["model"] for r in result["rows"]]
    assert names == ["unet-c16", "stpnet-tiny-shared", "stpnet-tiny-shared (before: HEAD)"]
    change = result["after_vs_before"]
    assert change["iqr"][0] <= change["median"] <= change["iqr"][1]
    unchanged = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "modeling_stpnet"], cwd=common.ROOT).returncode
    if unchanged == 0:  # the same code and weights: the same numbers
        assert result["equivalence"]["max_abs_logit_diff"] == 0.0
        assert result["equivalence"]["retrieved_indices_equal"]

    # training steps: losses and gradients compared too
    argv = ["--preset", "stpnet-tiny", "--size", "64", "--batch", "2", "--rounds", "2", "--baseline-ref", "HEAD"]
    result = breakdown.main([*argv, "--train"])
    assert result["setting"]["mode"] == "train"
    assert {"loss_diff", "max_abs_grad_diff", "max_abs_grad"} <= set(result["equivalence"])
    assert result["equivalence"]["max_abs_grad"] > 0
    if unchanged == 0:
        assert result["equivalence"]["loss_diff"] == 0.0 and result["equivalence"]["max_abs_grad_diff"] == 0.0


# ---------------------------------------------------------------------------------------------------- device checks
def test_device_checks_rehearsal_writes_what_comes_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU script's every step at CPU-sized settings: at most 8 files (what the GPU machine sends back), each
    results file in the agreed shape, and a summary that names every step."""
    assert device_checks.main(["--dry-run", "--out", str(tmp_path)]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"device_checks.log", "device_checks.json", "speed-gpu.json"} <= set(files)
    summary = json.loads((tmp_path / "device_checks.json").read_text())
    names = ["info", "tests", "speed", "speed-compile-fp32", "speed-compile-bf16"]
    assert [s["step"] for s in summary["steps"]] == names and summary["not_passed"] == []
    for name in ("speed-gpu", "speed-gpu-compile-fp32", "speed-gpu-compile-bf16"):
        rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert rows and all(REQUIRED_SPEED_KEYS <= set(r) for r in rows)
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    log = (tmp_path / "device_checks.log").read_text()
    assert "=== speed-compile-bf16" in log and "skipped" in log  # the CUDA tests ran and skipped here
    assert "wrote" in capsys.readouterr().out  # streamed to the console too


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_checks_stop_at_once_without_a_gpu(tmp_path: Path) -> None:
    assert device_checks.main(["--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "device_checks.json").read_text())
    assert summary["steps"] == [{"step": "info", "exit_status": 3, "seconds": summary["steps"][0]["seconds"],
                                 "timed_out": False}]  # fmt: skip
    assert summary["not_passed"] == ["info"]


def test_device_checks_step_out_of_time_is_killed_and_recorded(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as log:
        command = [sys.executable, "-c", "import time; print('started'); time.sleep(60)"]
        status, timed_out = device_checks.run_step(command, 2, log)
    assert timed_out and status != 0
    assert "started" in (tmp_path / "log").read_text()


def _results_file(
    path: Path,
    rows: list[tuple[str, str, str, float]],
    seed: int = 0,
    model_settings: dict[str, dict[str, object]] | None = None,
    **settings: object,
) -> Path:
    """A minimal quality results file of one seed: rows of `(model, variant, dataset, dice)`; `model_settings` by
    variant for the runs that record them (files written before they were recorded have none)."""
    runs = [
        {"model": m, "variant": v, "seed": seed, "dice": dice, "iou": dice / 2, "micro_dice": dice,
         "per_image_std": {"dice": 0.1, "iou": 0.1}, "reported_split": "test", "num_images": 4, "image_size": 64,
         "retrieval_accuracy": {"size": dice, "mean": dice} if v != "unet" else None,
         "retrieval_majority_baseline": {"size": 0.4} if v != "unet" else None,
         **({"model_settings": model_settings[v]} if model_settings and v in model_settings else {})}
        for m, v, d, dice in rows
    ]  # fmt: skip
    payload = {
        "machine": {"cpu": path.stem},
        "command": f"python benchmarks/quality.py --name {path.stem}",
        "settings": {"level": "cpu", "preset": "stpnet-tiny", "seeds": [seed], "overrides": {}, **settings,
                     "train_configs": {d: f"{d}.yaml" for _, _, d, _ in rows}},
        "status": "complete",
        "rows": [row for run, (_, _, d, _) in zip(runs, rows) for row in quality_report.aggregate([run], d, {})],
    }  # fmt: skip
    path.write_text(json.dumps(payload))
    return path


def test_quality_merge_joins_separate_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _results_file(
        tmp_path / "a.json",
        [("stpnet-tiny-no-ssa", "no-ssa", "kvasir-seg", 0.6), ("unet-c16", "unet", "kvasir-seg", 0.7)],
    )
    second = _results_file(
        tmp_path / "b.json",
        [("stpnet-tiny", "default", "qata-cov19", 0.5), ("stpnet-tiny", "default", "kvasir-seg", 0.65)],
    )
    merged = quality.main(["--merge", str(first), str(second), "--output-dir", str(tmp_path), "--name", "joined"])
    # datasets in order of appearance, variants in the benchmark's order within each
    assert [(r["dataset"], r["model"]) for r in merged["rows"]] == [
        ("kvasir-seg", "unet-c16"),
        ("kvasir-seg", "stpnet-tiny"),
        ("kvasir-seg", "stpnet-tiny-no-ssa"),
        ("qata-cov19", "stpnet-tiny"),
    ]
    assert [s["file"] for s in merged["sources"]] == ["a.json", "b.json"]
    assert merged["sources"][1]["machine"] == {"cpu": "b"} and merged["status"] == "complete"
    assert set(merged["settings"]["train_configs"]) == {"kvasir-seg", "qata-cov19"}
    assert json.loads((tmp_path / "joined.json").read_text())["rows"] == merged["rows"]
    assert (tmp_path / "joined.png").read_bytes().startswith(PNG_MAGIC)
    assert "| stpnet-tiny-no-ssa | kvasir-seg | test | 0.6000 |" in capsys.readouterr().out


def test_quality_merge_pools_seeds_of_separate_runs(tmp_path: Path) -> None:
    """Seed 0 of every row in one (already merged) file, seed 1 of some rows in others: pooled per model, mean ± std
    over seeds recomputed from the single runs, rows with one seed left as they were, sources flattened."""
    seed0 = quality_report.merge_results([
        _results_file(tmp_path / "a0.json", [("unet-c16", "unet", "kvasir-seg", 0.7)]),
        _results_file(tmp_path / "b0.json", [("stpnet-tiny", "default", "kvasir-seg", 0.5),
                                             ("stpnet-tiny-shared", "shared", "kvasir-seg", 0.6)]),
    ])  # fmt: skip
    (tmp_path / "seed0.json").write_text(json.dumps(seed0))
    seed1 = [
        _results_file(tmp_path / "a1.json", [("unet-c16", "unet", "kvasir-seg", 0.8)], seed=1),
        _results_file(tmp_path / "b1.json", [("stpnet-tiny", "default", "kvasir-seg", 0.7)], seed=1),
    ]
    merged = quality_report.merge_results([tmp_path / "seed0.json", *seed1])
    rows = {r["model"]: r for r in merged["rows"]}
    assert list(rows) == ["unet-c16", "stpnet-tiny", "stpnet-tiny-shared"]
    assert rows["unet-c16"]["seeds"] == [0, 1] and rows["unet-c16"]["dice"] == pytest.approx(0.75)
    assert rows["unet-c16"]["dice_std_over_seeds"] == pytest.approx(0.0707107, abs=1e-6)
    assert rows["stpnet-tiny"]["dice"] == pytest.approx(0.6) and rows["stpnet-tiny"]["iou"] == pytest.approx(0.3)
    assert rows["stpnet-tiny"]["retrieval_accuracy"]["size"] == pytest.approx(0.6)
    assert rows["stpnet-tiny"]["retrieval_majority_baseline"] == {"size": 0.4}
    assert rows["stpnet-tiny-shared"]["seeds"] == [0] and rows["stpnet-tiny-shared"]["dice_std_over_seeds"] is None
    assert merged["settings"]["seeds"] == [0, 1]
    assert [s["file"] for s in merged["sources"]] == ["a0.json", "b0.json", "a1.json", "b1.json"]


def test_quality_merge_refuses_rows_not_trained_alike(tmp_path: Path) -> None:
    base = _results_file(tmp_path / "a.json", [("unet-c16", "unet", "kvasir-seg", 0.7)])
    other = _results_file(tmp_path / "other.json", [("stpnet-tiny", "default", "kvasir-seg", 0.6)], preset="small")
    with pytest.raises(ValueError, match=r"other.json and .*a.json differ in settings.preset"):
        quality_report.merge_results([base, other])
    twice = _results_file(tmp_path / "twice.json", [("unet-c16", "unet", "kvasir-seg", 0.71)])
    with pytest.raises(ValueError, match=r"unet-c16 on kvasir-seg, seed 0, is in both .*a.json and .*twice.json"):
        quality_report.merge_results([base, twice])
    (tmp_path / "speed.json").write_text(json.dumps({"machine": {}, "rows": []}))
    with pytest.raises(ValueError, match=r"speed.json: not a quality results file"):
        quality_report.merge_results([base, tmp_path / "speed.json"])
    with pytest.raises(SystemExit, match=r"quality.py --merge: .*missing.json: cannot read"):
        quality.main(["--merge", str(base), str(tmp_path / "missing.json"), "--output-dir", str(tmp_path)])


def test_quality_merge_refuses_runs_built_with_other_model_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Equal settings, but a model default changed between the runs: pooling or comparing them is refused, naming
    the setting; what a variant sets itself (no-ssa's use_ssa) is not a difference; older files are named as
    unchecked."""
    new = {"model_type": "stpnet", "use_ssa": True, "zero_init_ssa": True, "base_channels": 16, "image_size": 64}
    old = {"model_type": "stpnet", "use_ssa": True, "base_channels": 16, "image_size": 64}  # before zero_init_ssa
    unet = {"model_type": "stpnet-unet", "base_channels": 16, "image_size": 64, "num_channels": 3}
    settings = {"default": new, "no-ssa": {**new, "use_ssa": False}, "unet": unet}
    base = _results_file(
        tmp_path / "a.json",
        [("stpnet-tiny", "default", "kvasir-seg", 0.6), ("stpnet-tiny-no-ssa", "no-ssa", "kvasir-seg", 0.5),
         ("unet-c16", "unet", "kvasir-seg", 0.7)],
        model_settings=settings,
    )  # fmt: skip
    same = _results_file(tmp_path / "b.json", [("stpnet-tiny", "default", "kvasir-seg", 0.7)], 1, settings)
    pooled = {r["model"]: r for r in quality_report.merge_results([base, same])["rows"]}
    assert pooled["stpnet-tiny"]["seeds"] == [0, 1]

    stale = _results_file(tmp_path / "c.json", [("stpnet-tiny", "default", "kvasir-seg", 0.65)], 1, {"default": old})
    with pytest.raises(ValueError, match=r"seed 0 and stpnet-tiny seed 1 on kvasir-seg .* zero_init_ssa \(a.json: "
                       r"true, c.json: absent\); their rows were not trained alike"):  # fmt: skip
        quality_report.merge_results([base, stale])
    other_width = {"unet": {**unet, "base_channels": 32}}
    wide = _results_file(tmp_path / "d.json", [("unet-c16", "unet", "qata-cov19", 0.7)], 1, other_width)
    quality_report.merge_results([base, wide])  # another dataset: not compared
    wide = _results_file(tmp_path / "e.json", [("unet-c16", "unet", "kvasir-seg", 0.7)], 1, other_width)
    with pytest.raises(ValueError, match=r"base_channels \(a.json: 16, e.json: 32\)"):
        quality_report.merge_results([base, wide])

    capsys.readouterr()
    legacy = _results_file(tmp_path / "legacy.json", [("stpnet-tiny", "default", "kvasir-seg", 0.6)], 2)
    quality_report.merge_results([base, legacy])
    assert "cannot check the model settings of runs in legacy.json" in capsys.readouterr().err
