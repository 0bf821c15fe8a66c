"""dagger.progress: a bar to await, or the tasks as they finish; with and without tqdm."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sys
import threading
import warnings

import pytest

import aiodagger as dagger
from tests.helpers import asleep_forever, boom, inc

# The package's `progress` attribute is the function-like class; this is its module.
progress_module = importlib.import_module("aiodagger.progress")


async def wait_event(event: asyncio.Event, value):
    await event.wait()
    return value


async def test_await_shows_a_bar_until_all_are_done(dagger_cluster, capsys):
    tasks = [dagger.spawn(inc, i) for i in range(20)]
    done = await asyncio.wait_for(dagger.progress(tasks, desc="squares"), 10)
    assert done == tasks and all(t.done() for t in tasks)
    err = capsys.readouterr().err
    assert "squares" in err and "20/20" in err


async def test_iteration_yields_each_task_as_it_finishes(dagger_cluster):
    gates = [asyncio.Event() for _ in range(4)]
    tasks = [dagger.spawn(wait_event, gate, i) for i, gate in enumerate(gates)]
    order = [2, 0, 3, 1]
    seen = []

    async def release():
        for i in order:
            gates[i].set()
            await asyncio.sleep(0.01)

    releaser = asyncio.create_task(release())
    async with asyncio.timeout(10):
        async for t in dagger.progress(tasks, bar=False):
            assert t.done()
            seen.append(await t)
    await releaser
    assert seen == order


async def test_failures_and_cancellations_count_as_done(dagger_cluster, capsys):
    ok = dagger.spawn(inc, 1)
    bad = dagger.spawn(boom)
    hung = dagger.spawn(asleep_forever)
    after = dagger.spawn(inc, bad)  # fails upstream
    waiter = asyncio.ensure_future(dagger.progress([ok, bad, hung, after]))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    hung.cancel()
    assert await asyncio.wait_for(waiter, 10) == [ok, bad, hung, after]
    assert [t.state for t in (ok, bad, hung, after)] == ["finished", "failed", "cancelled", "failed"]
    assert "failed=3" in capsys.readouterr().err


async def test_tasks_done_before_and_duplicates(dagger_cluster):
    a = dagger.spawn(inc, 1)
    await a
    b = dagger.spawn(inc, 2)
    seen = [t async for t in dagger.progress([a, b, a], bar=False)]
    assert sorted(t.id for t in seen) == sorted([a.id, b.id])
    assert await dagger.progress([], bar=False) == []


async def test_bar_false_draws_nothing(dagger_cluster, capsys):
    tasks = [dagger.spawn(inc, i) for i in range(5)]
    await dagger.progress(tasks, bar=False)
    assert capsys.readouterr().err == ""


async def test_cancelling_the_waiter_leaves_the_tasks_running(dagger_cluster):
    gate = asyncio.Event()
    t = dagger.spawn(wait_event, gate, "v")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(dagger.progress([t]), 0.05)
    assert not t.done()
    gate.set()
    assert await asyncio.wait_for(t, 10) == "v"


async def test_aclose_stops_iteration_and_closes_the_bar(dagger_cluster):
    gate = asyncio.Event()
    first = dagger.spawn(inc, 1)
    hung = dagger.spawn(wait_event, gate, None)
    async with contextlib.aclosing(dagger.progress([first, hung])) as p:
        async for t in p:
            assert t is first
            break
    assert p._bar is None
    with pytest.raises(StopAsyncIteration):
        await p.__anext__()
    gate.set()
    await asyncio.wait_for(hung, 10)


async def test_misuse_is_explained(dagger_cluster):
    with pytest.raises(TypeError, match="takes DTasks"):
        dagger.progress([1, 2])
    p = dagger.progress([dagger.spawn(inc, 1)], bar=False)
    assert await p == await p  # done is done

    def other_loop():
        async def again():
            return await p
        return asyncio.run(again())

    with pytest.raises(RuntimeError, match="another event loop"):
        await asyncio.to_thread(other_loop)


def test_tasks_of_a_background_cluster_seen_from_other_loops():
    # The cluster runs on its own loop thread; each asyncio.run is a new loop.
    with dagger.Cluster(threads=2):
        for round_ in range(3):
            async def main(round_=round_):
                tasks = [dagger.spawn(inc, round_ * 10 + i) for i in range(10)]
                seen = [await t async for t in dagger.progress(tasks, bar=False)]
                await asyncio.wait_for(dagger.progress(tasks, bar=False), 10)
                return sorted(seen)

            assert asyncio.run(main()) == [round_ * 10 + i + 1 for i in range(10)]


def test_from_a_plain_thread_with_its_own_loop():
    result = []

    def worker():
        async def main():
            tasks = [dagger.spawn(inc, i) for i in range(5)]
            return [t.id for t in await dagger.progress(tasks, bar=False)]
        result.append(asyncio.run(main()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and len(result[0]) == 5


async def test_without_tqdm_awaiting_works_and_warns_once(dagger_cluster, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if not installed: import fails
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(progress_module, "_warned_no_tqdm", False)
    tasks = [dagger.spawn(inc, i) for i in range(3)]
    with pytest.warns(RuntimeWarning, match=r"tqdm is not installed.*aiodagger\[progress\]"):
        assert await dagger.progress(tasks) == tasks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [t async for t in dagger.progress(tasks)] != []
    assert capsys.readouterr().err == ""
