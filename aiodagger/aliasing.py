"""Whether two task arguments may touch the same memory: the basis of datadeps ordering.

Two numpy arrays alias only if they share at least one byte. Bounding boxes are not
enough: the column views ``a[:, 0]`` and ``a[:, 1]`` of one array interleave, and so do
``a[:, ::2]`` and ``a[:, 1::2]``, without sharing a byte. The exact answer comes from
each array's start address, shape and strides; :func:`numpy.shares_memory` solves that
(a bounded linear Diophantine problem), after a cheap test of the byte ranges settles
the common case of arrays far apart. Other objects alias by identity: a task that
writes a list conflicts with every task given that same list, never with an equal one.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any

import numpy as np

__all__ = ["AccessLog", "Footprint", "footprint", "overlaps"]


class Footprint:
    """The memory an argument occupies, as datadeps compares it.

    For a numpy array: its byte range ``[low, high)`` and the array itself (for the
    exact test); for anything else the object, compared by identity.
    """

    __slots__ = ("array", "high", "low", "obj")

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        if isinstance(obj, np.ndarray):
            self.array: np.ndarray | None = obj
            if obj.size == 0:
                self.low = self.high = 0  # no byte: aliases nothing
            else:
                self.low, self.high = np.lib.array_utils.byte_bounds(obj)
        else:
            self.array = None
            self.low = self.high = 0

    def __repr__(self) -> str:
        if self.array is not None:
            return f"Footprint(array {self.array.shape} at [{self.low:#x}, {self.high:#x}))"
        return f"Footprint({type(self.obj).__name__} at {id(self.obj):#x})"


def footprint(obj: Any) -> Footprint:
    return Footprint(obj)


def overlaps(a: Footprint, b: Footprint) -> bool:
    """Whether ``a`` and ``b`` share at least one byte (arrays) or are one object."""
    if a.array is None or b.array is None:
        return a.array is None and b.array is None and a.obj is b.obj
    if a.low >= b.high or b.low >= a.high:  # disjoint byte ranges: no exact test needed
        return False
    # max_work=-1 (MAY_SHARE_EXACT): the exact answer however strided the views.
    return bool(np.shares_memory(a.array, b.array, max_work=-1))


class _Entry:
    """One footprint's history: the last task that wrote it, and those that read it since."""

    __slots__ = ("fp", "overlapping", "readers", "writer")

    def __init__(self, fp: Footprint) -> None:
        self.fp = fp
        self.overlapping: list[_Entry] = [self]  # entries sharing a byte with this one
        self.writer: Any = None
        self.readers: list[Any] = []


class AccessLog:
    """Which earlier accesses a new one must wait for: the ordering of a datadeps region.

    A read waits for the last write of every footprint that shares a byte with it; a
    write also waits for the reads since. The per-task path is two dict lookups and a
    walk over the (few) overlapping footprints: what overlaps what is worked out once,
    when a footprint is first seen, from an index of byte ranges sorted by start, so a
    region over thousands of blocks does not compare each new one with all the others.
    The log keeps every object it has seen alive, so that ``id()`` and addresses stay
    unique while it lives.
    """

    __slots__ = ("_by_geometry", "_by_id", "_entries", "_keep", "_lows", "_widest")

    def __init__(self) -> None:
        self._by_id: dict[int, _Entry] = {}
        self._by_geometry: dict[tuple[Any, ...], _Entry] = {}
        self._keep: list[Any] = []
        self._lows: list[tuple[int, int]] = []  # (low, index in _entries), sorted
        self._entries: list[_Entry] = []
        self._widest = 0

    def entry(self, obj: Any) -> _Entry:
        """The history of the memory ``obj`` occupies (shared by views of the same bytes)."""
        found = self._by_id.get(id(obj))
        if found is not None:
            return found
        fp = Footprint(obj)
        if fp.array is None:
            found = _Entry(fp)
        else:
            geometry = (fp.low, fp.high, obj.shape, obj.strides, obj.dtype.itemsize)
            found = self._by_geometry.get(geometry)
            if found is None:
                found = self._by_geometry[geometry] = self._index(fp)
        self._by_id[id(obj)] = found
        self._keep.append(obj)
        return found

    def _index(self, fp: Footprint) -> _Entry:
        new = _Entry(fp)
        if fp.high > fp.low:
            lows, entries = self._lows, self._entries
            start = bisect_left(lows, (fp.low - self._widest, -1))
            stop = bisect_left(lows, (fp.high, -1))
            for _, i in lows[start:stop]:
                other = entries[i]
                if overlaps(fp, other.fp):
                    new.overlapping.append(other)
                    other.overlapping.append(new)
            insort(lows, (fp.low, len(entries)))
            entries.append(new)
            self._widest = max(self._widest, fp.high - fp.low)
        return new

    @staticmethod
    def conflicts(entry: _Entry, writes: bool, into: dict[Any, None]) -> None:
        """Add to ``into`` the tasks an access to ``entry`` must come after."""
        for other in entry.overlapping:
            if other.writer is not None:
                into[other.writer] = None
            if writes:
                for reader in other.readers:
                    into[reader] = None

    @staticmethod
    def record(entry: _Entry, writes: bool, task: Any) -> None:
        if writes:
            entry.writer = task
            entry.readers = []
        else:
            readers = entry.readers
            if len(readers) >= 64:  # many reads and no write: forget those that are done
                readers[:] = [r for r in readers if not r.done()]
            readers.append(task)
