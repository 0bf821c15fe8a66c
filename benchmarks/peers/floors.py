"""The floors: what plain asyncio costs for the same work, with no framework.

They bound from below what any asyncio-based framework can reach: ``asyncio``
for coroutine work (W3), ``executor`` for thread-pool work (W1).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from benchmarks.peers.base import Peer
from benchmarks.workloads import Workload, inc, sleep0_identity


async def _call_inc(x: int) -> int:
    return inc(x)


async def _link(prev: asyncio.Task[int]) -> int:
    return inc(await prev)


class AsyncioPeer(Peer):
    """``asyncio.create_task`` + ``asyncio.gather``; sync work is called inline on the loop."""

    name: ClassVar[str] = "asyncio"

    async def w1(self, w: Workload) -> list[int]:
        tasks = [asyncio.create_task(_call_inc(i)) for i in range(w.n)]
        return await asyncio.gather(*tasks)

    async def w2(self, w: Workload) -> int:
        # Each link is a task awaiting the previous one: the asyncio analogue of
        # passing a task as a dependency.
        t: asyncio.Task[int] = asyncio.create_task(_call_inc(0))
        for _ in range(w.n - 1):
            t = asyncio.create_task(_link(t))
        return await t

    async def w3(self, w: Workload) -> list[int]:
        tasks = [asyncio.create_task(sleep0_identity(i)) for i in range(w.n)]
        return await asyncio.gather(*tasks)


class ExecutorPeer(Peer):
    """``loop.run_in_executor`` on a ThreadPoolExecutor of the default size."""

    name: ClassVar[str] = "executor"
    not_applicable: ClassVar[dict[str, str]] = {
        "W3": "n/a (async def runs on the loop, not in an executor)",
    }

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(thread_name_prefix="bench-executor")

    async def stop(self) -> None:
        if self._pool is not None:
            # wait=False: a timed-out run may have left work queued; don't block on it
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def w1(self, w: Workload) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, inc, i) for i in range(w.n)]
        return await asyncio.gather(*futures)

    async def w2(self, w: Workload) -> int:
        # No dependency graph in an executor: the chain is sequential awaits.
        loop = asyncio.get_running_loop()
        value = 0
        for _ in range(w.n):
            value = await loop.run_in_executor(self._pool, inc, value)
        return value
