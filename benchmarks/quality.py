#!/usr/bin/env python
"""Segmentation quality of STPNet, its ablations and a U-Net of the same width, trained identically in one run.

    python benchmarks/quality.py --smoke                       # bundled sample, 3 steps per row (< 2 min; the test)
    python benchmarks/quality.py                               # small settings: both datasets, ~1 h on 2 CPU cores
    python benchmarks/quality.py --settings cpu --variants unet --seeds 0  # a row on the CPU recipes as they are
    python benchmarks/quality.py --settings full --seeds 0 1 2 --datasets kvasir-seg   # the paper's recipe, GPU
    python benchmarks/quality.py --settings pretrained-cpu --variants unet default shared no-text  # ImageNet encoder
    python benchmarks/quality.py --merge a.json b.json --name quality-cpu  # join rows trained by separate runs

Rows (per dataset): `unet` (base 64; `unet-c32`/`unet-c16` for narrower presets: the U-Net has the preset's
width), `stpnet-<preset>` (its own retrieval backbone), `stpnet-<preset>-shared`, `stpnet-<preset>-no-text`
(use_text=False) and `stpnet-<preset>-no-ssa` (use_ssa=False). Every row uses the same training config (data,
split, seed, steps, augmentation, image size: `configuration/train/<dataset>-cpu.yaml` plus the settings below, or
with `--settings full` the paper's recipe `configuration/train/<dataset>.yaml` on the preset it names,
stpnet-small) through `stpnet.training.run_training`; only the model differs. The protocol is the config's:
Kvasir-SEG selects on a validation split carved from the official 880 training images and reports the official 120;
QaTa-COV19 selects on a carve of its training split and reports the official valid split. Dice/IoU are per-image means
on the reported split (original mask resolution), given as mean ± std over seeds, with the per-image std alongside;
STPNet rows add retrieval accuracy per text category. Results: `benchmarks/results/<name>.json`, rewritten after
every finished run (so a long background run shows its progress), and run folders under --runs-dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch

try:
    from . import common, quality_report
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]
    import quality_report  # type: ignore[no-redef]


VARIANTS = quality_report.VARIANT_ORDER
# The training config of each dataset: the CPU recipes (`*-cpu.yaml`: stpnet-tiny's, 128 px, AdamW, a fixed budget)
# under the smoke, small and cpu settings, the paper's recipes (`<dataset>.yaml`: 224 px, Adam, cosine warm restarts,
# early stopping; meant for a GPU) under the full settings.
CPU_CONFIGS = {
    "kvasir-seg": common.ROOT / "configuration" / "train" / "kvasir-seg-cpu.yaml",
    "qata-cov19": common.ROOT / "configuration" / "train" / "qata-cov19-cpu.yaml",
    "sample": common.ROOT / "configuration" / "train" / "sample-tiny.yaml",
}
FULL_CONFIGS = {
    "kvasir-seg": common.ROOT / "configuration" / "train" / "kvasir-seg.yaml",
    "qata-cov19": common.ROOT / "configuration" / "train" / "qata-cov19.yaml",
    "sample": common.ROOT / "configuration" / "train" / "sample-tiny.yaml",
}


# The recipes with the ImageNet-pretrained encoder (`*-pretrained-cpu.yaml`: stpnet-mobilenetv2, 128 px, 1000 steps).
PRETRAINED_CONFIGS = {
    "kvasir-seg": common.ROOT / "configuration" / "train" / "kvasir-seg-pretrained-cpu.yaml",
    "qata-cov19": common.ROOT / "configuration" / "train" / "qata-cov19-pretrained-cpu.yaml",
    "sample": common.ROOT / "configuration" / "train" / "sample-tiny.yaml",
}


def dataset_config(settings: str, dataset: str) -> Path:
    configs = {"full": FULL_CONFIGS, "pretrained-cpu": PRETRAINED_CONFIGS}.get(settings, CPU_CONFIGS)
    return configs[dataset]


# Overrides per settings level, on top of the dataset's training config (all rows alike).
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {
        "data.image_size": 64,
        "train.batch_size": 4,
        "train.max_steps": 3,
        "train.warmup_steps": 0,
        "train.eval_every_steps": 3,
        "train.checkpoint_every_steps": 0,
        "train.progress": False,
        "train.tensorboard": False,
    },
    "small": {
        "data.image_size": 128,
        "train.batch_size": 8,
        "train.max_steps": 150,
        "train.warmup_steps": 15,
        "train.eval_every_steps": 50,
        "train.early_stopping_patience": 0,
        "train.checkpoint_every_steps": 0,
        "train.progress": False,
        "train.tensorboard": False,
    },
    "cpu": {"train.progress": False, "train.tensorboard": False},  # the CPU recipes as they are (~36 min per row)
    "full": {"train.progress": False, "train.tensorboard": False},  # the paper recipes as they are
    "pretrained-cpu": {"train.progress": False, "train.tensorboard": False},  # the pretrained-encoder recipes
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="small")
    parser.add_argument("--smoke", action="store_true", help="= --settings smoke --datasets sample --seeds 0")
    parser.add_argument("--datasets", nargs="+", choices=sorted(CPU_CONFIGS))
    parser.add_argument(
        "--preset", help="STPNet preset under test (default: stpnet-tiny; with --settings cpu/full the recipes' own)"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, help="default 0 1 (smoke: 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra key=value for every row")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--runs-dir", default=str(common.ROOT / "outputs" / "quality"), help="training run folders")
    parser.add_argument("--output-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--name", help="results file stem (default quality-<settings>)")
    parser.add_argument(
        "--show", type=Path, metavar="JSON", help="only print the Markdown table of a results file (and chart it)"
    )
    parser.add_argument(
        "--merge", type=Path, nargs="+", metavar="JSON",
        help="only join results files of the same settings into <output-dir>/<name>.json (and chart it)",
    )  # fmt: skip
    parser.add_argument("--no-chart", action="store_true", help="write no PNG chart")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train every row again (default: reuse a finished run of the same training config whose saved "
        "model was built with the same model settings)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.settings = "smoke"
        args.datasets = args.datasets or ["sample"]
        args.seeds = args.seeds or [0]
    args.datasets = args.datasets or ["kvasir-seg", "qata-cov19"]
    args.seeds = args.seeds or [0, 1]
    args.name = args.name or f"quality-{args.settings}"
    if args.preset is None:
        recipes = args.settings in ("cpu", "full", "pretrained-cpu")
        args.preset = recipe_preset(parser, args.settings, args.datasets) if recipes else "stpnet-tiny"
    return args


def recipe_preset(parser: argparse.ArgumentParser, settings: str, datasets: list[str]) -> str:
    """The preset the datasets' recipes name (they must agree: every row uses one preset)."""
    from stpnet.training import load_train_config

    presets = {d: load_train_config(dataset_config(settings, d)).model.preset for d in datasets}
    if len(set(presets.values())) > 1:
        parser.error(f"the recipes name different presets {presets}; pick one with --preset")
    return next(iter(presets.values()))


