"""Shared fixtures: every async test runs on both asyncio's loop and uvloop, and no
test may leave an aiodagger thread behind."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import uvloop

import aiodagger as dagger
from aiodagger.cluster import shutdown_default_cluster


def pytest_asyncio_loop_factories(config, item):
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def gpu_skip_reason() -> str | None:
    """Why GPU tests cannot run here (cupy missing, or no CUDA device), or None."""
    try:
        import cupy
    except ImportError:
        return "cupy is not installed (pip install 'aiodagger[gpu]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy's CUDARuntimeError, or a driver library it cannot load
        return f"no CUDA device: {exc}"
    return None if count else "no CUDA device: cupy sees none"


def aiodagger_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("aiodagger")]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    yield
    shutdown_default_cluster()
    deadline = time.monotonic() + 5
    while aiodagger_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not aiodagger_threads(), f"threads left behind: {aiodagger_threads()}"


@pytest.fixture
async def cluster():
    async with dagger.Cluster(threads=2) as c:
        yield c
