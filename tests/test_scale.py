"""One large graph: what must hold however many tasks it has. Nothing here is timed (the
rates are benchmarks G10k, G1M and G10M); these check what would break first if
per-task costs grew with the graph: tasks held after they are done, memory per pending
task, and the collector's full passes over a large graph."""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from typing import Any

import pytest

import aiodagger as dagger
from aiodagger.scheduler import gcspacing

pytestmark = pytest.mark.timeout(300)

FAN = 100
LEAVES = 200_000  # 202,021 tasks


def inc(x: int) -> int:
    return x + 1


def total(*xs: int) -> int:
    return sum(xs)


def spawn_tree(n: int, probes: list[Any] | None = None) -> tuple[Any, int]:
    """n leaves inc(i), every FAN summed by one task, up to one root; the caller keeps
    at most FAN handles per level. ``probes`` gets a weak reference to every 1,000th task."""
    levels: list[list[Any]] = [[]]
    tasks = 0

    def spawn(fn: Any, *args: Any) -> Any:
        nonlocal tasks
        t = dagger.spawn(fn, *args)
        if probes is not None and tasks % 1000 == 0:
            probes.append(weakref.ref(t))
        tasks += 1
        return t

    for i in range(n):
        t = spawn(inc, i)
        k = 0
        while len(levels[k]) == FAN - 1:
            t = spawn(total, *levels[k], t)
            levels[k] = []
            k += 1
            if k == len(levels):
                levels.append([])
        levels[k].append(t)
    carry: list[Any] = []
    for level in levels:
        group = level + carry
        carry = [spawn(total, *group)] if len(group) > 1 else group
    return carry[0], tasks


async def test_a_200k_task_graph_completes_and_every_task_is_released(cluster):
    """Right result, no task left on the scheduler's books, and every task freed by
    reference counting alone (the collector is off): no per-task cycle or leftover."""
    sched = cluster._scheduler
    gc.collect()
    gc.disable()
    try:
        probes: list[Any] = []
        root, tasks = spawn_tree(LEAVES, probes)
        assert tasks == 202_021
        assert sched.live_count == tasks  # all pending: nothing ran yet
        assert await root == LEAVES * (LEAVES + 1) // 2
        assert sched.live_count == 0
        del root
        alive = [p() for p in probes if p() is not None]
        assert not alive, f"{len(alive)} of {len(probes)} sampled tasks still held: {alive[:3]}"
    finally:
        gc.enable()


async def test_a_pending_task_costs_at_most_1_kib(cluster):
    """Python memory allocated while spawning (the tasks, their arguments, the scheduler's
    books), over the tasks: the issue's bound is 1 KiB (about 640 B when written)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        root, tasks = spawn_tree(LEAVES)
        per_task = (tracemalloc.get_traced_memory()[0] - before) / tasks
    finally:
        tracemalloc.stop()
    assert await root == LEAVES * (LEAVES + 1) // 2
    assert per_task <= 1024, f"{per_task:.0f} B per pending task"


@pytest.fixture
def policy(monkeypatch):
    """The spacing policy as a fresh process has it, and the thresholds put back after."""
    if not gc.isenabled():
        pytest.skip("the collector is disabled here")
    monkeypatch.delenv(gcspacing.ENV, raising=False)
    monkeypatch.setattr(gcspacing, "_stopped", False)
    default = gc.get_threshold()
    yield default
    gc.set_threshold(*default)


async def test_full_collections_are_spaced_while_a_large_graph_is_held(policy):
    default = policy
    async with dagger.Cluster(threads=2):
        root, _ = spawn_tree(gcspacing.START + 10_000)
        held = gc.get_threshold()
        assert held[:2] == default[:2]
        # set when the count reached START (and read again each time it doubles)
        assert held[2] >= gcspacing.SPACING * gcspacing.START // (default[0] * default[1]) > default[2]
        assert await root > 0
        # the graph is done: the large graph's spacing is undone, the mid-size one's stays
        spaced = (*default[:2], max(default[2], gcspacing.MIN_SPACED))
        assert gc.get_threshold() == spaced
    assert gc.get_threshold() == default  # the cluster is closed: the program's again


async def test_full_collections_are_spaced_apart_once_a_mid_size_graph_was_held(policy):
    """From SMALL unfinished tasks, at least MIN_SPACED young collections between full
    ones, until the cluster closes (its next graphs come with no burst of full passes)."""
    default = policy
    spaced = (*default[:2], max(default[2], gcspacing.MIN_SPACED))
    async with dagger.Cluster(threads=2):
        root, _ = spawn_tree(1_000)
        assert gc.get_threshold() == default
        await root
        root, _ = spawn_tree(gcspacing.SMALL + 1_000)
        assert gc.get_threshold() == spaced != default
        assert await root > 0
        assert gc.get_threshold() == spaced  # the graph is done: kept for the next one
    assert gc.get_threshold() == default


async def test_thresholds_set_by_the_program_meanwhile_stand(policy):
    default = policy
    mine = (default[0] + 1, default[1], default[2] + 1)
    async with dagger.Cluster(threads=2):
        root, _ = spawn_tree(gcspacing.START + 10_000)
        assert gc.get_threshold() != default
        gc.set_threshold(*mine)
        await root
        assert gc.get_threshold() == mine
        root, _ = spawn_tree(gcspacing.START + 10_000)  # the policy has stopped
        assert gc.get_threshold() == mine
        await root


async def test_no_spacing_when_turned_off(policy, monkeypatch):
    default = policy
    monkeypatch.setenv(gcspacing.ENV, "0")
    async with dagger.Cluster(threads=2):
        root, _ = spawn_tree(gcspacing.START + 10_000)
        assert gc.get_threshold() == default
        await root


async def test_closing_a_cluster_with_a_large_graph_puts_the_thresholds_back(policy):
    default = policy
    async with dagger.Cluster(threads=2):
        root, _ = spawn_tree(gcspacing.START + 10_000)
        assert gc.get_threshold() != default
        # left unawaited: closing cancels it
    assert gc.get_threshold() == default
    assert root.cancelled() or root.done()
