"""Several hosts on one machine: three network namespaces, each joined to a bridge in the
root namespace by a veth pair, on a private test subnet. The cluster listens on the
bridge; one `aiodagger worker` runs inside each namespace. Data moves between workers
across the namespaces; then one host is cut off while tasks run, and the cluster must
notice within its heartbeat timeout and finish the work on the hosts that are left.

Needs root (CAP_NET_ADMIN) for `ip netns add`; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import pytest

import aiodagger as dagger
from aiodagger.comm.handshake import new_token
from tests.workers import WorkerProcesses, block, digest, pid_of, wait_for_file, write_token

pytestmark = pytest.mark.timeout(120)

IP = shutil.which("ip")
SUBNET = "10.231.7"  # bridge .1, hosts .2 .. .4
NHOSTS = 3
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 2.0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


@dataclass
class Host:
    netns: str
    veth: str  # the root namespace's end, on the bridge
    address: str


@dataclass
class Network:
    bridge: str
    address: str
    hosts: list[Host] = field(default_factory=list)


@pytest.fixture
def network():
    """A bridge and NHOSTS namespaces on it; all of it removed afterwards, even on failure."""
    if IP is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = f"{os.getpid() % 100000}"  # interface names are limited to 15 characters
    in_use = ip("-o", "-4", "addr", "show").stdout
    if f" {SUBNET}." in in_use:
        pytest.skip(f"the test subnet {SUBNET}.0/24 is already in use on this machine")
    net = Network(bridge=f"agbr{tag}", address=f"{SUBNET}.1")
    undo: list[tuple[str, ...]] = []
    try:
        first = ip("netns", "add", f"agns{tag}-0", check=False)
        if first.returncode != 0:
            pytest.skip(f"cannot create network namespaces (`ip netns add` refused: "
                        f"{first.stderr.strip()}); needs root or CAP_NET_ADMIN")
        undo.append(("netns", "del", f"agns{tag}-0"))
        ip("link", "add", net.bridge, "type", "bridge")
        undo.append(("link", "del", net.bridge))
        ip("addr", "add", f"{net.address}/24", "dev", net.bridge)
        ip("link", "set", net.bridge, "up")
        for i in range(NHOSTS):
            host = Host(netns=f"agns{tag}-{i}", veth=f"agv{tag}{i}", address=f"{SUBNET}.{i + 2}")
            peer = f"agp{tag}{i}"
            if i:
                ip("netns", "add", host.netns)
                undo.append(("netns", "del", host.netns))
            ip("link", "add", host.veth, "type", "veth", "peer", "name", peer)
            undo.append(("link", "del", host.veth))  # takes the peer end with it
            ip("link", "set", peer, "netns", host.netns)
            ip("link", "set", host.veth, "master", net.bridge)
            ip("link", "set", host.veth, "up")
            ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", peer)
            ip("-n", host.netns, "link", "set", peer, "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
            net.hosts.append(host)
        yield net
    finally:
        errors = []
        for args in reversed(undo):
            proc = ip(*args, check=False)
            # A veth goes away with its namespace's end; that is no error.
            if proc.returncode != 0 and "Cannot find device" not in proc.stderr:
                errors.append(f"ip {' '.join(args)}: {proc.stderr.strip()}")
        assert not errors, errors


@pytest.fixture
def workers(network, tmp_path):
    """Worker processes, ended (by pid) before the namespaces they run in are removed."""
    procs = WorkerProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


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
                               prefix=(IP, "netns", "exec", host.netns))
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

        ip("link", "set", network.hosts[-1].veth, "down")
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
