"""Tasks spawned from other processes: by tasks running in worker processes, and by
connected clients (``dagger.connect``), which spawn, put, publish and look up.

Each such process is a *spawner* (a RemoteWorker, or a :class:`ClientConn`): what it
spawned or put is kept in its own ``spawned`` table, by the key it gave, for as long as
it holds the handle (it sends ``forget``) or is connected; what it published is kept
by name here, whoever spawned it, until unpublished.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

import cloudpickle

from ..comm import protocol as P
from ..errors import FrameTooLargeError, WorkerLostError
from ..task import FINISHED, REMOTE, Chunk, DTask

if TYPE_CHECKING:
    from .registry import WorkerRegistry

__all__ = ["ClientConn", "Spawned"]

logger = logging.getLogger(__name__)


class ClientConn:
    """The scheduler's view of one connected client: never given tasks to run."""

    def __init__(self, cid: int, endpoint: P.Endpoint, info: P.Attach, reach_host: str | None) -> None:
        self.id = cid
        self.endpoint = endpoint
        self.name = info.name
        self.pid = info.pid
        self.host = info.host
        self.reach_host = reach_host  # as for a worker: how it reaches our loopback's workers
        self.max_frame = endpoint.comm.limit
        self.last_spawned = cid * P.ID_SPACE  # ids of what it spawns lie above this
        self.spawned: dict[int, Any] = {}
        self.last_seen = 0.0
        self.bytes_seen = 0

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid} on {self.host})"


