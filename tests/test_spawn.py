"""Spawning from everywhere a user might: a coroutine, a thread, another loop, a script."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading

import pytest

import aiodagger as dagger
from tests.helpers import add, ainc, inc


async def test_spawn_from_coroutine_sync_and_async(cluster):
    a = dagger.spawn(inc, 1)
    b = dagger.spawn(ainc, 10)
    assert isinstance(a, dagger.DTask)
    assert await a == 2
    assert await b == 11


async def test_dependencies_are_replaced_by_values(cluster):
    a = dagger.spawn(add, 1, 3)
    b = dagger.spawn(inc, a)
    c = dagger.spawn(ainc, b)  # a coroutine task depending on thread tasks
    assert await c == 6


async def test_dependencies_nested_in_containers_and_kwargs(cluster):
    a = dagger.spawn(inc, 0)
    b = dagger.spawn(inc, 1)

    def combine(items, mapping, *, extra):
        return items[0] + items[1][0] + mapping["k"] + extra

    t = dagger.spawn(combine, [a, (b,)], {"k": a}, extra=b)
    assert await t == 1 + 2 + 1 + 2


def received(*args, **kwargs):
    return args, kwargs


async def areceived(*args, **kwargs):
    return args, kwargs


def push(target, item):
    target.append(item)


async def apush(target, item):
    target.append(item)


# "store": worker 0 keeps results in a ChunkStore, and arguments are resolved from the
# values it loaded for the run rather than from the DTasks.
@pytest.fixture(params=["plain", "store"])
async def any_cluster(request):
    limit = "1 GiB" if request.param == "store" else None
    async with dagger.Cluster(threads=2, memory_limit=limit) as c:
        yield c


@pytest.mark.parametrize("fn", [push, apush], ids=["thread", "async"])
async def test_task_with_a_dependency_mutates_the_callers_list(any_cluster, fn):
    without, with_dep = [], []
    await dagger.spawn(fn, without, 1)
    await dagger.spawn(fn, with_dep, dagger.spawn(int, 2))
    assert (without, with_dep) == ([1], [2])


@pytest.mark.parametrize("fn", [received, areceived], ids=["thread", "async"])
async def test_only_containers_holding_a_dependency_are_rebuilt(any_cluster, fn):
    lst, dct, inner = [1], {"k": 1}, [2]
    tup = (inner, 3)
    dep = dagger.spawn(inc, 1)
    lst_dep, dct_dep, tup_dep = [lst, dep], {"d": dct, "v": dep}, (inner, [dep])
    args, kwargs = await dagger.spawn(fn, lst, dct, tup, dep, lst_dep, dct_dep, tup_dep,
                                      kl=lst, kd=dct, kt=tup, kdep=lst_dep)
    assert args[0] is lst and args[1] is dct and args[2] is tup
    assert args[3] == 2
    assert args[4] == [[1], 2] and args[4] is not lst_dep and args[4][0] is lst
    assert args[5] == {"d": {"k": 1}, "v": 2} and args[5] is not dct_dep and args[5]["d"] is dct
    assert args[6] == ([2], [2]) and args[6][0] is inner
    assert kwargs["kl"] is lst and kwargs["kd"] is dct and kwargs["kt"] is tup
    assert kwargs["kdep"] == [[1], 2] and kwargs["kdep"][0] is lst
    # The caller's containers still hold the DTask: rebuilding never writes into them.
    assert lst_dep[1] is dep and dct_dep["v"] is dep and tup_dep[1][0] is dep


async def test_same_dependency_twice_counts_once(cluster):
    a = dagger.spawn(inc, 1)
    assert await dagger.spawn(add, a, a) == 4


async def test_spawn_from_plain_thread(cluster):
    results = []

    def worker():
        t = dagger.spawn(inc, 41)
        results.append(t.fetch(timeout=10))

    th = threading.Thread(target=worker)
    th.start()
    await asyncio.to_thread(th.join, 10)
    assert results == [42]


async def test_await_from_second_event_loop_in_another_thread(cluster):
    t = dagger.spawn(inc, 1)
    out = []

    def other_loop():
        async def use():
            # spawn and await from a loop that is not the cluster's
            u = dagger.spawn(add, t, 10)
            out.append(await u)
            out.append(await asyncio.wait_for(t, 5))

        asyncio.run(use())

    th = threading.Thread(target=other_loop)
    th.start()
    await asyncio.to_thread(th.join, 10)
    assert out == [12, 2]


def test_sync_with_cluster_and_fetch():
    with dagger.Cluster(threads=2) as c:
        t = dagger.spawn(inc, dagger.spawn(inc, 1))
        assert t.fetch(timeout=10) == 3
        assert dagger.fetch(t) == 3
        assert c.state == "running"
    assert c.state == "closed"


def test_default_cluster_started_by_first_spawn():
    t = dagger.spawn(inc, 1)
    assert t.fetch(timeout=10) == 2


def test_spawn_from_synchronous_script_in_subprocess(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import aiodagger as dagger

        def square(x):
            return x * x

        tasks = [dagger.spawn(square, i) for i in range(100)]
        total = dagger.spawn(sum, tasks)
        print("total", total.fetch(timeout=30))
    """))
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(script)], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"total {sum(i * i for i in range(100))}"
    assert proc.stderr == ""


