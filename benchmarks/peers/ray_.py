"""Ray: a local Ray instance with two CPUs, tasks and refs awaited from asyncio."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, ClassVar

from benchmarks.peers.base import Peer, require
from benchmarks.workloads import Workload, inc, sleep0_identity

log = logging.getLogger(__name__)

NUM_CPUS = 2


class RayPeer(Peer):
    name: ClassVar[str] = "ray"

    def __init__(self) -> None:
        self._ray: Any = None
        self._inc: Any = None
        self._actor: Any = None

    async def start(self) -> None:
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
        self._actor = ray.remote(_AsyncWorker).remote()
        # Ray starts worker processes lazily; make sure the actor is up before the
        # warm-up run so its start-up never lands in a figure.
        await self._actor.ready.remote()

    async def stop(self) -> None:
        ray = self._ray
        if ray is None or not ray.is_initialized():
            return
        self._actor = None  # drop the handle first so the actor exits before shutdown
        ray.shutdown()  # same thread as init; bounded by the runner's watchdog

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


class _AsyncWorker:
    """Wrapped by ray.remote at start-up, so importing this module never needs Ray."""

    async def ready(self) -> bool:
        return True

    async def run(self, i: int) -> int:
        return await sleep0_identity(i)
