"""Many workers: the scheduler's placement of a task asks a few workers, not all."""

from __future__ import annotations

import asyncio

import aiodagger as dagger
from tests.helpers import inc


async def test_unscoped_tasks_are_placed_without_scanning_every_worker(monkeypatch):
    """300 simulated workers (benchmarks/manyworkers.py: real connections answering over
    the real protocol); each placement asks a handful of them whether they have room,
    and the tasks still spread over nearly all of them."""
    import os
    import secrets
    import subprocess
    import sys
    import time
    from pathlib import Path

    from aiodagger.scheduler.registry import RemoteWorker

    asked = 0
    has_room = RemoteWorker.has_room

    def counting(self, kind):
        nonlocal asked
        asked += 1
        return has_room(self, kind)

    token = secrets.token_urlsafe(32)
    n = 300
    async with dagger.Cluster(listen="tcp://127.0.0.1:0", token=token, threads=1, heartbeat_interval=5.0,
                              heartbeat_timeout=60.0) as cluster:
        root = Path(__file__).parent.parent
        sim = subprocess.Popen([sys.executable, "-m", "benchmarks.manyworkers", "--simulate", str(cluster.address),
                                str(n)], env={**os.environ, "AIODAGGER_SIM_TOKEN": token}, cwd=root)
        try:
            deadline = time.monotonic() + 120
            while len(cluster.workers) < n + 1:
                assert sim.poll() is None and time.monotonic() < deadline, "the simulated workers did not join"
                await asyncio.sleep(0.05)
            monkeypatch.setattr(RemoteWorker, "has_room", counting)
            placed: dict[int, int] = {}
            dist = cluster._scheduler.dist
            dispatch = dist.dispatch

            def recording(task, worker, waits=None):
                placed[worker.id] = placed.get(worker.id, 0) + 1
                return dispatch(task, worker, waits)

            monkeypatch.setattr(dist, "dispatch", recording)
            tasks = 3000
            await asyncio.wait_for(dagger.gather(*[dagger.spawn(inc, i) for i in range(tasks)]), 60)
        finally:
            sim.kill()
            sim.wait()
    assert sum(placed.values()) == tasks
    assert asked / tasks < 8, f"{asked / tasks:.1f} workers asked per task, of {n}"
    assert len(placed) >= 0.9 * n and max(placed.values()) <= 4 * tasks / n, placed
