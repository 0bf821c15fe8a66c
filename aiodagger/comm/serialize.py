"""Python objects as (pickle bytes, out-of-band buffers).

cloudpickle with pickle protocol 5: a numpy array's data (any contiguous buffer that
supports out-of-band pickling) is handed back as a separate buffer instead of being
copied into the pickle, so the wire and the spill files can write it as it is.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

__all__ = ["dumps", "loads"]


def dumps(obj: Any) -> tuple[bytes, list[memoryview]]:
    """Serialize ``obj``; large contiguous buffers come back uncopied, as memoryviews."""
    buffers: list[pickle.PickleBuffer] = []
    payload = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return payload, [b.raw() for b in buffers]


def loads(payload: bytes | memoryview, buffers: list[Any] | tuple[Any, ...] = ()) -> Any:
    """Rebuild an object from :func:`dumps` output (buffers are used in place, not copied)."""
    return pickle.loads(payload, buffers=buffers)
