"""Which CUDA devices a worker has, and what ``Cluster(gpus=...)`` asks for.

Devices are looked for inside the worker's own process, at its start: CUDA initialised
before a fork leaves the child a context it cannot use, so the cluster's process never
probes on behalf of its subprocess workers. A worker has GPU processors only when cupy
imports and sees a device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from .arrays import cupy_module, device_of, map_arrays

__all__ = ["GpuSpec", "check_spec", "choose", "gpus_argument", "missing_reason", "input_device", "parse_kind", "pick_gpu", "visible"]

# What Cluster(gpus=...) takes, checked: "auto", a count, or device numbers.
GpuSpec = str | int | tuple[int, ...]


def check_spec(gpus: Any) -> GpuSpec:
    """``gpus`` as :func:`choose` takes it, or a TypeError/ValueError that says what to write."""
    if gpus is None or gpus is False:
        return 0
    if gpus is True:
        raise ValueError("Cluster(gpus=True): write gpus='auto' for every device a worker sees, "
                         "or a count, or a list of device numbers")
    if isinstance(gpus, str):
        if gpus != "auto":
            raise ValueError(f"Cluster(gpus={gpus!r}): the only string taken is 'auto' "
                             "(every device a worker sees)")
        return gpus
    if isinstance(gpus, int):
        if gpus < 0:
            raise ValueError(f"Cluster(gpus={gpus!r}): a count of devices cannot be negative")
        return gpus
    if isinstance(gpus, Sequence):
        ids = tuple(gpus)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"Cluster(gpus={gpus!r}): device numbers are ints from 0, got {i!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"Cluster(gpus={gpus!r}): a device is named twice")
        return ids
    raise TypeError(f"Cluster(gpus=...) takes 'auto', a count or a list of device numbers, "
                    f"got {type(gpus).__name__}")


@functools.cache
def _probe() -> tuple[int, str]:
    """(devices seen, why none) for this process, probed once."""
    cupy = cupy_module()
    if cupy is None:
        return 0, "cupy is not installed (pip install 'aiodagger[gpu]')"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # noqa: BLE001 - no driver, no device, a broken install
        return 0, f"no CUDA device: {exc}"
    if count == 0:
        return 0, "no CUDA device: the driver reports none"
    return count, ""


def visible() -> list[int]:
    """The device numbers this process sees (none without cupy or a device)."""
    return list(range(_probe()[0]))


def missing_reason() -> str | None:
    """Why this process has no GPU, or None if it has one."""
    count, why = _probe()
    return None if count else why


def choose(spec: GpuSpec, seen: list[int] | None = None) -> list[int]:
    """The devices a worker runs GPU processors on, given the checked ``spec`` and the
    devices it sees; ValueError if it asks for one it does not see ("auto" never does)."""
    seen = visible() if seen is None else seen
    if spec == "auto" or spec == 0:
        return list(seen) if spec == "auto" else []
    if isinstance(spec, int):
        if spec > len(seen):
            raise ValueError(f"Cluster(gpus={spec}): this worker sees {_count(seen)}"
                             f"{_why(seen)}; ask for gpus='auto' or at most {len(seen)}")
        return list(seen[:spec])
    assert isinstance(spec, tuple)
    absent = [i for i in spec if i not in seen]
    if absent:
        raise ValueError(f"Cluster(gpus={list(spec)}): device(s) {absent} not seen by this worker, "
                         f"which sees {_count(seen)}{_why(seen)}")
    return list(spec)


def _count(seen: list[int]) -> str:
    if not seen:
        return "no CUDA device"
    return f"{len(seen)} CUDA device{'s' if len(seen) > 1 else ''} ({', '.join(map(str, seen))})"


def _why(seen: list[int]) -> str:
    if seen:
        return ""
    why = missing_reason()
    return f" ({why})" if why else ""


def pick_gpu(procs: dict[int, Any], wanted: bool | int | None, args: Any = (), kwargs: Any = None) -> Any:
    """The processor a GPU task goes to: device ``wanted``'s; for ``gpu=True`` the device
    its device inputs live on (``args``/``kwargs``: a mutable tile must be changed where
    it is, not in a copy on another device), else the one with the fewest tasks running."""
    if type(wanted) is int:
        return procs[wanted]
    if len(procs) > 1:
        where = input_device(args, kwargs or {})
        if where in procs:
            return procs[where]
    return min(procs.values(), key=lambda p: p.running)


def input_device(args: Any, kwargs: dict[str, Any]) -> int | None:
    """The device of the first device array among a task's arguments (as values, as
    finished DTasks' values, or as mutables' objects here), or None."""
    from ..placed import Placed, Ref, here
    from ..task import DTask

    found: list[int] = []

    def look(value: Any) -> Any:
        if found:
            return value
        if isinstance(value, DTask):  # its value, if here
            value = value._value
        if isinstance(value, (Ref, Placed)):  # a mutable's object, if here
            value = here(value)
        device = device_of(value)
        if device is not None:
            found.append(device)
        return value

    map_arrays(tuple(args), kwargs, look)
    return found[0] if found else None


def parse_kind(kind: str) -> tuple[str, int | None]:
    """A GPU task's kind as the wire carries it ("gpu", "gpu-async:1"): (kind, device or
    None for any); ValueError if it is no GPU kind."""
    base, _, device = kind.partition(":")
    if base not in ("gpu", "gpu-async") or (device and not device.isdigit()):
        raise ValueError(f"not a GPU task kind: {kind!r}")
    return base, int(device) if device else None


def gpus_argument(spec: GpuSpec) -> str:
    """A checked ``Cluster(gpus=...)`` as the worker's ``--gpus`` takes it."""
    return f"[{','.join(map(str, spec))}]" if isinstance(spec, tuple) else str(spec)
