"""Cluster: one scheduler bound to one event loop, and the workers it drives.

The cluster wires the parts together: the scheduler drives worker 0 (this process)
through :class:`~aiodagger.interfaces.LocalWorkerPort`, and workers in other processes
through the registry that a :class:`~aiodagger.launcher.WorkerLauncher` feeds (loaded
only when there are such workers).

``async with Cluster()`` binds to the running loop; plain ``with Cluster()`` (and the
default cluster that the first ``spawn`` outside any cluster starts) run on a private
uvloop thread, so synchronous scripts can spawn and ``fetch``. So does ``async with
Cluster()`` in trio code, whose thread has no asyncio loop to bind to.

Which cluster a ``spawn`` uses: the one entered in the current context (a ContextVar,
so it follows asyncio tasks), else the one whose pool thread is calling, else the most
recently entered one still open, else the default cluster.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import ssl
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._asynclib import is_cancellation, run_in_thread
from ._bridge import run_on_loop_awaitable
from ._context import RUNNING, ClusterState, current_cluster_var, pool_thread
from ._loopthread import LoopThread
from .comm.framing import DEFAULT_MAX_FRAME, check_max_frame
from .comm.server import check_listen
from .comm.tls import worker_contexts
from .dashboard import Bind, missing_requirements, parse_dashboard
from .gpu.discovery import check_spec
from .memory import parse_memory_limit, shared
from .memory.device import parse_device_limit
from .scheduler.core import Scheduler
from .taskoptions import check_resources
from .worker.aio import HURRY_GRACE
from .worker.local import LocalWorker, WorkerInfo

if TYPE_CHECKING:
    from .adapt import Adaptive
    from .dashboard.server import Dashboard
    from .launcher import WorkerLauncher

__all__ = ["Cluster", "WorkerInfo", "current_cluster", "on_cluster_start", "running_cluster"]

logger = logging.getLogger(__name__)


_current = current_cluster_var
_pool_thread = pool_thread
_entered: list[Cluster] = []


def enter_current(cluster: Any, tokens: list[Any]) -> None:
    """Make ``cluster`` (a Cluster, or a client's) the current one until leave_current."""
    tokens.append(_current.set(cluster))
    _entered.append(cluster)


def leave_current(cluster: Any, tokens: list[Any]) -> None:
    if cluster in _entered:
        _entered.remove(cluster)
    if tokens:
        token = tokens.pop()
        try:
            _current.reset(token)
        except ValueError:  # left from another context than the one that entered
            _current.set(None)
_default: Cluster | None = None
_default_lock = threading.Lock()
_atexit_registered = False
# Called with each cluster as it starts, on its loop thread (observers such as
# enable_logging register here); consulted once per start, never per task.
on_cluster_start: list[Callable[[Cluster], None]] = []


class Cluster:
    """A set of workers and the scheduler that feeds them.

    Worker 0 is this process, with an AsyncProc for coroutine functions and a
    ThreadProc for sync functions. ``processes=N`` adds N subprocess workers;
    ``listen="tcp://HOST:PORT"`` (with ``token=``) lets ``aiodagger worker`` processes
    join from other machines. While workers in other processes are present, tasks run
    there, and worker 0 runs only what is scoped to it (``scope(worker=0)``), so this
    process's loop stays free for scheduling and the application's own I/O.

    ``threads`` is the number of threads of each worker's pool (default: the CPUs,
    shared out among the subprocess workers).

    ``max_frame`` is the largest frame, in bytes, that a connection of this cluster
    carries (its listeners, its subprocess workers and their data servers; remote
    workers take ``--max-frame``): a task whose argument, input or result is larger
    fails with :class:`~aiodagger.errors.FrameTooLargeError`, and a peer announcing a
    larger frame is cut off before anything is allocated for it.

    ``tls_cert``, ``tls_key`` and ``tls_ca`` are the files the subprocess workers use
    with their peers, as ``aiodagger worker --tls-cert/--tls-key/--tls-ca`` does: with
    remote workers that serve their data over TLS, give at least ``tls_ca`` (to fetch
    from them) and a certificate valid for 127.0.0.1 with its key (to serve them). The
    subprocess workers reach the cluster itself over loopback, in the clear; ``ssl=``
    is the context of the ``listen=`` address.

    ``dashboard="127.0.0.1:8787"`` serves a live page of the workers, the task stream,
    progress per function, the recent graph and errors, and Prometheus metrics at
    ``/metrics``, on this cluster's loop (port 0: any free port; ``cluster.dashboard_url``
    says where). A non-loopback address needs ``token=``, which the page then asks for.
    """

    def __init__(
        self,
        processes: int = 0,
        threads: int | None = None,
        gpus: Any = "auto",
        memory_limit: Any = None,
        spill_dir: Any = None,
        listen: str | None = None,
        token: str | None = None,
        ssl: Any = None,
        dashboard: str | None = None,
        *,
        shutdown_timeout: float = 10.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        gpu_memory_limit: Any = None,
        resources: dict[str, float] | None = None,
    ) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 0:
            raise TypeError(f"Cluster(processes=...) takes an int >= 0, got {processes!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise TypeError(f"Cluster(threads=...) takes an int >= 1 or None, got {threads!r}")
        self.max_frame = check_max_frame(max_frame)
        self._worker_tls = _check_worker_tls(tls_cert, tls_key, tls_ca)
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError(
                f"Cluster(heartbeat_interval={heartbeat_interval!r}, heartbeat_timeout="
                f"{heartbeat_timeout!r}): a worker is lost when no answer to a heartbeat came "
                "within the timeout, so it must be a few intervals long, e.g. "
                f"heartbeat_timeout={5 * heartbeat_interval:g}")
        self.memory_limit = parse_memory_limit(memory_limit)
        if self.memory_limit is not None and not processes and listen is not None:
            raise ValueError(
                "Cluster(memory_limit=...) is the limit of each worker this cluster runs: with "
                "listen= and no processes=, set it on the remote workers instead "
                "(aiodagger worker ... --memory-limit 8GiB)")
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)
        # Checked here; the devices are found by each worker in its own process.
        self.gpus = check_spec(gpus)
        # Device memory each worker's results may hold per GPU before the oldest move to
        # host ("16GiB"); None: no limit, results move only when a task runs out of memory.
        self.gpu_memory_limit = parse_device_limit(gpu_memory_limit)
        # Amounts of named resources each worker has (worker 0 without processes=).
        self.resources = None if resources is None else check_resources(resources, "Cluster(resources=...)")
        cpus = os.cpu_count() or 1
        self.threads = threads or cpus
        self.processes = processes
        self.listen = listen
        self.shutdown_timeout = shutdown_timeout
        self._token = token
        self._ssl = ssl
        self._heartbeat = (heartbeat_interval, heartbeat_timeout)
        self._worker_threads = threads or max(1, cpus // max(processes, 1))
        self._launcher: WorkerLauncher | None = None
        self._adaptive: Adaptive | None = None  # adapt()'s, while it runs
        if listen is not None:  # check the address and token now, not at start
            check_listen(listen, token)
        self._dashboard_bind = None if dashboard is None else _check_dashboard(
            dashboard, token, f"Cluster(dashboard={dashboard!r})")
        self._dashboard: Dashboard | None = None
        self._state = ClusterState.NEW
        self._sched: Scheduler | None = None
        self._local: LocalWorker | None = None
        self._loop_thread: LoopThread | None = None
        self._closed_event: asyncio.Event | None = None
        self._ctx_tokens: list[contextvars.Token[Cluster | None]] = []

    # -- introspection -------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state.value

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._scheduler.loop

    @property
    def workers(self) -> list[WorkerInfo]:
        """The workers of this cluster, worker 0 (this process) first."""
        if self._local is None or self._state is not ClusterState.RUNNING:
            return []
        remote = self._launcher.infos() if self._launcher is not None else []
        return [self._local.info(), *remote]

    async def worker_stats(self) -> dict[int, dict[str, Any]]:
        """Fresh counters of every worker, by worker id: memory in use, spill thresholds,
        bytes spilled and the time spent writing them, errors... Worker 0 is listed when
        it keeps a store of its own (a memory limit)."""
        local = {}
        if self._local is not None and self._local.store is not None:
            stats = self._local.store.stats()
            stats["memory_used"] = stats["used"]
            local[0] = stats
        if self._launcher is None:
            return local
        dist = self._launcher.dist
        await run_on_loop_awaitable(dist.poll_stats(), self.loop)
        return {**local, **{w.id: dict(w.stats) for w in dist.workers.values()}}

    @property
    def address(self) -> str | None:
        """Where remote workers connect (``listen=``), e.g. ``tcp://10.0.0.5:8786``."""
        return self._launcher.address if self._launcher is not None else None

    @property
    def dashboard_url(self) -> str | None:
        """The dashboard page's address once started (None without ``dashboard=``); off
        loopback it carries ``?token=``, so treat it as the token itself."""
        return self._dashboard.url if self._dashboard is not None else None

    @property
    def token(self) -> str | None:
        """The shared secret workers authenticate with (generated when not given)."""
        return self._launcher.token if self._launcher is not None else self._token

    @property
    def tasks_in_flight(self) -> int:
        """Tasks spawned and not yet done (an O(1) counter)."""
        return self._scheduler.live_count

    @property
    def _scheduler(self) -> Scheduler:
        if self._sched is None:
            raise RuntimeError("this Cluster has not been started: use `async with Cluster()` or `with Cluster()`")
        return self._sched

    def __repr__(self) -> str:
        return f"<Cluster {self.state} workers={len(self.workers) or 1} threads={self.threads}>"

    # -- lifecycle -----------------------------------------------------------------------
    def _start_on(self, loop: asyncio.AbstractEventLoop, thread_id: int) -> None:
        """Build the scheduler and worker 0 on ``loop`` (called on that loop's thread)."""
        if self._state is not ClusterState.NEW:
            raise RuntimeError(f"a Cluster can be started once; this one is {self.state}")
        sched = Scheduler(loop, thread_id)
        # Tasks run in a context of their own: they see this cluster, not the
        # spawner's options or whatever else the spawning request had set.
        task_context = contextvars.Context()
        task_context.run(_current.set, self)
        # Worker 0 keeps its results in a store of its own when it runs every task under
        # a memory limit; with other workers the limit is theirs.
        own_limit = self.memory_limit if not self.processes and self.listen is None else None
        self._local = LocalWorker(sched, self.threads, task_context, self._init_pool_thread,
                                  memory_limit=own_limit, spill_dir=self.spill_dir,
                                  # with processes=N, worker 0 runs only what names it
                                  gpus=self.gpus if not self.processes else 0,
                                  gpu_memory_limit=self.gpu_memory_limit,
                                  resources=self.resources if not self.processes else None)
        sched.attach_local(self._local)
        self._sched = sched
        self._closed_event = asyncio.Event()
        self._local.start()
        self._state = ClusterState.RUNNING
        for hook in list(on_cluster_start):
            hook(self)

    def _init_pool_thread(self) -> None:
        _pool_thread.cluster = self

    async def __aenter__(self) -> Cluster:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Trio's thread cannot host the asyncio loop the cluster runs on: it gets a
            # thread of its own, as with `with Cluster()`, started from a worker thread
            # so that the trio run goes on meanwhile.
            await run_in_thread(self._start_background)
            self._enter()
            return self
        self._start_on(loop, threading.get_ident())
        try:
            await self._start_workers()
            await self._start_dashboard()
        except BaseException:
            await self.close()
            raise
        self._enter()
        return self

    async def _start_workers(self) -> None:
        """Start worker 0's store, or the listeners and subprocess workers."""
        assert self._sched is not None and self._local is not None
        if not self.processes and self.listen is None:
            await self._local.start_store()
            return
        # Imported here: an in-process cluster, and every worker process (which imports
        # this package too), never loads the registry of remote workers.
        from .launcher import WorkerLauncher

        self._launcher = WorkerLauncher(
            self._sched, listen=self.listen, token=self._token, ssl=self._ssl,
            threads=self._worker_threads, heartbeat_interval=self._heartbeat[0],
            heartbeat_timeout=self._heartbeat[1], memory_limit=self.memory_limit,
            spill_dir=self.spill_dir, shutdown_timeout=self.shutdown_timeout, max_frame=self.max_frame,
            worker_tls=self._worker_tls, gpus=self.gpus, gpu_memory_limit=self.gpu_memory_limit,
            resources=self.resources)
        await self._launcher.start(self.processes)

    async def _start_dashboard(self) -> None:
        if self._dashboard_bind is None:
            return
        # Imported here: aiohttp and prometheus-client load only for a dashboard.
        from .dashboard.server import Dashboard

        dashboard = Dashboard(self, self._dashboard_bind)
        await dashboard.start()
        self._dashboard = dashboard

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        hurry = _interrupted(exc)
        try:
            if self._loop_thread is not None:  # entered from trio: see __aenter__
                await run_in_thread(lambda: self._close_background(hurry))
            else:
                await self._close(hurry)
        finally:
            self._leave()

    def __enter__(self) -> Cluster:
        self._start_background()
        self._enter()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self._close_background(hurry=_interrupted(exc))
        finally:
            self._leave()

    def _enter(self) -> None:
        enter_current(self, self._ctx_tokens)

    def _leave(self) -> None:
        leave_current(self, self._ctx_tokens)

    def _start_background(self) -> None:
        loop_thread = LoopThread("aiodagger-loop")
        loop_thread.start()
        self._loop_thread = loop_thread

        async def start() -> None:
            self._start_on(loop_thread.loop, loop_thread.thread_id)
            try:
                await self._start_workers()
                await self._start_dashboard()
            except BaseException:
                await self.close()
                raise

        try:
            loop_thread.run(start())
        except BaseException:
            loop_thread.stop()
            self._loop_thread = None
            raise

    def _close_background(self, hurry: bool = False) -> None:
        loop_thread = self._loop_thread
        if loop_thread is None:
            return
        if threading.get_ident() == loop_thread.thread_id:
            raise RuntimeError("a background Cluster cannot be closed from its own loop thread")
        try:
            loop_thread.run(self._close(hurry))
        finally:
            loop_thread.stop()
            self._loop_thread = None

    async def close(self) -> None:
        """Cancel unfinished tasks, stop the workers, and wait until they have stopped.

        Running tasks get ``shutdown_timeout`` to end. Leaving ``with`` or ``async with``
        on Ctrl-C or cancellation gives them HURRY_GRACE only, and subprocess workers
        are signalled to stop at once: who interrupts waits for no task.
        """
        if self._loop_thread is not None and _no_asyncio_loop():  # trio's: see __aenter__
            await run_in_thread(self._close_background)
            return
        await self._close(hurry=False)

    async def _close(self, hurry: bool) -> None:
        if self._state is ClusterState.NEW:
            self._state = ClusterState.CLOSED
            return
        assert self._closed_event is not None and self._sched is not None and self._local is not None
        if self._state is not ClusterState.RUNNING:
            await self._closed_event.wait()
            return
        self._state = ClusterState.CLOSING
        if self._adaptive is not None:  # it would start workers while they stop
            await self._adaptive.wait_stopped(HURRY_GRACE if hurry else self.shutdown_timeout)
        if self._dashboard is not None:  # first: it reads the workers that close below
            dashboard, self._dashboard = self._dashboard, None
            try:
                await dashboard.stop()
            except Exception:  # the workers must still be stopped
                logger.exception("stopping the dashboard failed")
        cancelled = self._sched.close()
        if cancelled:
            logger.info("cluster closing: cancelled %d unfinished task(s)", cancelled)
        if self._launcher is not None:
            await self._launcher.close(hurry)
        timeout = min(self.shutdown_timeout, HURRY_GRACE) if hurry else self.shutdown_timeout
        if not await self._local.close(timeout):
            logger.warning(
                "cluster closed while tasks were still running user code in %s after %.1f s; "
                "those threads are left to finish on their own", self._local.thread_proc, timeout,
            )
        # The workers removed their segments: this process's idle mappings of them go
        # now, not at the next sweep (their pages live as long as a mapping does).
        shared.drop_gone()
        self._state = ClusterState.CLOSED
        self._closed_event.set()

    async def scale(self, n: int) -> None:
        """Make the number of subprocess workers ``n``, starting or retiring workers.

        A retiring worker first hands the results only it holds to the others.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"scale() takes a number of subprocess workers >= 0, got {n!r}")
        if self._state is not ClusterState.RUNNING:
            raise RuntimeError(f"scale() needs a running cluster; this one is {self.state}")
        if self._adaptive is not None:  # asked for a number: no longer adapting
            self._adaptive.stop()
        if self._launcher is None:
            if n == 0:
                return
            self.processes = n
            await self._start_workers()
            return
        await self._launcher.scale(n)


    # -- adapt(): as many subprocess workers as the work in flight needs (aiodagger.adapt) --
    def adapt(self, *, minimum: int = 0, maximum: int, interval: float = 1.0,
              wait_count: int = 3) -> Adaptive:
        """Start and retire subprocess workers as the work asks: a worker per
        ``threads`` tasks spawned and not done, within ``[minimum, maximum]``, checked
        every ``interval`` seconds; idle workers retire (handing over the results only
        they hold) after ``wait_count`` checks in a row asked for fewer. Returns the
        :class:`~aiodagger.adapt.Adaptive`, whose ``stop()`` ends it (as ``close()``
        does); another ``adapt()`` replaces it. Callable from any thread."""
        from .adapt import Adaptive

        if self._state is not ClusterState.RUNNING:
            raise RuntimeError(f"adapt() needs a running cluster; this one is {self.state}")
        adaptive = Adaptive(self, self.loop, minimum=minimum, maximum=maximum, interval=interval,
                            wait_count=wait_count)
        previous, self._adaptive = self._adaptive, adaptive

        def begin() -> None:
            if previous is not None:
                previous.stop()
            self._adapting_changed()
            adaptive.start(on_done=self._adapting_changed)

        if threading.get_ident() == self._scheduler.loop_thread_id:
            begin()
        else:
            self.loop.call_soon_threadsafe(begin)
        return adaptive

    def _adapting_changed(self) -> None:
        """adapt() began or ended (a subclass may let tasks wait for workers meanwhile)."""

    @property
    def requested_workers(self) -> int:
        """Subprocess workers running or starting (for adapt())."""
        return len(self._launcher.subprocess_workers()) if self._launcher is not None else 0

    @property
    def threads_per_worker(self) -> int:
        return self._worker_threads

    async def refresh(self) -> None:
        """Nothing to bring up to date: the launcher knows its processes (for adapt())."""

    async def adapt_to(self, n: int) -> None:
        """Start subprocess workers up to ``n``, or retire the idlest down to it (adapt())."""
        if self._launcher is None:
            if n > 0:
                self.processes = n
                await self._start_workers()
            return
        await self._launcher.scale(n, idle_first=True)


def _no_asyncio_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def _interrupted(exc: BaseException | None) -> bool:
    """Ctrl-C, or the cancellation that ``asyncio.run`` makes of it (or trio's)."""
    return isinstance(exc, KeyboardInterrupt) or is_cancellation(exc)


def _check_worker_tls(cert: Any, key: Any, ca: Any) -> dict[str, str]:
    """The TLS files of subprocess workers, by flag, as absolute paths; loaded once here
    so that a wrong one fails the Cluster call, not each worker process as it starts."""
    given = {flag: os.path.abspath(os.fspath(path))
             for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca))
             if path is not None}
    try:
        worker_contexts(cert, key, ca)
    except (ValueError, OSError, ssl.SSLError) as exc:
        raise ValueError(f"Cluster(tls_cert={cert!r}, tls_key={key!r}, tls_ca={ca!r}): {exc}") from exc
    return given


def _check_dashboard(spec: Any, token: str | None, option: str) -> Bind:
    bind = parse_dashboard(spec, token, option)
    missing = missing_requirements(option)
    if missing is not None:
        raise ImportError(missing)
    return bind


def _chosen_cluster() -> Cluster | None:
    """The context's cluster, else the calling pool thread's, else the last entered one."""
    cluster = _current.get()
    if cluster is not None and cluster._state is RUNNING:
        return cluster
    cluster = getattr(_pool_thread, "cluster", None)
    if cluster is not None and cluster._state is RUNNING:
        return cluster
    for cluster in reversed(_entered):
        if cluster._state is RUNNING:
            return cluster
    return None


def current_cluster() -> Cluster:
    """The cluster a ``spawn`` here would use, starting the default one if needed."""
    return _chosen_cluster() or _default_cluster()


def running_cluster() -> Cluster | None:
    """The cluster a ``spawn`` here would use, or None where it would start the default one.

    Unlike :func:`current_cluster` it never starts one: observers ask it.
    """
    cluster = _chosen_cluster()
    if cluster is not None:
        return cluster
    default = _default
    if default is not None and default._state is RUNNING:
        return default
    return None


def _default_cluster() -> Cluster:
    global _default, _atexit_registered
    with _default_lock:
        if _default is None or _default._state is not ClusterState.RUNNING:
            cluster = Cluster()
            spec = os.environ.get("AIODAGGER_DASHBOARD")
            if spec:  # a dashboard for scripts that never make a Cluster themselves
                cluster._dashboard_bind = _check_dashboard(spec, None, f"AIODAGGER_DASHBOARD={spec!r}")
            cluster._start_background()
            _default = cluster
            if not _atexit_registered:
                atexit.register(_shutdown_default_cluster_at_exit)
                _atexit_registered = True
        return _default


def shutdown_default_cluster(hurry: bool = False) -> None:
    """Close the default cluster if one was started (also run at interpreter exit)."""
    global _default
    with _default_lock:
        cluster, _default = _default, None
    if cluster is not None:
        cluster._close_background(hurry)


def _shutdown_default_cluster_at_exit() -> None:
    # A script that Ctrl-C ended (the interpreter keeps what ended it in sys.last_value)
    # waits for none of its tasks, as leaving `with Cluster()` on Ctrl-C does not.
    shutdown_default_cluster(hurry=isinstance(getattr(sys, "last_value", None), KeyboardInterrupt))
