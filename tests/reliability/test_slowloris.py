"""Slow loris: a thousand connections that open and then dawdle (nothing, one byte, a
hello a byte at a time, again when cut off) against both of a cluster's listeners,
the one its worker joined through and the one it offers the network, while tasks run
through that worker. The listeners cut them short; the tasks must not notice.

Measured, against the same run without the flood: the tasks' p99 latency at most
doubles (median of 5 rounds each), the cluster's process grows by at most 16 MiB, and
every descriptor it took for the flood is given back.

On two shared cores the flood's own work (its process, loopback TCP in the kernel) may
by itself slow the tasks that much: the same flood aimed at another process (an idle
`aiodagger scheduler`, whose listeners are the same) measures that, and the tasks may
then take at most 1.5x what they take under the decoy's flood. Across sessions the
quiet/flooded ratio ran from 1.5x to 2.75x with the code unchanged.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import psutil
import pytest

import aiodagger as dagger
from aiodagger.comm.handshake import new_token
from aiodagger.comm.server import parse_address
from tests.slowloris import ROOT, Flood

pytestmark = pytest.mark.timeout(240)

TASKS = 1000
ATTACKERS = 1000
# Rounds of quiet and flooded runs, their p99s compared by median: the machine this
# runs on may be busy with more than this test, and one p99 of 1,000 tasks swings
# between 0.4 and 2.5 ms here with nothing else changed.
ROUNDS = 5
# Each attacker reconnects 1-3 s after it is cut off: about 350 connections a second
# in all. At 700-1,500 a second the honest p99 rose 2-4x here, and about as much with
# the same flood aimed at another process: on two cores, the flood's own CPU (its
# process, and loopback TCP in the kernel) then weighs more than the cluster's defences.
RECONNECT = 2.0
SETTLE = 2.0  # seconds for the flood to be in full swing: open, cut off, back again
MiB = 1 << 20


@pytest.fixture
def descriptors():
    """Room for the flood's sockets on the cluster's side (restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def latencies(n: int) -> list[float]:
    """Seconds from spawn to result of ``n`` small tasks, one after the other: each
    figure is the system's, not time spent queued behind the task before it."""
    async def run() -> list[float]:
        out = []
        for i in range(n):
            start = time.perf_counter()
            assert await dagger.spawn(pow, i, 2) == i * i
            out.append(time.perf_counter() - start)
        return out

    return await asyncio.wait_for(run(), 60)


def p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * len(values))]


async def decoy(tmp_path: Path) -> tuple[asyncio.subprocess.Process, int]:
    """An idle `aiodagger scheduler` in a process of its own, and the port it listens on."""
    token = tmp_path / "decoy-token"
    token.write_text(new_token())
    env = {k: v for k, v in os.environ.items() if k != "AIODAGGER_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiodagger", "scheduler", "--listen", "tcp://127.0.0.1:0", "--token-file",
        str(token), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT, env=env)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    return proc, parse_address(line.rsplit(" ", 1)[1].strip())[1]


async def test_slow_loris_flood_leaves_the_workload_on_time(no_leaks, seed, descriptors, tmp_path):
    me = psutil.Process()
    other, other_port = await decoy(tmp_path)
    try:
        await run_floods(me, other_port, seed)
    finally:
        other.kill()
        await other.wait()


async def run_floods(me: psutil.Process, other_port: int, seed: int) -> None:
    async with dagger.Cluster(processes=1, threads=1, listen="tcp://127.0.0.1:0", token=new_token()) as cluster:
        # The listener the worker joined through: the path of every task below.
        internal = cluster._launcher._internal
        ports = [parse_address(cluster.address)[1], internal.port]
        await latencies(200)  # the worker is warm
        gc.collect()
        rss, fds = me.memory_info().rss, me.num_fds()
        peak, quiet, flooded, decoyed, reports = rss, [], [], [], []

        async def watch_rss() -> None:
            nonlocal peak
            while True:
                peak = max(peak, me.memory_info().rss)
                await asyncio.sleep(0.1)

        watcher = asyncio.ensure_future(watch_rss())
        try:
            for round_ in range(ROUNDS):
                quiet.append(p99(await latencies(TASKS)))
                async with Flood(ports, "--mode", "slow", "--connections", str(ATTACKERS), "--drip", "0.5",
                                 "--reconnect", str(RECONNECT), "--seed", str(seed + round_)) as flood:
                    await asyncio.sleep(SETTLE)
                    flooded.append(p99(await latencies(TASKS)))
                    reports.append((await flood.stop()).strip())
                async with Flood([other_port, other_port], "--mode", "slow", "--connections", str(ATTACKERS),
                                 "--drip", "0.5", "--reconnect", str(RECONNECT), "--seed", str(seed + round_)) as flood:
                    await asyncio.sleep(SETTLE)
                    decoyed.append(p99(await latencies(TASKS)))
                    await flood.stop()
        finally:
            watcher.cancel()
        print(f"\np99, quiet: {[f'{x * 1e3:.2f}' for x in quiet]} ms, flooded: "
              f"{[f'{x * 1e3:.2f}' for x in flooded]} ms, the decoy flooded: "
              f"{[f'{x * 1e3:.2f}' for x in decoyed]} ms; RSS +{(peak - rss) / MiB:.1f} MiB; "
              f"floods: {reports}; internal listener: {internal.accepted} accepted, "
              f"{internal.dropped} dropped, {internal.rejected} rejected")
        assert all(r.startswith("connected") for r in reports) and internal.dropped > 0  # it was there
        bound = max(2 * statistics.median(quiet), 1.5 * statistics.median(decoyed))
        assert statistics.median(flooded) <= bound, (quiet, flooded, decoyed)
        assert peak - rss <= 16 * MiB
        deadline = time.monotonic() + 15
        while (internal.pending or me.num_fds() > fds) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert internal.pending == 0 and me.num_fds() <= fds, (me.num_fds(), fds)
        assert await dagger.spawn(pow, 3, 2) == 9
