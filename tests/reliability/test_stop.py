"""SIGSTOP of a remote worker past the heartbeat timeout, then SIGCONT.

While it is stopped the cluster declares it lost and runs its tasks elsewhere. When it
wakes up it finds its connection gone, reconnects as a new worker, and offers what it
still holds. The checks: every future resolves once, with the right value (the stopped
worker's late completions belong to a dead incarnation and are never taken); the
values it kept are taken back rather than computed again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import aiodagger as dagger
from aiodagger.comm.handshake import new_token
from tests.reliability.tasks import block, first, runs
from tests.workers import WorkerProcesses, write_token

pytestmark = pytest.mark.timeout(120)

HEARTBEAT = dict(heartbeat_interval=0.1, heartbeat_timeout=1.0)
BIG = 128 << 10  # over the inline limit: the value stays on the worker that made it


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.05)


@pytest.fixture
def worker_procs(tmp_path):
    procs = WorkerProcesses(tmp_path)
    yield procs
    for proc in procs.procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
    procs.stop_all()


async def test_sigstop_past_heartbeat_then_sigcont(no_leaks, tmp_path, worker_procs):
    token = new_token()
    token_file = write_token(tmp_path, token)
    log = str(tmp_path / "runs.log")
    errors: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    async with dagger.Cluster(listen="tcp://127.0.0.1:0", token=token, threads=1, **HEARTBEAT) as cluster:
        sleeper, other = (worker_procs.start(cluster.address, token_file, "--heartbeat-timeout",
                                             str(HEARTBEAT["heartbeat_timeout"]), threads=2)
                          for _ in range(2))
        stopped, _ = await worker_procs.wait_joined(cluster, [sleeper, other])

        # Values that live only on the worker about to be stopped.
        with dagger.options(scope=dagger.scope(worker=stopped.id)):
            kept = [dagger.spawn(block, i, log, BIG) for i in range(8)]
        await asyncio.wait_for(dagger.wait(kept), 30)

        # Work in flight on both workers when the stop comes.
        resolved: dict[int, int] = {}
        with dagger.options(retries=2):
            busy = [dagger.spawn(block, 100 + i, log, BIG, 0.2) for i in range(24)]
        for t in busy:
            t.add_done_callback(lambda t: resolved.__setitem__(id(t), resolved.get(id(t), 0) + 1))
        await asyncio.sleep(0.3)
        os.kill(sleeper.pid, signal.SIGSTOP)
        await wait_until(lambda: stopped.id not in {w.id for w in cluster.workers},
                         5 * HEARTBEAT["heartbeat_timeout"], "declaring the stopped worker lost")
        values = await asyncio.wait_for(dagger.gather(*[dagger.spawn(first, t) for t in busy]), 30)
        assert values == [100 + i for i in range(24)]
        os.kill(sleeper.pid, signal.SIGCONT)
        await wait_until(lambda: sleeper.pid in {w.pid for w in cluster.workers}, 15,
                         "the woken worker reconnecting")

        # What it kept is taken back, not computed again.
        firsts = await asyncio.wait_for(dagger.gather(*[dagger.spawn(first, t) for t in kept]), 30)
        assert firsts == list(range(8))
        await asyncio.sleep(0.5)  # late completions of the dead incarnation, if any, arrive now

    ran = runs(log)
    assert all(len(ran[f"B{i}"]) == 1 for i in range(8)), \
        f"values the worker kept were computed again: { {k: v for k, v in ran.items() if len(v) > 1} }"
    assert set(resolved.values()) == {1} and len(resolved) == len(busy), "a future resolved twice"
    assert not errors, f"errors reached the loop: {errors}"
    assert sleeper.poll() is None, "the stopped worker should have reconnected, not exited"
