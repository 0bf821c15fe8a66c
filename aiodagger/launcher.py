"""Starting workers in other processes: listeners, subprocess workers, scale.

The cluster's side of its workers: :class:`~aiodagger.cluster.Cluster` owns one
launcher when it has workers beyond its own process, and hands their connections to
the scheduler's :class:`~aiodagger.scheduler.registry.WorkerRegistry`.

Subprocess workers are started with ``python -m aiodagger.worker``; their token travels
through a pipe they inherit (never on the command line, where ``ps`` would show it, nor
in the environment, which their tasks and every process those start would inherit) and
they connect back to a loopback listener of their own. ``listen=`` opens a second,
public listener for ``aiodagger worker`` processes on other machines.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .comm.framing import DEFAULT_MAX_FRAME
from .comm.handshake import ServerKey, new_token
from .comm.server import Listener, check_listen, is_loopback, parse_address
from .gpu.discovery import GpuSpec, gpus_argument
from .memory import shared, spilldir
from .scheduler.core import Scheduler
from .scheduler.registry import RemoteWorker, WorkerRegistry
from .worker.local import WorkerInfo

__all__ = ["WorkerLauncher"]

logger = logging.getLogger(__name__)

# Subprocess workers restarted per minute at most, after that the cluster goes on without.
MAX_RESTARTS = 5

# Seconds a subprocess worker told to stop now (SIGTERM) has to exit before it is killed:
# its tasks get HURRY_GRACE, then its store and spill directory go, then its interpreter.
# Measured: 0.6 s from the signal to the exit, spilled chunks and running tasks included.
HURRY_TIMEOUT = 3.0

# Each worker process runs `threads` tasks at once; BLAS libraries starting a thread
# per core inside each of them would oversubscribe the machine (see the demo).
_ONE_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerLauncher:
    def __init__(self, sched: Scheduler, *, listen: str | None, token: str | None, ssl: Any,
                 threads: int, heartbeat_interval: float, heartbeat_timeout: float,
                 memory_limit: int | None = None, spill_dir: str | None = None,
                 shutdown_timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME,
                 worker_tls: dict[str, str] | None = None, gpus: GpuSpec = "auto",
                 gpu_memory_limit: int | None = None, resources: dict[str, float] | None = None) -> None:
        if listen is not None:
            check_listen(listen, token)
        self.sched = sched
        self.shutdown_timeout = shutdown_timeout
        self.listen = listen
        self.token = token or new_token()
        self.ssl = ssl
        self.threads = threads
        self.memory_limit = memory_limit
        self.spill_dir = spill_dir
        self.max_frame = max_frame
        self.gpus = gpus
        self.gpu_memory_limit = gpu_memory_limit
        self.resources = dict(resources or {})  # each worker started here declares these
        self.worker_tls = worker_tls or {}  # "--tls-cert": path...: paths, never key material
        self.dist = WorkerRegistry(sched, heartbeat_interval, heartbeat_timeout)
        self.dist.accepts_remote = listen is not None
        self._internal: Listener | None = None
        self._public: Listener | None = None
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._serial = itertools.count(1)
        self._leaving: set[str] = set()  # retired or closing: their exit is expected
        self._watchers: set[asyncio.Task[None]] = set()
        self._restarts: collections.deque[float] = collections.deque()
        self._closing = False

    @property
    def address(self) -> str | None:
        """The public address remote workers connect to (None without ``listen=``)."""
        return self._public.address if self._public is not None else None

    async def start(self, processes: int) -> None:
        self.sched.dist = self.dist
        if processes:  # what workers killed outright left in /dev/shm, by any cluster here
            await asyncio.get_running_loop().run_in_executor(None, shared.remove_stale)
        self.dist.start()
        key = ServerKey(self.token)
        self._internal = Listener(self.dist.handle_connection, key, max_frame=self.max_frame)
        await self._internal.start("127.0.0.1", 0)
        if self.listen is not None:
            host, port = parse_address(self.listen)
            self._public = Listener(self.dist.handle_connection, key, ssl=self.ssl,
                                    max_frame=self.max_frame)
            await self._public.start(host, port)
            logger.info("cluster listening for workers on %s", self._public.address)
        self.dist.expects_workers = processes > 0
        if processes:
            await self._start_processes(processes, then=key.derive)
        else:
            key.derive()

    async def _start_processes(self, n: int, timeout: float = 60.0,
                               then: Callable[[], object] | None = None) -> None:
        """Start ``n`` worker processes and wait until they have joined; ``then`` runs
        while they start (the key derivation: 15 ms here, while they take 200)."""
        assert self._internal is not None
        env = dict(os.environ)
        env.pop("AIODAGGER_TOKEN", None)
        for var in _ONE_THREAD_ENV:
            env.setdefault(var, "1")
        names = set()
        # The cluster's heartbeat timeout is theirs too: they give up on the cluster, and
        # on a peer that stops answering a fetch, as soon as it gives up on them.
        extra = ["--max-frame", str(self.max_frame),
                 "--heartbeat-timeout", str(self.dist.heartbeat_timeout)]
        if self.listen is not None and not is_loopback(parse_address(self.listen)[0]):
            # Remote workers fetch inputs from these workers too: at this machine's
            # address as they see it (WorkerRegistry.holders), not at 127.0.0.1.
            extra += ["--data-host", "0.0.0.0"]
        for flag, path in self.worker_tls.items():
            extra += [flag, path]
        if self.memory_limit is not None:
            extra += ["--memory-limit", str(self.memory_limit)]
        if self.spill_dir is not None:
            extra += ["--spill-dir", self.spill_dir]
        extra += ["--gpus", gpus_argument(self.gpus)]
        if self.gpu_memory_limit is not None:
            extra += ["--gpu-memory-limit", str(self.gpu_memory_limit)]
        if self.resources:
            extra += ["--resources", ",".join(f"{k}={v!r}" for k, v in self.resources.items())]
        for _ in range(n):
            name = f"proc-{next(self._serial)}"
            token_fd = self._token_pipe()
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "aiodagger.worker", self._internal.address,
                    "--threads", str(self.threads), "--name", name, "--subprocess",
                    "--shutdown-timeout", str(self.shutdown_timeout), "--token-fd", str(token_fd),
                    *extra, env=env, stdin=subprocess.DEVNULL, pass_fds=(token_fd,),
                )
            finally:
                os.close(token_fd)
            self._procs[name] = proc
            names.add(name)
            watcher = asyncio.ensure_future(self._watch(name, proc))
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
        if then is not None:
            then()
        waiting = asyncio.ensure_future(self.dist.wait_for_workers(names, timeout))
        exits = [asyncio.ensure_future(self._procs[name].wait()) for name in names]
        try:
            done, _ = await asyncio.wait([waiting, *exits], return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                dead = [n for n in names if self._procs[n].returncode is not None]
                raise RuntimeError(f"subprocess worker(s) {dead} exited before joining the cluster "
                                   "(their error output is above)")
            waiting.result()
        finally:
            waiting.cancel()
            for fut in exits:
                fut.cancel()
            await asyncio.gather(waiting, *exits, return_exceptions=True)

    def _token_pipe(self) -> int:
        """The read end of a pipe that holds the token, for one worker to inherit."""
        read_fd, write_fd = os.pipe()
        data = self.token.encode()
        try:
            os.set_blocking(write_fd, False)  # a token longer than the pipe holds must not hang us
            if os.write(write_fd, data) != len(data):
                raise ValueError(f"the cluster's token is too long ({len(data)} bytes)")
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return read_fd

    async def _watch(self, name: str, proc: asyncio.subprocess.Process) -> None:
        """Start a new worker in place of one that died (as Dask's nanny does), at most
        MAX_RESTARTS a minute: a task that kills every worker it runs on must not make
        the cluster fork forever."""
        code = await proc.wait()
        if code != 0:  # killed outright, say: its shared segments are stale now
            await asyncio.get_running_loop().run_in_executor(None, shared.remove_stale)
        if self._closing or name in self._leaving or self._procs.get(name) is not proc:
            return
        del self._procs[name]
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._restarts and now - self._restarts[0] > 60.0:
            self._restarts.popleft()
        if len(self._restarts) >= MAX_RESTARTS:
            logger.error("subprocess worker %s exited (code %s); not restarted: %d restarts in the "
                         "last minute", name, code, len(self._restarts))
            self._give_up(f"its worker processes kept dying: {len(self._restarts)} restarts "
                          "in a minute")
            return
        self._restarts.append(now)
        logger.warning("subprocess worker %s exited (code %s); starting another", name, code)
        try:
            await self._start_processes(1)
        except Exception as exc:  # noqa: BLE001 - the cluster goes on with the workers it has
            logger.error("could not restart a subprocess worker: %s", exc)
            self._give_up(f"a worker process could not be restarted: {exc}")

    def _give_up(self, why: str) -> None:
        """No more restarts: tasks waiting for a worker process fail, saying why."""
        if not self._procs:
            self.dist.gave_up = why
            self.sched.request_flush()

    def subprocess_workers(self) -> list[RemoteWorker]:
        return [w for w in self.dist.workers.values() if w.name in self._procs]

    async def scale(self, n: int, idle_first: bool = False) -> None:
        """Start or retire subprocess workers until there are ``n``; ``idle_first``:
        retire those running the fewest tasks (adapt()), else the newest."""
        current = self.subprocess_workers()
        self.dist.expects_workers = n > 0
        if n > 0:
            self.dist.gave_up = None
        if n > len(current):
            await self._start_processes(n - len(current))
        if idle_first:
            current.sort(key=lambda w: -len(w.running))  # the busiest stay
        for worker in current[n:]:
            self._leaving.add(worker.name)
            await self.dist.retire(worker)
            await self._reap(worker.name)

    async def _reap(self, name: str, timeout: float | None = None) -> None:
        """Wait for a worker process to exit: its own shutdown timeout and a second for
        its interpreter to end, then kill it and remove the spill directory it left."""
        if timeout is None:
            timeout = self.shutdown_timeout + 1.0
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            logger.warning("subprocess worker %s (pid %d) did not exit; killing it", name, proc.pid)
            proc.kill()
            await proc.wait()
            # Its lock died with it: its directory is now a stale one like any other.
            base = Path(self.spill_dir or tempfile.gettempdir())
            await asyncio.get_running_loop().run_in_executor(None, spilldir.remove_stale, base)

    def infos(self) -> list[WorkerInfo]:
        out = []
        for w in self.dist.workers.values():
            memory = w.memory  # as of its last completion or heartbeat
            out.append(WorkerInfo(
                id=w.id, address=w.address, host=w.host, pid=w.pid, status=w.status.value,
                processors=w.processors(),
                memory_used=memory.used, memory_limit=w.memory_limit,
                spilled_bytes=memory.spilled_bytes, spill_errors=memory.spill_errors,
                tasks_running=len(w.running),
            ))
        return out

    async def close(self, hurry: bool = False) -> None:
        """Stop every worker and wait for the subprocess workers to exit.

        ``hurry`` (Ctrl-C, cancellation): subprocess workers are signalled, which stops
        them now, without waiting for what they run, and killed after HURRY_TIMEOUT.
        """
        self._closing = True
        for watcher in list(self._watchers):  # no restart from now on
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        registered = {w.name for w in self.dist.workers.values()}
        await self.dist.close()  # asks every registered worker to stop
        for name, proc in self._procs.items():
            # In a hurry, a signal stops it at once; not yet joined, nobody asked it to stop.
            if (hurry or name not in registered) and proc.returncode is None:
                proc.terminate()
        timeout = HURRY_TIMEOUT if hurry else None
        await asyncio.gather(*(self._reap(name, timeout) for name in list(self._procs)))
        for listener in (self._public, self._internal):
            if listener is not None:
                await listener.close()
