#!/usr/bin/env python
"""Speed and memory of every STPNet preset (own and "shared" retrieval backbone) against a U-Net of the same width.

    python benchmarks/speed.py                                  # 224 + 352 px, batch 1 + 16, train step, all presets
    python benchmarks/speed.py --presets stpnet-paper --sizes 224
    python benchmarks/speed.py --small                          # CI-style: 224 px, batch 1 + 4, fewer repeats

Per setting (image size x batch) all models run in one process, interleaved: every round times each model once,
in a rotated order, so load from other processes hits all rows alike. Reported: median latency per forward pass,
throughput, `ratio_to_unet` = median over rounds of (model time / same-round time of the U-Net of the model's own
width: `unet` = base 64 for stpnet-paper, `unet-c32` for stpnet-small, `unet-c16` for stpnet-tiny) with the
interquartile range of those per-round ratios, parameters, GMACs per image (torch.utils.flop_counter), peak memory
(`common.PeakMemory`, after the timing) and the training step (forward + backward + AdamW, Dice+BCE, plus the
retrieval losses for STPNet). On CUDA the inference rows are also run compiled (torch.compile), in bf16 and in bf16
compiled (`--variants` picks them on any device). The inference rows run the models as prediction does, rewritten by
`modeling_stpnet.optimize.optimize_for_inference` (`--plain`: as built), the training rows as training does
(`optimize_for_training`). Writes `benchmarks/results/<name>.json` and `<name>.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

from modeling_stpnet.optimize import optimize_for_inference, optimize_for_training  # noqa: E402  (common: sys.path)
from modeling_stpnet.summary import count_gmacs, count_parameters  # noqa: E402

MIN_TIMED_SECONDS = 0.05  # fast models repeat their forward pass within one timing to get above timer noise


# Inference variants: name -> (dtype, torch.compile). Compiling takes minutes per model on CPU.
VARIANTS = {
    "fp32": ("fp32", False),
    "fp32-compile": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16-compile": ("bf16", True),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", help="preset names (default: all in configuration/models)")
    parser.add_argument("--presets-dir", default=str(common.DEFAULT_PRESETS_DIR))
    parser.add_argument("--no-shared", action="store_true", help="skip the shared-backbone variants")
    parser.add_argument("--sizes", nargs="+", type=int, help="image sizes (default 224 352; --small: 224)")
    parser.add_argument("--latency-batch", type=int, default=1)
    parser.add_argument("--throughput-batch", type=int, help="default 16 (--small: 4); 0 skips")
    parser.add_argument("--repeats", type=int, help="timed rounds at the latency batch (default 7; --small: 3)")
    parser.add_argument("--throughput-repeats", type=int, help="timed rounds at the throughput batch (default 2)")
    parser.add_argument("--train-batch", type=int, default=2, help="training step batch; 0 skips the training rows")
    parser.add_argument("--train-size", type=int, help="training step image size (default: the first size)")
    parser.add_argument("--train-repeats", type=int, help="timed training steps per model (default 3; --small: 2)")
    parser.add_argument("--small", action="store_true", help="quick CI-style settings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        help="inference variants (default: fp32 on CPU; all of them on CUDA)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--name", help="results file stem (default speed or speed-small)")
    parser.add_argument("--output-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument(
        "--show", type=Path, metavar="JSON", help="only print a results file as a Markdown table of ratios (no run)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--plain", action="store_true", help="inference rows without optimize_for_inference")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="models and inputs in channels-last memory format (NHWC, oneDNN's own layout on CPU) for every row",
    )
    parser.add_argument(
        "--memory-all", action="store_true", help="also measure memory at the throughput batch (one more call each)"
    )
    args = parser.parse_args(argv)
    small = args.small
    args.sizes = args.sizes or ([224] if small else [224, 352])
    args.throughput_batch = args.throughput_batch if args.throughput_batch is not None else (4 if small else 16)
    args.repeats = args.repeats or (3 if small else 7)
    args.throughput_repeats = args.throughput_repeats or 2
    args.train_repeats = args.train_repeats or (2 if small else 3)
    args.train_size = args.train_size or args.sizes[0]
    args.name = args.name or ("speed-small" if small else "speed")
    args.variants = args.variants or (list(VARIANTS) if args.device.startswith("cuda") else ["fp32"])
    bad = [s for s in [*args.sizes, args.train_size] if s % 32]
    if bad:
        parser.error(f"image sizes must be multiples of 32, got {bad}")
    return args


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(steps: dict[str, Callable[[], Any]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of every step over `rounds` interleaved rounds, after one warm-up call each."""
    inner = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        _sync(device)
        warm = time.perf_counter() - t0
        inner[name] = max(1, min(20, math.ceil(MIN_TIMED_SECONDS / max(warm, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                steps[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / inner[name])
    return times


def inference_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    model.eval()  # the training rows leave their models in train mode

    def step() -> Any:
        with torch.inference_mode():
            return model(pixel_values=x)

    return step


def train_step(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], Any]:
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(x.shape[0], *x.shape[-2:], generator=g) > 0.7).float().to(device)
    kwargs: dict[str, torch.Tensor] = {"labels": labels}
    if getattr(model.config, "use_text", False):
        kwargs["text_labels"] = torch.stack(
            [torch.randint(0, len(s), (x.shape[0],), generator=g) for s in model.config.text_sentences], 1
        ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> Any:
        optimizer.zero_grad(set_to_none=True)
        loss = model(pixel_values=x, **kwargs).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    mode: str  # "inference" or "train"
    dtype: str
    compiled: bool
    size: int
    batch: int
    rounds: int

    @property
    def key(self) -> str:
        return f"{self.mode}|{self.dtype}|{int(self.compiled)}|{self.size}|{self.batch}"

    def label(self) -> str:
        extra = " compiled" if self.compiled else ""
        return f"{self.mode} {self.size}px batch {self.batch} {self.dtype}{extra}"


def all_settings(args: argparse.Namespace, device: torch.device) -> list[Setting]:
    out = []
    for dtype, compiled in (VARIANTS[v] for v in args.variants):
        out += [Setting("inference", dtype, compiled, s, args.latency_batch, args.repeats) for s in args.sizes]
        if args.throughput_batch:
            out += [
                Setting("inference", dtype, compiled, s, args.throughput_batch, args.throughput_repeats)
                for s in args.sizes
            ]
    if args.train_batch:
        out.append(Setting("train", "fp32", False, args.train_size, args.train_batch, args.train_repeats))
    return out


class ModelSet:
    """The models of one run, plus lazily made bf16 / compiled copies of them (`--variants`)."""

    def __init__(
        self,
        builds: dict[str, Callable[[], torch.nn.Module]],
        device: torch.device,
        channels_last: bool = False,
        plain: bool = False,
    ) -> None:
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.plain = plain
        self.fp32 = {
            name: build().eval().to(device, memory_format=self.memory_format) for name, build in builds.items()
        }
        self._variants: dict[tuple[str, bool], dict[str, torch.nn.Module]] = {}

    def get(self, dtype: str, compiled: bool) -> dict[str, torch.nn.Module]:
        if (dtype, compiled) not in self._variants:
            # The compiler makes its own kernels: it gets the rewrites that are plain graphs of standard operators.
            cpu_kernels = self.device.type == "cpu" and not compiled
            base = {
                n: m if self.plain else optimize_for_inference(copy.deepcopy(m), cpu_kernels)
                for n, m in self.fp32.items()
            }
            base = {n: copy.deepcopy(m).to(torch.bfloat16) if dtype == "bf16" else m for n, m in base.items()}
            self._variants[dtype, compiled] = {n: torch.compile(m) for n, m in base.items()} if compiled else base
        return self._variants[dtype, compiled]

    def steps(self, setting: Setting) -> dict[str, Callable[[], Any]]:
        dtype = torch.bfloat16 if setting.dtype == "bf16" else torch.float32
        seed = torch.Generator().manual_seed(setting.size * 1000 + setting.batch)
        x = torch.randn(setting.batch, 3, setting.size, setting.size, generator=seed).to(self.device, dtype)
        x = x.contiguous(memory_format=self.memory_format)
        if setting.mode == "train":
            return {
                n: train_step(optimize_for_training(copy.deepcopy(m), self.device), x, self.device)
                for n, m in self.fp32.items()
            }
        return {n: inference_step(m, x) for n, m in self.get(setting.dtype, setting.compiled).items()}


def measure_memory(models: ModelSet, settings: list[Setting], device: torch.device) -> tuple[str, dict[str, float]]:
    """Peak extra memory of one steady-state call per model and setting (training: after a first step, so AdamW's
    state already exists). Runs after all timing: pinning glibc's mmap threshold, which a truthful high-water mark
    needs, makes every large tensor page-fault anew and would slow the timed calls down."""
    memory = common.PeakMemory(device)
    peaks = {}
    for setting in settings:
        for name, step in models.steps(setting).items():
            if setting.mode == "train":
                step()
            memory.start()
            step()
            peaks[f"{setting.key}|{name}"] = memory.stop()
    memory.close()
    return memory.method, peaks


# ---------------------------------------------------------------------------------------------------- rows
def run(args: argparse.Namespace, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """All rows of the run; `progress` gets the payload so far after every setting (peak memory comes last)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = common.preset_configs(args.presets, args.presets_dir)
    specs = common.model_specs(presets, ["default"] if args.no_shared else ["default", "shared"])
    builds = {name: build for name, _, build in specs}
    reference = {name: ref for name, ref, _ in specs}
    machine = common.machine_info(device)
    load_samples = [common.load_average()]
    if load_samples[0] and load_samples[0][0] > 0.5 * (os.cpu_count() or 1) and device.type == "cpu":
        # Other jobs make multi-threaded ops wait for their slowest thread: models with many small ops (STPNet)
        # slow down more than the U-Net, so ratios drift upwards. One thread per process is far less sensitive.
        print(f"warning: load average {load_samples[0][0]} on {os.cpu_count()} cores; ratios will be inflated "
              "(consider --threads 1 or a quiet machine)")  # fmt: skip

    print(f"building {len(specs)} models: {', '.join(builds)}", flush=True)
    models = ModelSet(builds, device, args.channels_last, args.plain)
    static, gmacs = {}, {}
    for name, model in models.fp32.items():
        cpu_model = model if device.type == "cpu" else copy.deepcopy(model).cpu()
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        static[name] = {
            "params": count_parameters(model),
            "weights_mb": round(weights / 2**20, 1),
            **common.describe_model(model),
        }
        for size in sorted({*args.sizes, args.train_size}):
            gmacs[name, size] = count_gmacs(cpu_model, size)

    rows: list[dict[str, Any]] = []
    settings = all_settings(args, device)
    for setting in settings:
        print(f"{setting.label()}: {setting.rounds} rounds", flush=True)
        times = interleaved_times(models.steps(setting), setting.rounds, device)
        load_samples.append(common.load_average())
        for name, t in times.items():
            median = statistics.median(t)
            ratio, ratio_p25, ratio_p75 = common.paired_ratio(t, times[reference[name]])
            row = {
                "model": name,
                "mode": setting.mode,
                "dtype": setting.dtype,
                "compiled": setting.compiled,
                "memory_format": "channels_last" if args.channels_last else "contiguous",
                "optimized": setting.mode == "train" or not args.plain,
                "image_size": setting.size,
                "batch_size": setting.batch,
                "latency_ms": round(median * 1e3, 2),
                "latency_ms_min": round(min(t) * 1e3, 2),
                "ratio_to_unet": round(ratio, 3),
                "ratio_to_unet_iqr": [round(ratio_p25, 3), round(ratio_p75, 3)],
                "unet_reference": reference[name],
                "gmacs": round(gmacs[name, setting.size], 3),
                "peak_memory_mb": None,
                "rounds": setting.rounds,
                **static[name],
            }
            if setting.mode == "inference":
                row["throughput_img_s"] = round(setting.batch / median, 2)
            else:
                row["step_ms"] = row["latency_ms"]
            rows.append(row)
        if progress is not None:
            progress(results_payload(machine, "not measured yet", rows, complete=False))

    measured = [t for t in settings if args.memory_all or t.mode == "train" or t.batch == args.latency_batch]
    method, peaks = ("skipped (--no-memory)", {}) if args.no_memory else measure_memory(models, measured, device)
    for row in rows:
        key = f"{row['mode']}|{row['dtype']}|{int(row['compiled'])}|{row['image_size']}|{row['batch_size']}"
        peak = peaks.get(f"{key}|{row['model']}")
        row["peak_memory_mb"] = None if peak is None else round(peak, 1)

    machine["load_average_samples"] = load_samples
    machine["load_average_1_5_15_min_at_end"] = common.load_average()
    return results_payload(machine, method, rows)


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
        ("compiled", "compiled", ""),
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
    rows = [
        {**r, "compiled": "yes" if r.get("compiled") else "no", "ratio_iqr": _iqr_text(r.get("ratio_to_unet_iqr"))}
        for r in payload["rows"]
    ]
    print(common.format_table(rows, columns))
    m = payload["machine"]
    print(
        f"machine: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads; load averages (1/5/15 min) "
        f"at start {m['load_average_1_5_15_min_at_start']}, at end {m['load_average_1_5_15_min_at_end']}"
    )


def _setting_header(row: dict[str, Any]) -> str:
    """`224 px b1`, `224 px b1 bf16 compiled`, `train 224 px b2`."""
    extra = (f" {row['dtype']}" if row["dtype"] != "fp32" else "") + (" compiled" if row.get("compiled") else "")
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
        key = f"{r['mode']} {r['image_size']}px b{r['batch_size']} {r['dtype']}{' compiled' if r['compiled'] else ''}"
        groups.setdefault(key, []).append(r)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.show:
        payload = json.loads(args.show.read_text())
        print(ratio_summary(payload))
        m = payload["machine"]
        print(f"\n{m['cpu']} ({m['device']}), {m['torch_threads']} torch threads: `{payload['command']}`")
        return payload
    out = Path(args.output_dir)
    json_path = out / f"{args.name}.json"
    # Rewritten after every setting, so a run stopped at a time limit (a GPU lease) keeps the rows it measured.
    results = run(args, progress=lambda partial: common.write_results(json_path, partial))
    common.write_results(json_path, results)
    print_table(results)
    print(f"wrote {json_path}")
    if not args.no_chart and (chart := plot(results, out / f"{args.name}.png")):
        print(f"wrote {chart}")
    return results


if __name__ == "__main__":
    main()
