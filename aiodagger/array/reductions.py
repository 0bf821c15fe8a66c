"""Reductions of DArrays as trees of tasks: each block reduced where it lives, then the
partial results combined at most ``SPLIT_EVERY`` at a time, in block order.

What the partials carry depends on the reduction: the reduced block for ``sum``,
``prod``, ``min``, ``max``, ``any``, ``all``; (sum, count) for ``mean``; (count, mean,
sum of squared deviations) for ``var`` and ``std``, combined with Chan et al.'s pairwise
update so no pass over the data is repeated; (values, global indices) for ``argmax``
and ``argmin``, ties going to the smallest index as numpy's do. The result dtype and
numpy's own errors (an axis out of range, an empty ``min``) come from numpy, on a
one-element stand-in, before any task is spawned. The tasks take their array module
from the blocks: numpy, or cupy for blocks on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.array_utils import normalize_axis_tuple

from ..gpu.arrays import array_module
from . import grid
from .core import DArray, block_task, operation

__all__ = ["SPLIT_EVERY", "arg_reduce", "reduce"]

# How many partial results one combining task takes: with 8, a reduction over 4,096
# blocks is four levels deep.
SPLIT_EVERY = 8

_SIMPLE = frozenset(["sum", "prod", "min", "max", "any", "all"])  # xp.<kind> reduces and combines


def _stand_in(arr: DArray, axes: tuple[int, ...]) -> np.ndarray:
    """One element per axis (none where the array has none along a reduced axis)."""
    return np.ones(tuple(0 if arr.shape[a] == 0 else 1 for a in range(arr.ndim)), dtype=arr.dtype)


@operation("reduce")
def reduce(kind: str, arr: DArray, axis: Any, keepdims: bool, dtype: Any = None, ddof: int = 0) -> DArray:
    """``arr.<kind>(axis, keepdims, ...)`` as numpy computes it."""
    axes = tuple(range(arr.ndim)) if axis is None else normalize_axis_tuple(axis, arr.ndim)
    extra = {} if kind in ("min", "max", "any", "all") else {"dtype": dtype}
    if kind in ("var", "std"):
        extra["ddof"] = ddof
    with np.errstate(all="ignore"):
        out_dtype = np.asarray(getattr(np, kind)(_stand_in(arr, axes), axis=axes, **extra)).dtype
    if kind in _SIMPLE:
        acc = dtype if kind in ("sum", "prod") else None
    elif dtype is not None:
        acc = np.dtype(dtype)
    else:
        acc = np.result_type(arr.dtype, np.float64) if arr.dtype.kind in "biu" else arr.dtype
    return _tree(arr, axes, keepdims, out_dtype, kind,
                 lambda index: (_partial, kind, arr._blocks[index], axes, acc),
                 (_combine, kind), (_finish, kind, axes, keepdims, out_dtype, ddof))


@operation("arg_reduce")
def arg_reduce(kind: str, arr: DArray, axis: int | None, keepdims: bool) -> DArray:
    """``arr.argmax(axis)`` / ``argmin``: the flat index (axis None) or the index along ``axis``."""
    probe_axis = axis
    if axis is not None:
        (axis,) = normalize_axis_tuple(axis, arr.ndim)
    getattr(np, kind)(_stand_in(arr, tuple(range(arr.ndim))), axis=probe_axis)  # numpy's errors
    axes = tuple(range(arr.ndim)) if axis is None else (axis,)
    starts = [grid.offsets(c) for c in arr.chunks]

    def first(index: tuple[int, ...]) -> tuple[Any, ...]:
        origin = tuple(starts[a][i] for a, i in enumerate(index))
        return (_arg_partial, kind, arr._blocks[index], axis, origin, arr.shape)

    return _tree(arr, axes, keepdims, np.dtype(np.intp), kind, first,
                 (_arg_combine, kind, axis), (_arg_finish, axes, keepdims))


def _tree(arr: DArray, axes: tuple[int, ...], keepdims: bool, dtype: Any, name: str,
          first: Any, combine: tuple[Any, ...], finish: tuple[Any, ...]) -> DArray:
    groups: dict[tuple[int, ...], list[Any]] = {}
    for index in grid.indices(arr.chunks):
        out = tuple(0 if a in axes else i for a, i in enumerate(index))
        fn, *args = first(index)
        groups.setdefault(out, []).append(block_task(fn, *args, name=f"{name}-block"))
    out_chunks = tuple((1,) if a in axes else c for a, c in enumerate(arr.chunks))
    if not keepdims:
        out_chunks = tuple(c for a, c in enumerate(out_chunks) if a not in axes)
    blocks = np.empty(tuple(len(c) for c in out_chunks), dtype=object)
    for out, parts in groups.items():
        while len(parts) > 1:
            parts = [block_task(*combine, *parts[i:i + SPLIT_EVERY], name=f"{name}-combine")
                     for i in range(0, len(parts), SPLIT_EVERY)]
        where = out if keepdims else tuple(i for a, i in enumerate(out) if a not in axes)
        blocks[where] = block_task(*finish, parts[0], name=name)
    return DArray(blocks, out_chunks, dtype)


# -- what the tasks run ------------------------------------------------------------------
def _partial(kind: str, block: np.ndarray, axes: tuple[int, ...], acc: Any) -> Any:
    xp = array_module(block)
    if kind in _SIMPLE:
        if kind in ("sum", "prod"):
            return getattr(xp, kind)(block, axis=axes, keepdims=True, dtype=acc)
        return getattr(xp, kind)(block, axis=axes, keepdims=True)
    count = int(np.prod([block.shape[a] for a in axes], dtype=np.int64))
    total = xp.sum(block, axis=axes, keepdims=True, dtype=acc)
    if kind == "mean":
        return total, count
    mean = total / count if count else total
    deviations = xp.abs(block - mean) ** 2 if xp.iscomplexobj(block) else (block - mean) ** 2
    return count, mean, xp.sum(deviations, axis=axes, keepdims=True, dtype=mean.dtype)


def _combine(kind: str, *parts: Any) -> Any:
    if kind in _SIMPLE:
        xp = array_module(*parts)
        return getattr(xp, kind)(xp.stack(parts), axis=0)
    if kind == "mean":
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    count, mean, m2 = parts[0]
    xp = array_module(mean)
    for n_b, mean_b, m2_b in parts[1:]:
        total = count + n_b
        if total:
            delta = mean_b - mean
            sq = xp.abs(delta) ** 2 if xp.iscomplexobj(delta) else delta ** 2
            m2 = m2 + m2_b + sq * (count * n_b / total)
            mean = mean + delta * (n_b / total)
        count = total
    return count, mean, m2


def _finish(kind: str, axes: tuple[int, ...], keepdims: bool, dtype: Any, ddof: int, part: Any) -> Any:
    with np.errstate(all="ignore"):
        if kind in _SIMPLE:
            value = part
        elif kind == "mean":
            value = part[0] / part[1]
        else:
            count, _, m2 = part
            value = m2 / max(count - ddof, 0)
            if kind == "std":
                value = array_module(value).sqrt(value)
    xp = array_module(value)
    value = xp.asarray(value).astype(dtype, copy=False)
    return value if keepdims else value.squeeze(axis=axes)


def _arg_partial(kind: str, block: np.ndarray, axis: int | None, origin: tuple[int, ...],
                 shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    xp = array_module(block)
    pick = xp.argmax if kind == "argmax" else xp.argmin
    if axis is None:
        local = int(pick(block))
        where = np.unravel_index(local, block.shape)
        flat = np.ravel_multi_index(tuple(o + w for o, w in zip(origin, where, strict=True)), shape)
        ones = (1,) * block.ndim
        return xp.asarray(block[where]).reshape(ones).copy(), xp.full(ones, flat, dtype=np.intp)
    local = pick(block, axis=axis, keepdims=True)
    return xp.take_along_axis(block, local, axis=axis), local + origin[axis]


def _arg_combine(kind: str, axis: int | None, *parts: tuple[np.ndarray, np.ndarray]) -> Any:
    xp = array_module(*(p[0] for p in parts))
    values = xp.stack([p[0] for p in parts])
    index = xp.stack([p[1] for p in parts])
    if axis is not None:  # the parts go along the axis in order: the first best wins ties
        pick = xp.argmax if kind == "argmax" else xp.argmin
        chosen = xp.expand_dims(pick(values, axis=0), 0)
        return (xp.take_along_axis(values, chosen, axis=0)[0], xp.take_along_axis(index, chosen, axis=0)[0])
    # axis None: block order is not flat order, so ties go to the smallest flat index
    flat_values, flat_index = values.reshape(len(parts)), index.reshape(len(parts))
    nan = xp.isnan(flat_values) if flat_values.dtype.kind in "fc" else xp.zeros(len(parts), bool)
    if nan.any():
        best = nan
    else:
        target = flat_values.max() if kind == "argmax" else flat_values.min()
        best = flat_values == target
    i = int(xp.flatnonzero(best)[xp.argmin(flat_index[best])])
    return values[i], index[i]


def _arg_finish(axes: tuple[int, ...], keepdims: bool, part: tuple[np.ndarray, np.ndarray]) -> Any:
    index = part[1]
    return index if keepdims else index.squeeze(axis=axes)
