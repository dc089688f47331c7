"""The property-based tests with a larger example budget, and how their generated inputs ended.

    python benchmarks/fuzz.py                  # 20 x the CI budget -> benchmarks/results/fuzz.json
    python benchmarks/fuzz.py --scale 3 --output /tmp/fuzz.json

Runs ``tests/test_properties_*.py`` and the write-fault property of ``tests/test_faults.py`` in this process with
``$STPNET_FUZZ_SCALE`` set (``tests/properties.py``), then writes, per family, how many generated inputs (or
injected faults) ended in a correct result and how many in the package's own clear error; any other end (a
library's exception, a message that names nothing, a hang, a file left half written) fails the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks.common import RESULTS_DIR, command_line, load_average, write_results  # noqa: E402

TESTS = [
    "tests/test_properties_inputs.py",
    "tests/test_properties_files.py",
    "tests/test_faults.py::test_a_write_cut_off_at_any_byte_keeps_what_was_there",  # faults injected, not inputs
]
FAULTS = ("write faults",)  # families of injected faults, counted apart from generated inputs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=20, help="examples per test = CI budget x this (default 20)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "fuzz.json")
    args = parser.parse_args(argv)
    os.environ["STPNET_FUZZ_SCALE"] = str(args.scale)
    started, load = time.time(), load_average()
    status = pytest.main(["-q", "-p", "no:cacheprovider", *[str(HERE.parent / t) for t in TESTS]])
    from properties import TALLY  # the module the tests just filled (tests/ is on sys.path now)

    families: dict[str, dict[str, int]] = {}
    for (family, end), count in sorted(TALLY.items()):
        families.setdefault(family, {"result": 0, "clear error": 0})[end] = count
    inputs = {k: v for k, v in families.items() if k not in FAULTS}
    payload = {
        "command": command_line(),
        "scale": args.scale,
        "passed": status == 0,
        "inputs_tried": sum(sum(v.values()) for v in inputs.values()),
        "correct_results": sum(v["result"] for v in inputs.values()),
        "clear_errors": sum(v["clear error"] for v in inputs.values()),
        "faults_injected": sum(sum(families.get(k, {}).values()) for k in FAULTS),
        "other_ends": 0 if status == 0 else "see the pytest output: the run failed",
        "families": families,
        "seconds": round(time.time() - started, 1),
        "load_average_1_5_15_min_at_start": load,
    }
    print(f"{payload['inputs_tried']} inputs: {payload['correct_results']} correct results, "
          f"{payload['clear_errors']} clear errors; {payload['faults_injected']} faults injected; tests "
          f"{'passed' if status == 0 else 'FAILED'}")  # fmt: skip
    write_results(args.output, payload)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