# ---------------------------------------------------------------------------------------------------- models
@cache
def encoded_repository(definition: str, encoder: str, max_length: int, layers: int | None) -> tuple[torch.Tensor, ...]:
    """The text repository's embeddings, encoded once per benchmark instead of once per row."""
    from stpnet.training import load_repository, load_train_config

    config = load_train_config(overrides={"text.definition": definition})
    return tuple(load_repository(config).encode(encoder, max_length=max_length, num_hidden_layers=layers))


def row_model_config(variant: str, preset, config, repository):
    """The model config a row builds: the U-Net with the preset's encoder (width or backbone) and decoder, or the
    preset's STPNet with the variant's overrides (already in the training config's `model.overrides`). The U-Net
    takes those of `--set`'s model overrides that it has too (its init), so a change of a shared setting reaches the
    baseline as well."""
    if variant == "unet":
        own = {"model_type", "base_channels", "image_size", *common.BACKBONE_FIELDS}
        shared = set(common.model_settings(common.UNetConfig())) - own
        extra = {k: v for k, v in config.model.overrides.items() if k in shared}
        return common.unet_config(preset, image_size=config.data.image_size, **extra)
    from stpnet.training import build_model_config

    return build_model_config(config, repository)


def model_factory(variant: str, preset, built: dict[str, int]):
    """`run_training`'s model_factory for one row; records the parameter count in `built`."""

    def build(config, repository) -> torch.nn.Module:
        model = _build(config, repository)
        built["params"] = sum(p.numel() for p in model.parameters())
        return model

    def _build(config, repository) -> torch.nn.Module:
        from stpnet.training.model import load_pretrained_backbones, load_pretrained_retrieval_backbone

        model_config = row_model_config(variant, preset, config, repository)
        if variant == "unet":
            return load_pretrained_backbones(common.UNetForSemanticSegmentation(model_config))

        model = common.STPNetForSemanticSegmentation(model_config)
        if model.use_text:
            t = config.text
            model.set_text_embeddings(
                list(encoded_repository(t.definition, t.encoder, model_config.text_max_length, t.num_hidden_layers)),
                t.encoder,
            )
        if (
            model.use_text
            and model_config.retrieval_backbone != "shared"
            and model_config.retrieval_backbone_pretrained
        ):
            load_pretrained_retrieval_backbone(model, model_config.retrieval_backbone_pretrained)
        return load_pretrained_backbones(model)

    return build


