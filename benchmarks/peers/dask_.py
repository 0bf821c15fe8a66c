"""Dask, in its two forms: the distributed scheduler and dask.delayed on threads."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from benchmarks.peers.base import Peer, require, run_blocking
from benchmarks.workloads import Workload, inc

log = logging.getLogger(__name__)

# Dask runs functions on threads; it has no notion of an `async def` task.
_NO_ASYNC = "n/a (dask has no async def tasks)"

# How long a dask.compute call may block before the run gives up on it. The
# runner also bounds each run; this only keeps the helper thread from outliving
# a hung compute by much.
_COMPUTE_TIMEOUT_S = 600.0


class DaskDistributedPeer(Peer):
    """``distributed.Client(asynchronous=True, processes=False)``: scheduler and one
    threaded worker in this process, sharing the benchmark's event loop."""

    name: ClassVar[str] = "dask"
    not_applicable: ClassVar[dict[str, str]] = {"W3": _NO_ASYNC}

    def __init__(self) -> None:
        self._client: Any = None
        self._cluster: Any = None

    async def start(self) -> None:
        distributed = require("distributed")
        # The in-process scheduler and worker log at INFO on every start/stop.
        logging.getLogger("distributed").setLevel(logging.ERROR)
        # dashboard_address=None: no HTTP server, no port to collide on a shared machine.
        self._client = await distributed.Client(
            asynchronous=True, processes=False, dashboard_address=None
        )
        self._cluster = self._client.cluster
        log.debug("dask cluster: %s", self._cluster)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._cluster is not None:
            await self._cluster.close()
            self._cluster = None

    # pure=False everywhere: with content-derived keys a repeat would find the
    # previous repeat's results still on the scheduler (releases are asynchronous)
    # and skip the work.

    async def w1(self, w: Workload) -> list[int]:
        futures = [self._client.submit(inc, i, pure=False) for i in range(w.n)]
        return list(await self._client.gather(futures))

    async def w2(self, w: Workload) -> int:
        f = self._client.submit(inc, 0, pure=False)
        for _ in range(w.n - 1):
            f = self._client.submit(inc, f, pure=False)
        return int(await f)


class DaskDelayedPeer(Peer):
    """``dask.delayed`` graphs computed by the local threaded scheduler.

    ``dask.compute`` blocks, so it runs in a helper thread; the graph is built on
    the loop, inside the timed region, as a user would build it.
    """

    name: ClassVar[str] = "dask-delayed"
    not_applicable: ClassVar[dict[str, str]] = {"W3": _NO_ASYNC}

    def __init__(self) -> None:
        self._dask: Any = None

    async def start(self) -> None:
        self._dask = require("dask")

    async def w1(self, w: Workload) -> list[int]:
        dask = self._dask
        delayed_inc = dask.delayed(inc)
        parts = [delayed_inc(i) for i in range(w.n)]
        result = await run_blocking(
            lambda: dask.compute(*parts, scheduler="threads"), _COMPUTE_TIMEOUT_S
        )
        return list(result)

    async def w2(self, w: Workload) -> int:
        dask = self._dask
        delayed_inc = dask.delayed(inc)
        d = delayed_inc(0)
        for _ in range(w.n - 1):
            d = delayed_inc(d)
        (result,) = await run_blocking(
            lambda: dask.compute(d, scheduler="threads"), _COMPUTE_TIMEOUT_S
        )
        return int(result)
