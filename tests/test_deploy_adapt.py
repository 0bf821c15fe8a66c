"""aiodagger.deploy's adaptive loop, over a cluster stand-in that starts and retires
workers at once (SlurmCluster's own adapt() runs against Slurm in test_deploy_slurm)."""

from __future__ import annotations

import asyncio

import pytest

from aiodagger.adapt import Adaptive


class Workers:
    """A Scalable whose workers come and go the moment they are asked for."""

    def __init__(self, threads: int = 2) -> None:
        self.tasks_in_flight = 0
        self.requested_workers = 0
        self.threads_per_worker = threads
        self.asked: list[int] = []
        self.fail = 0  # the next adapt_to() calls that raise

    async def refresh(self) -> None:
        pass

    async def adapt_to(self, n: int) -> None:
        self.asked.append(n)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("sbatch refused")
        self.requested_workers = n


def adaptive(workers: Workers, **kw) -> Adaptive:
    options = {"minimum": 0, "maximum": 10, "interval": 0.01, "wait_count": 3, **kw}
    return Adaptive(workers, asyncio.get_running_loop(), **options)


async def test_a_worker_per_threads_tasks_within_the_bounds():
    workers = Workers(threads=2)
    a = adaptive(workers, minimum=1, maximum=4)
    for in_flight, expected in [(0, 1), (1, 1), (2, 1), (3, 2), (8, 4), (100, 4)]:
        workers.tasks_in_flight = in_flight
        assert a.recommendation() == expected, in_flight


async def test_up_at_once_down_after_wait_count_steps():
    workers = Workers(threads=1)
    a = adaptive(workers, wait_count=3)
    workers.tasks_in_flight = 5
    await a.step()
    assert workers.asked == [5]
    workers.tasks_in_flight = 0
    await a.step()
    await a.step()
    assert workers.asked == [5]  # a gap between two waves of tasks costs no worker
    workers.tasks_in_flight = 5
    await a.step()
    workers.tasks_in_flight = 0
    for _ in range(2):
        await a.step()
    assert workers.asked == [5]  # the count started again
    await a.step()
    assert workers.asked == [5, 0]


async def test_the_loop_adapts_until_stopped_and_tries_again_after_a_failure():
    workers = Workers(threads=1)
    workers.fail = 1
    a = adaptive(workers, wait_count=1)
    a.start()
    workers.tasks_in_flight = 3
    await asyncio.wait_for(_until(lambda: workers.requested_workers == 3), 10)
    assert workers.asked[:2] == [3, 3]  # the first try failed: a second one came
    workers.tasks_in_flight = 0
    await asyncio.wait_for(_until(lambda: workers.requested_workers == 0), 10)
    a.stop()
    await asyncio.wait_for(_until(lambda: not a.running), 10)
    workers.tasks_in_flight = 7
    await asyncio.sleep(0.05)
    assert workers.requested_workers == 0


async def test_wait_stopped_cancels_a_step_that_takes_too_long():
    class Stuck(Workers):
        async def adapt_to(self, n: int) -> None:
            await asyncio.sleep(3600)

    workers = Stuck()
    workers.tasks_in_flight = 1
    a = adaptive(workers)
    a.start()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(a.wait_stopped(0.1), 10)
    assert not a.running


@pytest.mark.parametrize("kw, match", [
    ({"minimum": -1}, "minimum"),
    ({"maximum": 1.5}, "maximum"),
    ({"minimum": 3, "maximum": 2}, "below the minimum"),
    ({"interval": 0}, "interval"),
    ({"wait_count": 0}, "wait_count"),
])
async def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        adaptive(Workers(), **kw)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)