# ---------------------------------------------------------------------------------------------------- runs
def per_image_std(run_dir: Path) -> dict[str, float | None]:
    """Std over images of Dice and IoU, from the per-image CSV the evaluation writes."""
    path = run_dir / "test" / "per_image.csv"
    if not path.is_file():
        return {"dice": None, "iou": None}
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    out = {}
    for key in ("dice", "iou"):
        values = [float(r[key]) for r in rows]
        out[key] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return out


def row_config(args: argparse.Namespace, dataset: str, variant: str, seed: int, preset) -> tuple:
    """`(model name, run folder, training config)` of one row: the dataset's recipe for the settings level with the
    level's overrides, the preset, the variant's model overrides, the seed and any `--set`."""
    from stpnet.training import apply_overrides, config_from_dict, load_train_config

    name = common.unet_for(args.preset, preset) if variant == "unet" else common.variant_name(args.preset, variant)
    run_dir = Path(args.runs_dir) / args.settings / dataset / f"{name}-seed{seed}"
    overrides: dict[str, Any] = {
        **SETTINGS[args.settings],
        "model.preset": args.preset,
        "model.overrides": {} if variant == "unet" else dict(common.VARIANT_OVERRIDES[variant]),
        "train.seed": seed,
        "output_dir": str(run_dir),
    }
    config = load_train_config(dataset_config(args.settings, dataset), overrides)
    if args.overrides:
        config = config_from_dict(apply_overrides(config.to_dict(), args.overrides))
    return name, run_dir, config


def train_one(args: argparse.Namespace, dataset: str, variant: str, seed: int, preset) -> dict[str, Any]:
    from stpnet.training import load_repository, run_training

    name, run_dir, config = row_config(args, dataset, variant, seed, preset)
    settings = common.model_settings(row_model_config(variant, preset, config, load_repository(config)))
    started = time.time()
    built: dict[str, int] = {}
    result = None if args.retrain else finished_run(run_dir, config.to_yaml(), settings)
    if result is None:
        resume = not args.retrain and interrupted_run(run_dir, config.to_yaml(), settings)
        if resume:
            print(f"[quality] resuming the interrupted run in {run_dir} from its last checkpoint", flush=True)
        # The run folders belong to the benchmark: a row that is neither reused nor resumed replaces its folder.
        result = run_training(
            config, model_factory=model_factory(variant, preset, built), resume=resume, overwrite=not resume
        )
    else:
        print(f"[quality] reusing the finished run in {run_dir} (same config; --retrain to train again)", flush=True)
        built["params"] = result["num_parameters"]
    metrics = result["test_metrics"] or {}
    return {
        "model": name,
        "variant": variant,
        "seed": seed,
        "dice": metrics.get("dice"),
        "iou": metrics.get("iou"),
        "micro_dice": metrics.get("micro_dice"),
        "input_resolution_dice": (metrics.get("input_resolution") or {}).get("dice"),
        "num_images": metrics.get("num_images"),
        "per_image_std": per_image_std(run_dir),
        "retrieval_accuracy": metrics.get("retrieval_accuracy"),
        "retrieval_majority_baseline": metrics.get("retrieval_majority_baseline"),
        "best_val_dice": result["best_val_dice"],
        "best_step": result["best_step"],
        "steps": result["steps"],
        "wall_time_s": result.get("wall_time_s", round(time.time() - started, 1)),
        "run_dir": str(run_dir),
        "reported_split": config.data.test_split,
        "image_size": config.data.image_size,
        "params": built.get("params"),
        "model_settings": settings,
    }


