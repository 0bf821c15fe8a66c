"""kill -9 of random worker processes while a 2,048-leaf tree reduction runs.

The cluster restarts the workers it started; every task that ran on a killed worker,
or whose only copy died with it, runs again elsewhere. The checks: the exact result,
and no task body ran more often than 1 + the kills that hit it (every run but the last
happened on a worker that was then killed) — nothing ran twice for no reason.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

import aiodagger as dagger
from tests.reliability.tasks import WIDTH, combine, leaf, runs

pytestmark = pytest.mark.timeout(240)

LEAVES = 2048
KILLS = 4  # under the launcher's 5 restarts a minute


def tree(log: str, pause: float) -> dagger.DTask:
    level = [dagger.spawn(leaf, i, log, pause) for i in range(LEAVES)]
    depth = 0
    while len(level) > 1:
        depth += 1
        level = [dagger.spawn(combine, level[j], level[j + 1], f"C{depth}-{j // 2}", log, pause)
                 for j in range(0, len(level), 2)]
    return level[0]


async def kill_workers(cluster: dagger.Cluster, rng: random.Random, kills: int,
                       every: float) -> list[int]:
    killed: list[int] = []
    while len(killed) < kills:
        await asyncio.sleep(every * rng.uniform(0.5, 1.5))
        pids = [w.pid for w in cluster.workers if w.pid != os.getpid() and w.pid not in killed]
        if pids:
            pid = rng.choice(pids)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


async def test_kill9_during_tree_reduction(seed, no_leaks, tmp_path):
    rng = random.Random(seed)
    log = str(tmp_path / "runs.log")
    async with dagger.Cluster(processes=3, threads=2) as cluster:
        with dagger.options(retries=KILLS):
            root = tree(log, pause=0.004)
        killer = asyncio.ensure_future(kill_workers(cluster, rng, KILLS, every=0.5))
        value = await asyncio.wait_for(root, 180)
        killed = await asyncio.wait_for(killer, 60)

    assert value.tolist() == [LEAVES * (LEAVES - 1) // 2] * WIDTH
    done = runs(log)
    assert len(done) == 2 * LEAVES - 1, "some task body never ran"
    extra = {key: pids for key, pids in done.items()
             if len(pids) > 1 + sum(pid in killed for pid in set(pids[:-1]))
             or any(pid not in killed for pid in pids[:-1])}
    assert not extra, (f"bodies ran more often than the kills that hit them explain "
                       f"(killed {killed}): {dict(list(extra.items())[:10])}")
    reran = sum(len(p) - 1 for p in done.values())
    print(f"killed {killed}; {reran} re-runs of {len(done)} bodies")
