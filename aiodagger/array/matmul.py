"""Matrix products of DArrays: ``a @ b``, ``np.matmul(a, b)``, ``dagger.array.matmul``.

numpy's semantics throughout: vectors on either side, stacks of matrices with their
leading axes broadcast, numpy's result dtype and errors. One task per output block
takes the row panel of ``a`` and the column panel of ``b`` it needs and sums their
products; the scheduler runs it where most of those bytes already are, so only the
blocks an output block needs move, worker to worker.

The inner dimension is cut as ``a``'s is; where ``b``'s blocks differ they are cut and
joined to match (``region_of``), once each. A numpy operand is first distributed in
blocks that match the other operand's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..gpu.arrays import array_module
from . import grid
from .core import DArray, block_task, broadcast_region, operation
from .creation import distribute
from .grid import Chunks

__all__ = ["matmul"]


@operation("matmul")
def matmul(a: Any, b: Any, dtype: Any = None) -> DArray:
    """``a @ b`` as numpy computes it; ``a`` or ``b`` may be a numpy array."""
    dtype = _result_dtype(a, b, dtype)
    if not isinstance(a, DArray):
        a = _distribute_matching(a, b, -1)
    if not isinstance(b, DArray):
        b = _distribute_matching(b, a, -2 if len(_shape(b)) > 1 else 0)
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    rows = a.chunks[-2:-1]  # none for a vector
    cols = b.chunks[-1:] if b.ndim > 1 else ()
    chunks = _batch_chunks(batch, a, b) + rows + cols
    starts = grid.offsets(a.chunks[-1])  # the inner dimension is cut as a's is
    inner = [slice(lo, hi) for lo, hi in zip(starts, starts[1:], strict=False)]
    # each operand as numpy broadcasts it: its core axes after the result's stack axes
    a_shape, b_shape = batch + a.shape[-2:], batch + b.shape[-2:]
    nb = len(batch)
    cache: dict[tuple[int, tuple[Any, ...]], Any] = {}
    blocks = np.empty(tuple(len(c) for c in chunks), dtype=object)
    for index in grid.indices(chunks):
        region = grid.block_slices(chunks, index)
        stack, row, col = region[:nb], region[nb:nb + len(rows)], region[nb + len(rows):]
        a_panel = [broadcast_region(a, stack + row + (k,), a_shape, cache) for k in inner]
        b_panel = [broadcast_region(b, stack + (k,) + col, b_shape, cache) for k in inner]
        blocks[index] = block_task(_panel_product, dtype, len(inner), *a_panel, *b_panel, name="matmul")
    return DArray(blocks, chunks, dtype)


def _result_dtype(a: Any, b: Any, dtype: Any) -> np.dtype[Any]:
    """numpy's result dtype, and numpy's errors for shapes it refuses, from a trial on
    stand-ins holding no data: the real shapes with one row and one column, so that the
    trial costs one row of ``a`` times one column of ``b``."""
    def stand_in(x: Any, axis: int) -> np.ndarray:
        shape = list(_shape(x))
        if len(shape) > 1:
            shape[axis] = min(shape[axis], 1)
        return np.broadcast_to(np.zeros((), dtype=_dtype(x)), shape)

    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        return np.asarray(np.matmul(stand_in(a, -2), stand_in(b, -1), **kwargs)).dtype
    except ValueError as exc:
        if "broadcast" in str(exc):  # the message names the shapes: numpy's, with the real ones
            whole = [np.broadcast_to(np.zeros((), dtype=_dtype(x)), _shape(x)) for x in (a, b)]
            np.matmul(*whole, **kwargs)
        raise


def _shape(x: Any) -> tuple[int, ...]:
    return x.shape if isinstance(x, (DArray, np.ndarray)) else np.shape(x)


def _dtype(x: Any) -> Any:
    return x.dtype if isinstance(x, (DArray, np.ndarray)) else np.asarray(x).dtype


def _distribute_matching(x: Any, other: Any, inner_axis: int) -> DArray:
    """A numpy operand distributed in the other operand's blocks along the inner
    dimension (so both are used as they are), whole along its other axes."""
    x = np.asarray(x)
    blocks = [max(n, 1) for n in x.shape]
    if isinstance(other, DArray):
        other_inner = -1 if inner_axis != -1 else (-2 if other.ndim > 1 else 0)
        blocks[inner_axis] = max(other.blocks[other_inner], 1)
    return distribute(x, tuple(blocks))


def _batch_chunks(batch: tuple[int, ...], a: DArray, b: DArray) -> Chunks:
    """The leading (stack) axes' blocks: the first operand's that spans each axis."""
    out = []
    for d, n in enumerate(batch):
        found: tuple[int, ...] = (n,)
        for x in (a, b):
            axis = d - (len(batch) - (x.ndim - 2))
            if x.ndim > 2 and axis >= 0 and x.shape[axis] == n:
                found = x.chunks[axis]
                break
        out.append(found)
    return tuple(out)


def _panel_product(dtype: Any, n: int, *panels: np.ndarray) -> np.ndarray:
    """The sum over k of ``a_k @ b_k``: ``panels`` holds the n pieces of a's row panel,
    then the n of b's column panel."""
    xp = array_module(*panels)
    out = xp.matmul(panels[0], panels[n], dtype=dtype)
    for k in range(1, n):
        out += xp.matmul(panels[k], panels[n + k], dtype=dtype)
    return out
