"""Network faults between hosts (network namespaces, tests/netns.py): a holder killed
while a large input streams out of it over a slowed link, a host cut off from
everyone and back, two hosts that cannot reach each other while the scheduler reaches
both. Every await must end with the right value or a typed error within a stated
bound, and once the fault is gone new work must run on every host.

One ``aiodagger worker`` runs on each host; the cluster listens on the bridge.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import aiodagger as dagger
from aiodagger.comm.handshake import new_token
from tests import netns
from tests.workers import block, digest, pid_of, wait_for_file, write_token

pytestmark = pytest.mark.timeout(240)

network, workers = netns.network, netns.workers  # the fixtures of the hosts

HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 2.0
WORKER_HEARTBEAT_TIMEOUT = 3.0  # the workers' own watch on the scheduler (--heartbeat-timeout)
# What the machine may add to any bound: three worker processes, the cluster and the
# test share its CPUs with whatever else runs.
SLACK = 5.0
TYPED = (dagger.DaggerError,)
MAX_INPUT_MISSES = 5  # tries of an input that cannot be fetched (aiodagger/scheduler/core.py)


@dataclass
class Hosts:
    """A cluster on the bridge and one worker on each host, by host index."""

    cluster: Any
    network: netns.Network
    workers: Any
    token_file: Path
    procs: list[Any]
    infos: list[Any]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def on(self, *hosts: int):
        return dagger.options(scope=dagger.scope(workers=[self.infos[h].id for h in hosts]))

    def worker_of(self, task) -> int:
        """The host holding ``task``'s result (the first, if several do)."""
        ids = [i.id for i in self.infos]
        return next(h for h, wid in enumerate(ids) if wid in task._where)

    async def replace(self, host: int) -> None:
        """Start a new worker on ``host`` in place of its dead one, as a supervisor would."""
        self.procs[host].wait(10)  # reaped: a zombie's pid still "exists"
        proc = self.workers.start(self.cluster.address, self.token_file, "--heartbeat-timeout",
                                  str(WORKER_HEARTBEAT_TIMEOUT), prefix=self.network.hosts[host].exec,
                                  threads=2)
        (self.infos[host],) = await self.workers.wait_joined(self.cluster, [proc])
        self.procs[host] = proc

    async def rejoined(self, host: int, timeout: float) -> float:
        """Wait until ``host``'s worker process is a worker of the cluster again (under a
        new id); return how long that took."""
        start = time.monotonic()
        pid = self.procs[host].pid
        while True:
            info = next((w for w in self.cluster.workers if w.pid == pid), None)
            if info is not None and info.id != self.infos[host].id:
                self.infos[host] = info
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, (
                f"host {host} did not rejoin within {timeout} s:\n{self.workers.output(self.procs[host])}")
            await asyncio.sleep(0.05)

    async def lost(self, host: int, timeout: float) -> float:
        start = time.monotonic()
        while self.infos[host].id in {w.id for w in self.cluster.workers}:
            assert time.monotonic() - start < timeout, f"host {host} was not declared lost in {timeout} s"
            await asyncio.sleep(0.02)
        return time.monotonic() - start

    async def every_host_works(self, size: int = 256 << 10) -> None:
        """Each host makes a block and digests the blocks of the others: work, and data
        between every pair of hosts."""
        n = len(self.infos)
        blocks = [self.on(i).spawn(block, size, 20 + i) for i in range(n)]
        digests = [self.on(i).spawn(digest, *(blocks[j] for j in range(n) if j != i)) for i in range(n)]
        results = await asyncio.wait_for(dagger.gather(*digests), 60)
        for i, (pid, got) in enumerate(results):
            assert pid == self.pids[i]
            assert got == [expected(self.pids[j], size, 20 + j) for j in range(n) if j != i]


def expected(pid: int, size: int, seed: int) -> tuple[int, int, str]:
    return pid, size, hashlib.sha256(bytes([seed % 256]) * size).hexdigest()


@pytest.fixture
async def hosts(network, workers, tmp_path):
    async with dagger.Cluster(threads=1, listen=f"tcp://{network.address}:0", token=new_token(),
                              heartbeat_interval=HEARTBEAT_INTERVAL,
                              heartbeat_timeout=HEARTBEAT_TIMEOUT) as cluster:
        token_file = write_token(tmp_path, cluster.token)
        procs = [workers.start(cluster.address, token_file, "--heartbeat-timeout",
                               str(WORKER_HEARTBEAT_TIMEOUT), prefix=host.exec, threads=2)
                 for host in network.hosts]
        yield Hosts(cluster, network, workers, token_file, procs, await workers.wait_joined(cluster, procs))


# -- a: the holder is killed while its value streams to another host ---------------------
SIZE = 32 << 20
# 32 MiB in ~3.4 s: longer than either heartbeat timeout, so that a transfer which
# merely takes its time is not mistaken for a silent peer.
RATE_MBIT = 80


