"""Wrong calls get errors that say what to write instead."""

from __future__ import annotations

import pytest

import aiodagger as dagger
from tests.helpers import ainc, inc


async def test_spawn_of_a_coroutine_object(cluster):
    with pytest.raises(TypeError, match=r"dagger.spawn\(ainc, \*args\)"):
        dagger.spawn(ainc(1))  # the coroutine is closed: no "never awaited" warning


async def test_spawn_of_a_value(cluster):
    with pytest.raises(TypeError, match=r"needs a callable.*not dagger.spawn\(fn\(\*args\)\)"):
        dagger.spawn(inc(1))


async def test_spawn_of_async_generator_function(cluster):
    async def gen():
        yield 1

    with pytest.raises(TypeError, match="async generator"):
        dagger.spawn(gen)


def test_unknown_option_suggests_the_right_one():
    with pytest.raises(TypeError, match="'priority'"):
        dagger.options(priorty=3)


@pytest.mark.parametrize("opts", [
    {"retries": -1}, {"retries": 1.5}, {"timeout": 0}, {"timeout": "1"}, {"priority": "high"},
    {"scope": "worker 1"}, {"name": 3}, {"checkpoint": 1},
])
def test_bad_option_values(opts):
    with pytest.raises((TypeError, ValueError)):
        dagger.options(**opts)


def test_bad_scopes():
    with pytest.raises(ValueError):
        dagger.scope("everywhere")
    with pytest.raises(TypeError):
        dagger.scope(worker="one")
    with pytest.raises(TypeError, match="interchangeable"):
        dagger.scope(thread=2)
    with pytest.raises(ValueError):
        dagger.scope(worker=1, workers=[2])


async def test_fetch_on_cluster_loop_thread_says_await(cluster):
    t = dagger.spawn(inc, 1)
    with pytest.raises(RuntimeError, match="await task"):
        t.fetch()
    assert await t == 2


async def test_gather_of_non_tasks(cluster):
    with pytest.raises(TypeError, match="takes DTasks"):
        await dagger.gather(1, 2)


def test_cluster_argument_validation():
    with pytest.raises(TypeError):
        dagger.Cluster(threads=0)
    with pytest.raises(TypeError):
        dagger.Cluster(processes=-1)


async def test_spawn_on_closed_cluster():
    async with dagger.Cluster(threads=1) as c:
        pass
    with pytest.raises(RuntimeError, match="not been started|closed"):
        c._scheduler.spawn(dagger.options().resolve(), inc, (1,), {})


async def test_dependency_from_another_cluster():
    async with dagger.Cluster(threads=1):
        t = dagger.spawn(inc, 1)
        await t
        async with dagger.Cluster(threads=1):
            with pytest.raises(ValueError, match="another cluster"):
                dagger.spawn(inc, t)


def test_a_container_that_contains_itself():
    """Walked once for dependencies (it used to overflow the stack); with a task inside,
    a TypeError says why it cannot be rebuilt."""
    loop = []
    loop.append(loop)
    with dagger.Cluster(threads=1):
        assert dagger.spawn(len, loop).fetch(timeout=10) == 1
        task = dagger.spawn(abs, -1)
        holder = {"task": task}
        holder["self"] = holder
        with pytest.raises(TypeError, match="contains itself"):
            dagger.spawn(len, holder)
