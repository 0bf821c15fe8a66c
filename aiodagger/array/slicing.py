"""Basic indexing of DArrays, as numpy's: ``a[10:200, ::2]``, ``a[3]``, ``a[-1, ..., None]``.

The output's blocks follow the input's: along each axis, the part of the slice that
falls in one input block is one output block (an input block the slice misses gives
none). So every output block is cut from exactly one input block, by one small task
that the scheduler runs where that block lives; an output block that is a whole input
block is that block's task itself. Fancy and boolean indexing are refused with a
``TypeError`` that says what is supported.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from ..gpu.arrays import array_module
from . import grid
from .core import DArray, block_task, operation

__all__ = ["getitem"]

# What one item of the index does, per item: None for a new axis, (block, position) for
# an integer (the axis is dropped), or the pieces of a slice, one per output block:
# (input block, slice within it, length), in the order the slice visits them.
_Piece = tuple[int, slice, int]


@operation("getitem")
def getitem(arr: DArray, key: Any) -> DArray:
    plan = _plan(arr, key)
    out_chunks = tuple((1,) if p is None else tuple(length for _, _, length in p)
                       for p in plan if not isinstance(p, tuple))
    blocks = np.empty(tuple(len(c) for c in out_chunks), dtype=object)
    for out_index in grid.indices(out_chunks):
        at = iter(out_index)
        in_index: list[int] = []
        local: list[Any] = []
        for p in plan:
            if p is None:
                next(at)
                local.append(None)
                continue
            block, inner = p[:2] if isinstance(p, tuple) else p[next(at)][:2]
            in_index.append(block)
            local.append(inner)
        source = arr._blocks[tuple(in_index)]
        whole = len(local) == arr.ndim and all(
            s == slice(0, c[b], 1) for s, b, c in zip(local, in_index, arr.chunks, strict=True))
        blocks[out_index] = source if whole else block_task(_cut, source, tuple(local), name="getitem")
    return DArray(blocks, out_chunks, arr.dtype)


def _plan(arr: DArray, key: Any) -> list[Any]:
    plan: list[Any] = []
    axis = 0
    for item in _expand(key, arr.shape):
        if item is None:
            plan.append(None)
            continue
        chunks, n = arr.chunks[axis], arr.shape[axis]
        if isinstance(item, slice):
            plan.append(_slice_pieces(chunks, *item.indices(n)))
        else:
            if not -n <= item < n:
                raise IndexError(f"index {item} is out of bounds for axis {axis} with size {n}")
            position = item % n
            block = grid.locate(chunks, position)
            plan.append((block, position - grid.offsets(chunks)[block]))
        axis += 1
    return plan


def _cut(block: np.ndarray, key: tuple[Any, ...]) -> np.ndarray:
    # A copy, not a view: a view would keep the whole input block alive in the worker's
    # memory while being counted at the size of the cut.
    return array_module(block).array(block[key])


def _expand(key: Any, shape: tuple[int, ...]) -> list[Any]:
    """``key`` as one item per input axis (a slice or an int) plus None for new axes;
    numpy's IndexError for too many indices or two ellipses."""
    if not isinstance(key, tuple):
        key = (key,)
    items: list[Any] = []
    ellipses = 0
    for k in key:
        if k is None or k is Ellipsis or isinstance(k, slice):
            ellipses += k is Ellipsis
            items.append(k)
        else:
            items.append(_integer(k))
    if ellipses > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    indexed = sum(1 for k in items if k is not None and k is not Ellipsis)
    if indexed > len(shape):
        raise IndexError(f"too many indices for array: array is {len(shape)}-dimensional, "
                         f"but {indexed} were indexed")
    fill = [slice(None)] * (len(shape) - indexed)
    if ellipses:
        at = items.index(Ellipsis)
        return items[:at] + fill + items[at + 1:]
    return items + fill


def _integer(k: Any) -> int:
    if isinstance(k, (bool, np.bool_)) or (isinstance(k, np.ndarray) and k.dtype == bool):
        raise TypeError(_unsupported("a boolean"))
    try:
        return operator.index(k)
    except TypeError:
        kind = "an array" if isinstance(k, np.ndarray) else f"a {type(k).__name__}"
        raise TypeError(_unsupported(kind)) from None


def _unsupported(kind: str) -> str:
    return (f"DArray indexing takes integers, slices, ... and None (numpy's basic indexing); got "
            f"{kind}: fancy and boolean indexing are not supported. Index the numpy array from "
            "fetch(), or select blocks with slices")


def _slice_pieces(chunks: tuple[int, ...], start: int, stop: int, step: int) -> list[_Piece]:
    """The positions ``range(start, stop, step)`` of one axis, cut at its block
    boundaries, in the order the slice visits them."""
    positions = range(start, stop, step)
    if not positions:
        return [(0, slice(0, 0, 1), 0)]
    starts = grid.offsets(chunks)
    order = range(len(chunks)) if step > 0 else range(len(chunks) - 1, -1, -1)
    pieces = []
    for b in order:
        lo, hi = starts[b], starts[b + 1]
        # the first and one past the last k with lo <= start + k * step < hi
        if step > 0:
            k0, k1 = -((start - lo) // step), -((start - hi) // step)
        else:
            k0, k1 = -((start - hi + 1) // step), (lo - start) // step + 1
        k0, k1 = max(k0, 0), min(k1, len(positions))
        if k1 > k0:
            first, last = positions[k0] - lo, positions[k1 - 1] - lo
            end = last + 1 if step > 0 else (last - 1 if last > 0 else None)
            pieces.append((b, slice(first, end, step), k1 - k0))
    return pieces

