"""numpy functions called on DArrays (``np.sum(a)``, ``np.mean(a, axis=0)``,
``np.reshape(a, (3, -1))``...), through ``__array_function__``: those with a DArray
method run as that method; numpy raises its usual ``TypeError`` for the others, rather
than the array being brought here. (``np.matmul`` is a ufunc: it comes through
``__array_ufunc__``.)"""

from __future__ import annotations

from typing import Any

import numpy as np

from .core import DArray, operation

__all__ = ["dispatch"]

_METHODS = {
    np.sum: "sum", np.prod: "prod", np.min: "min", np.max: "max", np.amin: "min", np.amax: "max",
    np.mean: "mean", np.var: "var", np.std: "std", np.argmax: "argmax", np.argmin: "argmin",
    np.any: "any", np.all: "all", np.transpose: "transpose",
}
_ATTRIBUTES = {np.shape: "shape", np.ndim: "ndim", np.size: "size"}


@operation("function")
def dispatch(func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if func in _ATTRIBUTES and len(args) == 1 and not kwargs:
        return getattr(args[0], _ATTRIBUTES[func])
    if func is np.reshape:
        return _reshape(*args, **kwargs)
    if func is np.dot:
        return _dot(*args, **kwargs)
    method = _METHODS.get(func)
    if method is None or not args:
        return NotImplemented
    target, *rest = args
    if kwargs.get("out") is not None:
        raise TypeError(f"np.{func.__name__}(..., out=...): a DArray is not written in place")
    kwargs = {k: v for k, v in kwargs.items() if k != "out"}
    if method == "transpose" and "axes" in kwargs:
        rest = [kwargs.pop("axes")]
    return getattr(target, method)(*rest, **kwargs)


def _reshape(a: Any, shape: Any = None, order: str = "C", *, newshape: Any = None, copy: Any = None) -> Any:
    if not isinstance(a, DArray):
        return NotImplemented
    if copy is False:
        raise ValueError("np.reshape(DArray, copy=False): a DArray's blocks are made by new tasks, never views")
    return a.reshape(newshape if shape is None else shape, order=order)


def _dot(a: Any, b: Any, out: Any = None) -> Any:
    # np.dot is np.matmul for vectors and matrices; it differs for stacks and scalars
    if out is not None:
        raise TypeError("np.dot(..., out=...): a DArray is not written in place")
    if not all(1 <= (x.ndim if isinstance(x, DArray) else np.ndim(x)) <= 2 for x in (a, b)):
        return NotImplemented
    return a @ b
