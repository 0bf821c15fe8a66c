"""This process's memory as the OS sees it, and giving freed heap memory back to it."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

import psutil

__all__ = ["rss", "trim_heap"]

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
