"""linalg's tile kernels for tiles on a GPU (cupy arrays), one per kernel of
:mod:`.linalg`, which calls them when its tile is a cupy array.

cuSOLVER for the factorizations (``cupy.linalg.cholesky``,
``cupyx.scipy.linalg.lu_factor``), cuBLAS's trsm through
``cupyx.scipy.linalg.solve_triangular``, and ``@`` for the updates. The updates
subtract in place, as the numpy kernels do, so a tile is never replaced: it is a
mutable that other tasks hold. cupy is imported only here, when a tile already is one
of its arrays.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..gpu.arrays import to_host

__all__ = ["gemm_h", "gemm_sub", "getrf_panel", "herk", "potrf", "swap_rows", "trsm_left_unit_lower",
           "trsm_right_lower_h", "triangular"]


def triangular() -> Any:
    """``cupyx.scipy.linalg``, for its ``solve_triangular`` (scipy's signature)."""
    import cupyx.scipy.linalg

    return cupyx.scipy.linalg


def _h(x: Any) -> Any:
    """The conjugate transpose (a view, for real tiles)."""
    return x.conj().T if x.dtype.kind == "c" else x.T


def potrf(tile: Any) -> None:
    import cupy
    import cupyx

    # cuSOLVER reports a failed factorization only in a device flag, which cupy reads
    # (a synchronization) when asked to: without "raise", the tile silently holds NaNs.
    with cupyx.errstate(linalg="raise"):
        try:
            factor = cupy.linalg.cholesky(tile)
        except np.linalg.LinAlgError as exc:
            raise np.linalg.LinAlgError("Matrix is not positive definite") from exc
    tile[...] = factor


def trsm_right_lower_h(lkk: Any, tile: Any) -> None:
    """tile := tile @ inv(L)^H, solved transposed as the numpy kernel does: tile^T :=
    inv(op_C(lkk^T)) @ tile^T, into the tile (tile^T is Fortran-ordered, so cuBLAS writes
    it in place)."""
    out = triangular().solve_triangular(lkk.T, tile.T, trans="C", lower=False, overwrite_b=True)
    _store(tile.T, out)


def herk(aik: Any, tile: Any) -> None:
    """tile -= aik @ aik^H, the whole tile (potrf reads only its lower triangle)."""
    tile -= aik @ _h(aik)


def gemm_h(aik: Any, ajk: Any, tile: Any) -> None:
    tile -= aik @ _h(ajk)


def gemm_sub(a: Any, b: Any, tile: Any) -> None:
    tile -= a @ b


def trsm_left_unit_lower(lkk: Any, tile: Any) -> None:
    """tile := inv(L) @ tile, L unit lower: tile^T := tile^T inv(L^T) has no left-side
    form, so solved as it is (into a copy) and stored back."""
    _store(tile, triangular().solve_triangular(lkk, tile, lower=True, unit_diagonal=True))


def getrf_panel(*panel: Any) -> np.ndarray:
    """The panel's pivoted LU, in place; its pivots (0-based, as scipy's) on the host,
    where the tasks that swap rows read them."""
    import cupy

    stacked = cupy.concatenate(panel)
    lu_factor = triangular().lu_factor
    # lu_factor warns (RuntimeWarning) of a zero pivot instead of failing: made the error
    # numpy's kernels raise. catch_warnings swaps the process-wide filters; the one added
    # matches that message only, so other threads' warnings go on as before.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*Singular matrix", category=RuntimeWarning)
        try:
            lu_, piv = lu_factor(stacked, overwrite_a=True, check_finite=False)
        except RuntimeWarning as exc:
            raise np.linalg.LinAlgError("Singular matrix") from exc
    start = 0
    for tile in panel:
        tile[...] = lu_[start:start + tile.shape[0]]
        start += tile.shape[0]
    return np.asarray(to_host(piv))


def swap_rows(order: np.ndarray, column: tuple[Any, ...]) -> None:
    """The column's tiles, stacked, reordered to ``order`` (host row indices): one gather
    on the device rather than a kernel per swap."""
    import cupy

    stacked = cupy.concatenate(column)[cupy.asarray(order)]
    start = 0
    for tile in column:
        tile[...] = stacked[start:start + tile.shape[0]]
        start += tile.shape[0]


def _store(tile: Any, value: Any) -> None:
    """``value`` into ``tile``, unless the solver already wrote it there."""
    if value.data.ptr != tile.data.ptr or value.strides != tile.strides:
        tile[...] = value
