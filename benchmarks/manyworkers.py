"""S-W: the scheduler's cost per task as the number of workers grows, up to 1,000.

    python -m benchmarks.manyworkers [--workers 2,10,100,1000] [--tasks 20000] [--rounds 3]
    python -m benchmarks.manyworkers --real 64     # 64 real worker processes: W4 and a tree

The scheduler is a real one (a ``dagger.Cluster(listen=...)`` in this process); the
workers are simulated in one other process: each is a real connection that does the
handshake, registers as a worker with one thread, and answers every task it is sent
at once with its result (an inline ``None``) over the real protocol, doing no work.
So the figure is what the scheduler spends per task, placement included, as the
worker count grows: CPU seconds of this process (every thread of it) over the tasks,
while ``--tasks`` independent tasks are spawned and gathered; beside it, the CPU it
spends with no task at all (heartbeats; sampled for IDLE_S first), in cores. Goal: within 2x from 2
to 1,000 workers (placement must not scan every worker for every task).

``--real N`` starts N real worker processes on this machine (one thread each) instead,
and times W4 (5,000 tiny tasks, spawned then gathered) and a tree reduction (10,000
leaves summed 100 at a time, as benchmarks/graphscale.py's graphs are) on them.

``--peer dask`` measures Dask distributed the same ways: with ``--real N``, a
``LocalCluster`` of N worker processes (one thread each); else its scheduler in a
process of its own (``dask scheduler``) and N real Dask workers, one thread each, all in
one other process (a Dask worker cannot be simulated more thinly than that: its
protocol is its code). The figure is then that scheduler process's CPU per task (psutil),
which leaves out the client's own cost; aiodagger's figure includes its client's, since
its scheduler runs in the client's process.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import pickle
import secrets
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

RESULT = pickle.dumps(None, protocol=5)


def inc(x: int) -> int:
    return x + 1


# -- the simulated workers (in their own process) ---------------------------------------------
async def _simulate(address: str, token: str, n: int) -> None:
    from aiodagger.comm import handshake
    from aiodagger.comm import protocol as P
    from aiodagger.comm.framing import open_comm
    from aiodagger.comm.server import parse_address

    # Every connection derives the same key from the same salt (the cluster's listener
    # has one): derived once here, not a thousand times.
    handshake._derive = functools.cache(handshake._derive)
    host, port = parse_address(address)
    endpoints = []

    def handlers(box: list[Any]) -> dict[type, Any]:
        def run(msg: P.Run, buffers: list[Any]) -> None:
            done = [P.Finished(t.key, t.attempt, "ok", len(RESULT), 0.0, 0.0, 1, []) for t in msg.tasks]
            try:
                box[0].send_nowait(P.Done(done, P.Memory(0, 0, 0, 0)), [RESULT] * len(done))
            except ConnectionError:
                pass

        def run_plain(msg: P.RunPlain, buffers: list[Any]) -> None:
            done = [P.Finished(key, attempt, "ok", len(RESULT), 0.0, 0.0, 1, [])
                    for key, attempt in zip(msg.keys, msg.attempts, strict=True)]
            try:
                box[0].send_nowait(P.Done(done, P.Memory(0, 0, 0, 0)), [RESULT] * len(done))
            except ConnectionError:
                pass

        def heartbeat(msg: P.Heartbeat, buffers: list[Any]) -> None:
            try:
                box[0].send_nowait(P.Heartbeat({}))
            except ConnectionError:
                pass

        def ignore(msg: Any, buffers: list[Any]) -> None:
            pass

        def stats(msg: P.Stats, buffers: list[Any]) -> tuple[P.StatsReply, list[Any]]:
            return P.StatsReply({}), []

        return {P.Run: run, P.RunPlain: run_plain, P.Heartbeat: heartbeat, P.Stats: stats, P.Functions: ignore, P.Values: ignore,
                P.Release: ignore, P.Cancel: ignore, P.Listen: ignore, P.Shutdown: ignore}

    for i in range(n):
        comm = await open_comm(host, port)
        await handshake.client_handshake(comm, token, {"role": "worker"})
        box: list[Any] = []
        endpoint = P.Endpoint(comm, handlers(box))
        box.append(endpoint)
        endpoints.append((endpoint, asyncio.ensure_future(endpoint.serve())))
        await endpoint.request(P.Register(f"sim-{i}", os.getpid(), socket.gethostname(), 1,
                                          "tcp://127.0.0.1:9", None, [], [], time.perf_counter()),
                               timeout=30)
    await asyncio.gather(*[serving for _, serving in endpoints], return_exceptions=True)


# -- the scheduler's side ----------------------------------------------------------------------
async def _measure(workers: int, tasks: int) -> tuple[float, float, float]:
    """(scheduler CPU µs per task, tasks per second, idle CPU in cores) with ``workers``
    simulated workers."""
    import aiodagger as dagger

    token = secrets.token_urlsafe(32)
    async with dagger.Cluster(listen="tcp://127.0.0.1:0", token=token, threads=1,
                              heartbeat_interval=5.0, heartbeat_timeout=60.0) as cluster:
        env = {**os.environ, "AIODAGGER_SIM_TOKEN": token}
        sim = subprocess.Popen([sys.executable, "-m", "benchmarks.manyworkers", "--simulate",
                                str(cluster.address), str(workers)], env=env)
        try:
            deadline = time.monotonic() + 120
            while len(cluster.workers) < workers + 1:
                if sim.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(cluster.workers) - 1} of {workers} simulated workers joined")
                await asyncio.sleep(0.05)
            await dagger.gather(*[dagger.spawn(inc, i) for i in range(min(tasks, 2000))])  # warm
            idle = time.process_time()
            await asyncio.sleep(IDLE_S)
            idle = (time.process_time() - idle) / IDLE_S
            cpu, wall = time.process_time(), time.perf_counter()
            await dagger.gather(*[dagger.spawn(inc, i) for i in range(tasks)])
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            sim.kill()
            sim.wait()
    return cpu / tasks * 1e6, tasks / wall, idle


def _tree(leaves: list[int]) -> int:
    return sum(leaves)


# -- Dask distributed, the same loads ------------------------------------------------------------
async def _dask_workers(address: str, n: int) -> None:
    """``n`` real Dask workers, one thread each, in this process (until killed)."""
    from distributed import Worker

    workers = [Worker(address, nthreads=1, memory_limit=0, dashboard=False, validate=False)
               for _ in range(n)]
    for i in range(0, n, 50):  # in batches: a thousand handshakes at once time out
        await asyncio.gather(*workers[i:i + 50])
    await asyncio.Event().wait()


async def _measure_dask(workers: int, tasks: int) -> tuple[float, float, float]:
    """(Dask scheduler process CPU µs per task, tasks per second, idle CPU in cores)
    with ``workers`` workers."""
    import tempfile

    import psutil
    from distributed import Client

    with tempfile.TemporaryDirectory() as tmp:
        sched_file = os.path.join(tmp, "scheduler.json")
        sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--no-dashboard",
                                  "--host", "127.0.0.1", "--port", "0", "--scheduler-file", sched_file],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sim = None
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(sched_file):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Dask scheduler did not start")
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.2)  # written, perhaps not complete
            async with Client(scheduler_file=sched_file, asynchronous=True) as client:
                sim = subprocess.Popen([sys.executable, "-m", "benchmarks.manyworkers", "--dask-workers",
                                        client.scheduler.address, str(workers)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await client.wait_for_workers(workers, timeout=600)
                await client.gather([client.submit(inc, i, pure=False) for i in range(min(tasks, 2000))])
                proc = psutil.Process(sched.pid)
                idle = _cpu(proc)  # what it spends with no task at all (heartbeats): left out
                await asyncio.sleep(IDLE_S)
                idle = (_cpu(proc) - idle) / IDLE_S
                before = _cpu(proc)
                wall = time.perf_counter()
                await client.gather([client.submit(inc, i, pure=False) for i in range(tasks)])
                wall = time.perf_counter() - wall
                after = _cpu(proc)
        finally:
            for p in (sim, sched):
                if p is not None:
                    p.kill()
                    p.wait()
    return (after - before) / tasks * 1e6, tasks / wall, idle


# Seconds the schedulers' CPU is sampled with no task in flight: what its workers cost it
# alone (heartbeats), shown beside the cost per task, which includes it. Taking it off
# was tried: at 1,000 Dask workers that background varies more than the tasks cost.
IDLE_S = 3.0


def _cpu(proc: Any) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def _real_dask(n: int, rounds: int) -> None:
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    async with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                            asynchronous=True, memory_limit=0) as cluster, \
            Client(cluster, asynchronous=True) as client:
        await client.wait_for_workers(n, timeout=600)
        started = time.perf_counter() - start
        w4, tree = [], []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            out = await client.gather([client.submit(inc, i, pure=False) for i in range(5000)])
            w4.append(5000 / (time.perf_counter() - t0))
            assert out == [i + 1 for i in range(5000)]
            t0 = time.perf_counter()
            level: list[Any] = [client.submit(inc, i, pure=False) for i in range(10_000)]
            while len(level) > 1:
                level = [client.submit(_tree, level[i:i + 100], pure=False) for i in range(0, len(level), 100)]
            total = await level[0]
            tree.append(10_100 / (time.perf_counter() - t0))
            assert total == sum(range(1, 10_001))
    print(f"dask: {n} real worker processes (started in {started:.1f} s): W4 {statistics.median(w4[1:]):,.0f} "
          f"tasks/s, tree reduction {statistics.median(tree[1:]):,.0f} tasks/s (medians of {rounds})")


async def _real(n: int, rounds: int) -> None:
    import aiodagger as dagger

    start = time.perf_counter()
    async with dagger.Cluster(processes=n, threads=1) as cluster:
        started = time.perf_counter() - start
        assert len(cluster.workers) == n + 1
        w4, tree = [], []
        for _ in range(rounds + 1):  # the first round warms up
            t0 = time.perf_counter()
            out = await dagger.gather(*[dagger.spawn(inc, i) for i in range(5000)])
            w4.append(5000 / (time.perf_counter() - t0))
            assert out == [i + 1 for i in range(5000)]
            t0 = time.perf_counter()
            level: list[Any] = [dagger.spawn(inc, i) for i in range(10_000)]
            while len(level) > 1:
                level = [dagger.spawn(_tree, level[i:i + 100]) for i in range(0, len(level), 100)]
            total = await level[0]
            tree.append(10_100 / (time.perf_counter() - t0))  # leaves + inner tasks
            assert total == sum(range(1, 10_001))
    print(f"{n} real worker processes (started in {started:.1f} s): W4 {statistics.median(w4[1:]):,.0f} "
          f"tasks/s, tree reduction {statistics.median(tree[1:]):,.0f} tasks/s (medians of {rounds})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.manyworkers")
    parser.add_argument("--workers", default="2,10,100,1000")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--real", type=int, default=0, help="N real worker processes instead (W4 and a tree)")
    parser.add_argument("--peer", choices=("aiodagger", "dask"), default="aiodagger")
    parser.add_argument("--simulate", nargs=2, metavar=("ADDRESS", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--dask-workers", nargs=2, metavar=("ADDRESS", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dask = args.peer == "dask"
    if args.real:
        asyncio.run(_real_dask(args.real, args.rounds) if dask else _real(args.real, args.rounds))
        return 0
    if args.simulate:
        asyncio.run(_simulate(args.simulate[0], os.environ["AIODAGGER_SIM_TOKEN"], int(args.simulate[1])))
        return 0
    if args.dask_workers:
        asyncio.run(_dask_workers(args.dask_workers[0], int(args.dask_workers[1])))
        return 0
    counts = [int(n) for n in args.workers.split(",")]
    rows: dict[int, list[tuple[float, float, float]]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            rows[n].append(asyncio.run((_measure_dask if dask else _measure)(n, args.tasks)))
    base = None
    print(f"{args.peer}:")
    print("| workers | scheduler CPU µs/task (median) | tasks/s (median) | idle CPU, cores | cost vs the fewest |")
    print("|---:|---:|---:|---:|---:|")
    for n in counts:
        cpu = statistics.median(r[0] for r in rows[n])
        rate = statistics.median(r[1] for r in rows[n])
        idle = statistics.median(r[2] for r in rows[n])
        base = base or cpu
        print(f"| {n:,} | {cpu:.1f} | {rate:,.0f} | {idle:.2f} | {cpu / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
