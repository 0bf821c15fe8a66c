"""aiodagger itself: the system every other row is compared against."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from benchmarks import arrayruns, graphscale
from benchmarks.coldstart import run_cold
from benchmarks.peers.base import Peer, Timed, Unavailable
from benchmarks.spillrun import peak_rss, raw_disk_gb_s
from benchmarks.workloads import (
    DD_BLOCK_VALUES,
    DD_BLOCKS,
    PROCESS_WORKERS,
    S1_WINDOW,
    W6_CHUNK,
    W6_LIMIT,
    Workload,
    array_sum,
    bump_block,
    bump_in_place,
    chunk_sum,
    fan_inputs,
    fan_sum,
    fib_start,
    fib_step,
    inc,
    make_array,
    make_chunk,
    sleep0_identity,
    stream_sum,
    stream_values,
    tree_add,
    tree_leaf,
    tree_levels,
    tree_total,
)

# The public API the workloads use; checked up front so that a half-built or
# shadowed package yields one clear 'not importable' line, not a traceback per run.
_API = ("Cluster", "spawn", "gather")


def load() -> Any:
    """Import aiodagger, or raise Unavailable('not importable (...)') saying why not."""
    try:
        import aiodagger as dagger
    except Exception as exc:  # any import-time failure, not only ImportError
        raise Unavailable(f"not importable ({type(exc).__name__}: {exc})") from exc
    missing = [name for name in _API if not hasattr(dagger, name)]
    if missing:
        # An empty directory named aiodagger imports as a namespace package.
        where = getattr(dagger, "__file__", None) or ", ".join(getattr(dagger, "__path__", []))
        raise Unavailable(f"not importable (package at {where} lacks {', '.join(missing)})")
    return dagger


class AiodaggerPeer(Peer):
    """``async with dagger.Cluster()`` for the local workloads, ``Cluster(processes=2)``
    for the processes workloads; W0 starts the latter in a fresh interpreter. W6 and
    W6L run on one worker process with a memory limit, W6-0 on worker 0 with it."""

    name: ClassVar[str] = "aiodagger"
    notes: ClassVar[dict[str, str]] = {
        "W5": "pinned with scope(worker=...) to the two worker processes",
        "W5-tcp": "pinned as in W5; AIODAGGER_SHM=0",
        "S1": "pinned with scope(worker=...); batches relayed by the scheduler's process",
    }

    def __init__(self) -> None:
        self._dagger: Any = None
        self._cluster: Any = None
        self._stack = contextlib.AsyncExitStack()

    def setup_of(self, workload: Workload) -> str:
        return workload.setup  # "processes-tcp" is a cluster of its own here

    async def start(self, setup: str) -> None:
        dagger = load()
        self._dagger = dagger
        if setup == "local":
            self._cluster = await self._stack.enter_async_context(dagger.Cluster())
        elif setup == "processes":
            self._cluster = await self._stack.enter_async_context(
                dagger.Cluster(processes=PROCESS_WORKERS)
            )
        elif setup == "processes-tcp":
            # Read by each worker process as it starts, and by this one: no segments.
            previous = os.environ.get("AIODAGGER_SHM")
            os.environ["AIODAGGER_SHM"] = "0"
            self._stack.callback(_restore_env, "AIODAGGER_SHM", previous)
            self._cluster = await self._stack.enter_async_context(
                dagger.Cluster(processes=PROCESS_WORKERS)
            )
        elif setup == "spill":
            self._spill_dir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="w6-")))
            self._raw_gb_s = await raw_disk_gb_s(self._spill_dir)
            self._cluster = await self._stack.enter_async_context(
                dagger.Cluster(processes=1, threads=2, memory_limit=W6_LIMIT, spill_dir=self._spill_dir)
            )
        elif setup == "spill-local":
            # W6's worker, as worker 0: the same limit, threads and kind of spill directory.
            self._spill_dir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="w6-0-")))
            self._raw_gb_s = await raw_disk_gb_s(self._spill_dir)
            self._cluster = await self._stack.enter_async_context(
                dagger.Cluster(threads=2, memory_limit=W6_LIMIT, spill_dir=self._spill_dir)
            )

    async def stop(self) -> None:
        self._cluster = None
        await self._stack.aclose()

    async def w0(self, w: Workload) -> Timed:
        return Timed(*await run_cold(self.name))

    async def w1(self, w: Workload) -> list[int]:
        d = self._dagger
        tasks = [d.spawn(inc, i) for i in range(w.n)]
        return list(await d.gather(*tasks))

    async def w1_log(self, w: Workload) -> Timed:
        d = self._dagger
        d.enable_logging()
        try:
            t0 = time.perf_counter()
            out = list(await d.gather(*[d.spawn(inc, i) for i in range(w.n)]))
            seconds = time.perf_counter() - t0
        finally:
            d.disable_logging()
        await d.fetch_logs(clear=True)  # the next repeat starts from an empty log
        return Timed(out, seconds)

    async def w2(self, w: Workload) -> int:
        d = self._dagger
        t = d.spawn(inc, 0)
        for _ in range(w.n - 1):
            t = d.spawn(inc, t)
        return int(await t)

    async def w2b(self, w: Workload) -> float:
        d = self._dagger
        x, y = fib_start()
        a, b = d.spawn(fib_step, x, x), d.spawn(fib_step, y, y)
        for _ in range(w.n - 2):
            a, b = b, d.spawn(fib_step, a, b)
        return float(f"{(await b)[0]:.6e}")

    w2b_p = w2b  # the same chain; the setup has the worker processes

    async def w2b_f(self, w: Workload) -> float:
        d = self._dagger
        x, y = fib_start()
        nodes = [d.spawn(fib_step, x, x), d.spawn(fib_step, y, y)]
        a, b = nodes
        for _ in range(w.n - 2):
            a, b = b, d.spawn(fib_step, a, b)
            nodes.append(b)
        total = d.spawn(fan_sum, *fan_inputs(nodes))
        del nodes, a, b  # only the sum is held, as in W2b only the last node
        return float(f"{(await total)[0]:.6e}")

    async def w3(self, w: Workload) -> list[int]:
        d = self._dagger
        tasks = [d.spawn(sleep0_identity, i) for i in range(w.n)]
        return list(await d.gather(*tasks))

    async def w7(self, w: Workload) -> float:
        d = self._dagger
        level = [d.spawn(tree_leaf, i) for i in range(tree_levels(w.n))]
        while len(level) > 1:
            level = [d.spawn(tree_add, level[i], level[i + 1]) for i in range(0, len(level), 2)]
        return float((await level[0])[0])

    w7_p = w7  # the same graph; the setup has the worker processes

    async def la_mm(self, w: Workload) -> Timed:
        return await arrayruns.aiodagger_run(self._dagger, w.key)

    la_chol = la_solve = st = la_mm

    async def dd(self, w: Workload) -> float:
        import numpy as np

        d = self._dagger
        blocks = np.zeros((DD_BLOCKS, DD_BLOCK_VALUES))
        rows = list(blocks)
        async with d.datadeps() as dd:
            for i in range(w.n):
                dd.spawn(bump_in_place, d.InOut(rows[i % DD_BLOCKS]))
        return float(blocks.sum())

    async def dd_plain(self, w: Workload) -> float:
        import numpy as np

        d = self._dagger
        chains: list[Any] = list(np.zeros((DD_BLOCKS, DD_BLOCK_VALUES)))
        for i in range(w.n):
            chains[i % DD_BLOCKS] = d.spawn(bump_block, chains[i % DD_BLOCKS])
        return float(sum(a.sum() for a in await d.gather(*chains)))

    async def w4(self, w: Workload) -> list[int]:
        # Worker 0 (this process) runs only tasks scoped to it while subprocess
        # workers exist, so every task here runs in one of the two worker processes.
        d = self._dagger
        tasks = [d.spawn(inc, i) for i in range(w.n)]
        return list(await d.gather(*tasks))

    async def w5(self, w: Workload) -> Timed:
        d = self._dagger
        first, second = self._two_workers()
        made = d.options(scope=d.scope(worker=first)).spawn(make_array, w.n)
        await made.wait()  # done on worker 1, its value left there: not fetched
        exc = made.exception()
        if exc is not None:
            raise exc
        t0 = time.perf_counter()
        total = await d.options(scope=d.scope(worker=second)).spawn(array_sum, made)
        return Timed(total, time.perf_counter() - t0)

    w5_tcp = w5  # the same run; the setup turned shared memory off

    async def s1(self, w: Workload) -> tuple[int, int]:
        d = self._dagger
        first, second = self._two_workers()
        with d.options(scope=d.scope(worker=first)):
            stream = d.spawn_streaming(stream_values, w.n, buffer=S1_WINDOW)
        count, total = await d.options(scope=d.scope(worker=second)).spawn(stream_sum, stream)
        return count, total

    async def g10k(self, w: Workload) -> Timed:
        """The tree spawned with dagger.spawn, the root awaited; timed: the run phase."""
        value, _, run_s, stages = await self._tree(w, rss=False)
        return Timed(value, run_s, stages)

    g1m = g10k

    async def g10m(self, w: Workload) -> Timed:
        """Timed: from the first spawn to the root's value."""
        value, spawn_s, run_s, stages = await self._tree(w, rss=True)
        return Timed(value, spawn_s + run_s, stages)

    async def _tree(self, w: Workload, rss: bool) -> tuple[int, float, float, dict[str, float]]:
        spawn = self._dagger.spawn

        async def wait(root: Any) -> int:
            return int(await root)

        return await graphscale.run_tree(
            lambda i: spawn(inc, i), lambda *xs: spawn(tree_total, *xs), wait, w.n, rss=rss)

    def _two_workers(self) -> list[int]:
        return sorted(info.id for info in self._cluster.workers if info.id != 0)[:2]

    async def w6(self, w: Workload) -> Timed:
        cluster = self._cluster
        (worker,) = [info for info in cluster.workers if info.id != 0]

        async def stats() -> dict[str, Any]:
            return (await cluster.worker_stats())[worker.id]

        return await self._spill(w, worker.pid, stats)

    w6l = w6  # the same run with more chunks: w.n says how many

    async def w6_0(self, w: Workload) -> Timed:
        # Worker 0 is this process: its RSS is the worker's, the caller's included.
        return await self._spill(w, os.getpid(), self._worker0_stats)

    async def _worker0_stats(self) -> dict[str, Any]:
        """Worker 0's spill counters. worker_stats() has only workers in other
        processes, so they come from worker 0's store; {} if it has none to show."""
        stats = (await self._cluster.worker_stats()).get(0)
        if stats is None:
            store = getattr(getattr(self._cluster, "_local", None), "store", None)
            stats = store.stats() if store is not None else {}
        return dict(stats)

    async def _spill(
        self, w: Workload, pid: int, stats: Callable[[], Awaitable[dict[str, Any]]]
    ) -> Timed:
        """W6's run: ``w.n`` chunks made and summed, every chunk kept referenced to the
        end; ``pid`` is the worker's process, whose RSS is sampled."""
        d = self._dagger
        before = await stats()
        async with peak_rss(pid) as peak:
            t0 = time.perf_counter()
            chunks = [d.spawn(make_chunk, i, W6_CHUNK) for i in range(w.n)]  # all kept referenced
            sums = [d.spawn(chunk_sum, c) for c in chunks]
            total = sum(await d.gather(*sums))
            seconds = time.perf_counter() - t0
        after = await stats()
        del chunks, sums
        measured: dict[str, float] = {}
        if "spilled_bytes" in after and "spilled_bytes" in before:
            spilled = after["spilled_bytes"] - before["spilled_bytes"]
            spill_time = after["spill_seconds"] - before["spill_seconds"]
            measured["GiB spilled"] = spilled / 2**30
            measured["spill GB/s"] = spilled / spill_time / 1e9 if spill_time else 0.0
        measured["raw disk GB/s"] = self._raw_gb_s
        measured["peak RSS GiB"] = peak[0] / 2**30
        return Timed(total, seconds, measured)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