async def test_holder_killed_mid_transfer_on_a_slow_link(no_leaks, seed, hosts):
    """A 32 MiB input moves to the consumer's host over a link shaped to 80 Mbit/s; its
    holder is killed (-9) once part of it has arrived. The consumer gets the right value,
    computed again on the third host, within the time of two transfers plus the
    heartbeat timeout; the cluster goes on without the dead host."""
    rng = random.Random(seed)
    consumer_host = rng.randrange(3)
    others = [h for h in range(3) if h != consumer_host]
    made = hosts.on(*others).spawn(block, SIZE, seed)
    await asyncio.wait_for(made.wait(), 30)
    holder = hosts.worker_of(made)
    spare = next(h for h in others if h != holder)
    consumer = hosts.network.hosts[consumer_host]
    hosts.network.slow(consumer, f"{RATE_MBIT}mbit", burst="256kb")
    try:
        start_bytes = hosts.network.shaped(consumer)
        used = hosts.on(consumer_host).spawn(digest, made)
        # Kill once a share of the value (drawn from the seed) has gone through the link.
        share = rng.uniform(0.2, 0.6)
        deadline = time.monotonic() + 30
        while hosts.network.shaped(consumer) - start_bytes < share * SIZE:
            assert not used.done(), f"the transfer ended before {share:.0%} of it was seen: {used}"
            assert time.monotonic() < deadline, "the transfer did not start"
            await asyncio.sleep(0.01)
        os.kill(hosts.pids[holder], signal.SIGKILL)
        killed = time.monotonic()
        transfer = SIZE * 8 / (RATE_MBIT * 1e6)
        bound = 2 * transfer + HEARTBEAT_TIMEOUT + SLACK
        pid, got = await asyncio.wait_for(used, bound)
        took = time.monotonic() - killed
        print(f"killed at {share:.0%} of the transfer; value back {took:.2f} s later (bound {bound:.1f} s)")
        assert pid == hosts.pids[consumer_host]
        assert got == [expected(hosts.pids[spare], SIZE, seed)]  # made again, on the spare host
        assert took <= bound
    finally:
        hosts.network.unslow(consumer)
    await hosts.lost(holder, HEARTBEAT_TIMEOUT + SLACK)
    alive = [h for h in range(3) if h != holder]
    assert await asyncio.wait_for(dagger.gather(*(hosts.on(h).spawn(pid_of) for h in alive)), 30) == [
        hosts.pids[h] for h in alive]

    # What the killed worker left on its disk goes when a worker starts there again.
    left = [p for p in Path(tempfile.gettempdir()).iterdir() if f"-{hosts.pids[holder]}-" in p.name]
    assert left, "the killed worker had no spill directory: nothing to check"
    await hosts.replace(holder)
    assert not any(p.exists() for p in left)
    await hosts.every_host_works()


# -- b: partitions -------------------------------------------------------------------------
def outcomes(results: list, seeds: list[int], check) -> tuple[int, list[BaseException]]:
    """How many results are right values (``check(value, seed)`` passes), and the typed
    errors; any other outcome fails the test."""
    right, errors = 0, []
    for value, seed in zip(results, seeds, strict=True):
        if isinstance(value, TYPED):
            errors.append(value)
        elif isinstance(value, BaseException):
            raise AssertionError(f"an untyped error: {value!r}") from value
        else:
            assert check(value, seed) is not False, value
            right += 1
    return right, errors


def check_block(value, seed: int, alive: list[int]) -> None:
    pid, data = value
    assert pid in alive and data == bytes([seed]) * BLOCK, (pid, len(data))


def check_digest(value, seed: int, consumer_pid: int, alive: list[int]) -> None:
    pid, [(maker, nbytes, sha)] = value
    assert pid == consumer_pid and maker in alive
    assert (nbytes, sha) == expected(maker, BLOCK, seed)[1:]


def spread(hosts: Hosts, tasks: list, host: int) -> list[int]:
    """Indexes of ``tasks`` whose result lives on ``host``; at least one."""
    found = [i for i, t in enumerate(tasks) if hosts.infos[host].id in t._where]
    assert found, f"no result landed on host {host}: {[t._where for t in tasks]}"
    return found


BLOCK = 1 << 20  # past the inline limit: each result stays where it is made


