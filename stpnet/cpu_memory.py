"""Keep freed memory in the process on CPU, so repeated forward passes stop paying for fresh pages.

A forward pass at 224 px allocates and frees about 100-140 MB of activations, mostly blocks larger than glibc's
mmap threshold. glibc hands such blocks back to the kernel when they are freed, so the next pass gets fresh pages
that the kernel must fault in and zero again: about 29 000 minor page faults per forward for the U-Net baseline and
34 000 for STPNet (`benchmarks/breakdown.py` counts them). Telling the allocator to keep what it frees removes them;
the price is that the process stays at its peak memory instead of shrinking between batches, which suits a
prediction job or a demo server. It changes process-wide state, so applications (the `stpnet-predict` command, the
demo) call it; the model code never does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 1 << 30  # allocations below 1 GiB come from the heap instead of mappings of their own
_INT_MAX = 2**31 - 1


def keep_freed_memory(top_pad_mib: int = 512) -> bool:
    """Stop glibc from returning freed memory to the kernel (Linux with glibc only).

    Sets `M_MMAP_THRESHOLD` to 1 GiB (large tensors come from the heap instead of their own mappings),
    `M_TRIM_THRESHOLD` to its maximum (the heap is never shrunk) and `M_TOP_PAD` to `top_pad_mib` (the heap grows
    in large steps). The same as starting Python with `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` and
    `MALLOC_TOP_PAD_` set. Returns True when the allocator took the settings, False where there is no glibc
    (macOS, Windows, musl), where it does nothing. A best effort: where the heap cannot grow in place (it depends
    on where other mappings landed in this process) glibc still hands out fresh pages.
    """
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = [
        (M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
        (M_TRIM_THRESHOLD, _INT_MAX),
        (M_TOP_PAD, min(_INT_MAX, top_pad_mib << 20)),
    ]
    return all(mallopt(param, value) == 1 for param, value in settings)


def limit_arenas(count: int) -> bool:
    """At most ``count`` glibc malloc arenas (Linux with glibc only; returns whether the allocator took it).

    glibc gives threads their own arenas (up to 8 per core) and each keeps the fragments of the largest requests its
    threads served. A server whose thread pool hands requests to ever other threads (Gradio's) then grows arena by
    arena under load; as many arenas as requests can run at once bound that (``benchmarks/load_demo.py``).
    """
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc.mallopt(M_ARENA_MAX, count) == 1


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (it has `mallopt` and `malloc_trim`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (musl has neither)
    except (OSError, AttributeError):
        return None
    return libc
