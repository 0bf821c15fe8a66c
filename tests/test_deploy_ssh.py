"""SSHCluster (aiodagger/deploy) against real OpenSSH servers that these tests start.

As root, each host is a network namespace on a bridge (tests/netns.py) with an sshd of
its own on port 22: two machines at two addresses as far as the cluster can tell, and
the workers really run in them (a task reports its network namespace). Without root
(no namespaces) the two sshd servers listen on two ports of 127.0.0.1 instead.

Each server takes one client key made here, for the user running the tests, and knows
nothing else: no password, no PAM, no agent. The workers run this interpreter with
this checkout on PYTHONPATH, which the command sets itself (sshd passes no environment).

Needs /usr/sbin/sshd (`tox -e deploy` installs openssh-server: .ci/deploy-setup) and
asyncssh (the extra "ssh"); skipped, saying which is missing, otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

import aiodagger as dagger
from aiodagger.comm.handshake import new_token
from tests import netns
from tests.workers import ROOT, block, digest, token_exposure, where

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(120)]

asyncssh = pytest.importorskip(
    "asyncssh", reason="asyncssh is not installed: pip install 'aiodagger[ssh]' (tox -e deploy)")
SSHD = "/usr/sbin/sshd"
if not os.access(SSHD, os.X_OK):
    pytest.skip(f"{SSHD} is missing: apt-get install openssh-server (tox -e deploy does)",
                allow_module_level=True)

from aiodagger.deploy import (  # noqa: E402 - after the skips: it needs asyncssh
    DeployConnectionError,
    DeployError,
    DeployTimeoutError,
    SSHCluster,
)
from aiodagger.deploy._hosts import HostSpec, parse_host  # noqa: E402

# The workers' environment: this checkout first (the tests' functions, and this
# aiodagger rather than an installed one), one BLAS thread each.
REMOTE_ENV = {"PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@dataclass
class Server:
    """One test host's sshd."""

    entry: str  # as hosts=[...] takes it
    address: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def sessions(self) -> list[psutil.Process]:
        """What runs under this sshd: its sessions, and what they started."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def netns(self) -> str:
        return os.readlink(f"/proc/{self.proc.pid}/ns/net")


@dataclass
class Hosts:
    servers: list[Server]
    dir: Path
    options: dict[str, object]
    in_namespaces: bool
    spare: list[str] = field(default_factory=list)  # an address of each host, no sshd on this port

    @property
    def entries(self) -> list[str]:
        return [s.entry for s in self.servers]

    def cluster(self, hosts: list[str] | None = None, **kwargs: object) -> SSHCluster:
        kwargs.setdefault("python", sys.executable)
        kwargs.setdefault("connect_options", self.options)
        kwargs.setdefault("remote_env", REMOTE_ENV)
        kwargs.setdefault("threads", 1)
        return SSHCluster(hosts or self.entries, **kwargs)  # type: ignore[arg-type]

    def assert_nothing_left(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while any(s.sessions() for s in self.servers):
            if time.monotonic() > deadline:
                left = {s.entry: [(p.pid, p.cmdline()) for p in s.sessions()] for s in self.servers}
                raise AssertionError(f"processes left on the hosts: {left}")
            time.sleep(0.05)


def _key(path: Path) -> asyncssh.SSHKey:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    path.chmod(0o600)
    return key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(server: Server, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"sshd exited ({server.proc.returncode}): {server.log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection((server.address, server.port), 1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd not listening after {timeout} s: {server.log.read_text()}")
        time.sleep(0.05)


def _stop(server: Server) -> None:
    """By pid: the server, then whatever its sessions left."""
    left = server.sessions()
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@contextlib.contextmanager
def _servers(directory: Path, places: list[tuple[str, int, tuple[str, ...]]]) -> Iterator[list[Server]]:
    """An sshd at each (address, port, command prefix), authorizing the client key."""
    host_key = _key(directory / "host_key")
    client_key = _key(directory / "client_key")
    (directory / "authorized_keys").write_bytes(client_key.export_public_key())
    with open(directory / "known_hosts", "w") as known:
        for address, port, _ in places:
            name = address if port == 22 else f"[{address}]:{port}"
            known.write(f"{name} {host_key.export_public_key().decode()}")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege separation directory
    servers: list[Server] = []
    try:
        for i, (address, port, prefix) in enumerate(places):
            config = directory / f"sshd_config_{i}"
            config.write_text(f"""\
