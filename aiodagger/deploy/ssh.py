"""SSHCluster: a cluster whose workers run on other machines, started over SSH.

The scheduler is a :class:`~aiodagger.cluster.Cluster` in this process, listening where
the hosts reach it; over one SSH connection per host (more past eight workers there,
sshd allows ten sessions on one), each worker is an ``aiodagger worker`` session of its
own (:mod:`._process`). Being a Cluster, it is used as one: ``async with``, ``with``,
from trio, ``dagger.spawn`` inside, ``cluster.workers``.

Starting fails as a whole, within bounded time, and leaves nothing running: hosts are
connected first (so an unreachable one fails before any worker starts), then every
worker is started, and the start waits until all have joined or one has left.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..cluster import Cluster
from ..comm.framing import DEFAULT_MAX_FRAME
from ..comm.server import parse_address
from ..comm.tokens import new_token
from ..errors import DeployError, DeployTimeoutError
from ..memory import parse_memory_limit
from ._hosts import Host, parse_host
from ._process import RemoteProcess, worker_command

__all__ = ["SSHCluster"]

logger = logging.getLogger(__name__)

# Flags SSHCluster gives every worker itself: the token travels over SSH, never as a flag.
_OWN_FLAGS = ("--token-fd", "--token-file", "--name", "--subprocess")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SSHCluster(Cluster):
    """A cluster whose workers run on ``hosts``, started over SSH.

    Each host runs ``processes_per_host`` ``aiodagger worker`` processes, with ``python``
    (the interpreter there that has aiodagger installed: a path, or a command as a list
    of words) and ``threads`` threads each (default: the host's CPUs, shared out). The
    scheduler runs in this process (``scheduler="local"``, the only kind: tasks are
    spawned where the scheduler is).

    ``connect_options`` go to ``asyncssh.connect`` for every host: ``username``,
    ``client_keys``, ``known_hosts``, ``port``... A host may carry its own user and port,
    ``"alice@node1:2222"``. ``remote_env`` is set in each worker's environment by the
    command itself (sshd passes on few variables), e.g. ``{"PYTHONPATH": ...}``.
    ``worker_options`` are more ``aiodagger worker`` flags (``["--tls-ca", "ca.pem"]``).

    Workers reach this process at ``listen_host`` (default: this machine's address on
    the route to each host, as its SSH connection shows it) on ``listen_port`` (default:
    any free one). The ``token`` (default: a new random one) goes to each worker through
    its SSH session's standard input, never on a command line.

    Starting raises :class:`~aiodagger.errors.DeployConnectionError` for a host that
    cannot be reached or logged into within ``connect_timeout``,
    :class:`~aiodagger.errors.DeployError` for a worker that exits before joining (its
    error output in the message), :class:`~aiodagger.errors.DeployTimeoutError` for one
    that has not joined after ``join_timeout``; nothing is left running. ``close()``
    asks the workers to leave, then sends SIGTERM and SIGKILL to those still there.
    """

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        scheduler: str = "local",
        processes_per_host: int = 1,
        threads: int | None = None,
        memory_limit: Any = None,
        spill_dir: str | os.PathLike[str] | None = None,
        python: str | Sequence[str] = "python3",
        connect_options: Mapping[str, Any] | None = None,
        listen_host: str | None = None,
        listen_port: int = 0,
        token: str | None = None,
        remote_env: Mapping[str, str] | None = None,
        worker_options: Sequence[str] = (),
        connect_timeout: float = 10.0,
        join_timeout: float = 60.0,
        dashboard: str | None = None,
        ssl: Any = None,
        shutdown_timeout: float = 10.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        try:
            import asyncssh  # noqa: F401 - checked here, used by ._hosts and ._process
        except ImportError:
            raise ImportError("SSHCluster needs asyncssh: pip install 'aiodagger[ssh]'") from None
        if scheduler != "local":
            raise ValueError(
                f"SSHCluster(scheduler={scheduler!r}): the scheduler runs in the process that "
                "spawns the tasks, this one (scheduler='local'); to run one elsewhere, start "
                "`aiodagger scheduler` there and `aiodagger worker` on the hosts")
        self._specs = _check_hosts(hosts)
        self.processes_per_host = _positive_int(processes_per_host, "processes_per_host")
        self.worker_threads = None if threads is None else _positive_int(threads, "threads")
        self._python = _check_python(python)
        self._connect_options = _check_connect_options(connect_options)
        self._remote_env = _check_env(remote_env)
        self._worker_options = _check_worker_options(worker_options)
        if not (connect_timeout > 0 and join_timeout > 0):
            raise ValueError(f"SSHCluster(connect_timeout={connect_timeout!r}, join_timeout="
                             f"{join_timeout!r}): both are seconds > 0")
        self.connect_timeout = float(connect_timeout)
        self.join_timeout = float(join_timeout)
        self._listen_host = listen_host
        self._listen_port = listen_port
        # The address is settled once the hosts are connected (_bind); the token is checked
        # now, as for any cluster that accepts workers from the network.
        token = token or new_token()
        # Worker 0, this process, is the scheduler's: no GPU of its own to place tasks on.
        super().__init__(gpus=0, listen=f"tcp://{_bracket(listen_host or '0.0.0.0')}:{listen_port}",
                         token=token, ssl=ssl, dashboard=dashboard, shutdown_timeout=shutdown_timeout,
                         heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
                         max_frame=max_frame)
        # Each remote worker's, as Cluster's are each subprocess worker's.
        self.memory_limit = parse_memory_limit(memory_limit)
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)
        self._hosts: list[Host] = []
        self._addresses: dict[Host, str] = {}  # where each host's workers reach the scheduler
        self._procs: dict[str, RemoteProcess] = {}
        self._joined: set[str] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._serial = itertools.count(1)
        self._remote_closing = False
        self._remote_stopped: asyncio.Future[None] | None = None

    @property
    def hosts(self) -> list[str]:
        """The hosts, as given."""
        return [spec.label for spec in self._specs]

    def __repr__(self) -> str:
        return f"<SSHCluster {self.state} hosts={len(self._specs)} workers={len(self._procs)}>"

    # -- starting ------------------------------------------------------------------------
    async def _start_workers(self) -> None:
        """Connect to every host, listen where they reach us, start their workers."""
        self._hosts = [Host(spec, self._connect_options, self.connect_timeout) for spec in self._specs]
        await _all_or_first_error(host.connect() for host in self._hosts)
        bind = self._bind()
        self.listen = f"tcp://{_bracket(bind)}:{self._listen_port}"
        await super()._start_workers()
        assert self.address is not None
        _, port = parse_address(self.address)
        for host in self._hosts:
            self._addresses[host] = f"tcp://{_bracket(self._addresses[host])}:{port}"
        await self._launch([h for h in self._hosts for _ in range(self.processes_per_host)])

    def _bind(self) -> str:
        """The address to listen on; fills in where each host's workers reach it."""
        if self._listen_host is not None:
            self._addresses = dict.fromkeys(self._hosts, self._listen_host)
            return self._listen_host
        self._addresses = {host: host.local_address for host in self._hosts}
        distinct = set(self._addresses.values())
        if len(distinct) == 1:  # one route out: listen there only, not on every interface
            return distinct.pop()
        if all(":" not in a for a in distinct):
            return "0.0.0.0"
        if all(":" in a for a in distinct):
            return "::"
        raise DeployError(f"the hosts reach this machine over both IPv4 and IPv6 ({sorted(distinct)}): "
                          "pass listen_host= with an address that all of them reach")

    async def _launch(self, hosts: list[Host]) -> None:
        """One worker on each of ``hosts`` (a host may repeat); back once all have joined."""
        threads = {h: self.worker_threads or await self._threads_on(h) for h in set(hosts)}
        starting = []
        for host in hosts:
            name = f"ssh-{host.spec.host}-{next(self._serial)}"
            command = worker_command(self._python, self._remote_env,
                                     self._worker_args(self._addresses[host], name, threads[host]))
            starting.append(RemoteProcess.start(host, name, command, self.token or ""))
        procs = await _all_or_first_error(starting, keep=self._adopt)
        await self._wait_joined(procs)
        for proc in procs:
            watcher = asyncio.ensure_future(self._watch(proc))
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)

    def _adopt(self, proc: RemoteProcess) -> None:
        self._procs[proc.name] = proc  # from now on close() stops it, whatever else fails

    async def _threads_on(self, host: Host) -> int | None:
        """The host's CPUs shared out among its workers (None: the worker's default, all)."""
        if self.processes_per_host == 1:
            return None
        cpus = await host.cpus()
        return None if cpus is None else max(1, cpus // self.processes_per_host)

    def _worker_args(self, address: str, name: str, threads: int | None) -> list[str]:
        args = [address, "--name", name,
                # The cluster's heartbeat timeout is theirs: they give up on it, and on a
                # peer that stops answering a fetch, as soon as it gives up on them.
                "--heartbeat-timeout", str(self._heartbeat[1]),
                "--shutdown-timeout", str(self.shutdown_timeout), "--max-frame", str(self.max_frame)]
        if threads is not None:
            args += ["--threads", str(threads)]
        if self.memory_limit is not None:
            args += ["--memory-limit", str(self.memory_limit)]
        if self.spill_dir is not None:
            args += ["--spill-dir", self.spill_dir]
        return [*args, *self._worker_options]

    async def _wait_joined(self, procs: list[RemoteProcess]) -> None:
        """Until every one of ``procs`` has joined; raises for the first that exits, or
        for the hosts whose workers have not joined after ``join_timeout``."""
        assert self._launcher is not None
        dist = self._launcher.dist
        names = {p.name for p in procs}
        waiting = asyncio.ensure_future(dist.wait_for_workers(names, self.join_timeout))
        try:
            await asyncio.wait([waiting, *(p.closed for p in procs)],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        joined = {w.name for w in dist.workers.values()} & names
        self._joined |= joined
        for proc in procs:
            if proc.closed.done():
                raise DeployError(f"worker {proc.name} on {proc.host.label} {proc.why()}",
                                  host=proc.host.label)
        late = [p for p in procs if p.name not in joined]
        if late:
            host = late[0].host
            on_host = [p for p in late if p.host is host]
            said = on_host[0].output()
            error = DeployTimeoutError(
                f"{len(on_host)} worker(s) on {host.label} did not join the cluster at "
                f"{self._addresses[host]} within {self.join_timeout:g} s: check that {host.label} "
                "reaches this machine at that address (listen_host= says where) and that no "
                "firewall drops it" + (f"; the last output of {on_host[0].name}:\n{said}" if said else ""),
                host=host.label)
            for other in {p.host.label for p in late} - {host.label}:
                error.add_note(f"the workers on {other} did not join either")
            raise error

    async def _watch(self, proc: RemoteProcess) -> None:
        await asyncio.wait([proc.closed])
        if self._remote_closing or self._procs.get(proc.name) is not proc:
            return  # stopped on purpose
        del self._procs[proc.name]
        logger.warning("worker %s on %s %s", proc.name, proc.host.label, proc.why())
        await proc.stop(0.0)

    # -- scaling -------------------------------------------------------------------------
    async def scale(self, n: int) -> None:
        """Make the number of workers on the hosts ``n``: new ones go to the hosts with
        the fewest; the newest leave first, handing the results only they hold to the others."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"scale() takes a number of workers >= 0, got {n!r}")
        if self.state != "running" or self._launcher is None:
            raise RuntimeError(f"scale() needs a running cluster; this one is {self.state}")
        current = list(self._procs.values())
        if n > len(current):
            count = {h: 0 for h in self._hosts}
            for proc in current:
                count[proc.host] += 1
            plan = []
            for _ in range(n - len(current)):
                host = min(self._hosts, key=count.__getitem__)  # ties: the first given
                count[host] += 1
                plan.append(host)
            await self._launch(plan)
            return
        dist = self._launcher.dist
        for proc in reversed(current[n:]):
            del self._procs[proc.name]  # leaving: its exit is no surprise
            try:
                worker = next((w for w in dist.workers.values() if w.name == proc.name), None)
                if worker is not None:
                    await dist.retire(worker)  # which then asks it to leave
            finally:
                await proc.stop(self.shutdown_timeout + 1.0)

    # -- closing -------------------------------------------------------------------------
    async def _close(self, hurry: bool) -> None:
        try:
            await super()._close(hurry)  # the registry asks the joined workers to leave
        finally:
            if self._remote_stopped is None:
                self._remote_stopped = asyncio.ensure_future(self._stop_remote(hurry))
            await asyncio.shield(self._remote_stopped)

    async def _stop_remote(self, hurry: bool) -> None:
        """Wait for the workers that were asked to leave, signal the others; then close
        the connections. Nothing of this cluster runs on the hosts afterwards."""
        self._remote_closing = True
        for watcher in list(self._watchers):
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        procs, self._procs = list(self._procs.values()), {}
        # A worker that never joined was asked nothing; in a hurry nobody waits.
        grace = 0.0 if hurry else self.shutdown_timeout + 1.0
        await asyncio.gather(*(p.stop(grace if p.name in self._joined else 0.0) for p in procs))
        await asyncio.gather(*(host.close() for host in self._hosts))


async def _all_or_first_error(coros: Iterable[Any], keep: Any = None) -> list[Any]:
    """Run ``coros`` together; their results, or the first error once all have ended
    (``keep`` is called with each result as it comes, to clean up after a failure)."""
    async def one(coro: Any) -> Any:
        result = await coro
        if keep is not None:
            keep(result)
        return result

    results = await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for other in errors[1:]:
            errors[0].add_note(f"also: {other}")
        raise errors[0]
    return results


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TypeError(f"SSHCluster({name}=...) takes an int >= 1, got {value!r}")
    return value


def _check_hosts(hosts: Any) -> list[Any]:
    if isinstance(hosts, str):
        raise TypeError(f"SSHCluster(hosts=...) takes a list of hosts: hosts=[{hosts!r}]")
    specs = [parse_host(h) for h in hosts]
    if not specs:
        raise ValueError("SSHCluster(hosts=[...]) needs at least one host")
    return specs


def _check_python(python: Any) -> list[str]:
    words = [python] if isinstance(python, str) else list(python)
    if not words or not all(isinstance(w, str) and w for w in words):
        raise TypeError(f"SSHCluster(python=...) takes the remote interpreter as a path, or a command "
                        f"as a list of words, e.g. '/opt/venv/bin/python'; got {python!r}")
    return words


def _check_connect_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    if "host" in options:
        raise TypeError("SSHCluster(connect_options=...) is for every host: list the hosts in "
                        "hosts=[...] ('user@host:port' sets a user and port for one)")
    return options


def _check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(env or {})
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name) or not isinstance(value, str):
            raise TypeError(f"SSHCluster(remote_env=...) takes variable names and string values, "
                            f"got {name!r}: {value!r}")
    if "AIODAGGER_TOKEN" in env:
        raise ValueError("SSHCluster(remote_env=...): the token travels over SSH to each worker; "
                         "pass it as token= instead")
    return env


def _check_worker_options(options: Any) -> list[str]:
    if isinstance(options, str):
        raise TypeError(f"SSHCluster(worker_options=...) takes a list of words: {options.split()!r}")
    words = list(options)
    if not all(isinstance(w, str) for w in words):
        raise TypeError(f"SSHCluster(worker_options=...) takes strings, got {words!r}")
    own = [w for w in words if w.split("=")[0] in _OWN_FLAGS]
    if own:
        raise ValueError(f"SSHCluster(worker_options=...): {own[0].split('=')[0]} is given by "
                         "SSHCluster itself (the token goes over SSH, names are made per worker)")
    return words
