#!/usr/bin/env python
"""Where an STPNet forward pass spends its time, against the U-Net of its width, optionally before/after a change.

    python benchmarks/breakdown.py --preset stpnet-paper --variant shared --size 224
    python benchmarks/breakdown.py --baseline-ref HEAD --json benchmarks/results/optimisation.json --profile
    python benchmarks/breakdown.py --train --batch 8 --size 128 --preset stpnet-tiny --baseline-ref HEAD
    python benchmarks/breakdown.py --optimize --rounds 15 --threads 1

Times every top-level block (stem, down blocks, SSA, retrieval, UTrans, its reconstruct steps, up blocks, fusion
blocks, head) with forward hooks, CPU fp32, interleaved rounds, medians. `--baseline-ref REF` also loads
`modeling_stpnet` as it was at git revision REF (extracted to a temporary folder) with the same weights, checks that
both give the same logits and reports both against the U-Net and the working tree's model against REF's directly
(median and interquartile range of the per-round ratios). `--profile` adds torch.profiler's top operators for the
current model. `--train` times training steps instead (train mode, forward with the Dice + BCE and retrieval losses,
backward; block times are then those of the forward part) and compares losses and gradients before/after.
`--optimize` adds the model as rewritten by `stpnet.optimize` (`optimize_for_inference`, with `--train`
`optimize_for_training`) beside the plain one, the U-Net rewritten too, and reports the rewritten model against
the plain one, paired round by round.

Each row also counts the minor page faults per forward pass (fresh pages the kernel had to hand out and zero, i.e.
memory the allocator returned and took back; Linux/macOS `getrusage`). Rerun with `--keep-memory` (glibc keeps what
it frees: `stpnet.cpu_memory`, what `stpnet-predict` does on CPU) or with the same settings from the
environment (`MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=536870912`) to see
what they cost each model.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

from stpnet.cpu_memory import keep_freed_memory  # noqa: E402  (common puts the checkout on sys.path)
from stpnet.optimize import optimize_for_inference, optimize_for_training  # noqa: E402

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]


def minor_faults() -> int | None:
    """Minor page faults of this process so far (all threads), or None where getrusage is missing."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None


BLOCKS = (
    ["stem"]
    + [f"down_blocks.{i}" for i in range(4)]
    + [f"ssa.{i}" for i in range(3)]
    + ["retrieval", "utrans"]
    # the decoder: each scale's transformer map is brought to full size right before its fusion
    + [n for i, s in enumerate((3, 2, 1, 0)) for n in (f"up_blocks.{i}", f"utrans.reconstruct.{s}", f"fusions.{i}")]
    + ["head"]
)