ListenAddress {address}
Port {port}
HostKey {directory / 'host_key'}
PidFile none
AuthorizedKeysFile {directory / 'authorized_keys'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
LogLevel VERBOSE
""")
            log = directory / f"sshd_{i}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", str(config)],
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            entry = address if port == 22 else f"{address}:{port}"
            servers.append(Server(entry, address, port, proc, log))
            _wait_listening(servers[-1])
        yield servers
    finally:
        for server in servers:
            _stop(server)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ssh")
    options = {"username": getpass.getuser(), "client_keys": [str(directory / "client_key")],
               "known_hosts": str(directory / "known_hosts"), "agent_path": None, "config": None}
    if os.geteuid() == 0 and shutil.which("ip"):
        with netns._network(2) as net, _servers(
                directory, [(h.address, 22, h.exec) for h in net.hosts]) as servers:
            yield Hosts(servers, directory, options, True, [h.address for h in net.hosts])
    else:
        places = [("127.0.0.1", _free_port(), ()) for _ in range(2)]
        with _servers(directory, places) as servers:
            yield Hosts(servers, directory, options, False)


def _server_of(hosts: Hosts, pid: int) -> Server:
    """The sshd that ``pid`` runs under."""
    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    (server,) = [s for s in hosts.servers if s.proc.pid in ancestors]
    return server


def _cmdlines() -> dict[int, bytes]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                out[int(entry)] = f.read()
    return out


async def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive := [p for p in pids if psutil.pid_exists(p)
                    and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, f"worker processes still running: {alive}"
        await asyncio.sleep(0.05)


# -- a cluster on the hosts --------------------------------------------------------------


async def test_a_graph_runs_on_the_workers_each_host_started(hosts, caplog):
    caplog.set_level(logging.INFO, logger="aiodagger.deploy")
    async with hosts.cluster() as cluster:
        remote = [w for w in cluster.workers if w.id != 0]
        assert len(remote) == 2, cluster.workers
        servers = [_server_of(hosts, w.pid) for w in remote]
        assert {s.entry for s in servers} == set(hosts.entries)  # one on each host

        on = [dagger.options(scope=dagger.scope(worker=w.id)) for w in remote]
        # Blocks made on each host, digested on the other: data moves between the hosts.
        blocks = [on[i].spawn(block, 256 << 10, 7 + i) for i in range(2)]
        digests = [on[i].spawn(digest, blocks[1 - i]) for i in range(2)]
        places = [on[i].spawn(where) for i in range(2)]
        for i, w in enumerate(remote):
            ran_on, [(made_on, size, _)] = await digests[i]
            assert (ran_on, made_on, size) == (w.pid, remote[1 - i].pid, 256 << 10)
            pid, net = await places[i]
            assert pid == w.pid
            if hosts.in_namespaces:
                assert net == servers[i].netns() != os.readlink("/proc/self/ns/net")

        token = cluster.token
        assert token and len(token) >= 32
        # Not on any command line of this machine (the workers', the shells', sshd's)...
        exposed = [pid for pid, cmdline in _cmdlines().items() if token.encode() in cmdline]
        assert not exposed, [(pid, _cmdlines().get(pid)) for pid in exposed]
        # ...nor in the workers' environment, nor what their tasks or children see.
        for i in range(2):
            assert await on[i].spawn(token_exposure, token) == dict.fromkeys(
                ["os.environ", "/proc/self/environ", "/proc/self/cmdline", "child's environment"],
                False)
        pids = [w.pid for w in remote]
    await _wait_gone(pids)
    hosts.assert_nothing_left()
    # They left when asked, with status 0: none had to be signalled, none failed.
    assert not [r for r in caplog.records if r.name.startswith("aiodagger.deploy")
                and r.levelno >= logging.WARNING], caplog.text


async def test_scale_starts_on_the_emptiest_host_and_retires_the_newest(hosts):
    async with hosts.cluster() as cluster:
        first = {w.pid for w in cluster.workers if w.id != 0}
        await cluster.scale(3)  # one more, on the first host given (both have one)
        pids = {w.pid for w in cluster.workers if w.id != 0}
        (new,) = pids - first
        assert len(pids) == 3 and _server_of(hosts, new).entry == hosts.entries[0]
        # A result only the newest worker holds outlives its leaving.
        (newest,) = [w for w in cluster.workers if w.pid == new]
        made = dagger.options(scope=dagger.scope(worker=newest.id)).spawn(block, 1 << 20, 3)
        await dagger.wait([made])
        await cluster.scale(1)
        (kept,) = [w.pid for w in cluster.workers if w.id != 0]
        assert kept in first
        await _wait_gone(list(pids - {kept}))
        assert await made == (new, bytes([3]) * (1 << 20))
    await _wait_gone(list(pids))
    hosts.assert_nothing_left()


def test_from_sync_code_with_two_workers_a_host(hosts):
    with hosts.cluster([hosts.entries[1]], processes_per_host=2, threads=None) as cluster:
        remote = [w for w in cluster.workers if w.id != 0]
        assert len(remote) == 2
        assert {_server_of(hosts, w.pid).entry for w in remote} == {hosts.entries[1]}
        results = [dagger.spawn(where).fetch(timeout=30) for _ in range(4)]
        assert {pid for pid, _ in results} <= {w.pid for w in remote}
        assert "SSHCluster running hosts=1 workers=2" in repr(cluster)
    hosts.assert_nothing_left()


# -- what goes wrong: a clear error, in bounded time, nothing left running ---------------


def _fails(hosts: Hosts, error: type[DeployError], host: str, *said: str, within: float = 30.0,
           **kwargs: object) -> DeployError:
    start = time.monotonic()
    with pytest.raises(error) as info, hosts.cluster([host], **kwargs):
        pass
    elapsed = time.monotonic() - start
    assert elapsed < within, f"took {elapsed:.1f} s to fail: {info.value}"
    assert info.value.host == host
    message = str(info.value)
    assert host in message
    for words in said:
        assert words in message, message
    hosts.assert_nothing_left()
    return info.value


def test_unreachable_host_says_which_and_what_to_check(hosts):
    # Refused: an address of a host on a port where nothing listens.
    spare = hosts.spare[0] if hosts.spare else "127.0.0.1"
    closed = f"{spare}:{_free_port()}"
    _fails(hosts, DeployConnectionError, closed, "cannot reach", "sshd runs there", within=10)


def test_silent_server_times_out_naming_the_host(hosts):
    with socket.socket() as listener:  # accepts, and never says a word
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        _fails(hosts, DeployConnectionError, host, "no SSH connection within 1 s", within=10,
               connect_timeout=1)


def test_refused_key_and_unknown_host_key(hosts):
    _key(hosts.dir / "not_authorized")  # a key the servers were never told of
    _fails(hosts, DeployConnectionError, hosts.entries[0], "refused to log in", "authorized_keys",
           connect_options={**hosts.options, "client_keys": [str(hosts.dir / "not_authorized")]})
    (hosts.dir / "empty_known_hosts").write_text("")
    _fails(hosts, DeployConnectionError, hosts.entries[0], "host key is not trusted",
           connect_options={**hosts.options, "known_hosts": str(hosts.dir / "empty_known_hosts")})


def test_missing_interpreter_or_aiodagger_shows_what_the_host_said(hosts):
    _fails(hosts, DeployError, hosts.entries[0], "/nonexistent/python3", "No such file",
           "python= names the interpreter", python="/nonexistent/python3")
    # -S -E: no site-packages, no PYTHONPATH: an interpreter without aiodagger.
    _fails(hosts, DeployError, hosts.entries[0], "No module named aiodagger",
           "aiodagger is not installed", python=[sys.executable, "-S", "-E"])


def test_a_worker_that_never_joins_times_out_naming_the_host(hosts, caplog):
    hung = [sys.executable, "-c", "import time; time.sleep(600)"]
    error = _fails(hosts, DeployTimeoutError, hosts.entries[1], "did not join the cluster at",
                   "within 2 s", within=20, python=hung, join_timeout=2)
    assert isinstance(error, TimeoutError)
    # SIGTERM stopped it: it was not left for SIGKILL.
    assert "did not exit on SIGTERM" not in caplog.text


def test_a_wrong_address_for_the_scheduler_times_out(hosts):
    if not hosts.in_namespaces:
        pytest.skip("needs hosts in network namespaces (root): on loopback every address reaches")
    # 127.0.0.1 on a host is that host itself: its worker retries there until the timeout.
    _fails(hosts, DeployTimeoutError, hosts.entries[0], "tcp://127.0.0.1:", "listen_host=",
           "reconnecting", within=20, listen_host="127.0.0.1", join_timeout=3)


def test_a_worker_refused_by_the_cluster_says_why(hosts, monkeypatch):
    # The workers are handed another token than the cluster's.
    wrong = new_token()
    monkeypatch.setattr(SSHCluster, "token", property(lambda self: wrong))
    _fails(hosts, DeployError, hosts.entries[0], "exited with status 1", "wrong token", within=20)


# -- arguments ---------------------------------------------------------------------------


def test_host_entries():
    assert parse_host("node1") == HostSpec("node1", "node1")
    assert parse_host("alice@node1:2222") == HostSpec("alice@node1:2222", "node1", 2222, "alice")
    assert parse_host("[fe80::1]:22") == HostSpec("[fe80::1]:22", "fe80::1", 22)
    assert parse_host("fe80::1") == HostSpec("fe80::1", "fe80::1")
    for bad in ("node1:ssh", "@node1", "[fe80::1]x", "node1:0"):
        with pytest.raises(ValueError):
            parse_host(bad)


def test_arguments_that_teach():
    with pytest.raises(TypeError, match=r"hosts=\['node1'\]"):
        SSHCluster("node1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheduler='local'"):
        SSHCluster(["node1"], scheduler="node2")
    with pytest.raises(ValueError, match="the token goes over SSH"):
        SSHCluster(["node1"], worker_options=["--token-file", "t"])
    with pytest.raises(ValueError, match="pass it as token="):
        SSHCluster(["node1"], remote_env={"AIODAGGER_TOKEN": "x"})
    with pytest.raises(ValueError, match="entropy"):
        SSHCluster(["node1"], token="secret")
    with pytest.raises(TypeError, match="list the hosts"):
        SSHCluster(["node1"], connect_options={"host": "node2"})


def test_importing_aiodagger_loads_no_asyncssh():
    code = ("import sys, aiodagger, aiodagger.deploy; aiodagger.spawn(int, 1).fetch(10); "
            "print('asyncssh' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "False"

