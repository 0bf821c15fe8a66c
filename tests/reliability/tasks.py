"""Task bodies for the chaos scenarios, found by reference in worker processes.

Each body appends ``<key> <pid>`` to a run log before it works: the scenarios read the
log to count how often each body ran, and where (an O_APPEND write of one short line is
atomic, so lines from concurrent workers never interleave).
"""

from __future__ import annotations

import os
import time

import numpy as np

WIDTH = 256  # int64 items per value: 2 KiB, sent out of band, so values live on workers


def note(log: str, key: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{key} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def leaf(i: int, log: str, pause: float) -> np.ndarray:
    note(log, f"L{i}")
    time.sleep(pause)
    return np.full(WIDTH, i, dtype=np.int64)


def combine(a: np.ndarray, b: np.ndarray, key: str, log: str, pause: float) -> np.ndarray:
    note(log, key)
    time.sleep(pause)
    return a + b


def runs(log: str) -> dict[str, list[int]]:
    """Each key in the run log, with the pids that ran it, in order."""
    found: dict[str, list[int]] = {}
    try:
        with open(log) as f:
            for line in f:
                key, pid = line.split()
                found.setdefault(key, []).append(int(pid))
    except FileNotFoundError:
        pass
    return found


def block(i: int, log: str, nbytes: int, pause: float = 0.0) -> np.ndarray:
    """A value larger than what travels with a completion: it stays on its worker."""
    note(log, f"B{i}")
    time.sleep(pause)
    return np.full(nbytes // 8, i, dtype=np.int64)


def first(a: np.ndarray) -> int:
    return int(a[0])


# -- the soak's graph: every value is a function of its key and its inputs' values --------
PRIME = 1_000_000_007


def value_of(x: object) -> int:
    return int(x[0]) if isinstance(x, np.ndarray) else int(x)  # type: ignore[index, call-overload]


def mix(key: int, inputs: tuple) -> int:
    return (key * 2654435761 + sum(value_of(x) for x in inputs)) % PRIME


def soak_sync(key: int, pause: float, *inputs: object) -> int:
    time.sleep(pause)
    return mix(key, inputs)


async def soak_async(key: int, pause: float, *inputs: object) -> int:
    import asyncio

    await asyncio.sleep(pause)
    return mix(key, inputs)


def soak_big(key: int, nbytes: int, *inputs: object) -> np.ndarray:
    """Over the inline limit: it stays on its worker, and with a memory limit, spills."""
    return np.full(nbytes // 8, mix(key, inputs), dtype=np.int64)


def soak_nested(key: int, pause: float, *inputs: object) -> int:
    """Spawns two tasks into the cluster from inside a worker and waits for them."""
    import aiodagger as dagger

    kids = [dagger.spawn(soak_sync, key * 4 + j, pause) for j in range(2)]
    return (mix(key, inputs) + sum(k.fetch(timeout=120) for k in kids)) % PRIME
