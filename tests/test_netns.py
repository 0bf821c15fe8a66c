"""Several hosts on one machine (tests/netns.py): three network namespaces on a bridge.
The cluster listens on the bridge; one `aiodagger worker` runs inside each namespace.
Data moves between workers across the namespaces; then one host is cut off while tasks
run, and the cluster must notice within its heartbeat timeout and finish the work on
the hosts that are left. (The chaos suite, tests/reliability, goes further.)

Needs root (CAP_NET_ADMIN) for `ip netns add`; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

import aiodagger as dagger
from aiodagger.comm.handshake import new_token
from tests import netns
from tests.workers import block, digest, pid_of, wait_for_file, write_token

pytestmark = pytest.mark.timeout(120)

network, workers = netns.network, netns.workers  # the fixtures of the hosts

HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 2.0


def expected(pid: int, size: int, seed: int) -> tuple[int, int, str]:
    return pid, size, hashlib.sha256(bytes([seed]) * size).hexdigest()


async def run_graph(on, pids, size: int):
    """Each host makes a block; each host digests the blocks of the two others."""
    n = len(on)
    blocks = [on[i].spawn(block, size, 10 + i) for i in range(n)]
    digests = [on[i].spawn(digest, *(blocks[j] for j in range(n) if j != i)) for i in range(n)]
    results = await asyncio.wait_for(dagger.gather(*digests), 60)
    for i, (pid, got) in enumerate(results):
        assert pid == pids[i]
        assert got == [expected(pids[j], size, 10 + j) for j in range(n) if j != i]


@pytest.mark.timeout(180)
async def test_hosts_share_work_and_one_is_cut_off(network, workers, tmp_path):
    async with dagger.Cluster(threads=1, listen=f"tcp://{network.address}:0", token=new_token(),
                              heartbeat_interval=HEARTBEAT_INTERVAL,
                              heartbeat_timeout=HEARTBEAT_TIMEOUT) as cluster:
        token_file = write_token(tmp_path, cluster.token)
        procs = [workers.start(cluster.address, token_file, "--heartbeat-timeout", "3",
                               prefix=host.exec)
                 for host in network.hosts]
        infos = await workers.wait_joined(cluster, procs)
        for info, host in zip(infos, network.hosts, strict=True):
            assert info.address.startswith(f"tcp://{host.address}:"), info
        pids = [p.pid for p in procs]
        on = [dagger.options(scope=dagger.scope(worker=i.id)) for i in infos]

        # Blocks too big to travel with their completions: they move host to host.
        await run_graph(on, pids, 256 << 10)

        # Cut the last host off while tasks (retries=1) run on every host.
        doomed, survivors = infos[-1], infos[:-1]
        gate = tmp_path / "gate"
        anywhere = dagger.options(retries=1, scope=dagger.scope(workers=[i.id for i in infos]))
        tasks = [anywhere.spawn(wait_for_file, str(gate), 60) for _ in range(6)]
        deadline = time.monotonic() + 20
        while not all(w.tasks_running for w in cluster.workers if w.id != 0):
            assert time.monotonic() < deadline, f"tasks did not reach every host: {cluster.workers}"
            await asyncio.sleep(0.05)

        network.cut(network.hosts[-1])
        cut = time.monotonic()
        while doomed.id in {w.id for w in cluster.workers}:
            assert time.monotonic() - cut < HEARTBEAT_TIMEOUT + 3, "the cut-off host was never declared lost"
            await asyncio.sleep(0.02)
        lost_after = time.monotonic() - cut
        # Its last answer to a heartbeat came at most one interval before the cut.
        assert lost_after <= HEARTBEAT_TIMEOUT + HEARTBEAT_INTERVAL + 0.5, lost_after

        gate.touch()
        done = await asyncio.wait_for(dagger.gather(*tasks), 60)
        assert set(done) <= set(pids[:-1]), (done, pids)
        assert sorted(w.id for w in cluster.workers if w.id != 0) == sorted(i.id for i in survivors)

        # New work still runs, and data still moves between the hosts that are left.
        assert await asyncio.wait_for(dagger.gather(*(o.spawn(pid_of) for o in on[:-1])), 30) == pids[:-1]
        await run_graph(on[:-1], pids[:-1], 256 << 10)


@pytest.mark.timeout(120)
async def test_a_transfer_slower_than_the_heartbeat_timeout_is_no_silence(network, workers, tmp_path):
    """A 16 MiB result leaves its host over a link shaped to 40 Mbit/s: ~3.4 s to another
    host, then as long to the caller, longer than both heartbeat timeouts. The bytes
    arriving are signs of life: the fetch is not given up, the holder not declared lost."""
    async with dagger.Cluster(threads=1, listen=f"tcp://{network.address}:0", token=new_token(),
                              heartbeat_interval=HEARTBEAT_INTERVAL,
                              heartbeat_timeout=HEARTBEAT_TIMEOUT) as cluster:
        token_file = write_token(tmp_path, cluster.token)
        procs = [workers.start(cluster.address, token_file, "--heartbeat-timeout", "3",
                               prefix=host.exec) for host in network.hosts[:2]]
        infos = await workers.wait_joined(cluster, procs)
        on = [dagger.options(scope=dagger.scope(worker=i.id)) for i in infos]
        size = 16 << 20
        made = [on[0].spawn(block, size, seed) for seed in (3, 4)]
        await asyncio.wait_for(dagger.wait(made), 30)
        network.slow(network.hosts[0], "40mbit", burst="256kb", outgoing=True)
        try:
            start = time.monotonic()
            assert await asyncio.wait_for(made[0], 30) == (procs[0].pid, bytes([3]) * size)
            assert await asyncio.wait_for(on[1].spawn(digest, made[1]), 30) == (
                procs[1].pid, [expected(procs[0].pid, size, 4)])
            assert time.monotonic() - start > 2 * 3.0  # each took longer than a timeout
        finally:
            network.unslow(network.hosts[0], outgoing=True)
        assert sorted(w.pid for w in cluster.workers[1:]) == sorted(p.pid for p in procs)


async def test_a_remote_host_fetches_from_a_subprocess_worker(network, workers, tmp_path):
    """A cluster with worker processes of its own that also takes remote workers: a worker
    on another host fetches an input held by a worker process of the cluster's machine,
    which advertises 127.0.0.1, at the address it reaches the cluster on."""
    async with dagger.Cluster(processes=1, threads=1, listen=f"tcp://{network.address}:0",
                              token=new_token()) as cluster:
        token_file = write_token(tmp_path, cluster.token)
        host = network.hosts[0]
        (remote,) = await workers.wait_joined(
            cluster, [workers.start(cluster.address, token_file, prefix=host.exec)])
        local = next(w for w in cluster.workers[1:] if w.id != remote.id)
        made = dagger.options(scope=dagger.scope(worker=local.id)).spawn(block, 256 << 10, 7)
        read = dagger.options(scope=dagger.scope(worker=remote.id)).spawn(digest, made)
        where, blocks = await asyncio.wait_for(read, 30)
        assert where == remote.pid
        assert blocks == [expected(local.pid, 256 << 10, 7)]
