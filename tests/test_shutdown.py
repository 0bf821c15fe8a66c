"""Closing a cluster is bounded by its shutdown_timeout, whatever its tasks do."""

from __future__ import annotations

import asyncio
import logging
import time

import aiodagger as dagger


async def stubborn_until(release: asyncio.Event) -> None:
    """Swallows CancelledError until ``release`` is set (a coroutine that never ends)."""
    while True:
        try:
            await asyncio.sleep(10)
            return
        except asyncio.CancelledError:
            if release.is_set():
                raise


async def stubborn_forever() -> None:
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass


async def test_close_returns_when_a_coroutine_swallows_cancellation(caplog):
    """Worker 0: close() waits at most shutdown_timeout for cancelled coroutines, then
    says what it left behind."""
    release = asyncio.Event()
    cluster = dagger.Cluster(threads=1, shutdown_timeout=0.5)
    try:
        async with cluster:
            dagger.spawn(stubborn_until, release)
            await asyncio.sleep(0.1)
            started = time.perf_counter()
        assert time.perf_counter() - started < 5
        assert any("swallow CancelledError" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING)
    finally:
        release.set()  # the loop's own teardown can now end it


async def test_close_does_not_wait_past_the_timeout_for_a_subprocess_worker():
    """A worker process whose task swallows cancellation is given shutdown_timeout (and a
    second to exit), then killed: close() does not take the old fixed 10 s."""
    async with dagger.Cluster(processes=1, shutdown_timeout=0.5):
        dagger.spawn(stubborn_forever)
        await asyncio.sleep(0.5)
        started = time.perf_counter()
    assert time.perf_counter() - started < 5
