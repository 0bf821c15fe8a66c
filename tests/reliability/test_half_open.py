"""A half-open link: a worker's connection to the cluster goes dark without closing.

The worker reaches the cluster through a fault proxy (faultproxy.py), which on command
stops forwarding in one or both directions while both sockets stay open: no FIN, no
RST, as when a route or a middlebox dies. With work in flight on that worker (sync and
async tasks, some pinned to it, some free to move; values it holds that the caller
awaits, one of them on its way when the link dies; a large argument on its way to it),
every await resolves within 10 s of the fault, with the right value or a
WorkerLostError, given heartbeats of 0.2 s and a timeout of 2 s on the cluster's side,
whatever the worker's own timeout. The stranded worker gives up on the dead link by
itself (its own heartbeat timeout), drops it, and joins again through a fresh one.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import NamedTuple

import psutil
import pytest

import aiodagger as dagger
from aiodagger.comm.handshake import new_token
from aiodagger.comm.server import parse_address
from tests.reliability.faultproxy import Direction, FaultProxy
from tests.workers import WorkerProcesses, block, digest, pid_of, write_token

pytestmark = pytest.mark.timeout(120)

HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 2.0
RESOLVE_WITHIN = 10.0
BLOCK = 256 << 10  # past the inline limit: results stay on the worker that made them
BIG = 32 << 20  # far more than the sockets' buffers hold: its sender waits for room


class Cut(NamedTuple):
    directions: tuple[Direction, ...]
    read: bool  # the proxy reads and drops (True) or stops reading (False)


BOTH: tuple[Direction, ...] = ("to-cluster", "to-worker")
# Each case: the cuts, 0.5 s apart, and the worker's own heartbeat timeout.
CASES: dict[str, tuple[list[Cut], float]] = {
    "both ways, dropped": ([Cut(BOTH, True)], HEARTBEAT_TIMEOUT),
    "both ways, stalled": ([Cut(BOTH, False)], HEARTBEAT_TIMEOUT),
    "to the cluster, stalled": ([Cut(("to-cluster",), False)], HEARTBEAT_TIMEOUT),
    # the worker hears nothing; the cluster must not wait for the worker's (default) timeout
    "to the worker, dropped": ([Cut(("to-worker",), True)], 10.0),
    # a large value is on its way to the cluster, stuck, when the other direction dies too
    "to the cluster mid-reply, then to the worker": (
        [Cut(("to-cluster",), False), Cut(("to-worker",), True)], HEARTBEAT_TIMEOUT),
}


def nap(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


async def anap(seconds: float, value: int) -> int:
    await asyncio.sleep(seconds)
    return value


def size_of(data: bytes) -> int:
    return len(data)


def sha(size: int, seed: int) -> str:
    return hashlib.sha256(bytes([seed]) * size).hexdigest()


async def value_of(awaitable):
    return await awaitable


def ids_of(cluster, pid: int) -> list[int]:
    return [w.id for w in cluster.workers if w.pid == pid]


def links(pid: int, local_port: int | None = None, remote_port: int | None = None) -> list:
    """Established TCP connections of ``pid`` between these ports."""
    return [c for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.raddr
            and local_port in (None, c.laddr.port) and remote_port in (None, c.raddr.port)]


async def wait_until(predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("case", list(CASES))
async def test_every_await_resolves_when_a_link_goes_dark(case, tmp_path, no_leaks, seed):
    cuts, worker_timeout = CASES[case]
    rng = random.Random(seed)
    workers = WorkerProcesses(tmp_path)
    proxy: FaultProxy | None = None
    try:
        async with dagger.Cluster(threads=1, listen="tcp://127.0.0.1:0", token=new_token(),
                                  heartbeat_interval=HEARTBEAT_INTERVAL,
                                  heartbeat_timeout=HEARTBEAT_TIMEOUT) as cluster:
            proxy = await FaultProxy(*parse_address(cluster.address)).start()
            token_file = write_token(tmp_path, cluster.token)
            dark = workers.start(proxy.address, token_file, "--heartbeat-timeout",
                                 str(worker_timeout), threads=4)
            (dark_info,) = await workers.wait_joined(cluster, [dark])
            # Made while the dark worker is the only one: their values live there alone,
            # and their lineage may run anywhere.
            seeds = [rng.randrange(256) for _ in range(4)]
            held = [dagger.spawn(block, BLOCK, s) for s in seeds[:3]]
            held.append(dagger.spawn(block, BIG, seeds[3]))
            await asyncio.wait_for(dagger.wait(held), 30)

            healthy = workers.start(cluster.address, token_file, threads=4)
            (healthy_info,) = await workers.wait_joined(cluster, [healthy])
            movable = dagger.options(retries=1, scope=dagger.scope(workers=[dark_info.id, healthy_info.id]))
            pinned = dagger.options(scope=dagger.scope(worker=dark_info.id))
            values = [rng.randrange(1 << 30) for _ in range(4)]
            must_succeed = {"sync": movable.spawn(nap, 3.0, values[0]),
                            "async": movable.spawn(anap, 3.0, values[1])}
            must_fail = {"pinned sync": pinned.spawn(nap, 3.0, values[2]),
                         "pinned async": pinned.spawn(anap, 3.0, values[3])}
            await wait_until(lambda: all(w.tasks_running >= 2 for w in cluster.workers
                                         if w.id == dark_info.id), "tasks reaching the dark worker", 30)

            cluster_port = parse_address(cluster.address)[1]
            assert proxy.black_hole(*cuts[0].directions, read=cuts[0].read) == 1
            fault = time.monotonic()
            dead_link = proxy.links[0].cluster[1].get_extra_info("sockname")[1]
            must_succeed["a large held value"] = asyncio.ensure_future(value_of(held[3]))
            for cut in cuts[1:]:
                await asyncio.sleep(0.5)
                proxy.black_hole(*cut.directions, read=cut.read)
            must_succeed["a held value"] = held[0]
            must_succeed["a held value, used"] = movable.spawn(digest, held[1], held[2])
            must_succeed["a big argument"] = movable.spawn(size_of, bytes(BIG))
            must_fail["a big argument, pinned"] = pinned.spawn(size_of, bytes(BIG))

            left = RESOLVE_WITHIN - (time.monotonic() - fault)
            awaits = [value_of(t) for t in [*must_succeed.values(), *must_fail.values()]]
            outcomes = await asyncio.wait_for(asyncio.gather(*awaits, return_exceptions=True), left)
            resolved_after = time.monotonic() - fault
            got = dict(zip([*must_succeed, *must_fail], outcomes, strict=True))
            assert got["sync"] == values[0]
            assert got["async"] == values[1]
            assert got["a held value"][1] == bytes([seeds[0]]) * BLOCK
            assert got["a large held value"][1] == bytes([seeds[3]]) * BIG
            used = got["a held value, used"][1]
            assert [(size, digest_) for _, size, digest_ in used] == [(BLOCK, sha(BLOCK, s)) for s in seeds[1:3]]
            assert got["a big argument"] == BIG
            for name in must_fail:
                assert isinstance(got[name], dagger.WorkerLostError), (name, got[name])
                assert f"on worker {dark_info.id} " in str(got[name]), got[name]
            # The cluster let go of its end of the dead link, stuck frames and all.
            assert dark_info.id not in {w.id for w in cluster.workers}
            await wait_until(lambda: not links(psutil.Process().pid, cluster_port, dead_link),
                             "the cluster dropping its end of the dead link", 1)

            # The stranded worker gave up on the dead link by itself, and joined again.
            await wait_until(lambda: ids_of(cluster, dark.pid) not in ([], [dark_info.id]),
                             "the stranded worker rejoining", worker_timeout + 5)
            rejoined_after = time.monotonic() - fault
            (new_id,) = ids_of(cluster, dark.pid)
            again = dagger.options(scope=dagger.scope(worker=new_id)).spawn(pid_of)
            assert await asyncio.wait_for(again, 30) == dark.pid
            proxy_port = parse_address(proxy.address)[1]
            assert len(links(dark.pid, remote_port=proxy_port)) == 1, links(dark.pid)
            assert dark.poll() is None and healthy.poll() is None
            print(f"{case}: every await resolved {resolved_after:.2f} s after the fault; "
                  f"the worker rejoined {rejoined_after:.2f} s after it")
    finally:
        workers.stop_all()
        if proxy is not None:
            await proxy.close()
