"""This process's memory as the OS sees it, and giving freed heap memory back to it."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

import psutil

__all__ = ["rss", "trim_heap", "tune_heap"]

_process: psutil.Process | None = None


def rss() -> int:
    """Resident set size of this process, in bytes (one read of /proc on Linux)."""
    global _process
    if _process is None or _process.pid != os.getpid():  # a forked child is another process
        _process = psutil.Process()
    return int(_process.memory_info().rss)


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (OSError, AttributeError):
        return None


# glibc keeps freed blocks below its mmap threshold (which grows up to 32 MiB as large
# blocks are freed) in its heaps, where RSS still counts them. malloc_trim(0) gives
# the free pages back (~40 µs a call here).
_malloc_trim = _find_malloc_trim()


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS; False where that is not possible.

    Releases the GIL (a ctypes call): run it in a thread.
    """
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# The most glibc takes as an mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit): blocks up to
# this come from the heap and are reused once freed.
MMAP_THRESHOLD = 32 << 20


def tune_heap(retain: int) -> bool:
    """Keep freed blocks for reuse in a worker process; False where that is not possible.

    A worker's results are large arrays that come and go: freed, glibc gives blocks above
    its mmap threshold back at once, trims each thread's arena, and spreads threads over
    arenas that lose their memory when emptied, so the next array of the same size is
    fresh pages, faulted in and zeroed by the kernel. W7-p (2,047 tasks on 1 MiB arrays,
    2 worker processes) took 320,000-330,000 page faults per worker and run, 1.0-1.2 s;
    with one arena, blocks up to 32 MiB from the heap and the heap's top kept up to
    ``retain`` bytes (and the store no longer trimming without a memory limit), 130,000-
    240,000 and 0.6-0.86 s (``/tmp`` harness counting minflt of each worker, 5 runs).
    One arena costs little here: Python allocates under the GIL, and the kernels that
    run in parallel (numpy, BLAS) allocate their outputs before releasing it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, retain)))
