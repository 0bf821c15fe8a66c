"""BLAS's gemm, trsm and syrk/herk on Fortran-ordered arrays, in place, without the GIL.

scipy's Python wrappers (``scipy.linalg.blas``) hold the GIL for the whole call: two
tile kernels on two pool threads ran one after the other (LA-chol busied 1.0 of 2 cores
most of the time). The same routines, taken from ``scipy.linalg.cython_blas``'s
capsules and called through ctypes, which lets the GIL go for a foreign call, run side
by side. Arrays must be Fortran-contiguous (the kernels pass C-ordered tiles' ``.T``).
"""

from __future__ import annotations

import ctypes
from functools import cache
from typing import Any

import numpy as np

__all__ = ["gemm", "herk", "trsm"]

_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d",
           np.dtype(np.complex64): "c", np.dtype(np.complex128): "z"}
_SCALAR: dict[str, Any] = {"s": ctypes.c_float, "d": ctypes.c_double, "c": ctypes.c_float * 2, "z": ctypes.c_double * 2}
_P = ctypes.c_void_p


@cache
def _routine(name: str, nargs: int) -> Any:
    import scipy.linalg.cython_blas as cython_blas

    capsule = cython_blas.__pyx_capi__[name]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    return ctypes.CFUNCTYPE(None, *[_P] * nargs)(pointer)  # CFUNCTYPE: the GIL is let go


def _prefix(*arrays: np.ndarray) -> str:
    dtype = arrays[0].dtype
    for a in arrays:
        if a.dtype != dtype or not a.flags.f_contiguous:
            raise ValueError("BLAS kernels take Fortran-contiguous arrays of one dtype")
    return _PREFIX[dtype]


def _scalar(prefix: str, value: complex) -> Any:
    kind = _SCALAR[prefix]
    if prefix in "cz":
        return kind(value.real, value.imag)
    return kind(value.real)


def _int(n: int) -> Any:
    return ctypes.byref(ctypes.c_int(n))


def _char(c: str) -> Any:
    return ctypes.c_char_p(c.encode())


def _ptr(value: Any) -> Any:
    return ctypes.byref(value) if not isinstance(value, np.ndarray) else value.ctypes.data_as(_P)


def gemm(transa: str, transb: str, alpha: complex, a: np.ndarray, b: np.ndarray, beta: complex,
         c: np.ndarray) -> None:
    """c := alpha op(a) op(b) + beta c (op: "N", "T" or "C")."""
    p = _prefix(a, b, c)
    m, n = c.shape
    k = a.shape[1] if transa == "N" else a.shape[0]
    _routine(p + "gemm", 13)(_char(transa), _char(transb), _int(m), _int(n), _int(k),
                             _ptr(_scalar(p, alpha)), _ptr(a), _int(max(1, a.shape[0])),
                             _ptr(b), _int(max(1, b.shape[0])), _ptr(_scalar(p, beta)), _ptr(c),
                             _int(max(1, m)))


def trsm(side: str, uplo: str, transa: str, diag: str, alpha: complex, a: np.ndarray, b: np.ndarray) -> None:
    """b := alpha op(a)^-1 b (side "L") or alpha b op(a)^-1 (side "R"), a triangular."""
    p = _prefix(a, b)
    m, n = b.shape
    _routine(p + "trsm", 11)(_char(side), _char(uplo), _char(transa), _char(diag), _int(m), _int(n),
                             _ptr(_scalar(p, alpha)), _ptr(a), _int(max(1, a.shape[0])), _ptr(b),
                             _int(max(1, m)))


def herk(uplo: str, trans: str, alpha: float, a: np.ndarray, beta: float, c: np.ndarray) -> None:
    """c := alpha a a^H + beta c (trans "N") or alpha a^H a + beta c ("C"), one triangle
    (syrk for real arrays, whose trans is "T")."""
    p = _prefix(a, c)
    n = c.shape[0]
    k = a.shape[1] if trans == "N" else a.shape[0]
    real = p in "sd"
    name, trans = (p + "syrk", "T" if trans == "C" else trans) if real else (p + "herk", trans)
    scalar = _SCALAR["s" if p in "sc" else "d"]  # herk's alpha and beta are real
    _routine(name, 10)(_char(uplo), _char(trans), _int(n), _int(k), _ptr(scalar(alpha)), _ptr(a),
                       _int(max(1, a.shape[0])), _ptr(scalar(beta)), _ptr(c), _int(max(1, n)))
