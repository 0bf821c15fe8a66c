"""``map_overlap``: a function applied to each block extended by its neighbours' edges
(Dagger.jl's ``@stencil``, Dask's ``map_overlap``), for stencils.

Each block is extended by ``depth`` cells on both sides of each axis, taken from the
blocks around it (from several along an axis where ``depth`` is larger than the
blocks next to it); ``fn`` gets the extended block and must return an array of the
same shape, from which the halo is cut off again. Each neighbour's part is cut by a
small task where that neighbour lives, so only the halo moves.

Past the edges of the whole array, ``boundary`` says what the halo holds, as Dask's
does, which is ``numpy.pad`` of the whole array with:

=============  ==================================  ====================================
boundary       halo past the edge of ``1 2 3``     ``numpy.pad`` mode
=============  ==================================  ====================================
"reflect"      ``2 1 | 1 2 3 | 3 2``               "symmetric" (the edge is repeated)
"periodic"     ``2 3 | 1 2 3 | 1 2``               "wrap"
"nearest"      ``1 1 | 1 2 3 | 3 3``               "edge"
a number c     ``c c | 1 2 3 | c c``               "constant", constant_values=c
"none"         ``1 2 3`` (no halo at the edges)    -
=============  ==================================  ====================================

With "none" the blocks at the edges are extended on their inner sides only, so ``fn``
gets smaller arrays there.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from ..gpu.arrays import array_module
from . import grid
from .core import DArray, block_task, join_grid, operation

__all__ = ["BOUNDARIES", "map_overlap"]

BOUNDARIES = ("reflect", "periodic", "nearest", "none")

# One run of an extended block along one axis, in order: ("copy" | "flip", block, slice
# within the block, length), ("repeat", block, slice of one cell, count) or
# ("const", -1, None, count).
_Segment = tuple[str, int, Any, int]


@operation("map_overlap")
def map_overlap(fn: Callable[..., Any], a: DArray, depth: Any, boundary: Any = "none",
                dtype: Any = None, **kwargs: Any) -> DArray:
    """``fn(extended_block, **kwargs)`` for each block of ``a``, extended by ``depth``
    cells (an int, one per axis, or {axis: depth}) from its neighbours, with ``boundary``
    past the array's edges (see the module's table); the halo is trimmed off the results."""
    if not isinstance(a, DArray):
        raise TypeError(f"map_overlap() takes a DArray, got {type(a).__name__}; distribute it first")
    depths = _depths(depth, a.ndim)
    constant = isinstance(boundary, numbers.Number)
    if not constant and boundary not in BOUNDARIES:
        raise ValueError(f"map_overlap(boundary={boundary!r}): boundary is one of {', '.join(map(repr, BOUNDARIES))} "
                         "or a number (a constant)")
    for axis, (n, d) in enumerate(zip(a.shape, depths, strict=True)):
        if n == 0 and d and not constant and boundary != "none":
            raise ValueError(f"map_overlap(boundary={boundary!r}) cannot extend the empty axis {axis}; "
                             "use boundary='none' or a constant")
    dtype = _trial(fn, a, depths, dtype, kwargs)

    per_axis = [[_segments(c, b, d, boundary) for b in range(len(c))] for c, d in zip(a.chunks, depths, strict=True)]
    name = getattr(fn, "__name__", type(fn).__name__)
    cuts: dict[tuple[Any, ...], Any] = {}
    blocks = np.empty(a.grid, dtype=object)
    for index in grid.indices(a.chunks):
        plans = [per_axis[axis][b] for axis, b in enumerate(index)]
        layout = tuple(len(segments) for segments, _ in plans)
        specs: list[tuple[Any, tuple[int, ...]]] = []
        pieces: list[Any] = []
        for combo in itertools.product(*(segments for segments, _ in plans)):
            shape = tuple(s[3] for s in combo)
            if any(s[0] == "const" for s in combo):
                specs.append((None, shape))
                continue
            specs.append((tuple((s[0], s[3]) for s in combo), shape))
            pieces.append(_cut(a, tuple(s[1] for s in combo), tuple(s[2] for s in combo), cuts))
        trims = tuple(trim for _, trim in plans)
        fill = boundary if constant else None
        blocks[index] = block_task(_apply, fn, kwargs, layout, specs, fill, a.dtype, trims, *pieces, name=name)
    return DArray(blocks, a.chunks, dtype)


def _depths(depth: Any, ndim: int) -> tuple[int, ...]:
    depths: list[Any]
    if isinstance(depth, dict):
        depths = [0] * ndim
        for axis, d in depth.items():
            depths[axis] = d
    elif isinstance(depth, (int, np.integer)):
        depths = [depth] * ndim
    else:
        depths = list(depth)
        if len(depths) != ndim:
            raise ValueError(f"map_overlap(depth={depth!r}): give one depth per axis ({ndim})")
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in depths):
        raise ValueError(f"map_overlap(depth={depth!r}): depths are ints >= 0")
    return tuple(int(d) for d in depths)


def _trial(fn: Callable[..., Any], a: DArray, depths: tuple[int, ...], dtype: Any, kwargs: dict[str, Any]) -> Any:
    """The result's dtype (unless given), and a shape-keeping check, from ``fn`` on a
    stand-in extended block of one cell."""
    stand_in = np.ones(tuple(2 * d + 1 for d in depths), dtype=a.dtype)
    try:
        with np.errstate(all="ignore"):
            out = np.asarray(fn(stand_in, **kwargs))
    except Exception as exc:
        if dtype is not None:
            return np.dtype(dtype)
        raise TypeError(f"map_overlap({getattr(fn, '__name__', fn)!r}): could not find the result's dtype by a "
                        f"trial call on an extended block of shape {stand_in.shape} ({type(exc).__name__}: "
                        f"{exc}); pass dtype=") from exc
    if out.shape != stand_in.shape:
        raise ValueError(f"map_overlap({getattr(fn, '__name__', fn)!r}): fn must keep the shape of the extended "
                         f"block; it returned shape {out.shape} for {stand_in.shape}")
    return out.dtype if dtype is None else np.dtype(dtype)


def _segments(chunks: tuple[int, ...], b: int, depth: int, boundary: Any) -> tuple[list[_Segment], tuple[int, int]]:
    """Block ``b`` of one axis extended by ``depth`` on both sides, as runs of source
    cells, and how much halo it has on each side."""
    starts = grid.offsets(chunks)
    n, lo, hi = starts[-1], starts[b], starts[b + 1]
    if boundary == "none":
        p0, p1 = max(lo - depth, 0), min(hi + depth, n)
    else:
        p0, p1 = lo - depth, hi + depth
    out: list[_Segment] = []
    p = p0
    while p < p1:
        if 0 <= p < n:
            end = min(p1, n)
            out += _split(starts, p, end, "copy")
            p = end
            continue
        end = min(p1, 0) if p < 0 else p1  # the run outside the array, on one side
        if boundary == "nearest":
            edge = 0 if p < 0 else n - 1
            block = grid.locate(chunks, edge)
            out.append(("repeat", block, slice(edge - starts[block], edge - starts[block] + 1), end - p))
            p = end
        elif boundary == "periodic":
            q = p % n
            length = min(end - p, n - q)
            out += _split(starts, q, q + length, "copy")
            p += length
        elif boundary == "reflect":  # period 2n: n cells forward, then the same n backward
            q = p % (2 * n)
            if q < n:
                length = min(end - p, n - q)
                out += _split(starts, q, q + length, "copy")
            else:
                top = 2 * n - 1 - q
                length = min(end - p, top + 1)
                out += _split(starts, top - length + 1, top + 1, "flip")
            p += length
        else:
            out.append(("const", -1, None, end - p))
            p = end
    if not out:  # an empty axis with no halo: the (empty) block itself
        out.append(("copy", b, slice(0, 0), 0))
    return out, (lo - p0, p1 - hi)


def _split(starts: list[int], s: int, e: int, kind: str) -> list[_Segment]:
    """Source cells ``s:e`` of one axis, cut at its block boundaries; taken backward
    (the blocks too) for "flip"."""
    out: list[_Segment] = []
    for b in range(len(starts) - 1):
        lo, hi = max(s, starts[b]), min(e, starts[b + 1])
        if hi > lo:
            out.append((kind, b, slice(lo - starts[b], hi - starts[b]), hi - lo))
    return out[::-1] if kind == "flip" else out


def _cut(a: DArray, index: tuple[int, ...], local: tuple[slice, ...], cuts: dict[tuple[Any, ...], Any]) -> Any:
    """The task whose value is ``local`` of block ``index``: the block's own when it is
    the whole block, else a small task run where the block is, shared by its users."""
    if all(s.start == 0 and s.stop == a.chunks[d][b] for d, (s, b) in enumerate(zip(local, index, strict=True))):
        return a._blocks[index]
    key = (index, tuple((s.start, s.stop) for s in local))
    if key not in cuts:
        cuts[key] = block_task(_take, a._blocks[index], local, name="halo")
    return cuts[key]


def _take(block: np.ndarray, local: tuple[slice, ...]) -> np.ndarray:
    return array_module(block).array(block[local])  # a copy: only the halo is kept and sent, not the block


def _apply(fn: Callable[..., Any], kwargs: dict[str, Any], layout: tuple[int, ...], specs: list[Any],
           fill: Any, dtype: Any, trims: tuple[tuple[int, int], ...], *pieces: np.ndarray) -> np.ndarray:
    """The extended block put together from ``pieces`` (flipped, repeated, or constant
    as ``specs`` say), ``fn`` applied, and the halo trimmed off."""
    xp = array_module(*pieces)  # numpy, or cupy for blocks on a GPU
    given = iter(pieces)
    parts = []
    for ops, shape in specs:
        if ops is None:
            parts.append(xp.full(shape, fill, dtype=dtype))
            continue
        piece = next(given)
        for axis, (kind, count) in enumerate(ops):
            if kind == "flip":
                piece = xp.flip(piece, axis)
            elif kind == "repeat":
                piece = xp.repeat(piece, count, axis=axis)
        parts.append(piece)
    extended = join_grid(layout, parts) if layout else parts[0]
    out = xp.asarray(fn(extended, **kwargs))
    if out.shape != extended.shape:
        raise ValueError(f"map_overlap({getattr(fn, '__name__', fn)!r}): fn must keep the shape of the extended "
                         f"block; it returned shape {out.shape} for {extended.shape}")
    return out[tuple(slice(lo, n - hi) for (lo, hi), n in zip(trims, out.shape, strict=True))]
