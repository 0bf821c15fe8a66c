"""``Cluster.adapt()``: subprocess workers started as work comes and retired when it goes,
real processes all along (SlurmCluster's jobs are tested in test_deploy_slurm.py, the
loop's arithmetic in test_deploy_adapt.py)."""

from __future__ import annotations

import asyncio
import os

import pytest

import aiodagger as dagger
from tests.helpers import eventually as until
from tests.helpers import inc, sleep_then

pytestmark = pytest.mark.timeout(120)


def subprocess_workers(cluster):
    return [w for w in cluster.workers if w.id != 0]


async def test_adapt_starts_workers_for_work_and_retires_them_when_idle():
    async with dagger.Cluster(processes=0, threads=1) as cluster:
        adaptive = cluster.adapt(minimum=0, maximum=2, interval=0.1, wait_count=3)
        assert adaptive.running or not adaptive.stopped
        # 20 tasks of 0.2 s on 1-thread workers: it asks for the maximum, 2
        tasks = [dagger.spawn(sleep_then, 0.2, i) for i in range(20)]
        await until(lambda: len(subprocess_workers(cluster)) == 2)
        kept = dagger.spawn(inc, 41)  # a result that lives on a worker about to retire
        assert await asyncio.wait_for(dagger.gather(*tasks), 60) == list(range(20))
        await asyncio.wait_for(kept.wait(), 30)
        ran_on = {t._where and next(iter(t._where)) for t in tasks} - {None, 0}
        assert ran_on, "no task ran on an adapted worker"
        # idle: back down to the minimum, results handed over first
        await until(lambda: not subprocess_workers(cluster))
        assert await asyncio.wait_for(kept, 30) == 42
        adaptive.stop()
        await asyncio.wait_for(adaptive.wait_stopped(5), 10)
        assert not adaptive.running


async def test_adapt_keeps_a_minimum_and_scale_ends_it():
    async with dagger.Cluster(processes=0, threads=1) as cluster:
        adaptive = cluster.adapt(minimum=1, maximum=3, interval=0.1)
        await until(lambda: len(subprocess_workers(cluster)) == 1)
        pid = subprocess_workers(cluster)[0].pid
        assert await asyncio.wait_for(dagger.spawn(os.getpid), 30) == pid  # tasks go there
        await cluster.scale(2)
        await until(lambda: adaptive.stopped)
        await asyncio.sleep(0.5)  # nothing brings it back to the minimum now
        assert len(subprocess_workers(cluster)) == 2


def test_adapt_arguments_are_checked():
    with dagger.Cluster(threads=1) as cluster:
        with pytest.raises(ValueError, match="the maximum is below the minimum"):
            cluster.adapt(minimum=3, maximum=1)
        with pytest.raises(ValueError, match="interval"):
            cluster.adapt(maximum=2, interval=0)
    with pytest.raises(RuntimeError, match="adapt\\(\\) needs a running cluster"):
        cluster.adapt(maximum=2)
