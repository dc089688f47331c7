"""Wording shared by error messages."""

from __future__ import annotations

from collections.abc import Sequence


def first_few(names: Sequence[str], limit: int = 3) -> str:
    """``"a, b, c and 4 more"``: enough names to find the problem without flooding the message."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
