"""Cutting a DArray's values in other blocks (``a.rechunk(blocks)``).

Each new block is made from the old blocks it overlaps (``region_of``): an old block
that is exactly a new one is kept as it is; the parts of the others are cut where
they live and joined by one task per new block.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import grid
from .core import DArray, operation, region_of
from .grid import Chunks

__all__ = ["rechunk", "rechunk_to"]


@operation("rechunk")
def rechunk(arr: DArray, blocks: Any) -> DArray:
    """``arr`` cut in blocks of shape ``blocks`` (as ``distribute``'s: edge blocks may be
    smaller)."""
    return rechunk_to(arr, grid.chunks_of(arr.shape, blocks))


def rechunk_to(arr: DArray, chunks: Chunks) -> DArray:
    """``arr`` on the grid ``chunks`` (block lengths per axis, summing to its shape)."""
    if chunks == arr.chunks:
        return arr
    assert tuple(sum(c) for c in chunks) == arr.shape, (chunks, arr.shape)
    blocks = np.empty(tuple(len(c) for c in chunks), dtype=object)
    for index in grid.indices(chunks):
        blocks[index] = region_of(arr, grid.block_slices(chunks, index))
    return DArray(blocks, chunks, arr.dtype)
