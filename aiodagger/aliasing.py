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

from typing import Any

import numpy as np

__all__ = ["Footprint", "footprint", "overlaps"]


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
