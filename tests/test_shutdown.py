"""Closing a cluster is bounded by its shutdown_timeout, whatever its tasks do."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

import aiodagger as dagger
from aiodagger.comm.handshake import new_token
from aiodagger.memory import spilldir
from aiodagger.worker.process import WorkerProcess
from tests.memory_disks import private_dir
from tests.workers import WorkerProcesses, read_line, wait_for_file, write_token


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


async def test_a_signalled_worker_exits_though_a_coroutine_ignores_cancellation():
    """As its parent's death signals it: nothing is left to wait for that coroutine."""
    async with dagger.Cluster(processes=1, shutdown_timeout=0.5) as cluster:
        (info,) = cluster.workers[1:]
        dagger.spawn(stubborn_forever)
        async with asyncio.timeout(30):
            while (await cluster.worker_stats())[info.id]["running"] < 1:
                await asyncio.sleep(0.05)
        worker = psutil.Process(info.pid)
        os.kill(info.pid, signal.SIGTERM)
        async with asyncio.timeout(3):
            while alive(worker):
                await asyncio.sleep(0.02)


async def hog(marker: str) -> None:
    """Blocks its worker's event loop: no message and no signal is handled meanwhile."""
    open(marker, "w").close()
    time.sleep(30)


async def until_exists(path: Path, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not path.exists():
            await asyncio.sleep(0.02)


async def test_a_worker_killed_at_close_leaves_no_spill_directory():
    with private_dir() as base:
        async with dagger.Cluster(processes=1, memory_limit="64MiB", spill_dir=base,
                                  shutdown_timeout=0.5):
            dagger.spawn(hog, str(base / "hogging"))
            await until_exists(base / "hogging")
            assert spill_dirs(base)
            started = time.perf_counter()
        assert time.perf_counter() - started < 5  # killed 1.5 s after it was asked to stop
        assert spill_dirs(base) == []


async def test_a_worker_signalled_twice_stops_now_and_removes_its_spill_directory(tmp_path):
    workers = WorkerProcesses(tmp_path)
    token = new_token()
    try:
        with private_dir() as base:
            async with dagger.Cluster(threads=1, listen="tcp://127.0.0.1:0", token=token,
                                      shutdown_timeout=0.5) as cluster:
                proc = workers.start(cluster.address, write_token(tmp_path, token), "--memory-limit",
                                     "64MiB", "--spill-dir", str(base), "--shutdown-timeout", "60")
                (info,) = await workers.wait_joined(cluster, [proc])
                on_it = dagger.options(scope=dagger.scope(worker=info.id))
                marker = base / "never"
                busy = on_it.spawn(wait_for_file, str(marker), 60)
                async with asyncio.timeout(30):
                    while (await cluster.worker_stats())[info.id]["running"] < 1:
                        await asyncio.sleep(0.05)
                os.kill(proc.pid, signal.SIGTERM)  # stop once its task is done
                await asyncio.sleep(1.0)
                assert proc.poll() is None and spill_dirs(base)
                os.kill(proc.pid, signal.SIGTERM)  # now
                started = time.perf_counter()
                async with asyncio.timeout(5):
                    while proc.poll() is None:
                        await asyncio.sleep(0.02)
                assert time.perf_counter() - started < 2.5
                assert spill_dirs(base) == []
                busy.cancel()
    finally:
        workers.stop_all()


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


# -- a cluster's process interrupted or killed ----------------------------------------------

# A user's script: two worker processes spilling past their memory limit, each busy in a
# task that sleeps (sync code, which no cancellation interrupts) when the signal comes.
INTERRUPTED = textwrap.dedent("""
    import asyncio, os, sys, time
    import numpy as np
    import aiodagger as dagger

    def make(i):
        return np.full(1 << 20, float(i))  # 8 MiB: 24 of them are past two 64 MiB limits

    def total(a):
        return float(a.sum())

    def slow(a, base):
        open(os.path.join(base, f"running-{os.getpid()}"), "w").close()
        time.sleep(60)
        return total(a)

    def ready(cluster):
        print("WORKERS", *[w.pid for w in cluster.workers[1:]], flush=True)

    def sync_script(base):
        with dagger.Cluster(processes=2, memory_limit="64MiB", spill_dir=base) as cluster:
            chunks = [dagger.spawn(make, i) for i in range(24)]
            assert [t.fetch() for t in [dagger.spawn(total, a) for a in chunks]]
            busy = [dagger.spawn(slow, a, base) for a in chunks]
            ready(cluster)
            busy[0].fetch()

    async def async_script(base):
        async with dagger.Cluster(processes=2, memory_limit="64MiB", spill_dir=base) as cluster:
            chunks = [dagger.spawn(make, i) for i in range(24)]
            assert await dagger.gather(*[dagger.spawn(total, a) for a in chunks])
            busy = [dagger.spawn(slow, a, base) for a in chunks]
            ready(cluster)
            await busy[0]

    if sys.argv[1] == "sync":
        sync_script(sys.argv[2])
    else:
        asyncio.run(async_script(sys.argv[2]))
""")


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def spill_dirs(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.name.startswith("aiodagger-spill-"))


def spill_files(base: Path) -> list[Path]:
    return list(base.glob("aiodagger-spill-*/*.spill"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script, sig", [
    ("sync", "SIGTERM"), ("sync", "SIGINT"), ("sync", "Ctrl-C"),
    ("async", "SIGTERM"), ("async", "SIGINT"), ("async", "Ctrl-C"),
    ("async", "SIGKILL"),  # the workers see their parent die, by the parent-death signal
])
def test_a_signal_to_the_cluster_process_leaves_no_worker_and_no_spill_directory(script, sig):
    with private_dir() as base:
        main = subprocess.Popen([sys.executable, "-c", INTERRUPTED, script, str(base)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        family: list[psutil.Process] = []
        try:
            line = read_line(main, 90)
            assert line.startswith(b"WORKERS"), (line, main.stderr.read() if main.poll() is not None else b"")
            family = psutil.Process(main.pid).children(recursive=True)
            assert {p.pid for p in family} >= {int(pid) for pid in line.split()[1:]}
            assert len(family) >= 2 and spill_files(base)  # spilled
            deadline = time.monotonic() + 30
            while len(list(base.glob("running-*"))) < 2:  # and busy, both of them
                assert time.monotonic() < deadline, "the tasks did not start"
                time.sleep(0.05)
            if sig == "Ctrl-C":  # a terminal sends SIGINT to the whole foreground group
                os.killpg(main.pid, signal.SIGINT)
            else:
                main.send_signal(getattr(signal, sig))
            started = time.monotonic()
            while time.monotonic() - started < 5.0:
                if main.poll() is not None and not any(map(alive, family)) and not spill_dirs(base):
                    break
                time.sleep(0.05)
            assert main.poll() is not None
            assert [p.pid for p in family if alive(p)] == []
            assert spill_dirs(base) == []
        finally:
            for proc in family:
                if alive(proc):
                    proc.kill()
            if main.poll() is None:
                main.kill()
            main.wait(30)
            for pipe in (main.stdout, main.stderr):
                pipe.close()


# A plain script on the default cluster (worker 0 only: no process, no spill directory).
ON_THE_DEFAULT_CLUSTER = textwrap.dedent("""
    import time
    import aiodagger as dagger

    def nap():
        print("RUNNING", flush=True)
        time.sleep(60)

    dagger.spawn(nap).fetch()
""")


def test_ctrl_c_ends_a_script_on_the_default_cluster_without_waiting_for_its_tasks():
    main = subprocess.Popen([sys.executable, "-c", ON_THE_DEFAULT_CLUSTER],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_line(main) == b"RUNNING\n"
        main.send_signal(signal.SIGINT)
        assert main.wait(5) == -signal.SIGINT  # as Python ends on an unhandled Ctrl-C
    finally:
        if main.poll() is None:
            main.kill()
        main.wait(30)
        for pipe in (main.stdout, main.stderr):
            pipe.close()


async def test_a_signal_while_the_spill_directory_is_removed_waits_for_the_removal(tmp_path, monkeypatch):
    """The signal that comes while a stopping worker removes its spill directory takes
    effect once the directory is gone: the process ended with it half removed, or not
    at all (its event loop's exit cancelled the removal)."""
    removing = threading.Event()
    remove = spilldir.remove

    def slow_remove(path, lock=None):
        removing.set()
        time.sleep(0.5)
        remove(path, lock)

    monkeypatch.setattr(spilldir, "remove", slow_remove)
    worker = WorkerProcess("tcp://127.0.0.1:9", "token", threads=1, name="w", spill_dir=str(tmp_path))
    running = asyncio.ensure_future(worker.run())  # nobody listens there: it stops at once
    assert await asyncio.to_thread(removing.wait, 10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert list(tmp_path.iterdir()) == []
