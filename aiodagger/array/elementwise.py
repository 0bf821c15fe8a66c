"""Elementwise operations on DArrays: numpy ufuncs (so every operator), with numpy's
broadcasting between DArrays of different block grids and ranks, numpy arrays and
scalars; and ``map_blocks``.

The output takes its block grid, axis by axis, from the first DArray operand that spans
that axis; the others are cut to match (one task per differing region). The result's
dtype, and numpy's errors for shapes or values it refuses, come from running the
operation once on one-element stand-ins, before any task is spawned.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from ..gpu.arrays import array_module
from . import grid
from .core import DArray, block_task, broadcast_region, operation
from .grid import Chunks
from .matmul import matmul

__all__ = ["apply_ufunc", "elementwise", "map_blocks"]

_OPERANDS = (DArray, np.ndarray, np.generic, numbers.Number)


@operation("ufunc")
def apply_ufunc(ufunc: Any, method: str, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if method != "__call__" or ufunc.nout != 1:
        return NotImplemented
    if kwargs.get("out") is not None:
        raise TypeError(f"np.{ufunc.__name__}(..., out=...): a DArray is not written in place; "
                        "use the DArray it returns")
    if not all(isinstance(x, _OPERANDS) for x in inputs):
        return NotImplemented
    if ufunc.signature is not None:  # a gufunc: matmul is the one a DArray knows
        if ufunc is not np.matmul:
            return NotImplemented
        extra = set(kwargs) - {"dtype", "out"}
        if extra:
            raise TypeError(f"np.matmul(..., {', '.join(sorted(extra))}=...) is not supported for DArrays; "
                            "only dtype= is")
        return matmul(*inputs, dtype=kwargs.get("dtype"))
    return elementwise(ufunc, inputs, kwargs, ufunc.__name__)


def _stand_in(x: Any) -> Any:
    if isinstance(x, (DArray, np.ndarray)):
        return np.ones((1,) * x.ndim, dtype=x.dtype)
    return x


def elementwise(fn: Callable[..., Any], operands: tuple[Any, ...], kwargs: dict[str, Any],
                name: str, dtype: Any = None) -> DArray:
    shape = np.broadcast_shapes(*(x.shape if isinstance(x, DArray) else np.shape(x) for x in operands))
    if dtype is None:
        with np.errstate(all="ignore"):
            dtype = np.asarray(fn(*[_stand_in(x) for x in operands], **kwargs)).dtype
    chunks = _output_chunks(shape, operands)
    blocks = np.empty(tuple(len(c) for c in chunks), dtype=object)
    cache: dict[tuple[int, tuple[Any, ...]], Any] = {}
    for index in grid.indices(chunks):
        region = grid.block_slices(chunks, index)
        pieces = [broadcast_region(x, region, shape, cache) for x in operands]
        blocks[index] = block_task(_call, fn, kwargs, *pieces, name=name)
    return DArray(blocks, chunks, dtype)


def _output_chunks(shape: tuple[int, ...], operands: tuple[Any, ...]) -> Chunks:
    out = []
    for d, n in enumerate(shape):
        found: tuple[int, ...] = (n,)
        for x in operands:
            if isinstance(x, DArray):
                axis = d - (len(shape) - x.ndim)
                if axis >= 0 and x.shape[axis] == n:
                    found = x.chunks[axis]
                    break
        out.append(found)
    return tuple(out)


def _call(fn: Callable[..., Any], kwargs: dict[str, Any], *args: Any) -> Any:
    if isinstance(fn, np.ufunc):
        xp = array_module(*args)
        if xp is not np:  # blocks on a GPU: the ufunc of the same name there
            fn = _device_ufunc(xp, fn)
    return fn(*args, **kwargs)


def _device_ufunc(xp: Any, ufunc: np.ufunc) -> Any:
    found = getattr(xp, ufunc.__name__, None)
    if found is None:
        raise NotImplementedError(
            f"np.{ufunc.__name__} on blocks on a GPU: {xp.__name__} has no {ufunc.__name__}. Run it "
            "outside the GPU scope (a CPU task receives the blocks as numpy arrays)")
    return found


@operation("map_blocks")
def map_blocks(fn: Callable[..., Any], *args: Any, dtype: Any = None, **kwargs: Any) -> DArray:
    """``fn`` applied to each block of the DArrays among ``args`` (which share one block
    grid), other arguments passed as they are; each result must keep its block's shape."""
    arrays = [a for a in args if isinstance(a, DArray)]
    if not arrays:
        raise TypeError("map_blocks() needs at least one DArray among its arguments")
    chunks = arrays[0].chunks
    for a in arrays[1:]:
        if a.chunks != chunks:
            raise ValueError(f"map_blocks(): the DArrays have different block grids ({chunks} and "
                             f"{a.chunks}); rechunk one to the other's blocks first")
    if dtype is None:
        try:
            with np.errstate(all="ignore"):
                dtype = np.asarray(fn(*[_stand_in(a) for a in args], **kwargs)).dtype
        except Exception as exc:
            raise TypeError(f"map_blocks({getattr(fn, '__name__', fn)!r}): could not find the result's "
                            f"dtype by a trial call ({type(exc).__name__}: {exc}); pass dtype=") from exc
    blocks = np.empty(arrays[0].grid, dtype=object)
    name = getattr(fn, "__name__", type(fn).__name__)
    for index in grid.indices(chunks):
        pieces = [a._blocks[index] if isinstance(a, DArray) else a for a in args]
        blocks[index] = block_task(_call, fn, kwargs, *pieces, name=name)
    return DArray(blocks, chunks, dtype)
