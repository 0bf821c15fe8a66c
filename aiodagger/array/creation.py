"""Making DArrays: from a numpy array (``distribute``), or on the workers from nothing
(``zeros``, ``ones``, ``full``, ``rand``, ``randn``, ``fromfunction``), so that no block
passes through the caller. New blocks are spread over the workers in turn (those the
scope in effect admits; under a GPU scope they are made on GPUs, as cupy arrays)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import grid
from .core import DArray, block_task, new_block, new_block_module, on_gpu, placement

__all__ = ["distribute", "fromfunction", "full", "ones", "rand", "randn", "zeros"]


def _shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"negative dimensions are not allowed: shape {shape}")
    return shape


def _build(shape: tuple[int, ...], blocks: Any, dtype: Any,
           make: Callable[[tuple[int, ...], tuple[slice, ...], int], tuple[Any, ...]], name: str) -> DArray:
    chunks = grid.chunks_of(shape, blocks)
    out = np.empty(tuple(len(c) for c in chunks), dtype=object)
    indices = list(grid.indices(chunks))
    for n, (index, worker) in enumerate(zip(indices, placement(len(indices)), strict=True)):
        region = grid.block_slices(chunks, index)
        block_shape = tuple(s.stop - s.start for s in region)
        fn, *args = make(block_shape, region, n)
        out[index] = block_task(fn, *args, name=name, worker=worker)
    return DArray(out, chunks, dtype)


def distribute(x: Any, blocks: Any) -> DArray:
    """``x`` (anything ``np.asarray`` takes) cut in blocks of shape ``blocks``, spread over
    the workers. Each block is a copy: later changes to ``x`` do not reach it."""
    x = np.asarray(x)
    # Copied here and now: the task may run (or be sent) after the caller changed x.
    return _build(x.shape, blocks, x.dtype, lambda shape, region, n: (_block, x[region].copy()), "distribute")


def _block(piece: np.ndarray) -> np.ndarray:
    return piece  # on a GPU processor, the processor has moved it there


def full(shape: Any, blocks: Any, fill_value: Any, dtype: Any = None) -> DArray:
    dtype = np.asarray(fill_value).dtype if dtype is None else np.dtype(dtype)
    gpu = on_gpu()
    return _build(_shape(shape), blocks, dtype, lambda s, r, n: (new_block, "full", s, dtype, gpu, fill_value),
                  "full")


def zeros(shape: Any, blocks: Any, dtype: Any = float) -> DArray:
    dtype, gpu = np.dtype(dtype), on_gpu()
    return _build(_shape(shape), blocks, dtype, lambda s, r, n: (new_block, "zeros", s, dtype, gpu), "zeros")


def ones(shape: Any, blocks: Any, dtype: Any = float) -> DArray:
    dtype, gpu = np.dtype(dtype), on_gpu()
    return _build(_shape(shape), blocks, dtype, lambda s, r, n: (new_block, "ones", s, dtype, gpu), "ones")


def _random(kind: str, shape: Any, blocks: Any, dtype: Any, seed: Any) -> DArray:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"{kind}() makes float32 or float64 values, not {dtype}; convert the result "
                        "with .astype if you need another type")
    shape = _shape(shape)
    nblocks = int(np.prod([len(c) for c in grid.chunks_of(shape, blocks)], dtype=np.int64))
    # Independent streams per block (numpy's SeedSequence.spawn): the same seed gives the
    # same array whatever the workers. On GPUs cupy's generator, seeded alike, draws
    # them: the same array whatever the GPUs, but not numpy's values.
    seeds = np.random.SeedSequence(seed).spawn(nblocks)
    gpu = on_gpu()
    return _build(shape, blocks, dtype, lambda s, r, n: (_draw, kind, s, dtype, seeds[n], gpu), kind)


def _draw(kind: str, shape: tuple[int, ...], dtype: Any, seed: np.random.SeedSequence, gpu: bool) -> Any:
    rng = new_block_module(gpu).random.default_rng(seed)
    return rng.random(shape, dtype=dtype) if kind == "rand" else rng.standard_normal(shape, dtype=dtype)


def rand(shape: Any, blocks: Any, dtype: Any = float, seed: Any = None) -> DArray:
    """Uniform values in [0, 1)."""
    return _random("rand", shape, blocks, dtype, seed)


def randn(shape: Any, blocks: Any, dtype: Any = float, seed: Any = None) -> DArray:
    """Standard normal values."""
    return _random("randn", shape, blocks, dtype, seed)


def fromfunction(fn: Callable[..., Any], shape: Any, blocks: Any, dtype: Any = float, **kwargs: Any) -> DArray:
    """``np.fromfunction(fn, shape, dtype=dtype)``, block by block on the workers: ``fn``
    gets the coordinate arrays of each block."""
    dtype = np.dtype(dtype)
    shape = _shape(shape)
    # numpy's dtype= is the coordinates'; the array's is whatever fn makes of them.
    made = np.asarray(fn(*[np.zeros((1,) * len(shape), dtype=dtype)] * len(shape), **kwargs)).dtype
    gpu = on_gpu()
    return _build(shape, blocks, made,
                  lambda s, r, n: (_from_coordinates, fn, s, tuple(x.start for x in r), dtype, kwargs, gpu),
                  getattr(fn, "__name__", "fromfunction"))


def _from_coordinates(fn: Callable[..., Any], shape: tuple[int, ...], origin: tuple[int, ...],
                      dtype: Any, kwargs: dict[str, Any], gpu: bool) -> Any:
    """``fn`` of the block's coordinates (cupy arrays on a GPU)."""
    xp = new_block_module(gpu)
    coords = [xp.arange(o, o + n, dtype=dtype) for o, n in zip(origin, shape, strict=True)]
    return xp.asarray(fn(*xp.meshgrid(*coords, indexing="ij"), **kwargs))
