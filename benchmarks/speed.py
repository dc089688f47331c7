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
`optimize_for_inference` (`--variants fp32-plain`: as built; `fp32-onnx`: exported and run by onnxruntime), the
training rows as training does (`optimize_for_training`). Writes `benchmarks/results/<name>.json` and `<name>.png`.

    python benchmarks/speed.py --presets stpnet-paper --sizes 224 --variants fp32-plain fp32 fp32-onnx  # deploy forms
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    from . import common
    from .speed_report import plot, print_table, ratio_summary, results_payload
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]
    from speed_report import plot, print_table, ratio_summary, results_payload  # type: ignore[no-redef]

from benchmarks.summary import count_gmacs, count_parameters  # noqa: E402
from stpnet.optimize import optimize_for_inference, optimize_for_training  # noqa: E402  (common: sys.path)

MIN_TIMED_SECONDS = 0.05  # fast models repeat their forward pass within one timing to get above timer noise


# Inference variants: name -> (dtype, form). Forms: "optimized" = rewritten by optimize_for_inference (the deploy
# path of prediction), "plain" = the model as built, "compiled" = optimized + torch.compile (minutes per model on
# CPU), "onnx" = exported (stpnet.onnx_export, static shapes per setting) and run by onnxruntime on the CPU.
VARIANTS = {
    "fp32": ("fp32", "optimized"),
    "fp32-plain": ("fp32", "plain"),
    "fp32-onnx": ("fp32", "onnx"),
    "fp32-compile": ("fp32", "compiled"),
    "bf16": ("bf16", "optimized"),
    "bf16-compile": ("bf16", "compiled"),
}
GPU_VARIANTS = ["fp32", "fp32-compile", "bf16", "bf16-compile"]


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
        help="inference variants (default: fp32 on CPU; fp32, bf16 and both compiled on CUDA); e.g. fp32-plain "
        "fp32 fp32-onnx for the plain model, the deploy path and onnxruntime",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--name", help="results file stem (default speed or speed-small)")
    parser.add_argument("--output-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument(
        "--show", type=Path, metavar="JSON", help="only print a results file as a Markdown table of ratios (no run)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
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
    args.variants = args.variants or (GPU_VARIANTS if args.device.startswith("cuda") else ["fp32"])
    if "fp32-onnx" in args.variants and not args.device.startswith("cpu"):
        parser.error("fp32-onnx runs onnxruntime on the CPU: use it with --device cpu")
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
    form: str  # see VARIANTS; the training step always runs optimize_for_training's form
    size: int
    batch: int
    rounds: int

    @property
    def key(self) -> str:
        return f"{self.mode}|{self.dtype}|{self.form}|{self.size}|{self.batch}"

    def label(self) -> str:
        extra = "" if self.form == "optimized" else f" {self.form}"
        return f"{self.mode} {self.size}px batch {self.batch} {self.dtype}{extra}"


def all_settings(args: argparse.Namespace, device: torch.device) -> list[Setting]:
    out = []
    for dtype, form in (VARIANTS[v] for v in args.variants):
        out += [Setting("inference", dtype, form, s, args.latency_batch, args.repeats) for s in args.sizes]
        if args.throughput_batch:
            out += [
                Setting("inference", dtype, form, s, args.throughput_batch, args.throughput_repeats) for s in args.sizes
            ]
    if args.train_batch:
        out.append(Setting("train", "fp32", "optimized", args.train_size, args.train_batch, args.train_repeats))
    return out


class ModelSet:
    """The models of one run, plus lazily made forms of them (`--variants`): rewritten, plain, compiled, bf16, ONNX."""

    def __init__(
        self, builds: dict[str, Callable[[], torch.nn.Module]], device: torch.device, channels_last: bool = False
    ) -> None:
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.fp32 = {
            name: build().eval().to(device, memory_format=self.memory_format) for name, build in builds.items()
        }
        self._variants: dict[tuple[str, str], dict[str, torch.nn.Module]] = {}
        self._onnx: dict[tuple[str, int, int], Any] = {}
        self._onnx_dir: tempfile.TemporaryDirectory | None = None

    def get(self, dtype: str, form: str) -> dict[str, torch.nn.Module]:
        if (dtype, form) not in self._variants:
            # The compiler makes its own kernels: it gets the rewrites that are plain graphs of standard operators.
            cpu_kernels = self.device.type == "cpu" and form != "compiled"
            base = {
                n: m if form == "plain" else optimize_for_inference(copy.deepcopy(m), cpu_kernels)
                for n, m in self.fp32.items()
            }
            base = {n: copy.deepcopy(m).to(torch.bfloat16) if dtype == "bf16" else m for n, m in base.items()}
            self._variants[dtype, form] = {n: torch.compile(m) for n, m in base.items()} if form == "compiled" else base
        return self._variants[dtype, form]

    def onnx_session(self, name: str, size: int, batch: int) -> Any:
        """An onnxruntime session of the model exported as ONNX export does it (the portable rewrites), for one input
        shape, on as many threads as torch uses so both runtimes get the same cores."""
        key = (name, size, batch)
        if key not in self._onnx:
            import onnxruntime as ort

            from stpnet.onnx_export import export

            if self._onnx_dir is None:
                self._onnx_dir = tempfile.TemporaryDirectory(prefix="speed-onnx-")
            path = Path(self._onnx_dir.name) / f"{name}-{size}-{batch}.onnx"
            model = optimize_for_inference(copy.deepcopy(self.fp32[name]).cpu(), cpu_kernels=False)
            export(model, path, size, batch=batch)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            self._onnx[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._onnx[key]

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
        if setting.form == "onnx":
            inputs = {"pixel_values": x.cpu().numpy()}
            sessions = {n: self.onnx_session(n, setting.size, setting.batch) for n in self.fp32}
            return {n: functools.partial(session.run, None, inputs) for n, session in sessions.items()}
        return {n: inference_step(m, x) for n, m in self.get(setting.dtype, setting.form).items()}


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
    models = ModelSet(builds, device, args.channels_last)
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
    row_keys: list[str] = []  # each row's key in measure_memory's peaks
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
                "form": setting.form,
                "compiled": setting.form == "compiled",
                "memory_format": "channels_last" if args.channels_last else "contiguous",
                "optimized": setting.form != "plain",
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
            row_keys.append(f"{setting.key}|{name}")
        if progress is not None:
            progress(results_payload(machine, "not measured yet", rows, complete=False))

    measured = [t for t in settings if args.memory_all or t.mode == "train" or t.batch == args.latency_batch]
    method, peaks = ("skipped (--no-memory)", {}) if args.no_memory else measure_memory(models, measured, device)
    for row, key in zip(rows, row_keys):
        peak = peaks.get(key)
        row["peak_memory_mb"] = None if peak is None else round(peak, 1)

    machine["load_average_samples"] = load_samples
    machine["load_average_1_5_15_min_at_end"] = common.load_average()
    return results_payload(machine, method, rows)


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
