"""Several hosts on one machine, for the tests: network namespaces, each joined to a
bridge in the root namespace by a veth pair, on a private /24 subnet. The cluster
listens on the bridge; workers run inside the namespaces (``Host.exec``).

Faults are injected on those links and undone by the same object: a host's link taken
down and up, a route blackholed between two hosts (they no longer reach each other,
the scheduler still reaches both), a link slowed with a token bucket. Whatever is
created is removed when the ``network()`` block ends, failure or not.

Needs root (CAP_NET_ADMIN) for ``ip netns add``; the block skips the test otherwise.
Test modules import the fixtures ``network`` (three hosts) and ``workers``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from tests.workers import WorkerProcesses

IP = shutil.which("ip")
TC = shutil.which("tc")


def _run(tool: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert tool is not None
    proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(tool)} {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(IP, *args, check=check)


@dataclass
class Host:
    netns: str
    veth: str  # the root namespace's end, on the bridge
    peer: str  # the namespace's end
    address: str

    @property
    def exec(self) -> tuple[str, ...]:
        """The prefix that runs a command on this host."""
        assert IP is not None
        return (IP, "netns", "exec", self.netns)


@dataclass
class Network:
    bridge: str
    address: str
    hosts: list[Host] = field(default_factory=list)
    # Commands that undo what was made, run last first when the block ends.
    undo: list[tuple[str | None, tuple[str, ...]]] = field(default_factory=list)

    def _do(self, tool: str | None, args: tuple[str, ...], undo: tuple[str, ...]) -> None:
        _run(tool, *args)
        self.undo.append((tool, undo))

    def _undo(self, tool: str | None, undo: tuple[str, ...]) -> None:
        self.undo.remove((tool, undo))
        _run(tool, *undo)

    def cut(self, host: Host) -> None:
        """Take ``host``'s link down: it reaches nobody and nobody reaches it."""
        self._do(IP, ("link", "set", host.veth, "down"), ("link", "set", host.veth, "up"))

    def heal(self, host: Host) -> None:
        self._undo(IP, ("link", "set", host.veth, "up"))

    def partition(self, a: Host, b: Host) -> None:
        """``a`` and ``b`` no longer reach each other; both still reach the bridge."""
        for one, other in ((a, b), (b, a)):
            route = ("route", "add", "blackhole", f"{other.address}/32")
            self._do(IP, ("-n", one.netns, *route), ("-n", one.netns, "route", "del", "blackhole",
                                                     f"{other.address}/32"))

    def unpartition(self, a: Host, b: Host) -> None:
        for one, other in ((a, b), (b, a)):
            self._undo(IP, ("-n", one.netns, "route", "del", "blackhole", f"{other.address}/32"))

    def slow(self, host: Host, rate: str, burst: str = "64kb", latency: str = "500ms",
             outgoing: bool = False) -> None:
        """Shape what ``host`` receives (or sends, ``outgoing``) to ``rate``: a token
        bucket on its veth's end in the root namespace (or in its own)."""
        self._do(TC, (*_dev(host, outgoing), "root", "tbf", "rate", rate, "burst", burst,
                      "latency", latency), (*_dev(host, outgoing, "del"), "root"))

    def unslow(self, host: Host, outgoing: bool = False) -> None:
        self._undo(TC, (*_dev(host, outgoing, "del"), "root"))

    @staticmethod
    def shaped(host: Host, outgoing: bool = False) -> int:
        """Bytes that went through the bucket that ``slow`` put there (as ``tc -s`` counts)."""
        words = _run(TC, "-s", *_dev(host, outgoing, "show")).stdout.split()
        return int(words[words.index("Sent") + 1])


def _dev(host: Host, outgoing: bool, verb: str = "add") -> tuple[str, ...]:
    """``tc`` arguments up to the device: the host's end of its link, or the bridge's."""
    if outgoing:
        return ("-n", host.netns, "qdisc", verb, "dev", host.peer)
    return ("qdisc", verb, "dev", host.veth)


def _free_subnet() -> str:
    """A 10.231.N.0/24 no interface of this machine uses (other test runs may hold some)."""
    in_use = ip("-o", "-4", "addr", "show").stdout
    start = os.getpid() % 200
    for i in range(200):
        subnet = f"10.231.{10 + (start + i) % 200}"
        if f" {subnet}." not in in_use:
            return subnet
    pytest.skip("no free 10.231.N.0/24 subnet for the test network")


@contextmanager
def _network(nhosts: int) -> Iterator[Network]:
    """A bridge and ``nhosts`` namespaces on it; all of it removed afterwards, even on failure."""
    if IP is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = f"{os.getpid() % 100000}"  # interface names are limited to 15 characters
    subnet = _free_subnet()
    net = Network(bridge=f"agbr{tag}", address=f"{subnet}.1")
    made: list[tuple[str, ...]] = []
    try:
        first = ip("netns", "add", f"agns{tag}-0", check=False)
        if first.returncode != 0:
            pytest.skip(f"cannot create network namespaces (`ip netns add` refused: "
                        f"{first.stderr.strip()}); needs root or CAP_NET_ADMIN")
        made.append(("netns", "del", f"agns{tag}-0"))
        ip("link", "add", net.bridge, "type", "bridge")
        made.append(("link", "del", net.bridge))
        ip("addr", "add", f"{net.address}/24", "dev", net.bridge)
        ip("link", "set", net.bridge, "up")
        for i in range(nhosts):
            host = Host(netns=f"agns{tag}-{i}", veth=f"agv{tag}{i}", peer=f"agp{tag}{i}",
                        address=f"{subnet}.{i + 2}")
            if i:
                ip("netns", "add", host.netns)
                made.append(("netns", "del", host.netns))
            ip("link", "add", host.veth, "type", "veth", "peer", "name", host.peer)
            made.append(("link", "del", host.veth))  # takes the peer end with it
            ip("link", "set", host.peer, "netns", host.netns)
            ip("link", "set", host.veth, "master", net.bridge)
            ip("link", "set", host.veth, "up")
            ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.peer)
            ip("-n", host.netns, "link", "set", host.peer, "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
            net.hosts.append(host)
        yield net
    finally:
        errors = []
        for tool, args in reversed(net.undo):
            proc = _run(tool, *args, check=False)
            if proc.returncode != 0:
                errors.append(f"{' '.join(args)}: {proc.stderr.strip()}")
        for args in reversed(made):
            proc = ip(*args, check=False)
            # A veth goes away with its namespace's end; that is no error.
            if proc.returncode != 0 and "Cannot find device" not in proc.stderr:
                errors.append(f"ip {' '.join(args)}: {proc.stderr.strip()}")
        assert not errors, errors


@pytest.fixture
def network():
    with _network(3) as net:
        yield net


@pytest.fixture
def workers(network, tmp_path):
    """Worker processes, ended (by pid) before the namespaces they run in are removed."""
    procs = WorkerProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()
