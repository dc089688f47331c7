#!/usr/bin/env python
"""Every GPU check of this repository in one command, sized for a short lease of a GPU machine.

    PYTHONUNBUFFERED=1 python3 benchmarks/device_checks.py --out "$OUT"        # on the GPU machine, repo root
    python benchmarks/device_checks.py --dry-run --out /tmp/checks             # rehearsal on a CPU (the test)

Steps, each a subprocess with its own time limit, cut to what is left of `--budget` seconds:

1. `info`: torch, CUDA and the GPU (fails the run at once if no GPU is visible, unless --dry-run).
2. `tests`: `tests/test_cuda.py` (the GPU against the CPU: eval logits and retrieval, a training step's loss and
   gradients, bf16, torch.compile, the predictor).
3. `speed`: `speed.py` on the GPU, every preset with and without the shared backbone and the U-Nets, fp32 and bf16,
   224 and 352 px, batch 1 and 16, training step, peak memory -> `<out>/speed-gpu.json` / `.png`.
4. `speed-compile-fp32`, `speed-compile-bf16`: stpnet-paper's rows (own and shared backbone, and the U-Net) eager
   and `torch.compile`d, 224 px batch 1 -> `<out>/speed-gpu-compile-<dtype>.json` / `.png` (compiling is what takes
   the time here; one file per dtype, so if the budget cuts the second one off the first one's rows remain).

It needs only torch, transformers, pytest and matplotlib (no dataset, no text encoder: the models keep their
placeholder text embeddings, which cost the same as encoded ones). A step that fails or runs out of time is recorded
and the next one still runs (speed.py rewrites its results file after every setting, so a step cut off keeps the rows
it measured, marked `"complete": false`). Everything printed also goes to `<out>/device_checks.log`, and a summary
(per step: exit status, seconds, timed out) to `<out>/device_checks.json`; the exit status is non-zero if any step
failed, timed out or was skipped.
Copy the JSON and PNG files into `benchmarks/results/` to commit them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]

INFO = (
    "import platform, torch, transformers; "
    "print('python', platform.python_version(), '| torch', torch.__version__, '| transformers', "
    "transformers.__version__, '| CUDA', torch.version.cuda); "
    "n = torch.cuda.device_count(); "
    "print('GPUs:', [torch.cuda.get_device_name(i) for i in range(n)] or 'none'); "
    "import sys; sys.exit(0 if n or {dry} else 3)"
)


def steps(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    """`(name, command, own time limit in seconds)` in the order they run."""
    python, speed, out = sys.executable, str(ROOT / "benchmarks" / "speed.py"), str(args.out)
    if args.dry_run:  # the same commands at CPU-sized settings: stpnet-tiny only, tiny images, no compiling
        device = ["--device", "cpu", "--presets", "stpnet-tiny", "--no-shared", "--sizes", "96", "--repeats", "2"]
        full = [*device, "--throughput-batch", "2", "--train-batch", "1", "--train-repeats", "1"]
        compiled = {dtype: [*device, "--variants", "fp32"] for dtype in ("fp32", "bf16")}
    else:
        full = ["--device", "cuda", "--variants", "fp32", "bf16", "--repeats", "20"]
        full += ["--throughput-repeats", "5", "--train-repeats", "5"]
        device = ["--device", "cuda", "--presets", "stpnet-paper", "--sizes", "224", "--repeats", "20"]
        compiled = {dtype: [*device, "--variants", dtype, f"{dtype}-compile"] for dtype in ("fp32", "bf16")}
    once = ["--throughput-batch", "0", "--train-batch", "0", "--no-memory"]
    return [
        ("info", [python, "-c", INFO.format(dry=args.dry_run)], 60),
        ("tests", [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_cuda.py")],
         180),
        ("speed", [python, speed, *full, "--name", "speed-gpu", "--output-dir", out], 200),
        # One results file per dtype, so a second one cut off by the budget leaves the first one's rows.
        *((f"speed-compile-{dtype}", [python, speed, *compiled[dtype], *once, "--name", f"speed-gpu-compile-{dtype}",
           "--output-dir", out], 10_000) for dtype in ("fp32", "bf16")),
    ]  # fmt: skip


def run_step(command: list[str], limit: float, log: TextIO) -> tuple[int | None, bool]:
    """Run `command` in the repository root, streaming its output to stdout and `log`; `(exit status, timed out)`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )

    def copy_output() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    try:
        status, timed_out = process.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        process.kill()
        status, timed_out = process.wait(), True
    reader.join(timeout=10)
    return status, timed_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the log, the summary and the results")
    parser.add_argument("--budget", type=float, default=500.0, help="seconds for all steps together (default 500)")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal at tiny settings (no GPU needed)")
    parser.add_argument(
        "--only", nargs="+", help="run only these steps (info, tests, speed, speed-compile-fp32, speed-compile-bf16)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    summary: dict[str, Any] = {"dry_run": args.dry_run, "budget_s": args.budget, "steps": []}
    with open(args.out / "device_checks.log", "w", encoding="utf-8") as log:
        for name, command, own_limit in steps(args):
            if args.only and name not in args.only:
                continue
            left = args.budget - (time.monotonic() - start)
            header = f"\n=== {name} (limit {min(own_limit, left):.0f} s): {' '.join(command)}\n"
            sys.stdout.write(header)
            log.write(header)
            if left < 5:
                summary["steps"].append({"step": name, "skipped": "budget spent"})
                continue
            t0 = time.monotonic()
            status, timed_out = run_step(command, min(own_limit, left), log)
            seconds = round(time.monotonic() - t0, 1)
            summary["steps"].append({"step": name, "exit_status": status, "seconds": seconds, "timed_out": timed_out})
            log.flush()
            if name == "info" and status != 0:
                break  # no GPU: nothing after this would mean anything
    summary["seconds"] = round(time.monotonic() - start, 1)
    failed = [s["step"] for s in summary["steps"] if s.get("exit_status") != 0]
    summary["not_passed"] = failed  # failed, timed out or skipped for want of time
    (args.out / "device_checks.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{json.dumps(summary)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
