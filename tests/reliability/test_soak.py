"""The seeded soak: a random DAG of sync, async, nested and spilled tasks runs while
workers are killed (-9) and stopped (SIGSTOP past the heartbeat timeout, and shorter).

Every future must resolve exactly once, with the right value or a typed error, and the
run must leave nothing behind. The graph and the faults come from the printed seed
(AIODAGGER_CHAOS_SEED replays one). The short soak runs in `.ci/run`; its size and
length are AIODAGGER_CHAOS_TASKS and AIODAGGER_CHAOS_SECONDS.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

import aiodagger as dagger
from aiodagger.errors import DaggerError
from tests.reliability.tasks import PRIME, mix, soak_async, soak_big, soak_nested, soak_sync

TASKS = int(os.environ.get("AIODAGGER_CHAOS_TASKS", "20000"))
SECONDS = float(os.environ.get("AIODAGGER_CHAOS_SECONDS", "120"))
WORKERS = 3
BIG = 512 << 10
HEARTBEAT = dict(heartbeat_interval=0.2, heartbeat_timeout=2.0)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(SECONDS * 3 + 180)]


class Graph:
    """A random DAG and the value each of its tasks must have."""

    def __init__(self, rng: random.Random, n: int, pause: float) -> None:
        self.nodes: list[tuple[str, list[int]]] = []
        self.expected: list[int] = []
        for key in range(n):
            kind = rng.choices(["sync", "async", "big", "nested"], weights=[60, 30, 6, 4])[0]
            window = range(max(0, key - 400), key)
            inputs = rng.sample(window, min(len(window), rng.choice([0, 1, 1, 2, 3])))
            self.nodes.append((kind, inputs))
            value = mix(key, tuple(self.expected[i] for i in inputs))
            if kind == "nested":
                value = (value + mix(key * 4, ()) + mix(key * 4 + 1, ())) % PRIME
            self.expected.append(value)
        self.pause = pause

    def spawn(self) -> list[dagger.DTask]:
        tasks: list[dagger.DTask] = []
        for key, (kind, inputs) in enumerate(self.nodes):
            args = [tasks[i] for i in inputs]
            if kind == "sync":
                tasks.append(dagger.spawn(soak_sync, key, self.pause, *args))
            elif kind == "async":
                tasks.append(dagger.spawn(soak_async, key, self.pause, *args))
            elif kind == "big":
                tasks.append(dagger.spawn(soak_big, key, BIG, *args))
            else:
                tasks.append(dagger.spawn(soak_nested, key, self.pause, *args))
        return tasks


async def inject_faults(cluster: dagger.Cluster, rng: random.Random, until: float,
                        done: asyncio.Event, log: list[str]) -> None:
    """One fault every few seconds; at most 4 that end a worker per minute (the
    cluster restarts at most 5 a minute)."""
    ended: list[float] = []
    while not done.is_set() and time.monotonic() < until:
        try:
            await asyncio.wait_for(done.wait(), rng.uniform(1.5, 4.0))
            return
        except TimeoutError:
            pass
        pids = [w.pid for w in cluster.workers if w.pid != os.getpid()]
        if not pids:
            continue
        pid = rng.choice(pids)
        now = time.monotonic()
        ended = [t for t in ended if now - t < 60]
        fault = rng.choice(["kill", "stop-long", "stop-short"] if len(ended) < 4 else ["stop-short"])
        try:
            if fault == "kill":
                os.kill(pid, signal.SIGKILL)
                ended.append(now)
            else:
                pause = HEARTBEAT["heartbeat_timeout"] * (2 if fault == "stop-long" else 0.3)
                os.kill(pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(pause)
                finally:
                    os.kill(pid, signal.SIGCONT)
                if fault == "stop-long":
                    ended.append(now)
        except ProcessLookupError:
            continue
        log.append(f"{now:.1f} {fault} {pid}")


def hung(graph: Graph, tasks: list[dagger.DTask], cluster: dagger.Cluster,
         faults: list[str]) -> str:
    """What a soak that did not finish was waiting for."""
    waiting = [key for key, t in enumerate(tasks) if not t.done()]
    lines = [f"{len(waiting)} of {len(tasks)} tasks never finished; faults: {faults}",
             f"workers: {cluster.workers}"]
    dist = cluster._launcher.dist if cluster._launcher is not None else None
    for key in waiting[:8]:
        kind, inputs = graph.nodes[key]
        task = tasks[key]
        on = [w.id for w in dist.workers.values() if task.id in w.running] if dist else []
        lines.append(f"  {task!r} ({kind}) state={task._state} attempts={task._attempts} "
                     f"misses={task._misses} on workers {on}; inputs: "
                     + ", ".join(f"{tasks[i]!r} where={tasks[i]._where}" for i in inputs))
    return "\n".join(lines)


async def test_seeded_soak(seed, no_leaks):
    rng = random.Random(seed)
    # Each sync body sleeps so that the graph takes about SECONDS on the workers.
    pause = SECONDS * WORKERS * 2 / TASKS
    graph = Graph(rng, TASKS, pause)
    resolved = [0] * TASKS
    faults: list[str] = []
    async with dagger.Cluster(processes=WORKERS, threads=2, memory_limit="128MiB",
                              **HEARTBEAT) as cluster:
        with dagger.options(retries=3):
            tasks = graph.spawn()
        for i, t in enumerate(tasks):
            t.add_done_callback(lambda _t, i=i: resolved.__setitem__(i, resolved[i] + 1))
        done = asyncio.Event()
        faulting = asyncio.ensure_future(
            inject_faults(cluster, rng, time.monotonic() + SECONDS * 2, done, faults))
        try:
            await asyncio.wait_for(dagger.wait(tasks), SECONDS * 3 + 60)
        except TimeoutError:
            raise AssertionError(hung(graph, tasks, cluster, faults)) from None
        finally:
            done.set()
            await faulting
        await asyncio.sleep(0.5)  # late reports from dead incarnations, if any, arrive now

        right, typed, wrong, causes = 0, {}, [], []
        for key, t in enumerate(tasks):
            exc = t.exception()
            if exc is None:
                try:
                    value = await asyncio.wait_for(t, 60)  # a value on a worker comes here
                except DaggerError as lost:  # its holder died after it finished
                    typed[type(lost).__name__] = typed.get(type(lost).__name__, 0) + 1
                    continue
                got = int(value[0]) if graph.nodes[key][0] == "big" else value
                if got == graph.expected[key]:
                    right += 1
                else:
                    wrong.append((key, got, graph.expected[key]))
            elif isinstance(exc, DaggerError):
                typed[type(exc).__name__] = typed.get(type(exc).__name__, 0) + 1
                if not isinstance(exc, dagger.UpstreamError):
                    causes.append(f"{graph.nodes[key][0]} {key}: {exc}")
            else:
                wrong.append((key, repr(exc), graph.expected[key]))
        print(f"\nsoak of {TASKS} tasks, seed {seed}: {right} right, typed errors {typed}, "
              f"faults {len(faults)}: {faults}")
        for cause in causes[:10]:
            print(f"  failed: {cause}")
    assert not wrong, f"wrong values or untyped errors: {wrong[:10]}"
    assert resolved == [1] * TASKS, "a future resolved more than once or never"
    assert faults, "no fault was injected: the soak ran too fast to test anything"
    assert right >= TASKS * 0.9, f"only {right} of {TASKS} tasks succeeded: {typed}; {causes[:5]}"
