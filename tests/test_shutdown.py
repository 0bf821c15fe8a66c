"""Closing a cluster is bounded by its shutdown_timeout, whatever its tasks do."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

import pytest

import aiodagger as dagger
from aiodagger.comm.handshake import new_token
from aiodagger.memory import spilldir
from aiodagger.worker.process import WorkerProcess
from tests.workers import WorkerProcesses, wait_for_file, write_token


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


async def test_a_second_signal_cuts_the_wait_for_tasks_short_but_not_the_cleanup(tmp_path):
    """An `aiodagger worker` stopping on SIGTERM waits for its running sync task; a
    second SIGTERM ends that wait, and the worker still removes its spill directory (it
    was left behind, to be found only by a later worker on that machine)."""
    workers = WorkerProcesses(tmp_path)
    spill = tmp_path / "spill"
    try:
        async with dagger.Cluster(threads=1, listen="tcp://127.0.0.1:0", token=new_token()) as cluster:
            proc = workers.start(cluster.address, write_token(tmp_path, cluster.token),
                                 "--spill-dir", str(spill), threads=1)
            await workers.wait_joined(cluster, [proc])
            assert len(list(spill.iterdir())) == 1
            dagger.spawn(wait_for_file, str(tmp_path / "never"), 20)
            while not any(w.tasks_running for w in cluster.workers):
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # the thread is inside the task
            for _ in range(2):
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
            assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 10) == 0
        assert list(spill.iterdir()) == [], workers.output(proc)
    finally:
        workers.stop_all()


async def test_a_signal_while_the_spill_directory_is_removed_waits_for_the_removal(tmp_path, monkeypatch):
    """The signal that comes while a stopping worker removes its spill directory takes
    effect once the directory is gone: the process ended with it half removed, or not
    at all (its event loop's exit cancelled the removal)."""
    removing = threading.Event()
    remove = spilldir.remove

    def slow_remove(path):
        removing.set()
        time.sleep(0.5)
        remove(path)

    monkeypatch.setattr(spilldir, "remove", slow_remove)
    worker = WorkerProcess("tcp://127.0.0.1:9", "token", threads=1, name="w", spill_dir=str(tmp_path))
    running = asyncio.ensure_future(worker.run())  # nobody listens there: it stops at once
    assert await asyncio.to_thread(removing.wait, 10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert list(tmp_path.iterdir()) == []
