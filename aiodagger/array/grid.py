"""Block grids: how an array's shape is cut into blocks, and which blocks a region needs.

A grid is, per axis, the lengths of its blocks (``chunks``, as in Dask): ``(4, 4, 2)``
for an axis of 10 cut in blocks of 4. Dagger.jl's ``Blocks`` give the shape of one
block; the edge blocks are smaller when it does not divide the axis (ragged).
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["Chunks", "block_slices", "chunks_of", "indices", "locate", "offsets", "region_blocks"]

Chunks = tuple[tuple[int, ...], ...]


def chunks_of(shape: tuple[int, ...], blocks: Any) -> Chunks:
    """The grid of ``shape`` cut in blocks of ``blocks`` (ints > 0, one per axis)."""
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        blocks = (blocks,) * len(shape)
    try:
        blocks = tuple(blocks)
    except TypeError:
        raise TypeError(f"blocks must be a tuple of ints (the shape of one block), got {blocks!r}") from None
    if len(blocks) != len(shape):
        raise ValueError(f"blocks {blocks} has {len(blocks)} entries; the array has {len(shape)} "
                         f"dimensions (shape {shape}): give one block length per dimension")
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"blocks must be ints, got {blocks!r}")
        if b <= 0:
            raise ValueError(f"blocks {blocks}: every block length must be at least 1")
    out = []
    for n, b in zip(shape, blocks, strict=True):
        if n == 0:
            out.append((0,))
        else:
            full, rest = divmod(n, b)
            out.append((b,) * full + ((rest,) if rest else ()))
    return tuple(out)


def offsets(chunks: Sequence[int]) -> list[int]:
    """Where each block of one axis starts, plus the axis's length at the end."""
    return [0, *itertools.accumulate(chunks)]


def indices(chunks: Chunks) -> Iterator[tuple[int, ...]]:
    """Every block index of the grid, in C order."""
    return itertools.product(*(range(len(c)) for c in chunks))


def block_slices(chunks: Chunks, index: tuple[int, ...]) -> tuple[slice, ...]:
    """The region block ``index`` covers."""
    out = []
    for c, i in zip(chunks, index, strict=True):
        start = sum(c[:i])
        out.append(slice(start, start + c[i]))
    return tuple(out)


def locate(chunks: Sequence[int], position: int) -> int:
    """The block of one axis holding ``position``."""
    return bisect_right(offsets(chunks), position) - 1


def region_blocks(chunks: Chunks, region: tuple[slice, ...]) -> list[list[tuple[int, slice]]]:
    """Per axis, the blocks a (step 1) region crosses, each with the part of it wanted,
    relative to that block."""
    out = []
    for c, sl in zip(chunks, region, strict=True):
        starts = offsets(c)
        parts = []
        if sl.stop > sl.start:
            first = bisect_right(starts, sl.start) - 1
            last = bisect_right(starts, sl.stop - 1) - 1
            for b in range(first, last + 1):
                lo, hi = max(sl.start, starts[b]), min(sl.stop, starts[b + 1])
                parts.append((b, slice(lo - starts[b], hi - starts[b])))
        else:
            b = min(bisect_right(starts, sl.start) - 1, len(c) - 1)
            parts.append((max(b, 0), slice(0, 0)))
        out.append(parts)
    return out
