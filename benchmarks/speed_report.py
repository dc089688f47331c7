"""Tables and the chart of a `benchmarks/speed.py` results file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]


def results_payload(
    machine: dict[str, Any], memory_method: str, rows: list[dict[str, Any]], complete: bool = True
) -> dict[str, Any]:
    """The results file; `complete` is false in the copies written while the run goes on."""
    return {
        "complete": complete,
        "machine": machine,
        "command": common.command_line(),
        "notes": {
            "ratio_to_unet": "median over interleaved rounds of (model time / same-round time of the U-Net named in "
            "unet_reference: unet = base 64 for stpnet-paper, unet-c32 for stpnet-small, unet-c16 for stpnet-tiny)",
            "ratio_to_unet_iqr": "25th and 75th percentiles of the same per-round ratios",
            "latency_ms": "median wall time of one forward pass of the whole batch (train rows: one optimiser step: "
            "forward, Dice+BCE (+ retrieval focal losses for STPNet), backward, AdamW)",
            "gmacs": "multiply-accumulates per image of one eval forward pass (torch.utils.flop_counter / 2)",
            "peak_memory_mb": "peak memory of one steady-state call above what was resident before it (weights_mb, "
            "and for train rows the AdamW state, 2 x weights): activations, workspace, gradients; measured at the "
            "latency batch and for the training step (--memory-all: every row). Method: " + memory_method,
            "models": "random weights; STPNet text embeddings are the built-in placeholders (same cost as encoded)",
            "load": "load averages sampled after each setting; the machine is shared, so compare ratios, not ms",
        },
        "rows": rows,
    }


def _iqr_text(iqr: list[float] | None) -> str | None:
    return None if not iqr else f"{iqr[0]:.2f}-{iqr[1]:.2f}"


def print_table(payload: dict[str, Any]) -> None:
    columns = [
        ("model", "model", ""),
        ("mode", "mode", ""),
        ("dtype", "dtype", ""),
        ("form", "form", ""),
        ("image_size", "px", "d"),
        ("batch_size", "batch", "d"),
        ("latency_ms", "ms", ".1f"),
        ("throughput_img_s", "img/s", ".2f"),
        ("ratio_to_unet", "x unet", ".2f"),
        ("ratio_iqr", "IQR", ""),
        ("unet_reference", "vs", ""),
        ("params", "params", ",d"),
        ("gmacs", "GMACs", ".2f"),
        ("peak_memory_mb", "peak MiB", ".0f"),
    ]
    rows = [{**r, "form": form(r), "ratio_iqr": _iqr_text(r.get("ratio_to_unet_iqr"))} for r in payload["rows"]]
    print(common.format_table(rows, columns))
    m = payload["machine"]
    print(
        f"machine: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads; load averages (1/5/15 min) "
        f"at start {m['load_average_1_5_15_min_at_start']}, at end {m['load_average_1_5_15_min_at_end']}"
    )


def form(row: dict[str, Any]) -> str:
    """The row's form (see speed.VARIANTS); files written before forms existed say `compiled` / `optimized`."""
    if "form" in row:
        return row["form"]
    return "compiled" if row.get("compiled") else "optimized" if row.get("optimized", True) else "plain"


def _setting_header(row: dict[str, Any]) -> str:
    """`224 px b1`, `224 px b1 plain`, `224 px b1 onnx`, `224 px b1 bf16 compiled`, `train 224 px b2`."""
    shown = form(row) if row["mode"] == "inference" and form(row) != "optimized" else ""
    extra = (f" {row['dtype']}" if row["dtype"] != "fp32" else "") + (f" {shown}" if shown else "")
    prefix = "train " if row["mode"] == "train" else ""
    return f"{prefix}{row['image_size']} px b{row['batch_size']}{extra}"


def ratio_summary(payload: dict[str, Any]) -> str:
    """A Markdown table with one row per model and one column per setting: the ratio to the U-Net of the model's
    width with its interquartile range; then the first setting's latency and peak memory, parameters and GMACs."""
    headers: list[str] = []
    table: dict[str, dict[str, Any]] = {}
    for r in payload["rows"]:
        header = _setting_header(r)
        if header not in headers:
            headers.append(header)
        entry = table.setdefault(r["model"], {"model": r["model"], "params": r["params"] / 1e6, "gmacs": r["gmacs"]})
        iqr = _iqr_text(r.get("ratio_to_unet_iqr")) if not r["model"].startswith("unet") else None
        entry[header] = f"{r['ratio_to_unet']:.2f}" + (f" ({iqr})" if iqr else "")
        if header == headers[0]:
            entry["ms"], entry["memory"] = r["latency_ms"], r.get("peak_memory_mb")
    columns = [("model", "model", "")] + [(h, f"x U-Net, {h}", "") for h in headers]
    columns += [("ms", f"ms, {headers[0]}", ".1f"), ("memory", f"peak MiB, {headers[0]}", ".0f")]
    columns += [("params", "params (M)", ".2f"), ("gmacs", "GMACs", ".2f")]
    return common.format_table(list(table.values()), columns, markdown=True)


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart")
        return None
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in payload["rows"]:
        groups.setdefault(_setting_header(r), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 0.35 * max(map(len, groups.values())) + 1.5))
    axes = [axes] if len(groups) == 1 else list(axes)
    for ax, (key, rows) in zip(axes, groups.items()):
        names = [r["model"] for r in rows]
        ratios = [r["ratio_to_unet"] for r in rows]
        colours = ["#888888" if n.startswith("unet") else "#1f77b4" if "shared" in n else "#d62728" for n in names]
        ax.barh(names, ratios, color=colours)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(1.5, color="black", linewidth=0.8, linestyle="--", label="1.5x goal")
        for i, r in enumerate(rows):
            ax.text(r["ratio_to_unet"], i, f" {r['latency_ms']:.0f} ms", va="center", fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("time / U-Net of the same width")
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    axes[0].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"STPNet vs U-Net, {payload['machine']['cpu']} ({payload['machine']['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