def finished_run(run_dir: Path, config_yaml: str, model_settings: dict[str, Any]) -> dict[str, Any] | None:
    """The result of an earlier run in `run_dir` when it finished (tested) with exactly this training config and a
    model built alike (its saved `best/config.json` against `model_settings`, so a changed model default is not
    mistaken for the same row), else None: an interrupted benchmark then continues where it stopped instead of
    retraining every row."""
    try:
        result = json.loads((run_dir / "run.json").read_text())
        same_config = (run_dir / "train_config.yaml").read_text() == config_yaml
        saved_model = json.loads((run_dir / "best" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not same_config or not result.get("test_metrics") or result.get("steps") != result.get("total_steps"):
        return None
    changes = common.model_settings_changes(saved_model, model_settings)
    if changes:
        described = "; ".join(f"{key} (was {was}, now {now})" for key, (was, now) in changes.items())
        print(f"[quality] retraining {run_dir}: its model was built with other settings: {described}", flush=True)
        return None
    return result


def interrupted_run(run_dir: Path, config_yaml: str, model_settings: dict[str, Any]) -> bool:
    """Whether `run_dir` holds an unfinished run of exactly this training config and model settings with a
    checkpoint to continue from (a finished run, or one of another config, is reused or replaced instead)."""
    from stpnet.training.checkpoints import checkpoint_steps

    try:
        same_config = (run_dir / "train_config.yaml").read_text() == config_yaml
    except OSError:
        return False
    if not same_config or (run_dir / "run.json").exists() or not checkpoint_steps(run_dir):
        return False
    try:
        saved_model = json.loads((run_dir / "best" / "config.json").read_text())
    except (OSError, ValueError):
        return True  # no model selected yet: the checkpoint alone says how far it got
    return not common.model_settings_changes(saved_model, model_settings)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.show:
        payload = json.loads(args.show.read_text())
        quality_report.report(payload, None if args.no_chart else args.show.with_suffix(".png"), markdown=True)
        return payload
    if args.merge:
        try:
            payload = quality_report.merge_results(args.merge)
        except ValueError as error:
            raise SystemExit(f"quality.py --merge: {error}") from None
        out = common.write_results(Path(args.output_dir) / f"{args.name}.json", payload)
        print(f"wrote {out}")
        quality_report.report(payload, None if args.no_chart else out.with_suffix(".png"), markdown=True)
        return payload
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = common.preset_configs([args.preset])[args.preset]
    unet = common.unet_for(args.preset, preset)
    payload: dict[str, Any] = {
        "machine": common.machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "command": common.command_line(),
        "settings": {
            "level": args.settings,
            "preset": args.preset,
            "seeds": args.seeds,
            "overrides": {**SETTINGS[args.settings], "extra": args.overrides},
            "train_configs": {d: str(dataset_config(args.settings, d).relative_to(common.ROOT)) for d in args.datasets},
        },
        "notes": {
            "dice/iou": "per-image means on the reported split at original resolution; mean over seeds "
            "(std over seeds beside it; per-image std averaged over seeds)",
            "unet": f"{unet}: a U-Net with the preset's encoder ("
            + (f"backbone {preset.backbone}" if preset.backbone_config else f"base {preset.base_channels}")
            + ") and decoder widths",
            "model names": "stpnet-<preset> uses the preset's own retrieval backbone; -shared the encoder's features",
        },
        "status": "running",
        "rows": [],
    }
    out = Path(args.output_dir) / f"{args.name}.json"
    runs: dict[str, list[dict[str, Any]]] = {d: [] for d in args.datasets}
    params: dict[str, int] = {}
    for dataset in args.datasets:
        for seed in args.seeds:
            for variant in args.variants:
                print(f"[quality] {dataset} seed {seed}: {variant}", flush=True)
                run = train_one(args, dataset, variant, seed, preset)
                runs[dataset].append(run)
                params[run["model"]] = run.pop("params")
                payload["rows"] = [
                    row for d in args.datasets if runs[d] for row in quality_report.aggregate(runs[d], d, params)
                ]
                payload["machine"]["load_average_1_5_15_min_now"] = common.load_average()
                common.write_results(out, payload)
    payload["status"] = "complete"
    common.write_results(out, payload)
    print(f"wrote {out}")
    quality_report.report(payload, None if args.no_chart else out.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
