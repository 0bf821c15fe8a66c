"""Device arrays as the rest of aiodagger sees them: which values live on a GPU, their
size there, and moving them between host and device.

cupy is imported lazily and only where a value could be one of its arrays: a process
that never touches a GPU never imports it (importing cupy costs ~0.3 s and, before a
fork, would leave the child a broken CUDA context). Every function here works without
cupy installed; then no value is a device array.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["array_module", "cupy_module", "device_nbytes", "device_of", "is_device_array", "to_device",
           "to_host"]


def cupy_module() -> Any | None:
    """cupy if it is installed and imports, else None (imported at the first call)."""
    mod = sys.modules.get("cupy")
    if mod is not None:
        return mod
    try:
        import cupy
    except Exception:  # noqa: BLE001 - a broken install means "no cupy", said by gpu.devices
        return None
    return cupy


def is_device_array(value: Any) -> bool:
    """Whether ``value`` is a cupy array. Never imports cupy: a value can only be one if
    its module was imported already."""
    mod = sys.modules.get("cupy")
    return mod is not None and isinstance(value, mod.ndarray)


def device_nbytes(value: Any) -> int:
    """The device memory ``value`` holds: its nbytes if a cupy array, else 0."""
    return int(value.nbytes) if is_device_array(value) else 0


def device_of(value: Any) -> int | None:
    """The device number a cupy array lives on, else None."""
    # is_device_array inlined: a ChunkStore asks this of every value it is given, and
    # the second call was a third of the cost (53 ns against 35 for a host value).
    mod = sys.modules.get("cupy")
    if mod is None or not isinstance(value, mod.ndarray):
        return None
    return int(value.device.id)


def array_module(*values: Any) -> Any:
    """cupy if any of ``values`` is a cupy array, else numpy (as ``cupy.get_array_module``,
    without importing cupy for host values)."""
    if any(is_device_array(v) for v in values):
        return sys.modules["cupy"]
    import numpy

    return numpy


def to_host(value: Any, stream: Any = None) -> Any:
    """A cupy array copied to a numpy array, ordered on ``stream`` (the producer's: the
    copy then follows the work that made the value, whatever stream is current here);
    any other value as it is."""
    if not is_device_array(value):
        return value
    cupy = sys.modules["cupy"]
    with cupy.cuda.Device(value.device.id):
        if stream is None:
            return cupy.asnumpy(value)
        host = cupy.asnumpy(value, stream=stream)
        stream.synchronize()  # asnumpy on a stream only enqueues the copy
        return host


def to_device(value: Any, device: int, stream: Any = None) -> Any:
    """A numpy array (or anything with the array interface but a cupy array) copied to
    ``device`` on ``stream``; a cupy array on another device copied across; else as is."""
    import numpy

    cupy = cupy_module()
    if cupy is None:
        raise RuntimeError("moving a value to a GPU needs cupy: pip install 'aiodagger[gpu]'")
    if isinstance(value, cupy.ndarray):
        if value.device.id == device:
            return value
    elif not isinstance(value, numpy.ndarray):
        return value
    with cupy.cuda.Device(device):
        if stream is None:
            return cupy.asarray(value)
        with stream:
            return cupy.asarray(value)


_CONTAINERS = (list, tuple, dict)


def map_arrays(args: tuple[Any, ...], kwargs: dict[str, Any], convert: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args``/``kwargs`` with ``convert`` applied to every value that is not a list,
    tuple or dict (walked, as dependencies are found: aiodagger/_args.py); a container is
    rebuilt only where something in it changed."""
    new_args = _map(args, convert)
    new_kwargs = _map(kwargs, convert) if kwargs else kwargs
    return new_args, new_kwargs


def _map(value: Any, convert: Any) -> Any:
    kind = type(value)
    if kind is list or kind is tuple:
        items = [_map(v, convert) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return items if kind is list else tuple(items)
    if kind is dict:
        out = {k: _map(v, convert) for k, v in value.items()}
        if all(out[k] is v for k, v in value.items()):
            return value
        return out
    return convert(value)


def host_reducers() -> dict[type, Any] | None:
    """A pickler's dispatch table that sends cupy arrays as numpy ones, or None when cupy
    was never imported here. Values cross processes as host arrays (the reader may have
    no GPU, or another one); a GPU task that reads one gets it back on its device."""
    mod = sys.modules.get("cupy")
    if mod is None:
        return None
    import copyreg

    table = dict(copyreg.dispatch_table)
    table[mod.ndarray] = _reduce_to_host
    return table


def _reduce_to_host(value: Any) -> Any:
    return to_host(value).__reduce_ex__(5)