async def test_nested_spawn_from_thread_task_with_fetch(cluster):
    def outer(n):
        # a sync task spawning and blocking on its children
        kids = [dagger.spawn(inc, i) for i in range(n)]
        return sum(k.fetch(timeout=10) for k in kids)

    assert await dagger.spawn(outer, 5) == sum(range(1, 6))


async def test_nested_spawn_from_async_task(cluster):
    async def outer(n):
        return sum(await dagger.gather(*[dagger.spawn(ainc, i) for i in range(n)]))

    assert await dagger.spawn(outer, 5) == sum(range(1, 6))


async def test_blocked_fetch_hands_thread_slot_back():
    # With one thread, a task blocked in fetch() on a child would deadlock unless
    # its slot is handed back while it waits: recursion three levels deep.
    def fib(n):
        if n < 2:
            return n
        return dagger.spawn(fib, n - 1).fetch(timeout=20) + dagger.spawn(fib, n - 2).fetch(timeout=20)

    async with dagger.Cluster(threads=1):
        assert await asyncio.wait_for(dagger.spawn(fib, 6), 30) == 8


async def test_put_chunk_passed_to_many_tasks(cluster):
    ref = await dagger.put([1, 2, 3])
    assert isinstance(ref, dagger.Chunk)
    assert await dagger.tochunk(5) is not None
    results = await dagger.gather(*[dagger.spawn(lambda xs, i: sum(xs) + i, ref, i) for i in range(3)])
    assert results == [6, 7, 8]
    assert await ref == [1, 2, 3]


async def test_put_with_unsatisfiable_scope(cluster):
    with pytest.raises(dagger.NoProcessorError, match="worker 0"):
        await dagger.put(1, scope=dagger.scope(worker=7))


async def test_sync_function_returning_coroutine_is_awaited_on_loop(cluster):
    def wrapper(x):
        return ainc(x)  # e.g. a decorator around an async def

    assert await dagger.spawn(wrapper, 1) == 2


async def test_many_tasks_batched(cluster):
    tasks = [dagger.spawn(inc, i) for i in range(5000)]
    assert await dagger.gather(*tasks) == [i + 1 for i in range(5000)]


async def test_long_chain_of_continuations(cluster):
    t = dagger.spawn(inc, 0)
    for _ in range(2000):
        t = dagger.spawn(inc, t)
    assert await t == 2001


async def test_diamond_and_fan_in(cluster):
    root = dagger.spawn(inc, 0)
    mids = [dagger.spawn(add, root, i) for i in range(50)]
    total = dagger.spawn(lambda *xs: sum(xs), *mids)
    assert await total == sum(1 + i for i in range(50))
