"""``dagger.connect``: this process as a client of a shared cluster.

A scheduler started on its own (``aiodagger scheduler --listen ...``) or by another
program (``Cluster(listen=...)``) takes clients as well as workers. A client is never
given tasks to run: it spawns, puts, awaits and fetches, as a worker process's tasks
do (its scheduler stand-in is the same :class:`~aiodagger.worker.nested.SchedulerClient`,
over a connection of its own), and publishes results for other clients.

What a client spawned or put is released when it disconnects, unless published. A
client that loses its connection fails what it awaits with SchedulerLostError and
reconnects by itself, putting its live chunks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import threading
import weakref
from collections.abc import Awaitable, Generator
from typing import Any

from ._bridge import run_on_loop_awaitable, run_on_loop_blocking
from ._context import ClusterState
from ._loopthread import LoopThread
from .cluster import _entered, _interrupted, enter_current, leave_current
from .comm import protocol as P
from .comm.framing import DEFAULT_MAX_FRAME, open_comm
from .comm.handshake import HANDSHAKE_TIMEOUT, client_handshake
from .comm.server import parse_address
from .errors import (
    AuthenticationError,
    ConnectError,
    FrameTooLargeError,
    ProtocolError,
    SchedulerLostError,
    WorkerLostError,
)
from .task import FAILED, REMOTE, Chunk, DTask
from .taskoptions import TaskOptions
from .worker.nested import SchedulerClient

__all__ = ["ClientCluster", "connect"]

logger = logging.getLogger(__name__)

# A published task's handle is made when the lookup's reply arrives; its task-done may
# come in the same read, before the reply's waiter resumes: kept this long for it.
_EARLY_KEEP = 64


def connect(address: str | None = None, *, token: str | None = None, name: str | None = None,
            timeout: float = 10.0, ssl: Any = None, heartbeat_interval: float = 1.0,
            heartbeat_timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME) -> ClientCluster:
    """Attach this process to the scheduler at ``address`` (``tcp://HOST:PORT``) as a client.

    ``async with dagger.connect(...) as cluster:`` (or ``with`` from sync code, or
    ``cluster = await dagger.connect(...)`` then ``await cluster.close()``): inside,
    ``spawn``, ``await``, ``fetch``, ``put``, ``gather``, ``TaskGroup`` and ``progress``
    use that cluster. ``address`` defaults to ``$AIODAGGER_SCHEDULER``, ``token`` to
    ``$AIODAGGER_TOKEN`` or the contents of ``$AIODAGGER_TOKEN_FILE``. Raises
    ConnectError when nothing there takes clients within ``timeout`` seconds, and
    AuthenticationError for a wrong token.
    """
    address = address or os.environ.get("AIODAGGER_SCHEDULER")
    if not address:
        raise ValueError("dagger.connect() needs the scheduler's address, e.g. "
                         "connect('tcp://10.0.0.5:8786', token=...), or $AIODAGGER_SCHEDULER set")
    host, port = parse_address(address)
    if token is None:
        token = _token_from_env()
    if not isinstance(token, str) or not token:
        raise ValueError("dagger.connect() needs the cluster's token: token=..., or "
                         "$AIODAGGER_TOKEN / $AIODAGGER_TOKEN_FILE set")
    if not timeout > 0:
        raise ValueError(f"connect(timeout=...) must be > 0 seconds, got {timeout!r}")
    return ClientCluster(f"tcp://{host}:{port}", token, name=name or f"{socket.gethostname()}-{os.getpid()}",
                         timeout=timeout, ssl=ssl, heartbeat=(heartbeat_interval, heartbeat_timeout),
                         max_frame=max_frame)


def _token_from_env() -> str | None:
    token = os.environ.get("AIODAGGER_TOKEN")
    path = os.environ.get("AIODAGGER_TOKEN_FILE")
    if not token and path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read(4096).strip()
        except OSError as exc:
            raise ValueError(f"dagger.connect(): cannot read $AIODAGGER_TOKEN_FILE: {exc}") from None
    return token


class ClientCluster:
    """A shared cluster as seen from a client process (what ``dagger.connect`` returns)."""

    def __init__(self, address: str, token: str, *, name: str, timeout: float, ssl: Any,
                 heartbeat: tuple[float, float], max_frame: int) -> None:
        self.address = address
        self.name = name
        self._session = _Session(self, address, token, name=name, timeout=timeout, ssl=ssl,
                                 heartbeat=heartbeat, max_frame=max_frame)
        self._state = ClusterState.NEW
        self._loop_thread: LoopThread | None = None
        self._sched: ConnectedScheduler | None = None
        self._ctx_tokens: list[Any] = []

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def connected(self) -> bool:
        """Whether the connection to the scheduler is up now (it comes back by itself)."""
        return self._session.worker_id >= 0

    @property
    def tasks_in_flight(self) -> int:
        """Tasks this client spawned that are not done yet."""
        return self._sched.live_count if self._sched is not None else 0

    @property
    def _scheduler(self) -> ConnectedScheduler:
        if self._sched is None:
            raise RuntimeError("this client is not connected: use `async with dagger.connect(...)`")
        return self._sched

    def __repr__(self) -> str:
        return f"<ClientCluster {self.state} of {self.address}>"

    # -- lifecycle ---------------------------------------------------------------------------
    async def _start(self) -> None:
        if self._state is not ClusterState.NEW:
            raise RuntimeError(f"a client connects once; this one is {self.state}")
        self._sched = await self._session.start()
        self._state = ClusterState.RUNNING

    async def __aenter__(self) -> ClientCluster:
        await self._start()
        self._enter()
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            await self.close()
        finally:
            self._leave()

    def __await__(self) -> Generator[Any, None, ClientCluster]:
        """``cluster = await dagger.connect(...)``: connected and current until closed."""
        async def start() -> ClientCluster:
            await self._start()
            self._enter()
            return self

        return start().__await__()

    def __enter__(self) -> ClientCluster:
        loop_thread = LoopThread("aiodagger-client")
        loop_thread.start()
        self._loop_thread = loop_thread
        try:
            loop_thread.run(self._start())
        except BaseException:
            loop_thread.stop()
            self._loop_thread = None
            raise
        self._enter()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            loop_thread = self._loop_thread
            if loop_thread is not None:
                try:
                    loop_thread.run(self._close(hurry=_interrupted(exc)))
                finally:
                    loop_thread.stop()
                    self._loop_thread = None
        finally:
            self._leave()

    async def close(self) -> None:
        """Disconnect: what this client spawned or put and did not publish is released."""
        if self._loop_thread is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._close(), self._loop_thread.loop))
            self._loop_thread.stop()
            self._loop_thread = None
        else:
            await self._close()
        if self in _entered:  # `await dagger.connect()`: current until closed
            self._leave()

    async def _close(self, hurry: bool = False) -> None:
        if self._state is not ClusterState.RUNNING:
            self._state = ClusterState.CLOSED
            return
        self._state = ClusterState.CLOSING
        await self._session.stop()
        self._state = ClusterState.CLOSED

    def _enter(self) -> None:
        enter_current(self, self._ctx_tokens)

    def _leave(self) -> None:
        leave_current(self, self._ctx_tokens)

    # -- sharing between clients ---------------------------------------------------------------
    async def publish(self, name: str, obj: DTask[Any] | Chunk[Any]) -> None:
        """Keep ``obj`` (a task of this cluster, or a chunk put here) under ``name``:
        other clients get it with ``get_published(name)``, and it outlives this client's
        connection until ``unpublish(name)``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"publish() takes a non-empty name, got {name!r}")
        if type(obj) is DTask:
            key = obj.id
        elif type(obj) is Chunk:
            key = -obj.id
        else:
            raise TypeError(f"publish() takes a DTask or a Chunk of this cluster, got {type(obj).__name__}")
        if getattr(obj, "_sched", None) is not self._sched:
            raise ValueError(f"{obj!r} does not belong to this client's cluster")
        await self._ask(P.Publish(name, key))

    async def unpublish(self, name: str) -> None:
        """Forget what is published under ``name`` (its value is freed once no client holds it)."""
        await self._ask(P.Publish(name, 0))

    async def get_published(self, name: str) -> DTask[Any]:
        """A handle to what any client published as ``name``: ``await`` it for its value,
        or pass it to tasks. KeyError, naming what is published, if nothing is."""
        return await run_on_loop_awaitable(self._scheduler.lookup(name), self._scheduler.loop)

    async def _ask(self, msg: Any) -> None:
        reply = await run_on_loop_awaitable(self._scheduler.request(msg), self._scheduler.loop)
        if reply.error:
            raise ValueError(reply.error)