class Spawned:
    """Spawn, put, forget, cancel, publish and lookup from other processes (on the loop)."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self.registry = registry
        self.sched = registry.sched
        self._fns: dict[bytes, Any] = {}
        # What clients published, by name: kept (and so its result) until unpublished.
        self.published: dict[str, DTask[Any] | Chunk[Any]] = {}

    def handlers(self, spawner: Any) -> dict[type, Any]:
        """What a worker or a client may send about what it spawned."""
        handlers: dict[type, Any] = {
            P.Spawn: functools.partial(self.on_spawn, spawner),
            P.Forget: functools.partial(self.on_forget, spawner),
            P.CancelSpawned: functools.partial(self.on_cancel, spawner),
            P.Put: functools.partial(self.on_put, spawner),
        }
        if isinstance(spawner, ClientConn):
            handlers[P.Publish] = functools.partial(self.on_publish, spawner)
            handlers[P.Lookup] = functools.partial(self.on_lookup, spawner)
        return handlers

    # -- spawning --------------------------------------------------------------------------
    def on_spawn(self, spawner: Any, msg: P.Spawn, buffers: list[Any]) -> None:
        self._check_ids(spawner, [rec.key for rec in msg.tasks])
        resolve = functools.partial(self._resolve, spawner)
        for rec, parts in P.split_parts(msg.tasks, buffers):
            try:
                fn = self._fns.get(rec.fn_hash)
                if fn is None:
                    fn = self._fns[rec.fn_hash] = cloudpickle.loads(parts[0])
                opts = cloudpickle.loads(parts[1])
                if opts.after:  # keys of tasks spawned there, as the spawner sent them
                    opts = opts.merged({"after": tuple(resolve(k) for k in opts.after)})
                args, kwargs = P.loads_args(parts[2], parts[3:], resolve if rec.refs else None)
                task = self.sched.spawn(opts, fn, args, kwargs, key=rec.key)
            except Exception as exc:  # noqa: BLE001 - reported to the task's handle
                exc.add_note("aiodagger: a task spawned in another process could not be "
                             "loaded by the scheduler (can its process import the function "
                             "and the arguments' classes?)")
                self._send(spawner, P.TaskDone(rec.key, "failed", [], ""), [P.dumps_error(exc)])
                continue
            spawner.spawned[rec.key] = task
            task._on_done(functools.partial(self.report, spawner))

    @staticmethod
    def _check_ids(spawner: Any, keys: list[int]) -> None:
        """Each id new and in the spawner's own range, or the whole message is refused:
        a task sharing its id with another would share its entries in ``running``, in
        the references kept by key, and wedge the ready heap that orders by id."""
        last = spawner.last_spawned
        end = (spawner.id + 1) * P.ID_SPACE
        for key in keys:
            if not last < key < end:
                raise P.ProtocolError(
                    f"process {spawner.id} sent a task or chunk id {key}: its ids lie below "
                    f"{end}, each larger than the one before ({last})")
            last = key
        spawner.last_spawned = last

    @staticmethod
    def _resolve(spawner: Any, key: int) -> Any:
        obj = spawner.spawned.get(key)
        if obj is None:
            raise LookupError(f"task or chunk {key} is not known here (any more)")
        return obj

    def on_forget(self, spawner: Any, msg: P.Forget, buffers: list[Any]) -> None:
        for key in msg.ids:
            spawner.spawned.pop(key, None)

    def on_cancel(self, spawner: Any, msg: P.CancelSpawned, buffers: list[Any]) -> None:
        for key in msg.ids:
            obj = spawner.spawned.get(key)
            if type(obj) is DTask:
                self.sched.cancel(obj)

    # -- clients: put, publish, lookup -------------------------------------------------------
    def on_put(self, client: Any, msg: P.Put, buffers: list[Any]) -> None:
        """``put()`` in a client or a worker's task: the chunk lives in this process while
        that process holds it (or it is published), and goes to workers as any chunk put
        here does."""
        if msg.key >= 0:
            raise P.ProtocolError(f"put from a client takes a chunk's key (below 0), got {msg.key}")
        self._check_ids(client, [-msg.key])
        local = self.sched.local
        assert local is not None
        value = P.loads(buffers[0], buffers[1:])
        client.spawned[msg.key] = Chunk(value, local.id, -msg.key, self.sched)

    def on_publish(self, client: ClientConn, msg: P.Publish, buffers: list[Any]) -> tuple[P.Answer, list[Any]]:
        if msg.key == 0:
            if self.published.pop(msg.name, None) is None:
                return P.Answer(f"nothing is published as {msg.name!r}"), []
            return P.Answer(""), []
        obj = client.spawned.get(msg.key)
        if obj is None:
            return P.Answer(f"task or chunk {msg.key} is not known to the scheduler (any more)"), []
        if msg.name in self.published and self.published[msg.name] is not obj:
            return P.Answer(f"{msg.name!r} is already published: unpublish it first"), []
        self.published[msg.name] = obj
        return P.Answer(""), []

    def on_lookup(self, client: ClientConn, msg: P.Lookup, buffers: list[Any]) -> tuple[P.Found, list[Any]]:
        obj = self.published.get(msg.name)
        if obj is None:
            return P.Found(0, sorted(self.published)), []
        key = obj.id if type(obj) is DTask else -obj.id
        client.spawned[key] = obj
        if type(obj) is DTask:
            obj._on_done(functools.partial(self.report, client))
        else:  # a chunk has its value already: reported once the reply is on its way
            asyncio.get_running_loop().call_soon(self.report, client, obj)
        return P.Found(key, []), []

    # -- reporting ---------------------------------------------------------------------------
    def report(self, spawner: Any, obj: Any) -> None:
        """Tell ``spawner`` how a task it spawned (or looked up) ended: its value inline
        when it lives here, else where to fetch it from."""
        if not self.registry.connected(spawner):
            return
        buffers: list[Any] = []
        holders: list[P.Holder] = []
        is_chunk = type(obj) is Chunk
        key = -obj.id if is_chunk else obj.id
        if not is_chunk and obj._cancelled:
            status = "cancelled"
        elif is_chunk or (obj._state == FINISHED and (obj._value is not REMOTE
                                                      or self.registry._holders(obj, spawner))):
            status = "finished"
            if obj._value is REMOTE:
                holders = self.registry._holders(obj, spawner)
            else:
                payload, parts = P.dumps(obj._value)
                buffers = [payload, *parts]
                size = len(payload) + sum(p.nbytes for p in parts)
                if size > spawner.max_frame:
                    status, buffers = "failed", [P.dumps_error(FrameTooLargeError.of(
                        f"the value of {key}, held by the scheduler,", size, spawner.max_frame))]
        else:
            status = "failed"
            exc = obj._exc
            if exc is None:  # finished, but every copy of its value is gone
                exc = WorkerLostError(f"the result of {obj._describe()} was lost with its worker")
            buffers = [P.dumps_error(exc)]
        self._send(spawner, P.TaskDone(key, status, holders, ""), buffers)

    @staticmethod
    def _send(spawner: Any, msg: Any, buffers: list[Any]) -> None:
        async def send() -> None:
            try:
                await spawner.endpoint.send(msg, buffers)
            except ConnectionError:
                pass

        asyncio.ensure_future(send())
