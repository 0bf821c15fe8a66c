"""Small task functions shared by the tests (importable by subprocess scripts too)."""

from __future__ import annotations

import asyncio
import threading
import time


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def boom(*_args):
    raise ValueError("boom")


async def ainc(x):
    await asyncio.sleep(0)
    return x + 1


async def asleep_forever():
    await asyncio.sleep(3600)


def block_on(event: threading.Event, timeout: float = 10.0) -> str:
    event.wait(timeout)
    return "released"


def sleep_then(seconds: float, value):
    time.sleep(seconds)
    return value


async def eventually(check, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``check()`` on the loop until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
