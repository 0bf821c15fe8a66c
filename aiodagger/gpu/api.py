"""``dagger.gpu``: awaiting GPU work from asyncio code."""

from __future__ import annotations

from typing import Any

from .arrays import cupy_module
from .discovery import missing_reason, visible
from .waiters import waiters

__all__ = ["devices", "missing_reason", "synchronize"]


async def synchronize(stream_or_event: Any = None) -> Any:
    """Wait, without blocking the event loop, until the work queued so far on a cupy
    ``Stream`` is done, or a cupy ``Event`` fired (anything with ``synchronize()`` will
    do); the current stream if none is given. A CUDA error of that work is raised here.

    A stream gets a blocking-sync event recorded on it, which a waiter thread waits on
    (see :mod:`aiodagger.gpu.waiters`); the object waited on is returned."""
    target = stream_or_event
    cupy = cupy_module()
    if target is None:
        if cupy is None:
            raise RuntimeError("dagger.gpu.synchronize() with no stream needs cupy: pip install 'aiodagger[gpu]'")
        target = cupy.cuda.get_current_stream()
    if cupy is not None and isinstance(target, cupy.cuda.Stream):
        event = cupy.cuda.Event(block=True, disable_timing=True)
        event.record(target)
        target = event
    elif not callable(getattr(target, "synchronize", None)):
        raise TypeError(f"dagger.gpu.synchronize() takes a cupy Stream or Event (anything with "
                        f"synchronize()), got {type(target).__name__}")
    return await waiters().wait(target)


def devices() -> list[int]:
    """The CUDA devices this process sees: [] without cupy or a device
    (``dagger.gpu.missing_reason()`` says which)."""
    return visible()
