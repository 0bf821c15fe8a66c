"""Dask, in its two forms: the distributed scheduler and dask.delayed on threads."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

from benchmarks import arrayruns, graphscale
from benchmarks.coldstart import run_cold
from benchmarks.peers.base import Peer, Timed, require, run_blocking
from benchmarks.spillrun import peak_rss, raw_disk_gb_s
from benchmarks.workloads import (
    PROCESS_WORKERS,
    W6_CHUNK,
    W6_LIMIT,
    Workload,
    array_sum,
    chunk_sum,
    inc,
    make_array,
    make_chunk,
    sleep0_identity,
    tree_add,
    tree_leaf,
    tree_levels,
    tree_total,
)

log = logging.getLogger(__name__)

# Dask runs functions on threads; it has no notion of an `async def` task.
_NO_ASYNC = "n/a (dask.delayed calls an async def and gets a coroutine, never awaited)"

# Measured here: 100,000 chained client.submit calls held the event loop past the
# runner's 3-minute watchdog, which ends the whole run (and with it every other row).
_NO_LONG_CHAIN = "n/a (100,000 chained submits block the loop for over 3 minutes here)"

# Tried once (python -m benchmarks.run --peers dask,ray --only G1M --repeat 1): the warm-up
# timed out after the runner's 120 s; its G10k run rate, about 500 tasks/s, puts the
# 1,010,101 tasks past half an hour.
_NO_MILLION = "n/a (tried at G1M: timed out after 120 s; ~500 tasks/s at G10k means ~35 min)"

# How long a dask.compute call may block before the run gives up on it. The
# runner also bounds each run; this only keeps the helper thread from outliving
# a hung compute by much.
_COMPUTE_TIMEOUT_S = 600.0


class DaskDistributedPeer(Peer):
    """The distributed scheduler, with an asynchronous Client on the benchmark's loop.

    Local workloads: ``Client(asynchronous=True, processes=False)``, the scheduler and
    one threaded worker in this process. Processes workloads: ``LocalCluster(
    n_workers=2, threads_per_worker=1, processes=True)``. W0 starts the latter in a
    fresh interpreter.
    """

    name: ClassVar[str] = "dask"
    not_applicable: ClassVar[dict[str, str]] = {
        "W6-0": "n/a (aiodagger's worker 0 against its own W6; no comparable in-process variant)",
        "DD": "n/a (no datadeps: tasks cannot be ordered by the memory they access)",
        "S1": "n/a (no streaming between tasks: a task's result is one value)",
        "W2b": _NO_LONG_CHAIN,
        "W2b-p": _NO_LONG_CHAIN,
        "W2b-f": _NO_LONG_CHAIN,
        "G1M": _NO_MILLION,
        "G10M": _NO_MILLION,
    }
    notes: ClassVar[dict[str, str]] = {"W5": "pinned with submit(..., workers=[address])",
                                       "W5-tcp": "W5 itself: Dask moves it over TCP"}

    def __init__(self) -> None:
        self._client: Any = None
        self._cluster: Any = None
        self._distributed: Any = None
        self._workers: list[str] = []
        self._raw_gb_s = 0.0  # W6: the spill directory's disk, measured at start

    async def start(self, setup: str) -> None:
        distributed = require("distributed")
        self._distributed = distributed
        # The in-process scheduler and worker log at INFO on every start/stop.
        logging.getLogger("distributed").setLevel(logging.ERROR)
        if setup == "local":
            # dashboard_address=None: no HTTP server, no port to collide on a shared machine.
            self._client = await distributed.Client(
                asynchronous=True, processes=False, dashboard_address=None
            )
            self._cluster = self._client.cluster
        elif setup == "processes":
            self._cluster = await distributed.LocalCluster(
                n_workers=PROCESS_WORKERS,
                threads_per_worker=1,
                processes=True,
                asynchronous=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            self._client = await distributed.Client(self._cluster, asynchronous=True)
            await self._client.wait_for_workers(PROCESS_WORKERS)
            identity = await self._client.scheduler.identity()
            self._workers = sorted(identity["workers"])
        elif setup == "spill":
            # One worker process with the same limit as aiodagger's, Dask's default
            # thresholds (spill 70 %, pause 80 %, terminate 95 %), its own spill directory.
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(prefix="w6-dask-")
            # Measured here as aiodagger measures it at its start: the same disk work
            # precedes both systems' runs.
            self._raw_gb_s = await raw_disk_gb_s(Path(self._tmp.name))
            self._cluster = await distributed.LocalCluster(
                n_workers=1, threads_per_worker=2, processes=True, asynchronous=True,
                memory_limit=W6_LIMIT, local_directory=self._tmp.name,
                dashboard_address=None, silence_logs=logging.ERROR,
            )
            self._client = await distributed.Client(self._cluster, asynchronous=True)
            await self._client.wait_for_workers(1)
        log.debug("dask cluster: %s", self._cluster)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._cluster is not None:
            await self._cluster.close()
            self._cluster = None
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
            self._tmp = None

    # pure=False everywhere: with content-derived keys a repeat would find the
    # previous repeat's results still on the scheduler (releases are asynchronous)
    # and skip the work.

    async def w1(self, w: Workload) -> list[int]:
        futures = [self._client.submit(inc, i, pure=False) for i in range(w.n)]
        return list(await self._client.gather(futures))

    async def w3(self, w: Workload) -> list[int]:
        # distributed runs an `async def` task on its worker's event loop (since
        # dask/distributed#5151); the worker is in this process (processes=False).
        futures = [self._client.submit(sleep0_identity, i, pure=False) for i in range(w.n)]
        return list(await self._client.gather(futures))

    async def g10k(self, w: Workload) -> Timed:
        # No bytes per task: submit only queues the graph for the scheduler, which takes
        # it in once the loop runs, so after spawning its state is not built yet.
        submit = self._client.submit
        value, _, run_s, stages = await graphscale.run_tree(
            lambda i: submit(inc, i, pure=False),
            lambda *fs: submit(tree_total, *fs, pure=False),
            _result, w.n, memory=False)
        return Timed(value, run_s, stages)

    async def w2(self, w: Workload) -> int:
        f = self._client.submit(inc, 0, pure=False)
        for _ in range(w.n - 1):
            f = self._client.submit(inc, f, pure=False)
        return int(await f)

    async def w0(self, w: Workload) -> Timed:
        return Timed(*await run_cold(self.name))


    async def w7(self, w: Workload) -> float:
        submit = self._client.submit
        level = [submit(tree_leaf, i, pure=False) for i in range(tree_levels(w.n))]
        while len(level) > 1:
            level = [submit(tree_add, level[i], level[i + 1], pure=False) for i in range(0, len(level), 2)]
        return float((await level[0])[0])

    w7_p = w7

    async def la_mm(self, w: Workload) -> Timed:
        return await arrayruns.dask_distributed_run(self._client, w.key)

    la_chol = la_solve = st = la_mm

    async def w4(self, w: Workload) -> list[int]:
        futures = [self._client.submit(inc, i, pure=False) for i in range(w.n)]
        return list(await self._client.gather(futures))

    async def w5(self, w: Workload) -> Timed:
        first, second = self._workers[:2]
        made = self._client.submit(make_array, w.n, workers=[first], pure=False)
        await self._distributed.wait(made)  # done on worker 1, its value left there
        if made.status != "finished":
            await made  # raises the task's error
        t0 = time.perf_counter()
        total = await self._client.submit(array_sum, made, workers=[second], pure=False)
        return Timed(total, time.perf_counter() - t0)



    w5_tcp = w5  # Dask's same-host transfers are TCP already
    async def w6(self, w: Workload) -> Timed:
        client = self._client
        (pid,) = (await client.run(os.getpid)).values()
        async with peak_rss(pid) as peak:
            t0 = time.perf_counter()
            chunks = [client.submit(make_chunk, i, W6_CHUNK, pure=False) for i in range(w.n)]
            sums = [client.submit(chunk_sum, c, pure=False) for c in chunks]
            total = sum(await client.gather(sums))
            seconds = time.perf_counter() - t0
        del chunks, sums
        return Timed(total, seconds, {"raw disk GB/s": self._raw_gb_s, "peak RSS GiB": peak[0] / 2**30})

    w6l = w6  # the same run with more chunks: w.n says how many


async def _result(future: Any) -> Any:
    return await future


class DaskDelayedPeer(Peer):
    """``dask.delayed`` graphs computed by the local threaded scheduler.

    ``dask.compute`` blocks, so it runs in a helper thread; the graph is built on
    the loop, inside the timed region, as a user would build it.
    """

    name: ClassVar[str] = "dask-delayed"
    not_applicable: ClassVar[dict[str, str]] = {
        "W3": _NO_ASYNC,
        # Measured here: building and computing the 100,000-node chain did not finish
        # within the runner's 3-minute watchdog, which ends the whole run.
        "W2b": "n/a (the 100,000-node chain did not finish within 3 minutes here)",
        "W2b-f": "n/a (W2b's 100,000-node chain, which it extends, did not finish within 3 minutes here)",
    }

    def __init__(self) -> None:
        self._dask: Any = None

    async def start(self, setup: str) -> None:
        self._dask = require("dask")

    async def w1(self, w: Workload) -> list[int]:
        dask = self._dask
        delayed_inc = dask.delayed(inc)
        parts = [delayed_inc(i) for i in range(w.n)]
        result = await run_blocking(
            lambda: dask.compute(*parts, scheduler="threads"), _COMPUTE_TIMEOUT_S
        )
        return list(result)

    async def w7(self, w: Workload) -> float:
        dask = self._dask
        leaf, add = dask.delayed(tree_leaf), dask.delayed(tree_add)
        level = [leaf(i) for i in range(tree_levels(w.n))]
        while len(level) > 1:
            level = [add(level[i], level[i + 1]) for i in range(0, len(level), 2)]
        (root,) = await run_blocking(lambda: dask.compute(level[0], scheduler="threads"), _COMPUTE_TIMEOUT_S)
        return float(root[0])

    async def la_mm(self, w: Workload) -> Timed:
        return await arrayruns.dask_threads_run(self._dask, w.key)

    la_chol = la_solve = st = la_mm

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
