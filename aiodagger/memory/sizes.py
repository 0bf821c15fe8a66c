"""Memory limits as users write them, and the size of a chunk in bytes."""

from __future__ import annotations

import numbers
import re
import sys
from collections.abc import Callable
from typing import Any

from ..comm import serialize

__all__ = ["parse_memory_limit", "sizeof"]

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_FORMS = ("an int of bytes (268435456), a string with a unit ('256MiB', '8GiB', "
          "'1.5GB', '500MB'), a float fraction of system memory in (0, 1] (0.5), "
          "or None for no limit")


def parse_memory_limit(value: int | float | str | None) -> int | None:
    """A memory limit in bytes, or None for no limit.

    Accepts an int of bytes, a string with a decimal (kB, MB, GB, TB, PB) or binary
    (KiB, MiB, GiB, TiB, PiB) unit or plain bytes (B or none), a float in (0, 1] as a
    fraction of the machine's memory, or None.
    """
    if value is None:
        return None
    if isinstance(value, bool):  # an int subclass, never meant as a size
        raise TypeError(f"memory_limit={value!r} is not a size: write {_FORMS}")
    if isinstance(value, numbers.Integral):
        if value <= 0:
            raise ValueError(f"memory_limit={value!r} must be positive: write {_FORMS}")
        return int(value)
    if isinstance(value, numbers.Real):
        if not 0 < value <= 1:
            raise ValueError(f"memory_limit={value!r}: a float is a fraction of system memory "
                             f"and must lie in (0, 1]; for a size write {_FORMS}")
        import psutil

        return max(1, int(float(value) * psutil.virtual_memory().total))
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        factor = _UNITS.get(match.group(2).lower() or "b") if match else None
        if match is None or factor is None:
            raise ValueError(f"memory_limit={value!r} is not understood: write {_FORMS}")
        nbytes = int(float(match.group(1)) * factor)
        if nbytes <= 0:
            raise ValueError(f"memory_limit={value!r} must be positive: write {_FORMS}")
        return nbytes
    raise TypeError(f"memory_limit={value!r} ({type(value).__name__}) is not a size: write {_FORMS}")


def sizeof(obj: Any) -> int:
    """Bytes that ``obj`` holds, as counted against a worker's memory limit.

    Exact and O(1) for numpy arrays and scalars, bytes, bytearray, memoryview and small
    builtins; anything else costs one pickling (with out-of-band buffers, so arrays
    inside it are not copied) and counts its pickled size.
    """
    sizer = _SIZERS.get(type(obj))
    if sizer is None:
        sizer = _sizer_for(type(obj))
    return sizer(obj)


def _nbytes(obj: Any) -> int:
    return int(obj.nbytes)


def _pickled_size(obj: Any) -> int:
    try:
        payload, buffers = serialize.dumps(obj)
    except Exception:
        # It cannot be spilled either; the store finds that out when it tries.
        return sys.getsizeof(obj)
    return len(payload) + sum(b.nbytes for b in buffers)


_SIZERS: dict[type, Callable[[Any], int]] = {
    memoryview: _nbytes,
    bytes: len,
    bytearray: len,
    int: sys.getsizeof,
    float: sys.getsizeof,
    complex: sys.getsizeof,
    bool: sys.getsizeof,
    type(None): sys.getsizeof,
    str: sys.getsizeof,
}


def _sizer_for(cls: type) -> Callable[[Any], int]:
    # Subclasses resolve once, then hit the dict like the exact types do. numpy is
    # looked up, not imported: a worker that never saw numpy holds no arrays.
    np = sys.modules.get("numpy")
    if np is not None and issubclass(cls, (np.ndarray, np.generic)):
        sizer: Callable[[Any], int] = _nbytes
    elif issubclass(cls, (bytes, bytearray)):
        sizer = len
    else:
        return _pickled_size  # not cached: the table stays bounded by the types seen here
    _SIZERS[cls] = sizer
    return sizer
