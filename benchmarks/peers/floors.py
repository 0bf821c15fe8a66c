"""The floors: what the same work costs with no framework at all.

They bound from below what any asyncio-based framework can reach: ``asyncio``
for coroutine work (W3) and for a bounded stream of values (W7, in one process),
``executor`` for thread-pool work (W1),
``process-pool`` and ``process-pool-map`` for work in two worker processes (W4,
and W0's cold start), ``tcp-socket`` for moving an array between two processes
(W5). A floor has rows only for the workloads it bounds.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import socket
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, ClassVar

from benchmarks import arrayruns
from benchmarks.coldstart import run_cold
from benchmarks.peers.base import Peer, Timed, run_blocking
from benchmarks.workloads import (
    PROCESS_WORKERS,
    S1_WINDOW,
    Workload,
    array_sum,
    fan_inputs,
    fan_sum,
    fib_start,
    fib_step,
    inc,
    make_array,
    sleep0_identity,
    stream_values,
)

# How long the floors' own blocking steps may take before they are given up on;
# the runner's --timeout bounds each run as a whole.
_BLOCKING_TIMEOUT_S = 600.0
_JOIN_TIMEOUT_S = 10.0


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

    async def w2b(self, w: Workload) -> float:
        # The floor: the same additions in a plain loop, no tasks at all.
        x, y = fib_start()
        a, b = fib_step(x, x), fib_step(y, y)
        for _ in range(w.n - 2):
            a, b = b, fib_step(a, b)
        return float(f"{b[0]:.6e}")

    async def w2b_f(self, w: Workload) -> float:
        x, y = fib_start()
        nodes = [fib_step(x, x), fib_step(y, y)]
        for _ in range(w.n - 2):
            nodes.append(fib_step(nodes[-2], nodes[-1]))
        return float(f"{fan_sum(*fan_inputs(nodes))[0]:.6e}")

    async def w3(self, w: Workload) -> list[int]:
        tasks = [asyncio.create_task(sleep0_identity(i)) for i in range(w.n)]
        return await asyncio.gather(*tasks)

    async def s1(self, w: Workload) -> tuple[int, int]:
        # The same window as the streaming systems, in one process: no pickling, no wire.
        queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=S1_WINDOW)

        async def produce() -> None:
            async for v in stream_values(w.n):
                await queue.put(v)
            await queue.put(None)

        producer = asyncio.create_task(produce())
        count = total = 0
        while (v := await queue.get()) is not None:
            count += 1
            total += v
        await producer
        return count, total


class ExecutorPeer(Peer):
    """``loop.run_in_executor`` on a ThreadPoolExecutor of the default size."""

    name: ClassVar[str] = "executor"
    not_applicable: ClassVar[dict[str, str]] = {
        "W3": "n/a (async def runs on the loop, not in an executor)",
    }

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    async def start(self, setup: str) -> None:
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


# -- processes -----------------------------------------------------------------------------

# The worker processes of the floors are started with "spawn": the benchmark process
# has an event loop and threads, which fork would copy mid-flight.
_SPAWN = multiprocessing.get_context("spawn")


def _end_processes(procs: list[BaseProcess], timeout: float = _JOIN_TIMEOUT_S) -> None:
    """Join ``procs``, killing those still alive after ``timeout`` seconds (blocking)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(_JOIN_TIMEOUT_S)


