"""Full garbage collections spaced out while this process's clusters hold a large graph.

CPython's cyclic collector runs a full (generation-2) collection whenever the objects
that have survived into generation 2 grew by a quarter since the last one, and a full
collection visits every tracked object in the process. An unfinished task is about four
tracked objects (its DTask, the list of its waiters, its entry in the ready heap, the
list of its dependents), so while a large graph is being spawned it is most of what
grows: spawning a tree of 1,010,101 tasks ran 16 full collections, 3.3 s of the 5.9 s
it took, and spawning slowed from 420,000 tasks/s (10,101 tasks, where the interpreter's
own objects absorb the growth) to 160,000 (benchmarks G10k and G1M).

So while the clusters of this process hold at least :data:`START` unfinished tasks, the
collector's third threshold (how many generation-1 collections may pass between two full
ones, 10 by default) is raised to match about :data:`SPACING` tracked allocations per
unfinished task, re-read each time the count doubles or halves; it is put back when they
hold fewer than ``START // 2``, or close. With that, the same tree spawned at 370,000
tasks/s (4 full collections, all before the count reached ``START``), and the run after
it went from 200,000 to 240,000 tasks/s. Young collections (generations 0 and 1) are left as they are, so short-lived
cycles are collected as before; a cycle that became garbage after surviving into
generation 2 waits longer for a full collection, which still comes after a bounded
number of allocations (about ``SPACING`` times the unfinished tasks).

Below that, once a scheduler has held :data:`SMALL` unfinished tasks, full collections
are kept at least :data:`MIN_SPACED` generation-1 collections apart (about 700,000
tracked allocations with the default thresholds) until it closes: a program that spawns
graphs of that size spawns them again. Such a graph is what grows the surviving objects
by a quarter in a small process (a script's, a benchmark's: some 35,000 tracked objects
at rest), so a full pass came every 8,700 tasks of W3 (10,000 ``async def`` tasks,
spawned then gathered, again and again): 23 passes of ~17 ms in 200,000 tasks, 2.0 µs
of its 9.2 µs per task. At 100 apart W3 took 7.4 µs, with 3 full passes. Kept only
while a graph is held, the spacing was undone between two graphs, and the passes put
off came all at once (20 in the same run).

Nothing is changed while the collector is disabled or its first threshold is 0, and
thresholds someone else set meanwhile stand: the policy then stops for the life of the
process. ``AIODAGGER_GC_SPACING=0`` in the environment turns it off.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref

__all__ = ["ENV", "MIN_SPACED", "SMALL", "SPACING", "START", "GraphSize", "enabled"]

ENV = "AIODAGGER_GC_SPACING"
# Unfinished tasks (all clusters of the process together) from which full collections
# are spaced out: below it, the interpreter's own objects dominate and the default holds.
START = 1 << 16
# From this many unfinished tasks, full collections come at least MIN_SPACED
# generation-1 collections apart (the default is 10).
SMALL = 1 << 12
MIN_SPACED = 100
# Tracked allocations allowed between full collections, per unfinished task (a task is
# about four tracked objects: four tasks' worth of new objects per task in the graph).
SPACING = 16

_lock = threading.Lock()
_sizes: weakref.WeakKeyDictionary[GraphSize, int] = weakref.WeakKeyDictionary()
# Schedulers that have held SMALL unfinished tasks, until they close.
_seasoned: weakref.WeakSet[GraphSize] = weakref.WeakSet()
_saved: tuple[int, int, int] | None = None  # the thresholds before the policy changed them
_applied: tuple[int, int, int] | None = None  # what it set them to
_stopped = False


def enabled() -> bool:
    """Whether the policy applies in this process (``AIODAGGER_GC_SPACING`` not off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class GraphSize:
    """One scheduler's count of unfinished tasks, as the policy sees it.

    The scheduler calls :meth:`crossed` only when its count reaches ``up`` or falls below
    ``down``: a comparison per task, and the work here once per doubling or halving.
    """

    __slots__ = ("__weakref__", "down", "up")

    def __init__(self) -> None:
        self.up = SMALL if enabled() else sys.maxsize
        self.down = -1

    def crossed(self, live: int) -> None:
        if live < SMALL // 2:
            self.up, self.down = SMALL, -1
        else:
            self.up, self.down = 2 * live, live // 2
        with _lock:
            if live:
                _sizes[self] = live
            else:
                _sizes.pop(self, None)
            if live >= SMALL:
                _seasoned.add(self)
            _apply(sum(_sizes.values()))

    def close(self) -> None:
        """The scheduler holds no task any more."""
        self.up, self.down = sys.maxsize, -1
        with _lock:
            _sizes.pop(self, None)
            _seasoned.discard(self)
            _apply(sum(_sizes.values()))


def _apply(total: int) -> None:
    global _saved, _applied, _stopped
    if _stopped:
        return
    current = gc.get_threshold()
    if _applied is not None and current != _applied:
        _saved = _applied = None  # set by someone else meanwhile: theirs stand
        _stopped = True
        return
    large = total >= START or (_applied is not None and total >= START // 2)
    if large or _seasoned:
        base = _saved if _saved is not None else current
        t0, t1, t2 = base
        if not gc.isenabled() or t0 <= 0:
            return
        spaced = (t0, t1, max(t2, MIN_SPACED if _seasoned else t2,
                              SPACING * total // (t0 * max(t1, 1)) if large else t2))
        if _saved is None:
            _saved = base
        if spaced != current:
            gc.set_threshold(*spaced)
        _applied = spaced
    elif _saved is not None:
        gc.set_threshold(*_saved)
        _saved = _applied = None