class ConnectedScheduler(SchedulerClient):
    """The TaskOwner of a client's handles: spawns go to the shared scheduler."""

    in_worker_process = False

    def __init__(self, session: _Session) -> None:
        super().__init__(session)  # type: ignore[arg-type]
        self.session = session
        self._early: dict[int, tuple[P.TaskDone, list[Any]]] = {}
        self._lookups = 0
        self._live = 0  # tasks spawned here and not done (admit())
        self._room = asyncio.Event()
        self._fetching: dict[int, asyncio.Future[Any]] = {}

    def placeable_workers(self, scope: Any) -> list[int]:
        raise RuntimeError(
            "dagger.mutable, dagger.shard and dagger.array place objects on chosen workers, "
            "which a connected client cannot do: create them in a task, or in the program "
            "that runs the cluster")

    def _disconnected(self) -> Exception:
        return SchedulerLostError(f"this client is not connected to the scheduler at "
                                  f"{self.session.address} right now (it is reconnecting)")

    def _settle_lost(self, key: int) -> None:
        task = self.handles.get(key)
        if task is not None and not task.done():
            task._exc = SchedulerLostError(
                f"{task._describe()} was lost with the connection to the scheduler at "
                f"{self.session.address}; spawn it again once reconnected")
            task._state = FAILED
            task._notify()

    def connection_lost(self) -> None:
        for key in list(self.handles.keys()):
            self._settle_lost(key)
        self._early.clear()

    # -- spawning and what is reported --------------------------------------------------------
    def spawn(self, opts: TaskOptions, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DTask[Any]:
        task = super().spawn(opts, fn, args, kwargs)
        self._live += 1
        task._on_done(self._one_done)
        return task

    def _one_done(self, task: DTask[Any]) -> None:
        self._live -= 1
        if self._live < self._admit_below:
            self._room.set()

    _admit_below = 0

    @property
    def live_count(self) -> int:
        return self._live

    async def admitted(self, limit: int) -> None:
        """Wait until this client's tasks in flight fall under 90 % of ``limit``."""
        self._admit_below = max(1, limit * 9 // 10)
        while self._live >= self._admit_below:
            self._room.clear()
            await self._room.wait()

    def on_task_done(self, msg: P.TaskDone, buffers: list[Any]) -> None:
        if msg.key not in self.handles and self._lookups:
            self._early[msg.key] = (msg, buffers)
            while len(self._early) > _EARLY_KEEP:
                del self._early[next(iter(self._early))]
            return
        super().on_task_done(msg, buffers)

    def put_again(self) -> None:
        """After a reconnection: every chunk still held goes to the scheduler again."""
        for chunk, box in list(self._chunks.items()):
            self._send_put(chunk, box)

    # -- requests -----------------------------------------------------------------------------
    async def request(self, msg: Any) -> Any:
        endpoint = self.session.endpoint
        if endpoint is None:
            raise self._disconnected()
        self._flush()  # what it names was spawned before it
        reply, _ = await endpoint.request(msg, timeout=self.session.timeout)
        return reply

    async def lookup(self, name: str) -> DTask[Any]:
        self._lookups += 1
        try:
            found = await self.request(P.Lookup(name))
            if found.key == 0:
                raise KeyError(f"nothing is published as {name!r}; published: {found.names or 'nothing'}")
            task = self.handles.get(found.key)
            if task is None:
                task = DTask(self, found.key, name, None, (), {}, TaskOptions())
                self.handles[found.key] = task
                weakref.finalize(task, self._forget, found.key)
            early = self._early.pop(found.key, None)
            if early is not None:
                super().on_task_done(*early)
            return task
        finally:
            self._lookups -= 1

    async def _bring(self, objs: list[Any]) -> None:
        for obj in objs:
            if obj._value is REMOTE:
                pending = self._fetching.get(obj.id)
                if pending is None:
                    pending = self._fetching[obj.id] = asyncio.ensure_future(
                        self.session.fetch(obj.id, obj._handle))
                    pending.add_done_callback(functools.partial(self._fetched, obj.id))
                value = await asyncio.shield(pending)
                if obj._value is REMOTE:
                    obj._value = value

    def _fetched(self, key: int, _fut: asyncio.Future[Any]) -> None:
        self._fetching.pop(key, None)

    def bring_here(self, objs: list[Any]) -> Awaitable[None]:
        return run_on_loop_awaitable(self._bring(objs), self.loop)

    def bring_blocking(self, objs: list[Any], timeout: float | None) -> None:
        run_on_loop_blocking(self._bring(objs), self.loop, self.loop_thread_id, timeout)


class _Session:
    """The client's connection to the scheduler: attach, heartbeats, reconnection, and
    the fetching of results from the workers that hold them."""

    def __init__(self, cluster: ClientCluster, address: str, token: str, *, name: str,
                 timeout: float, ssl: Any, heartbeat: tuple[float, float], max_frame: int) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.token = token
        self.name = name
        self.timeout = timeout
        self.ssl = ssl
        self.heartbeat_interval, self.heartbeat_timeout = heartbeat
        self.max_frame = max_frame
        self.worker_id = -1  # the client id the scheduler gave this connection
        self.endpoint: P.Endpoint | None = None
        self.loop: asyncio.AbstractEventLoop
        self.loop_thread_id = 0
        self.sched: ConnectedScheduler
        self._peers: dict[str, P.Endpoint] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._serving: asyncio.Task[None] | None = None
        self._stopping = False
        self._backoff = 0.1

    @property
    def streams(self) -> Any:
        raise RuntimeError("streaming tasks cannot be spawned from a connected client: spawn a "
                           "task that runs dagger.spawn_streaming on the cluster instead")

    def _scheduler_limit(self) -> int:
        endpoint = self.endpoint
        return endpoint.comm.limit if endpoint is not None else self.max_frame

    async def start(self) -> ConnectedScheduler:
        self.loop = asyncio.get_running_loop()
        self.loop_thread_id = threading.get_ident()
        self.sched = ConnectedScheduler(self)
        serving = await self._attach()  # the first attach must work: its error is the caller's
        self._serving = asyncio.ensure_future(self._serve(serving))
        return self.sched

    async def _attach(self) -> asyncio.Future[None]:
        """Connect, authenticate and attach: the endpoint's serving task."""
        what = f"the scheduler at {self.address}"
        try:
            comm = await open_comm(self.host, self.port, ssl=self.ssl, max_frame=self.max_frame,
                                   timeout=self.timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectError(f"cannot reach {what}: {exc or type(exc).__name__}. Is `aiodagger "
                               "scheduler --listen ...` running there, and the port open?") from exc
        try:
            await client_handshake(comm, self.token, {"role": "client"},
                                   timeout=min(self.timeout, HANDSHAKE_TIMEOUT))
        except AuthenticationError:
            comm.close()
            raise
        except (TimeoutError, ProtocolError, ConnectionError) as exc:
            comm.close()
            raise ConnectError(f"{self.address} did not answer as an aiodagger scheduler "
                               f"({type(exc).__name__}: {exc}); check the address and port") from None
        endpoint = P.Endpoint(comm, {P.TaskDone: self.sched.on_task_done, P.Heartbeat: _ignore})
        serving = asyncio.ensure_future(endpoint.serve())
        try:
            reply, _ = await endpoint.request(P.Attach(self.name, os.getpid(), socket.gethostname()),
                                              timeout=self.timeout)
        except (ConnectionError, TimeoutError, ProtocolError) as exc:
            serving.cancel()
            await endpoint.close()
            raise ConnectError(f"{self.address} is an aiodagger process that does not take clients "
                               f"(a worker's data port?): {exc or type(exc).__name__}") from None
        self.endpoint = endpoint
        self.worker_id = reply.worker_id
        self._backoff = 0.1
        logger.info("client %s attached to %s as client %d", self.name, self.address, self.worker_id)
        return serving

    async def _serve(self, serving: asyncio.Future[None]) -> None:
        """Serve the connection; when it ends, fail what waits on it and reconnect."""
        while True:
            heartbeat = asyncio.ensure_future(self._heartbeat())
            try:
                await serving
            except (ConnectionError, OSError, ProtocolError) as exc:
                logger.warning("client %s: connection to %s lost: %s", self.name, self.address, exc)
            finally:
                heartbeat.cancel()
                endpoint, self.endpoint, self.worker_id = self.endpoint, None, -1
                if endpoint is not None:
                    await endpoint.close()
                self.sched.connection_lost()
            if self._stopping:
                return
            while True:
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, 5.0)
                try:
                    serving = await self._attach()
                    break
                except (ConnectError, AuthenticationError) as exc:
                    logger.warning("client %s: reconnecting to %s: %s", self.name, self.address, exc)
            try:
                self.sched.put_again()
            except ConnectionError:
                continue

    async def _heartbeat(self) -> None:
        """A heartbeat every interval (the scheduler answers each); a scheduler silent
        past the timeout is given up on, and the connection aborted."""
        endpoint = self.endpoint
        assert endpoint is not None
        seen, heard = endpoint.bytes_received, self.loop.time()
        while True:
            with contextlib.suppress(ConnectionError):
                endpoint.send_nowait(P.Heartbeat({}))
            await asyncio.sleep(self.heartbeat_interval)
            now = self.loop.time()
            if endpoint.bytes_received != seen:
                seen, heard = endpoint.bytes_received, now
            elif now - heard > self.heartbeat_timeout:
                endpoint.comm.abort()
                return

    async def stop(self) -> None:
        self._stopping = True
        endpoint = self.endpoint
        if endpoint is not None:
            self.sched._flush()  # spawns batched before the close still reach it
            await endpoint.close()
        if self._serving is not None:
            self._serving.cancel()
            await asyncio.gather(self._serving, return_exceptions=True)
        for peer in list(self._peers.values()):
            await peer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- results held by workers ---------------------------------------------------------------
    async def fetch(self, key: int, holders: list[P.Holder]) -> Any:
        """The value of ``key`` from the first holder that gives it (through /dev/shm
        when the holder is on this machine)."""
        tried = []
        for holder in holders:
            try:
                peer = await self._peer(holder.address)
                reply, buffers = await peer.request(P.Get([key], P.shm_key()), timeout=self.heartbeat_timeout)
                if reply.shared:
                    try:
                        return await self.loop.run_in_executor(None, P.load_shared, reply.shared[0].path)
                    except (OSError, ValueError) as exc:  # another /dev/shm after all
                        logger.info("client %s: segment of %d not mapped (%s)", self.name, key, exc)
                        reply, buffers = await peer.request(P.Get([key]), timeout=self.heartbeat_timeout)
            except (ConnectionError, OSError, TimeoutError, ProtocolError) as exc:
                tried.append(f"worker {holder.worker} ({holder.address}): {exc or type(exc).__name__}")
                continue
            if reply.items:
                return P.loads(buffers[0], buffers[1:])
            if reply.oversized:
                raise FrameTooLargeError.of(f"the result of task id {key}, held by worker {holder.worker},",
                                            reply.oversized[0].size, peer.comm.limit)
            tried.append(f"worker {holder.worker} ({holder.address}): not held any more")
        raise WorkerLostError(f"the result of task id {key} could not be fetched: {'; '.join(tried) or 'no holder'}")

    async def _peer(self, address: str) -> P.Endpoint:
        endpoint = self._peers.get(address)
        if endpoint is not None and not endpoint.closed:
            return endpoint
        host, port = parse_address(address)
        comm = await open_comm(host, port, ssl=self.ssl, max_frame=self.max_frame, timeout=self.timeout)
        try:
            await client_handshake(comm, self.token, {"role": "peer", "client": self.worker_id},
                                   timeout=min(self.timeout, HANDSHAKE_TIMEOUT))
        except BaseException:
            comm.close()
            raise
        endpoint = P.Endpoint(comm)  # this end only asks
        self._peers[address] = endpoint
        task = asyncio.ensure_future(endpoint.serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return endpoint


def _ignore(msg: Any, buffers: list[Any]) -> None:
    pass


