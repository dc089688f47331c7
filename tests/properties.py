"""What the property-based tests share: their example budget, the rule every generated input must obey, and a tally
of the outcomes (``benchmarks/fuzz.py`` reports it).

The rule: every input ends in a correct result (each test checks what correct means) or in the package's own
error, raised by the package's code (not a library's exception passing through), whose message names the file or
value at fault; never in a hang (a watchdog fails an example that runs too long).
"""

from __future__ import annotations

import os
import signal
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

# CI runs a fixed, derandomised budget (the same examples on every run, a few seconds per test); the benchmark
# (benchmarks/fuzz.py) sets this to a larger factor.
SCALE_ENV = "STPNET_FUZZ_SCALE"
WATCHDOG_S = 60
TALLY: Counter[tuple[str, str]] = Counter()
T = TypeVar("T")


def budget(examples: int) -> settings:
    """``@settings`` for a property test: ``examples`` in CI, times ``$STPNET_FUZZ_SCALE`` in the benchmark."""
    scale = max(1, int(os.environ.get(SCALE_ENV, "1")))
    return settings(
        max_examples=examples * scale,
        derandomize=True,
        deadline=None,  # a busy 2-core machine makes timings noisy; the watchdog catches real hangs
        database=None,  # nothing written into the checkout; derandomised runs need no replay store
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Hang(BaseException):
    """An example ran past the watchdog (a BaseException, so no ``except Exception`` in the code under test eats it)."""


@contextmanager
def watchdog(seconds: int = WATCHDOG_S) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def raised_by_package(error: BaseException) -> bool:
    """The innermost frame of the traceback lies in our code (``stpnet``, ``modeling_stpnet``), not in a library."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = (f"{os.sep}stpnet{os.sep}", f"{os.sep}modeling_stpnet{os.sep}")
    return bool(frames) and any(folder in frames[-1].filename for folder in ours)


def outcome(
    test: str,
    call: Callable[[], T],
    errors: tuple[type[BaseException], ...],
    names: Sequence[str],
) -> T | None:
    """``call()``'s result, or None after one of ``errors`` that the package raised and whose message names one of
    ``names`` (the file, the value or the argument at fault). Anything else fails the example."""
    try:
        with watchdog():
            result = call()
    except errors as error:
        message = str(error)
        assert raised_by_package(error), f"a library's {type(error).__name__} passed through: {message}"
        assert any(name in message for name in names), f"the message names none of {list(names)}: {message}"
        TALLY[test, "clear error"] += 1
        return None
    TALLY[test, "result"] += 1
    return result