def load_baseline_package(ref: str, folder: Path) -> Any:
    """`modeling_stpnet` at git revision `ref`, imported under the name `stpnet_baseline`."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "modeling_stpnet"], cwd=common.ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "modeling_stpnet").rename(folder / "stpnet_baseline")
    sys.path.insert(0, str(folder))
    return importlib.import_module("stpnet_baseline")


class BlockTimer:
    """Wall time of named submodules through forward pre/post hooks (eager CPU runs them one after another)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self._start: dict[str, float] = {}
        modules = dict(model.named_modules())
        for name in names:
            if name in modules:
                modules[name].register_forward_pre_hook(self._pre(name))
                modules[name].register_forward_hook(self._post(name))

    def _pre(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.times[name].append(time.perf_counter() - self._start[name])

        return hook

    def medians_ms(self) -> dict[str, float]:
        return {n: round(statistics.median(v) * 1e3, 2) for n, v in self.times.items()}

    def clear(self) -> None:
        self.times.clear()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="stpnet-paper")
    parser.add_argument("--variant", default="shared", choices=sorted(common.VARIANT_OVERRIDES))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--baseline-ref", help="git revision whose modeling_stpnet is the 'before' model")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators")
    parser.add_argument("--train", action="store_true", help="time training steps (forward + losses + backward)")
    parser.add_argument("--optimize", action="store_true", help="add the model rewritten by stpnet.optimize")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--keep-memory",
        action="store_true",
        help="keep freed memory in the process (stpnet.cpu_memory, as stpnet-predict does on CPU)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_memory else False

    config = common.variant_config(common.preset_configs([args.preset])[args.preset], args.variant)
    name = common.variant_name(args.preset, args.variant)
    (unet_spec,) = [s for s in common.model_specs({args.preset: config}, []) if s[0].startswith("unet")]
    models: dict[str, nn.Module] = {unet_spec[0]: unet_spec[2]().train(args.train)}
    torch.manual_seed(0)
    models[name] = common.STPNetForSemanticSegmentation(config).train(args.train)
    optimized_name = f"{name} (optimized)"
    if args.optimize:

        def rewrite(model: nn.Module) -> nn.Module:
            return optimize_for_training(model, "cpu") if args.train else optimize_for_inference(model)

        rewrite(models[unet_spec[0]])
        models[optimized_name] = rewrite(copy.deepcopy(models[name]))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    targets = {  # only used with --train; the U-Net ignores the text labels
        "labels": (torch.rand(args.batch, args.size, args.size, generator=generator) > 0.7).float(),
        "text_labels": torch.zeros(args.batch, config.num_text_categories, dtype=torch.long),
    }

    def step(model: nn.Module) -> Any:
        """One timed call: a forward pass, or with --train a forward with the losses and the backward."""
        if not args.train:
            return model(x)
        model.zero_grad(set_to_none=True)
        output = model(x, **targets)
        output.loss.backward()
        return output

    result: dict[str, Any] = {
        "machine": common.machine_info(torch.device("cpu")),
        "command": common.command_line(),
        "setting": {
            "mode": "train" if args.train else "inference",
            "image_size": args.size,
            "batch_size": args.batch,
            "rounds": args.rounds,
            "dtype": "fp32",
            "optimize": args.optimize,
        },
        "malloc_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "keep_freed_memory": kept,
    }

    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline_ref:
            result["baseline"] = {
                "ref": args.baseline_ref,
                "commit": subprocess.run(
                    ["git", "rev-parse", args.baseline_ref], cwd=common.ROOT, capture_output=True, text=True
                ).stdout.strip(),
                "note": "the 'before' model is modeling_stpnet at this commit; 'after' is the working tree",
            }
            baseline = load_baseline_package(args.baseline_ref, Path(tmp))
            before = baseline.STPNetForSemanticSegmentation(baseline.STPNetConfig(**config.to_diff_dict()))
            before.train(args.train).load_state_dict(models[name].state_dict())
            before_name = f"{name} (before: {args.baseline_ref})"
            models[before_name] = before
            with torch.inference_mode(not args.train):
                new, old = step(models[name]), step(before)
            result["equivalence"] = {
                "max_abs_logit_diff": (new.logits - old.logits).abs().max().item(),
                "max_abs_logit": old.logits.abs().max().item(),
                "mask_agreement": ((new.logits > 0) == (old.logits > 0)).float().mean().item(),
                "retrieved_indices_equal": bool(torch.equal(new.retrieved_indices, old.retrieved_indices)),
            }
            if args.optimize:
                with torch.inference_mode(not args.train):
                    rewritten = step(models[optimized_name])
                difference = (rewritten.logits - old.logits).abs().max().item()
                result["equivalence"]["optimized_max_abs_logit_diff"] = difference
            if args.train:
                gradients = {n: p.grad for n, p in before.named_parameters() if p.grad is not None}
                result["equivalence"] |= {
                    "loss_diff": abs(new.loss.item() - old.loss.item()),
                    "max_abs_grad_diff": max(
                        (p.grad - gradients[n]).abs().max().item() for n, p in models[name].named_parameters()
                    ),
                    "max_abs_grad": max(g.abs().max().item() for g in gradients.values()),
                }
        timers = {n: BlockTimer(m, BLOCKS) for n, m in models.items()}
        totals: dict[str, list[float]] = {n: [] for n in models}
        faults: dict[str, list[int]] = {n: [] for n in models}
        names = list(models)
        with torch.inference_mode(not args.train):
            for m in models.values():
                step(m)
            for t in timers.values():
                t.clear()
            for r in range(args.rounds):
                for n in names[r % len(names) :] + names[: r % len(names)]:
                    f0, t0 = minor_faults(), time.perf_counter()
                    step(models[n])
                    totals[n].append(time.perf_counter() - t0)
                    if f0 is not None:
                        faults[n].append(minor_faults() - f0)
        ref = unet_spec[0]
        rows = []
        for n in names:
            ratio, p25, p75 = common.paired_ratio(totals[n], totals[ref])
            rows.append(
                {
                    "model": n,
                    "image_size": args.size,
                    "batch_size": args.batch,
                    "latency_ms": round(statistics.median(totals[n]) * 1e3, 2),
                    "ratio_to_unet": round(ratio, 3),
                    "ratio_to_unet_iqr": [round(p25, 3), round(p75, 3)],
                    "unet_reference": ref,
                    "page_faults_per_forward": int(statistics.median(faults[n])) if faults[n] else None,
                    "blocks_ms": timers[n].medians_ms(),
                }
            )
        result["rows"] = rows
        if args.baseline_ref:  # the change itself, paired round by round: < 1 means faster than before
            ratio, p25, p75 = common.paired_ratio(totals[name], totals[before_name])
            result["after_vs_before"] = {"median": round(ratio, 4), "iqr": [round(p25, 4), round(p75, 4)]}
            if args.optimize:
                ratio, p25, p75 = common.paired_ratio(totals[optimized_name], totals[before_name])
                result["optimized_vs_before"] = {"median": round(ratio, 4), "iqr": [round(p25, 4), round(p75, 4)]}
        if args.optimize:
            ratio, p25, p75 = common.paired_ratio(totals[optimized_name], totals[name])
            result["optimized_vs_plain"] = {"median": round(ratio, 4), "iqr": [round(p25, 4), round(p75, 4)]}

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(3):
                    models[name](x)
            table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20)
            print(table)
    result["machine"]["load_average_1_5_15_min_at_end"] = common.load_average()

    print(f"{'block':<16}" + "".join(f"{n[:34]:>36}" for n in names))
    for block in BLOCKS:
        values = [r["blocks_ms"].get(block) for r in rows]
        if any(v is not None for v in values):
            print(f"{block:<16}" + "".join(f"{'-' if v is None else f'{v:.1f} ms':>36}" for v in values))
    page_kib = os.sysconf("SC_PAGE_SIZE") / 1024 if hasattr(os, "sysconf") else 4
    for r in rows:
        faults_text = ""
        if r["page_faults_per_forward"] is not None:
            mib = r["page_faults_per_forward"] * page_kib / 1024
            faults_text = f"  {r['page_faults_per_forward']} page faults ({mib:.0f} MiB fresh pages) per forward"
        low, high = r["ratio_to_unet_iqr"]
        ratio_text = f"x{r['ratio_to_unet']:.2f} (IQR {low:.2f}-{high:.2f}) vs {ref}"
        print(f"{r['model']:<40} {r['latency_ms']:>9.1f} ms  {ratio_text}{faults_text}")
    for key in ("after_vs_before", "optimized_vs_before", "optimized_vs_plain"):
        if key in result:
            change = result[key]
            low, high = change["iqr"]
            print(f"{key.replace('_vs_', ' / ')}, per round: {change['median']:.3f} (IQR {low:.3f}-{high:.3f})")
    if "equivalence" in result:
        print(f"before/after equivalence: {result['equivalence']}")
    print(
        f"load averages: start {result['machine']['load_average_1_5_15_min_at_start']}, "
        f"end {result['machine']['load_average_1_5_15_min_at_end']}"
    )
    if args.json:
        common.write_results(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