async def test_a_host_cut_off_from_everyone_and_back(no_leaks, seed, hosts, tmp_path):
    """Host X's link goes down while tasks run on every host, X holds results, other
    hosts are about to fetch them (over connections opened before) and the caller
    awaits them. Every await ends, within both heartbeat timeouts plus slack, with the
    right value (run again, or computed again, on the hosts left) or a typed error.
    Then the link comes back: X's worker joins again and work runs on all three."""
    rng = random.Random(seed)
    x = rng.randrange(3)
    others = [h for h in range(3) if h != x]
    await hosts.every_host_works()  # every pair of workers has a connection open now
    everywhere = hosts.on(0, 1, 2)
    made = [everywhere.spawn(block, BLOCK, 40 + i) for i in range(6)]
    await asyncio.wait_for(dagger.wait(made), 30)
    on_x = spread(hosts, made, x)
    gate = tmp_path / "gate"
    running = [dagger.options(retries=1, scope=dagger.scope(workers=[i.id for i in hosts.infos]))
               .spawn(wait_for_file, str(gate), 60) for _ in range(6)]
    deadline = time.monotonic() + 20
    while not all(w.tasks_running for w in hosts.cluster.workers[1:]):
        assert time.monotonic() < deadline, f"tasks did not reach every host: {hosts.cluster.workers}"
        await asyncio.sleep(0.05)

    hosts.network.cut(hosts.network.hosts[x])
    cut = time.monotonic()
    alive = [hosts.pids[h] for h in others]
    consumer = rng.choice(others)
    fetches = [hosts.on(consumer).spawn(digest, made[i]) for i in on_x]
    awaited = [made[i] for i in on_x]
    gate.touch()
    bound = HEARTBEAT_TIMEOUT + WORKER_HEARTBEAT_TIMEOUT + SLACK
    results = await asyncio.wait_for(
        asyncio.gather(*fetches, *awaited, *running, return_exceptions=True), bound)
    took = time.monotonic() - cut
    print(f"host {x} cut off: every await ended {took:.2f} s later (bound {bound:.1f} s)")
    n = len(on_x)
    seeds = [40 + i for i in on_x]
    right, errors = outcomes(results[:n], seeds, lambda v, s: check_digest(v, s, hosts.pids[consumer], alive))
    right2, errors2 = outcomes(results[n:2 * n], seeds, lambda v, s: check_block(v, s, alive))
    right3, errors3 = outcomes(results[2 * n:], [0] * len(running), lambda v, s: v in alive)
    print(f"right values: {right}/{n} fetched by host {consumer}, {right2}/{n} by the caller, "
          f"{right3}/{len(running)} tasks run again; typed errors: {errors + errors2 + errors3}")

    hosts.network.heal(hosts.network.hosts[x])
    rejoin_bound = WORKER_HEARTBEAT_TIMEOUT + 5.0 + 10.0 + SLACK  # watch, backoff, connect
    took = await hosts.rejoined(x, rejoin_bound)
    print(f"host {x} joined again {took:.2f} s after its link came back (bound {rejoin_bound:.1f} s)")
    await hosts.every_host_works()


async def test_two_hosts_that_cannot_reach_each_other(no_leaks, seed, hosts):
    """Hosts A and B lose their routes to each other; the scheduler still reaches both,
    and so does host C. B's tasks that need results held on A end, within the
    workers' heartbeat timeout and the tries of a lost input, with the right value
    (the input computed again where B can get it) or a typed error; A's results still
    reach the caller and C. Once the routes are back, data moves between all hosts."""
    rng = random.Random(seed)
    a, b = rng.sample(range(3), 2)
    c = 3 - a - b
    await hosts.every_host_works()  # A and B have a connection open to each other
    pinned = hosts.on(a).spawn(block, BLOCK, 60)  # can be made on A only
    movable = [hosts.on(a, c).spawn(block, BLOCK, 61 + i) for i in range(4)]
    await asyncio.wait_for(dagger.wait([pinned, *movable]), 30)
    on_a = [movable[i] for i in spread(hosts, movable, a)]

    hosts.network.partition(hosts.network.hosts[a], hosts.network.hosts[b])
    start = time.monotonic()
    alive = hosts.pids
    from_b = [hosts.on(b).spawn(digest, t) for t in [pinned, *on_a]]
    from_c = [hosts.on(c).spawn(digest, t) for t in [pinned, *on_a]]
    bound = WORKER_HEARTBEAT_TIMEOUT + MAX_INPUT_MISSES * 1.0 + SLACK
    results = await asyncio.wait_for(asyncio.gather(*from_b, *from_c, return_exceptions=True), bound)
    print(f"hosts {a} and {b} partitioned: every await ended {time.monotonic() - start:.2f} s later "
          f"(bound {bound:.1f} s)")
    n = len(from_b)
    seeds = [60, *(61 + movable.index(t) for t in on_a)]
    right_b, errors_b = outcomes(results[:n], seeds, lambda v, s: check_digest(v, s, hosts.pids[b], alive))
    right_c, errors_c = outcomes(results[n:], seeds, lambda v, s: check_digest(v, s, hosts.pids[c], alive))
    print(f"right values: {right_b}/{n} on host {b}, {right_c}/{n} on host {c}; "
          f"typed errors: {errors_b + errors_c}")
    assert not errors_c, "host C reaches A: its tasks have no reason to fail"
    (pid, data), *_ = await asyncio.wait_for(dagger.gather(pinned, *on_a), bound)
    assert data == bytes([60]) * BLOCK  # the caller gets A's results through the scheduler

    hosts.network.unpartition(hosts.network.hosts[a], hosts.network.hosts[b])
    await hosts.every_host_works()

