"""Quality results files (`benchmarks/quality.py`): the table, the chart, and merging files of separate runs.

Rows of one comparison are often trained by separate invocations (one per dataset, variant or seed, side by side on
different cores, or on different days); `merge_results` joins their files into one, refusing files whose settings
differ (other than in their seeds), so a merged table still compares rows trained identically.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

# Row order within a dataset (the order of quality.VARIANTS).
VARIANT_ORDER = ["unet", "default", "shared", "no-text", "no-ssa"]
# Settings every merged file must share; train_configs may differ in which datasets they name, seeds in which seeds
# they trained (a model's seeds from several files are pooled into one row).
SHARED_SETTINGS = ("level", "preset", "overrides")


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(runs: list[dict[str, Any]], dataset: str, params: dict[str, int]) -> list[dict[str, Any]]:
    """One row per model: mean ± std over seeds; per-image std averaged over seeds; retrieval accuracy means."""
    rows = []
    for name in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == name]
        dice, dice_std = _mean_std([r["dice"] for r in mine])
        iou, iou_std = _mean_std([r["iou"] for r in mine])
        row: dict[str, Any] = {
            "model": name,
            "dataset": dataset,
            "split": mine[0]["reported_split"],
            "dice": dice,
            "dice_std_over_seeds": dice_std,
            "iou": iou,
            "iou_std_over_seeds": iou_std,
            "dice_std_over_images": _mean_std([r["per_image_std"]["dice"] for r in mine])[0],
            "iou_std_over_images": _mean_std([r["per_image_std"]["iou"] for r in mine])[0],
            "micro_dice": _mean_std([r["micro_dice"] for r in mine])[0],
            "seeds": [r["seed"] for r in mine],
            "num_images": mine[0]["num_images"],
            "image_size": mine[0]["image_size"],
            "params": params.get(name),
            "per_seed": mine,
        }
        accuracies = [r["retrieval_accuracy"] for r in mine if r["retrieval_accuracy"]]
        if accuracies:
            row["retrieval_accuracy"] = {
                c: _mean_std([a.get(c) for a in accuracies])[0] for c in accuracies[0]
            }  # fmt: skip
            # A property of the reported split (the same for every seed and model): the accuracy of always answering
            # its most frequent entry, the floor a retrieval head has to beat.
            floors = [r.get("retrieval_majority_baseline") for r in mine if r.get("retrieval_majority_baseline")]
            if floors:
                row["retrieval_majority_baseline"] = floors[0]
        rows.append(row)
    return rows


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """One results payload from several: rows of all files, ordered by dataset and variant, a model's seeds from
    several files pooled into one row (mean ± std over all of them), `sources` naming each file with its command and
    machine (a merged file's own sources in its place). Raises ValueError, naming the files, when their settings
    other than seeds differ, a seed of a model appears twice or a file is not a quality results file."""
    if not paths:
        raise ValueError("--merge needs at least one results file")
    payloads = []
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read a results file ({error})") from error
        if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list) or "settings" not in payload:
            raise ValueError(f"{path}: not a quality results file (needs 'settings' and 'rows')")
        payloads.append(payload)
    first, first_path = payloads[0]["settings"], paths[0]
    for path, payload in zip(paths[1:], payloads[1:]):
        for key in SHARED_SETTINGS:
            if payload["settings"].get(key) != first.get(key):
                raise ValueError(
                    f"{path} and {first_path} differ in settings.{key} ({payload['settings'].get(key)!r} vs "
                    f"{first.get(key)!r}): their rows were not trained identically"
                )
    _check_model_settings(paths, payloads)
    rows = _pool_seeds(paths, payloads)
    datasets = list(dict.fromkeys(dataset for dataset, _ in rows))

    def order(item: tuple[tuple[str, str], dict[str, Any]]) -> tuple[int, int]:
        (dataset, _), row = item
        variant = next((s.get("variant") for s in row.get("per_seed", []) if s.get("variant")), None)
        rank = VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)
        return datasets.index(dataset), rank

    seeds = sorted({seed for payload in payloads for seed in payload["settings"].get("seeds") or []})
    train_configs: dict[str, str] = {}
    for payload in payloads:
        train_configs.update(payload["settings"].get("train_configs") or {})
    return {
        "machine": payloads[0]["machine"],
        "command": common.command_line(),
        "sources": [source for path, p in zip(paths, payloads) for source in _sources(path, p)],
        "settings": {**first, "seeds": seeds, "train_configs": train_configs},
        "notes": payloads[0].get("notes", {}),
        "status": "complete" if all(p.get("status") == "complete" for p in payloads) else "partial",
        "rows": [row for _, row in sorted(rows.items(), key=order)],
    }


def _sources(path: Path, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The file with its command and machine, or for a merged file the sources it names."""
    return payload.get("sources") or [
        {"file": Path(path).name, "command": payload.get("command"), "machine": payload.get("machine")}
    ]


def _check_model_settings(paths: list[Path], payloads: list[dict[str, Any]]) -> None:
    """Raise ValueError, naming both runs and the settings, when two runs on one dataset were built with different
    model settings other than the ones their variants set: same settings and same code build alike, so a difference
    means a model default changed between the runs (equal `settings` cannot show that). Runs of files written before
    `model_settings` was recorded cannot be checked; a line on stderr names those files."""
    runs: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    unchecked: list[str] = []
    for path, payload in zip(paths, payloads):
        for row in payload["rows"]:
            for run in row.get("per_seed") or []:
                if "model_settings" in run:
                    runs.setdefault(row["dataset"], []).append((Path(path).name, run))
                elif Path(path).name not in unchecked:
                    unchecked.append(Path(path).name)
    if unchecked:
        print(f"[merge] cannot check the model settings of runs in {', '.join(unchecked)} "
              "(written before quality.py recorded them)", file=sys.stderr)  # fmt: skip
    for dataset, found in runs.items():
        for i, (path_a, a) in enumerate(found):
            for path_b, b in found[i + 1 :]:
                x, y = a["model_settings"], b["model_settings"]
                # same class: a key only one has is a setting the other predates; another class (the U-Net beside
                # STPNet): only the settings both have
                same_class = x.get("model_type") == y.get("model_type")
                keys = x.keys() | y.keys() if same_class else x.keys() & y.keys() - {"model_type"}
                for variant in (a.get("variant"), b.get("variant")):
                    keys -= common.VARIANT_OVERRIDES.get(variant, {}).keys()
                changes = common.model_settings_changes(x, y, keys)
                if changes:
                    described = "; ".join(f"{key} ({path_a}: {u}, {path_b}: {v})" for key, (u, v) in changes.items())
                    raise ValueError(
                        f"{a['model']} seed {a['seed']} and {b['model']} seed {b['seed']} on {dataset} were built with "
                        f"different model settings: {described}; their rows were not trained alike "
                        "(retrain the older rows, e.g. quality.py --retrain)"
                    )


def _pool_seeds(paths: list[Path], payloads: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """`{(dataset, model): row}` over all files; a model found in several files has its seeds pooled and its row
    aggregated again from the single-seed results. Raises ValueError when one seed of a model is in two files."""
    found: dict[tuple[str, str], list[tuple[Path, dict[str, Any]]]] = {}
    for path, payload in zip(paths, payloads):
        for row in payload["rows"]:
            found.setdefault((row["dataset"], row["model"]), []).append((path, row))
    rows = {}
    for (dataset, model), sources in found.items():
        if len(sources) == 1:
            rows[dataset, model] = sources[0][1]
            continue
        seen: dict[int, Path] = {}
        for path, row in sources:
            if "per_seed" not in row:
                raise ValueError(f"{path}: {model} on {dataset} has no per-seed results to pool with other files")
            for run in row["per_seed"]:
                if run["seed"] in seen:
                    first = seen[run["seed"]]
                    raise ValueError(f"{model} on {dataset}, seed {run['seed']}, is in both {first} and {path}")
                seen[run["seed"]] = path
        runs = sorted((run for _, row in sources for run in row["per_seed"]), key=lambda run: run["seed"])
        params = {model: next((row["params"] for _, row in sources if row.get("params")), None)}
        rows[dataset, model] = aggregate(runs, dataset, params)[0]
    return rows


def report(payload: dict[str, Any], chart: Path | None, markdown: bool = False) -> None:
    """Print the table of a results payload and, unless `chart` is None, chart it there."""
    print_table(payload, markdown=markdown)
    if chart is not None and plot(payload, chart):
        print(f"wrote {chart}")


def print_table(payload: dict[str, Any], markdown: bool = False) -> None:
    columns = [
        ("model", "model", ""),
        ("dataset", "dataset", ""),
        ("split", "split", ""),
        ("dice", "Dice", ".4f"),
        ("dice_std_over_seeds", "± seeds", ".4f"),
        ("iou", "IoU", ".4f"),
        ("iou_std_over_seeds", "± seeds", ".4f"),
        ("dice_std_over_images", "std img", ".3f"),
        ("num_images", "images", "d"),
        ("params_m", "params (M)", ".2f"),
        ("retrieval_mean", "retrieval acc.", ".3f"),
        ("seed_list", "seeds", ""),
    ]
    rows = [
        {
            **row,
            "params_m": row["params"] / 1e6 if row.get("params") else None,
            "retrieval_mean": (row.get("retrieval_accuracy") or {}).get("mean"),
            "seed_list": " ".join(map(str, row.get("seeds") or [])),
        }
        for row in payload["rows"]
    ]
    print(common.format_table(rows, columns, markdown=markdown))
    for row in payload["rows"]:
        if row.get("retrieval_accuracy"):
            floor = row.get("retrieval_majority_baseline") or {}
            acc = ", ".join(
                f"{c} {v:.3f}" + (f" ({floor[c]:.3f})" if floor.get(c) is not None else "")
                for c, v in row["retrieval_accuracy"].items()
                if v is not None
            )
            legend = " (majority-class floor)" if floor else ""
            print(f"  {row['model']} on {row['dataset']}: retrieval accuracy{legend} {acc}")


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    """Dice per model (bar: mean over seeds, whisker: ± std over seeds, dots: single seeds) and, below, retrieval
    accuracy per text category for the rows that retrieve, with the split's majority-class floor; one column per
    dataset."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart")
        return None
    datasets = list(dict.fromkeys(r["dataset"] for r in payload["rows"]))
    if not datasets:
        return None
    with_retrieval = any(r.get("retrieval_accuracy") for r in payload["rows"])
    n_rows = 2 if with_retrieval else 1
    fig, axes = plt.subplots(n_rows, len(datasets), figsize=(5.2 * len(datasets), 3.4 * n_rows), squeeze=False)
    for col, dataset in enumerate(datasets):
        rows = [r for r in payload["rows"] if r["dataset"] == dataset]
        ax = axes[0][col]
        names = [r["model"] for r in rows]
        colours = [_colour(n) for n in names]
        ax.barh(names, [r["dice"] or 0 for r in rows], xerr=[r.get("dice_std_over_seeds") or 0 for r in rows],
                color=colours, alpha=0.8, capsize=3)  # fmt: skip
        for i, r in enumerate(rows):
            seeds = [s["dice"] for s in r.get("per_seed", []) if s.get("dice") is not None]
            ax.plot(seeds, [i] * len(seeds), "k.", markersize=4)
            if r["dice"] is not None:
                ax.text(0.01, i, f"{r['dice']:.3f}", va="center", fontsize=7, color="white")
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"per-image Dice, {rows[0]['split']} ({rows[0]['num_images']} images)")
        seed_ids = sorted({seed for r in rows for seed in r.get("seeds") or []})
        ax.set_title(f"{dataset}: seeds {', '.join(map(str, seed_ids))} (dots: single seeds)", fontsize=9)
        if with_retrieval:
            _plot_retrieval(axes[1][col], [r for r in rows if r.get("retrieval_accuracy")])
    settings = payload.get("settings", {})
    fig.suptitle(f"quality, {settings.get('level', '?')} settings ({settings.get('preset', '?')}): "
                 f"{payload['machine']['cpu']}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _colour(name: str) -> str:
    if name.startswith("unet"):
        return "#888888"
    return {"-shared": "#1f77b4", "-no-text": "#2ca02c", "-no-ssa": "#ff7f0e"}.get(
        next((s for s in ("-shared", "-no-text", "-no-ssa") if name.endswith(s)), ""), "#d62728"
    )


def _plot_retrieval(ax: Any, rows: list[dict[str, Any]]) -> None:
    if not rows:
        ax.set_axis_off()
        return
    categories = [c for c in rows[0]["retrieval_accuracy"] if c != "mean"]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        values = [r["retrieval_accuracy"].get(c) or 0 for c in categories]
        ax.bar([k + (i - (len(rows) - 1) / 2) * width for k in range(len(categories))], values, width,
               color=_colour(r["model"]), label=r["model"])  # fmt: skip
    floor = next((r["retrieval_majority_baseline"] for r in rows if r.get("retrieval_majority_baseline")), None)
    if floor:
        for k, c in enumerate(categories):
            if floor.get(c) is not None:
                label = "majority-class floor" if k == 0 else None
                ax.hlines(floor[c], k - 0.45, k + 0.45, colors="black", linestyles="--", linewidth=1, label=label)
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("retrieval accuracy")
    ax.legend(fontsize=6, loc="upper right")
