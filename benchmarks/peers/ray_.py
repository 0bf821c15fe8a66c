"""Ray: a local Ray instance with two CPUs, tasks and refs awaited from asyncio."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, ClassVar

from benchmarks import graphscale
from benchmarks.coldstart import run_cold
from benchmarks.peers.base import Peer, Timed, require, run_blocking
from benchmarks.workloads import (
    PROCESS_WORKERS,
    S1_WINDOW,
    Workload,
    array_sum,
    inc,
    make_array,
    sleep0_identity,
    stream_values_sync,
    tree_add,
    tree_leaf,
    tree_levels,
    tree_total,
)

log = logging.getLogger(__name__)

NUM_CPUS = PROCESS_WORKERS

_WAIT_TIMEOUT_S = 600.0


_SLOW_CHAIN = "n/a (the 100,000-node chain did not finish within the runner's 120 s here: over 1.2 ms a node)"


class RayPeer(Peer):
    """One ``ray.init(num_cpus=2)`` serves the local and the processes workloads: Ray
    always runs tasks in worker processes, so its W1 and W4 rows are the same
    thing at different sizes. W0 runs Ray in a fresh interpreter, with no Ray
    started in this one."""

    name: ClassVar[str] = "ray"
    notes: ClassVar[dict[str, str]] = {
        "W4": "the same remote tasks as its W1 row",
        "W5": "made and summed by two actors (two processes); the array goes through "
        "Ray's shared-memory object store, mapped by the second, not over a socket",
        "S1": "a streaming generator method of one actor, iterated by a method of the other "
        f"(_generator_backpressure_num_objects={S1_WINDOW}); each value is an object",
    }

    not_applicable: ClassVar[dict[str, str]] = {
        "W5-tcp": "n/a (on one node Ray's objects always go through its shared-memory store)",
        # Measured here with remote tasks taking the previous two object refs: W2b's
        # warm-up timed out after the runner's 120 s, and a timed-out row ends a peer's
        # other rows in the run; W2b-f ran at 1,346 µs/node at --scale 0.01.
        "W2b": _SLOW_CHAIN,
        "W2b-p": _SLOW_CHAIN,
        "W2b-f": "n/a (1,346 µs/node at --scale 0.01 here: its 100,000 nodes would take over 2 minutes)",
        # Tried once (python -m benchmarks.run --peers dask,ray --only G1M --repeat 1): the
        # warm-up timed out after the runner's 120 s; its G10k run rate, about 2,200
        # tasks/s, puts the 1,010,101 tasks near 8 minutes.
        "G1M": "n/a (tried at G1M: timed out after 120 s; ~2,200 tasks/s at G10k means ~8 min)",
        "G10M": "n/a (tried at G1M: timed out after 120 s; ~2,200 tasks/s at G10k means ~8 min)",
    }

    def __init__(self) -> None:
        self._ray: Any = None
        self._inc: Any = None
        self._leaf: Any = None
        self._add: Any = None
        self._actor: Any = None
        self._holders: list[Any] = []

    def setup_of(self, workload: Workload) -> str:
        return "cold" if workload.setup == "cold" else "instance"

    async def start(self, setup: str) -> None:
        if setup == "cold":
            require("ray")
            return
        # Before the import: no usage-stats prompt or upload attempt from a benchmark.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # W3 queues 10,000 calls on one actor by design; Ray warns on the console
        # past 5,000, through a channel log_to_driver=False does not cover.
        os.environ.setdefault("RAY_actor_excess_queueing_warn_threshold", "1000000000")
        ray = require("ray")
        self._ray = ray
        # On the loop's thread, blocking it for the seconds init takes, and not in a
        # helper thread: Ray ties its GCS and raylet to the life of the thread that
        # started them (Linux parent-death signal), so they would be killed the
        # moment a helper thread finished. A hang here is caught by the runner's
        # watchdog instead of an asyncio timeout.
        ray.init(
            num_cpus=NUM_CPUS,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
        self._inc = ray.remote(inc)
        self._leaf, self._add = ray.remote(tree_leaf), ray.remote(tree_add)
        self._total = ray.remote(tree_total)
        self._actor = ray.remote(_AsyncWorker).remote()
        # W5's and W7's two ends: actors are processes of their own, so two of them pin
        # the making and the summing to two different worker processes. num_cpus=0: they
        # must not take the CPUs the tasks of the other workloads run on.
        holder = ray.remote(num_cpus=0)(_ArrayHolder)
        self._holders = [holder.remote(), holder.remote()]
        # Ray starts worker processes lazily; make sure the actors are up before the
        # warm-up run so their start-up never lands in a figure.
        pids = await asyncio.gather(*(h.pid.remote() for h in self._holders))
        assert len(set(pids)) == 2, f"W5's actors share a process: {pids}"
        await self._actor.ready.remote()

    async def stop(self) -> None:
        ray = self._ray
        if ray is None or not ray.is_initialized():
            return
        # Drop the handles first so the actors exit before shutdown.
        self._actor = None
        self._holders = []
        ray.shutdown()  # same thread as init; bounded by the runner's watchdog

    async def w0(self, w: Workload) -> Timed:
        return Timed(*await run_cold(self.name))

    async def w1(self, w: Workload) -> list[int]:
        refs = [self._inc.remote(i) for i in range(w.n)]
        return list(await asyncio.gather(*refs))

    async def w2(self, w: Workload) -> int:
        # Passing a ref as an argument makes it a dependency Ray resolves before the call.
        ref = self._inc.remote(0)
        for _ in range(w.n - 1):
            ref = self._inc.remote(ref)
        return int(await ref)

    async def w3(self, w: Workload) -> list[int]:
        # Ray runs `async def` only as methods of an async actor (here: one actor,
        # its methods interleaved on the actor's event loop).
        refs = [self._actor.run.remote(i) for i in range(w.n)]
        return list(await asyncio.gather(*refs))

    async def w7(self, w: Workload) -> float:
        level = [self._leaf.remote(i) for i in range(tree_levels(w.n))]
        while len(level) > 1:
            level = [self._add.remote(level[i], level[i + 1]) for i in range(0, len(level), 2)]
        return float((await level[0])[0])

    w7_p = w7  # Ray's tasks always run in its worker processes

    async def g10k(self, w: Workload) -> Timed:
        # No bytes per task: Ray's scheduling state lives in its raylet and its workers,
        # not in this process; and a remote call is submitted (and may run) at once.
        leaf, total = self._inc.remote, self._total.remote

        async def wait(ref: Any) -> Any:
            return await ref

        value, _, run_s, stages = await graphscale.run_tree(leaf, total, wait, w.n, memory=False)
        return Timed(value, run_s, stages)

    async def w4(self, w: Workload) -> list[int]:
        refs = [self._inc.remote(i) for i in range(w.n)]
        return list(await asyncio.gather(*refs))

    async def w5(self, w: Workload) -> Timed:
        # A task's (or actor method's) return value goes into the node's shared-memory
        # object store when it is made; the second actor maps it from there. On one
        # node, Ray's "transfer" is that store, not a socket.
        ray = self._ray
        first, second = self._holders
        made = first.make.remote(w.n)
        await run_blocking(
            lambda: ray.wait([made], fetch_local=False, timeout=_WAIT_TIMEOUT_S), _WAIT_TIMEOUT_S
        )
        t0 = time.perf_counter()
        total = await second.total.remote(made)
        return Timed(total, time.perf_counter() - t0)

    async def s1(self, w: Workload) -> tuple[int, int]:
        # A generator's ObjectRefGenerator cannot be passed to another task, so the
        # reading actor is the one that calls the producing actor's generator method.
        first, second = self._holders
        count, total = await second.read_stream.remote(first, w.n)
        return count, total


class _AsyncWorker:
    """Wrapped by ray.remote at start-up, so importing this module never needs Ray."""

    async def ready(self) -> bool:
        return True

    async def run(self, i: int) -> int:
        return await sleep0_identity(i)


class _ArrayHolder:
    """W5's and W7's actor, wrapped by ray.remote at start-up."""

    def pid(self) -> int:
        return os.getpid()

    def make(self, n: int) -> Any:
        return make_array(n)

    def total(self, a: Any) -> float:
        return array_sum(a)

    def stream(self, n: int) -> Any:
        for v in stream_values_sync(n):  # noqa: UP028 - Ray calls send() on the generator
            yield v

    def read_stream(self, producer: Any, n: int) -> tuple[int, int]:
        import ray

        count = total = 0
        values = producer.stream.options(_generator_backpressure_num_objects=S1_WINDOW).remote(n)
        for ref in values:
            count += 1
            total += ray.get(ref)
        return count, total
