#!/usr/bin/env python
"""Convert a raw on-disk dataset into an STPNet ``DatasetDict`` (image, mask, text, one ClassLabel per category).

Examples::

    python hub_scripts/prepare_dataset.py --source /data/kvasir-seg --output outputs/kvasir-seg
    python hub_scripts/prepare_dataset.py --layout qata-cov19 --source /data/qata-cov19 \
        --output outputs/qata --parquet outputs/qata-parquet
    python hub_scripts/prepare_dataset.py --source sample/kvasir-seg-mini --image-size 256 --limit 10 \
        --push-to-hub me/kvasir-seg-mini

Prints per-split counts, skipped files with reasons, and the class balance of every category. ``--output`` and
``--parquet`` must be new or empty folders; ``--overwrite`` replaces a dataset this script wrote there earlier
(never a folder holding anything else), and the new dataset only takes its place once completely written. Bad
arguments exit with status 2, bad data with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stpnet.extras import TRAIN_MODULES, exit_unless_installed  # noqa: E402

if __name__ == "__main__":  # the install line instead of an import traceback
    exit_unless_installed("hub_scripts/prepare_dataset.py", "train", TRAIN_MODULES)

from stpnet.data import (  # noqa: E402
    LAYOUTS,
    DataError,
    check_save_targets,
    class_balance,
    convert_raw,
    discover,
    format_class_balance,
    push_stpnet_dataset,
    resolve_repository,
    save_stpnet_dataset,
    validate_stpnet_dataset,
)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (0 or a negative value would not mean "no limit")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {value} (leave the option out for no limit)"
        )
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1), the share of train carved out as validation."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) (0 = no validation split), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=["auto", *LAYOUTS], default="auto", help="on-disk layout (default: detect)")
    parser.add_argument("--source", required=True, type=Path, help="folder with the raw dataset")
    parser.add_argument(
        "--text-definition",
        type=Path,
        default=None,
        help="text repository JSON (default: configuration/text/<layout>.json)",
    )
    parser.add_argument("--output", type=Path, default=None, help="save_to_disk folder (new or empty)")
    parser.add_argument("--parquet", type=Path, default=None, help="folder for {split}.parquet files (new or empty)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset written earlier into --output/--parquet (a folder holding anything else is refused)",
    )
    parser.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.1,
        help="fraction of train carved out as validation when the layout has none (default 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation carve (default 0)")
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="downsize so the long side is at most N pixels (masks follow)",
    )
    parser.add_argument("--limit", type=positive_int, default=None, help="at most N pairs per split (quick subsets)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad pairs and report them with a count instead of stopping at the first one",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="upload with DatasetDict.push_to_hub (needs a network and a Hub token)",
    )
    parser.add_argument("--private", action="store_true", help="make the Hub dataset private")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.output is None and args.parquet is None and args.push_to_hub is None:
        print("note: none of --output/--parquet/--push-to-hub given; converting only to report counts and balance")
    try:  # before converting, which can take long, so that a taken folder is reported at once
        check_save_targets(args.output, args.parquet, args.overwrite)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    on_error = "skip" if args.skip_bad else "raise"
    try:
        raw = discover(args.source, args.layout, on_error)
        repository = resolve_repository(args.text_definition, raw.layout)
        dataset, report = convert_raw(
            raw,
            repository,
            val_fraction=args.val_fraction,
            seed=args.seed,
            image_size=args.image_size,
            limit=args.limit,
            on_error=on_error,
            progress=not args.no_progress,
        )
        validate_stpnet_dataset(dataset, repository)
    except (DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        if not args.skip_bad:
            print("(use --skip-bad to leave bad pairs out and get a count instead)", file=sys.stderr)
        return 1
    except ValueError as error:  # an option or text definition the conversion cannot use
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"text repository: {repository.name} ({', '.join(repository.categories)})")
    print(report.format())
    print("class balance:")
    print(format_class_balance(class_balance(dataset)))
    for option, target in (("--output", args.output), ("--parquet", args.parquet)):
        if target is None:
            continue
        try:
            save_stpnet_dataset(dataset, **{option[2:]: target}, overwrite=args.overwrite)
        except (DataError, OSError) as error:
            print(f"error: saving {option} {target} failed: {error}; {target} is as it was before", file=sys.stderr)
            return 1
        print(f"saved: {target}")
    if args.push_to_hub:
        import huggingface_hub

        try:
            push_stpnet_dataset(dataset, args.push_to_hub, private=args.private)
        except (OSError, huggingface_hub.errors.HfHubHTTPError) as error:  # requests' errors are OSErrors
            saved = "; the local copies above are complete" if args.output or args.parquet else ""
            print(
                f"error: upload to https://huggingface.co/datasets/{args.push_to_hub} failed: {error}{saved}\n"
                "Check the network and your token (`hf auth login` or HF_TOKEN).",
                file=sys.stderr,
            )
            return 1
        print(f"pushed: https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