class _ProcessPool(Peer):
    """A ``ProcessPoolExecutor(2)`` started for the processes setup, its workers up
    before the warm-up run."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def start(self, setup: str) -> None:
        if setup != "processes":
            return
        self._pool = ProcessPoolExecutor(PROCESS_WORKERS, mp_context=_SPAWN)
        # Both workers up before the warm-up run: one task each, at the same time.
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._pool, time.sleep, 0.2) for _ in range(PROCESS_WORKERS))
        )

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # A timed-out run may have left work queued: cancel it, don't wait for it,
        # and kill workers that do not exit (3.11 has no terminate_workers()).
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        await run_blocking(lambda: _end_processes(procs), 2 * _JOIN_TIMEOUT_S + 5)


class ProcessPoolPeer(_ProcessPool):
    """``loop.run_in_executor`` on a ``ProcessPoolExecutor(2)``: one submission per task.

    Its W0 row is the cold-start floor: a fresh interpreter, a ProcessPoolExecutor(2)
    whose workers are forked (no second interpreter start-up), and ``inc(1)``.
    """

    name: ClassVar[str] = "process-pool"
    notes: ClassVar[dict[str, str]] = {"W0": "workers forked, not started as interpreters"}

    async def w0(self, w: Workload) -> Timed:
        return Timed(*await run_cold(self.name))

    async def w4(self, w: Workload) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, inc, i) for i in range(w.n)]
        return await asyncio.gather(*futures)


class ProcessPoolMapPeer(_ProcessPool):
    """``ProcessPoolExecutor(2).map(inc, range(n), chunksize=...)``: tasks shipped in
    batches, four per worker, from a helper thread (``map`` blocks)."""

    name: ClassVar[str] = "process-pool-map"
    notes: ClassVar[dict[str, str]] = {"W4": "batched: chunksize = n / 8"}

    async def w4(self, w: Workload) -> list[Any]:
        pool = self._pool
        assert pool is not None
        chunksize = max(1, math.ceil(w.n / (4 * PROCESS_WORKERS)))
        return await run_blocking(
            lambda: list(pool.map(inc, range(w.n), chunksize=chunksize)), _BLOCKING_TIMEOUT_S
        )


# -- loopback TCP --------------------------------------------------------------------------


def _recv_exactly(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        k = conn.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the sender closed the connection mid-array")
        got += k


def _tcp_receiver(ctrl: Connection) -> None:
    """Process 2: accept one connection; per run, receive n float64 values into a
    preallocated buffer and send their sum to the parent."""
    import numpy as np

    with socket.create_server(("127.0.0.1", 0)) as server:
        ctrl.send(server.getsockname()[1])
        conn, _ = server.accept()
    buf = np.empty(0)
    with conn:
        while (n := ctrl.recv()) is not None:
            if buf.size != n:
                buf = np.empty(n)
                buf.fill(0.0)  # its pages touched here, outside the timed region
            ctrl.send("ready")
            _recv_exactly(conn, buf.data.cast("B"))
            ctrl.send(array_sum(buf))


def _tcp_sender(ctrl: Connection, port: int) -> None:
    """Process 1: per run, make the array on request, then sendall it on request."""
    arr: Any = None
    with socket.create_connection(("127.0.0.1", port)) as conn:
        while (msg := ctrl.recv()) is not None:
            if msg[0] == "make":
                arr = None  # the previous run's array goes before the next is made
                arr = make_array(msg[1])
                ctrl.send("made")
            else:
                conn.sendall(memoryview(arr).cast("B"))
                ctrl.send("sent")


class SocketPeer(Peer):
    """W5's floor: two processes and one loopback TCP connection. The sender does
    ``socket.sendall`` on a memoryview of its numpy array; the receiver does
    ``recv_into`` a preallocated numpy buffer and sums it. No framing, no pickling,
    no scheduler: the figure is the copy through the kernel plus the sum."""

    name: ClassVar[str] = "tcp-socket"

    def __init__(self) -> None:
        self._procs: list[BaseProcess] = []
        self._sender: Connection | None = None
        self._receiver: Connection | None = None

    async def start(self, setup: str) -> None:
        if setup != "processes":
            return
        self._receiver, r_child = _SPAWN.Pipe()
        self._sender, s_child = _SPAWN.Pipe()
        receiver = _SPAWN.Process(target=_tcp_receiver, args=(r_child,), daemon=True)
        receiver.start()
        r_child.close()
        self._procs.append(receiver)
        port = await self._call(self._receiver, None, wait_only=True)
        sender = _SPAWN.Process(target=_tcp_sender, args=(s_child, port), daemon=True)
        sender.start()
        s_child.close()
        self._procs.append(sender)

    @staticmethod
    async def _call(conn: Connection, msg: Any, wait_only: bool = False) -> Any:
        def call() -> Any:
            if not wait_only:
                conn.send(msg)
            return conn.recv()

        return await run_blocking(call, _BLOCKING_TIMEOUT_S)

    async def stop(self) -> None:
        for conn in (self._sender, self._receiver):
            if conn is not None:
                try:
                    conn.send(None)
                except OSError:
                    pass
        procs, self._procs = self._procs, []
        await run_blocking(lambda: _end_processes(procs), 2 * _JOIN_TIMEOUT_S + 5)
        for conn in (self._sender, self._receiver):
            if conn is not None:
                conn.close()
        self._sender = self._receiver = None

    async def w5(self, w: Workload) -> Timed:
        sender, receiver = self._sender, self._receiver
        assert sender is not None and receiver is not None
        await self._call(sender, ("make", w.n))  # the array exists in process 1
        await self._call(receiver, w.n)  # the buffer exists in process 2

        def timed() -> tuple[float, float]:
            t0 = time.perf_counter()
            sender.send(("send",))
            total = receiver.recv()
            return total, time.perf_counter() - t0

        total, seconds = await run_blocking(timed, _BLOCKING_TIMEOUT_S)
        await self._call(sender, None, wait_only=True)  # "sent"
        return Timed(total, seconds)


    w5_tcp = w5  # the floor of both: W5 over TCP is what this measures

class NumpyPeer(Peer):
    """numpy on the whole array, in this process: the floor of the array workloads."""

    name: ClassVar[str] = "numpy"

    async def la_mm(self, w: Workload) -> Timed:
        return await arrayruns.numpy_run(w.key)

    la_chol = la_solve = st = la_mm
