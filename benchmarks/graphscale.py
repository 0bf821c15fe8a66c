"""G10k, G1M, G10M: one large graph, spawned then run, at three sizes.

The graph is a tree reduction, the shape of a map-reduce over many small pieces (a sum
over a bag's partitions, a histogram over files): ``n`` leaves ``inc(i)``, every
``FAN`` (100) gathered by a ``tree_total`` task, every 100 of those by another, up to
one root, which is all the caller awaits. It is built as it is spawned, as a program
reading its input would: the caller never holds more than 100 handles per level, so
what stays in memory between spawning and running is the scheduler's (and the
arguments it keeps for the tasks), not a list of a million handles in the benchmark.

Each run reports three figures: the spawn rate (tasks per second while the graph is
spawned, nothing awaited, so nothing runs), the run rate (tasks per second from the
first await to the root's value) and the memory per pending task, measured between the
two. Memory is the allocators' bytes in use (pymalloc's allocated blocks, from
``sys._debugmallocstats``, plus glibc's ``mallinfo2`` in-use and mmapped bytes) after
spawning minus before, over the tasks. Not RSS: memory freed by earlier runs is reused
without growing RSS (three runs of 10,101 tasks in one process grew RSS by 772, 267 and
45 B per task), so the delta would say less the more had run before. Not tracemalloc:
it slows allocation several times and allocates a trace per block itself, so the rates
could not come from the same run. The allocators' count agrees with tracemalloc's
(631-690 B/task against tracemalloc's 701 for 100,000 leaves, which also counts the
first growth of the scheduler's set of live tasks).
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.workloads import FAN, inc, tree_total

SPAWN_RATE = "spawn tasks/s"
RUN_RATE = "run tasks/s"
BYTES_PER_TASK = "B/task pending"
PEAK_RSS = "peak RSS GiB"


def build_tree(leaf: Callable[[int], Any], reduce: Callable[..., Any], n: int) -> tuple[Any, int]:
    """Spawn the tree over ``n`` leaves through ``leaf(i)`` and ``reduce(*handles)``;
    return the root's handle and how many tasks were spawned."""
    levels: list[list[Any]] = [[]]
    tasks = 0
    for i in range(n):
        t = leaf(i)
        tasks += 1
        k = 0
        while True:
            level = levels[k]
            level.append(t)
            if len(level) < FAN:
                break
            t = reduce(*level)
            tasks += 1
            levels[k] = []
            k += 1
            if k == len(levels):
                levels.append([])
    carry: list[Any] = []
    for level in levels:  # the partial groups, carried up to one root
        group = level + carry
        if len(group) > 1:
            carry = [reduce(*group)]
            tasks += 1
        else:
            carry = group
    return carry[0], tasks


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2() -> Callable[[], _Mallinfo2] | None:
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc 2.33 and later
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn  # type: ignore[no-any-return]


_MALLINFO2 = _mallinfo2()


def _pymalloc_bytes() -> int | None:
    """Bytes in pymalloc's allocated blocks (its report goes to C's stderr: fd 2)."""
    if not hasattr(sys, "_debugmallocstats"):
        return None
    with tempfile.TemporaryFile(mode="w+") as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        for line in out:
            if line.startswith("# bytes in allocated blocks"):
                return int(line.split("=")[1].replace(",", ""))
    return None  # PYTHONMALLOC=malloc: everything is malloc's, counted below


def allocated_bytes() -> int | None:
    """Bytes the process's allocators hold for live objects; None where not measurable."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return (_pymalloc_bytes() or 0) + info.uordblks + info.hblkhd


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss_sampled(interval: float = 0.02) -> Iterator[list[int]]:
    """This process's peak RSS, sampled by a thread every ``interval`` s (the event loop
    is busy spawning for most of the run, so a coroutine would not sample); yields [bytes]."""
    peak = [_rss()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=sample, name="bench-rss", daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss())


async def run_tree(
    leaf: Callable[[int], Any],
    reduce: Callable[..., Any],
    wait: Callable[[Any], Any],
    n: int,
    rss: bool = False,
    memory: bool = True,
) -> tuple[Any, float, float, dict[str, float]]:
    """Spawn the tree, measure, run it; returns the root's value, the seconds spawning,
    the seconds running (from the first await to the value) and the measurements.

    ``wait(root)`` is awaited for the value. ``rss`` adds both phases' seconds and the
    peak RSS over them to the measurements (G10M). ``memory=False``: no bytes per task,
    for a system whose scheduler is not (yet) in this process's memory after spawning.
    """
    gc.collect()
    with peak_rss_sampled() if rss else _no_sampler() as peak:
        before = allocated_bytes() if memory else None
        t0 = time.perf_counter()
        root, tasks = build_tree(leaf, reduce, n)
        t1 = time.perf_counter()
        after = allocated_bytes() if memory else None
        value = await wait(root)
        t2 = time.perf_counter()
    del root
    stages = {SPAWN_RATE: tasks / (t1 - t0)}
    if before is not None and after is not None:
        stages[BYTES_PER_TASK] = (after - before) / tasks
    if rss:  # G10M: its figure is the wall time, so the run rate is a measurement too
        stages[RUN_RATE] = tasks / (t2 - t1)
        stages["spawn s"] = t1 - t0
        stages["run s"] = t2 - t1
        stages[PEAK_RSS] = peak[0] / 2**30
    return value, t1 - t0, t2 - t1, stages


@contextmanager
def _no_sampler() -> Iterator[list[int]]:
    yield [0]


__all__ = ["BYTES_PER_TASK", "PEAK_RSS", "RUN_RATE", "SPAWN_RATE", "allocated_bytes",
           "build_tree", "inc", "peak_rss_sampled", "run_tree", "tree_total"]
