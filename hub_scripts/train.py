#!/usr/bin/env python
"""Train STPNet (or another segmentation model) from a YAML config, with Accelerate.

Examples::

    accelerate launch hub_scripts/train.py --config configuration/train/sample-tiny.yaml
    python hub_scripts/train.py --config configuration/train/kvasir-seg.yaml --dataset outputs/data/kvasir-seg \
        --output-dir outputs/kvasir --set train.lr=1e-3 --set model.overrides.retrieval_backbone=shared
    python hub_scripts/train.py --config configuration/train/kvasir-seg.yaml --output-dir outputs/kvasir --resume
    python hub_scripts/train.py --config configuration/train/sample-tiny.yaml --output-dir outputs/a --overwrite
    python hub_scripts/train.py --config configuration/train/kvasir-seg.yaml --init-from org/stpnet-kvasir \
        --dataset my-polyps --output-dir outputs/my-polyps   # fine-tune a trained checkpoint
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 hub_scripts/train.py --config ...

``--set section.key=value`` (repeatable) overrides any key of the YAML file; values are parsed as YAML. The selected
model (best validation Dice) is written to ``<output-dir>/best`` with ``save_pretrained``. An output folder that
already holds a run's results is refused unless ``--resume`` (continue that run) or ``--overwrite`` (replace it;
only the files a run writes are removed) is given.

SIGTERM (what a cluster scheduler sends before it kills a job) saves a checkpoint after the current optimizer step
and exits with status 143; ``--resume`` then continues exactly. A failed write (full disk, read-only folder) keeps
the previous checkpoints and ``best/`` and exits with status 1 and a message naming the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stpnet.extras import TRAIN_MODULES, exit_unless_installed  # noqa: E402

if __name__ == "__main__":  # the install line instead of an import traceback
    exit_unless_installed("hub_scripts/train.py", "train", TRAIN_MODULES)

from stpnet.safe_write import OutputWriteError  # noqa: E402
from stpnet.training import (  # noqa: E402
    ConfigError,
    TrainingInterrupted,
    apply_overrides,
    config_from_dict,
    read_config_file,
    run_training,
)
from stpnet.training.evaluation import retrieval_report  # noqa: E402
from stpnet.training.resume import EXIT_STATUS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="YAML training config (configuration/train/)")
    parser.add_argument("--dataset", default=None, help="local dataset path or Hub id (overrides data.dataset)")
    parser.add_argument("--output-dir", default=None, help="run folder (overrides output_dir)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides train.max_steps)")
    parser.add_argument(
        "--init-from",
        default=None,
        help="fine-tune this trained checkpoint (folder or Hub id; overrides model.init_from): its architecture and "
        "weights start the run",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in <output-dir>/checkpoints, or from the folder given",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in <output-dir> (removes only the files a run writes: best/, checkpoints/, "
        "history, logs, test/ metrics); without it or --resume such a folder is refused",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set train.lr=1e-3 --set augment.enabled=false (repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Flag values are taken verbatim (a folder named "no" stays a string); --set values are parsed as YAML.
    flags = {
        "data.dataset": args.dataset,
        "output_dir": args.output_dir,
        "train.max_steps": args.max_steps,
        "model.init_from": args.init_from,
    }
    try:
        data = apply_overrides(read_config_file(args.config), args.overrides)
        config = config_from_dict(apply_overrides(data, {k: v for k, v in flags.items() if v is not None}))
        result = run_training(config, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as error:  # SIGTERM from a scheduler: the checkpoint is saved, the run resumable
        print(f"interrupted: {error}", file=sys.stderr)
        return EXIT_STATUS
    except OutputWriteError as error:  # full disk, read-only folder: earlier files are intact, the message says so
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not result["is_main_process"]:
        return 0
    # the best validation Dice was printed by the run itself; here only the test split's scores are new
    if result["test_metrics"]:
        m = result["test_metrics"]
        folder = Path(result["output_dir"]) / "test"
        print(f"test ({config.data.test_split}, {m['num_images']} images): Dice {m['dice']:.4f}, IoU {m['iou']:.4f}")
        for line in retrieval_report(m):
            print(line)
        print(f"written: {folder / 'metrics.json'}, per_image.csv, overlays/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
