"""The wire protocol: every op and every record, defined once. This docstring is its reference.

A message is one frame (:mod:`.framing`): a msgpack header and raw buffers. The header
is a map ``{"op": OP, "a": [field, ...]}``, plus ``"req": N`` on a request and
``"reply_to": N`` (with ``"op": "reply"``) on its reply. ``"a"`` holds the message's
fields in order, as a msgpack array: no field names travel. Records inside a message
(a task to run, a completion...) are arrays too. Each message and record below is a
``NamedTuple``; ``encode`` / ``decode`` are the only translation between them and
headers, and ``decode`` checks a whole message (field count, every type, buffer counts)
before any handler sees it: a malformed one is a :class:`ProtocolError`, which closes
that connection only.

Buffers: a record that carries data says how many buffers it takes (``nparts``); a
message's buffers are its records' parts, in record order.

Requests (``register``, ``get``, ``stats``, ``replicate``) carry an integer ``req`` and
are answered by exactly their reply type; every other message carries none. Either
rule broken is a ProtocolError.

=================  ====================  ==============================================
op                 direction             fields (records in CamelCase)
=================  ====================  ==============================================
``register``       worker -> scheduler   name, pid, host, threads, address,
                   (request)             memory_limit, holds, gpus, clock (its
                                         perf_counter as it sent this), resources
                                         (a map of name to amount); reply
                                         ``Registered(worker_id)``
``listen``         scheduler -> worker   on: send ``events`` (an observer is attached)
``events``         worker -> scheduler   runs [RunEvent(key, attempt, thread)], moves
                                         [MoveEvent(key, nbytes, source, start, stop)],
                                         stores [StoreEvent(key, nbytes, how, start,
                                         stop)]; times on the worker's clock
``heartbeat``      both ways             stats (a map; empty from the scheduler); a
                                         worker answers each of the scheduler's
``functions``      scheduler -> worker   defs [FunctionDef(hash)], one buffer each (the
                                         cloudpickled function), before their tasks
``values``         scheduler -> worker   defs [ValueDef(key, nparts)]: inputs that live
                                         in the scheduler's process, before their tasks
``run``            scheduler -> worker   tasks [RunTask]: key, name, fn_hash, kind,
                                         attempt, nparts, deps [Dep(key, holders
                                         [Holder(worker, address)])], callbacks, refs,
                                         inputs, files, waits, priority. Parts: the
                                         pickled (restore, checkpoint) pair if
                                         ``callbacks``, then the arguments' pickle and
                                         its buffers. ``waits``: inputs running here
                                         still; the task is held until they finish
``done``           worker -> scheduler   results [Finished]: key, attempt, status
                                         (ok | error | missing | cancelled | dropped),
                                         size, start, seconds, nparts, missing
                                         [Missing(key, holders)]; memory: Memory(used, spilled_bytes,
                                         spill_errors, running), current as of this batch
``run-plain``      scheduler -> worker   keys, fns, names, which, attempts, priorities:
                                         thread tasks without inputs whose arguments
                                         are small builtins, in columns (task i runs
                                         ``fns[which[i]]``, named ``names[which[i]]``);
                                         one part, the pickled list of their argument
                                         tuples
``done-values``    worker -> scheduler   keys, attempts, starts, seconds, memory: runs
                                         that ended with a small builtin value the
                                         worker did not keep, in columns; one part,
                                         the pickled list of the values
``holding``        worker -> scheduler   keys this worker fetched or was handed, and holds
``cancel``         scheduler -> worker   ids of tasks to cancel
``release``        scheduler -> worker   keys whose results nobody needs any more
``put``            scheduler -> worker   key; the value's pickle and buffers. Also
                   client -> scheduler   a connected client's ``put()``: the chunk
                                         (key: minus its id, in the client's range) is
                                         kept by the scheduler while the client lives
``get``            any -> worker         ids, shm; reply ``Items(items [Item(key,
                   (request)             nparts)], missing, later, oversized
                                         [Oversized(key, size)], shared [Shared(key,
                                         path, size)])``, the values' parts in item
                                         order; ``later``: held, but past one frame's
                                         limits (ask for them again); ``oversized``:
                                         held, but larger than a frame of this
                                         connection may be; ``shared``: in a segment
                                         of ``/dev/shm`` (only when ``shm``, the asker's
                                         machine key, is the holder's own)
``stats``          scheduler -> worker   reply ``StatsReply(stats)`` (a map)
                   (request)
``replicate``      scheduler -> worker   items [Dep]: fetch these from their holders;
                   (request)             reply ``Ack()``
``shutdown``       scheduler -> worker   (none): finish and exit
``spawn``          worker -> scheduler   tasks [SpawnTask(key, fn_hash, nparts, refs)]
                                         spawned by tasks on the worker; parts: the
                                         function, the options, the arguments
``task-done``      scheduler -> worker   key, status (finished | failed | cancelled),
                                         holders [Holder], reason: a spawned task ended;
                                         parts: its value or its error, if sent
``forget``         worker -> scheduler   ids of spawned tasks the worker dropped (and
                                         keys of chunks a client put and dropped)
``cancel-spawned`` worker -> scheduler   ids of spawned tasks to cancel
``stream-open``    worker -> scheduler   stream: a streaming task's producer started
                                         here; its credit is sent here from now on
``stream-credit``  scheduler -> worker   stream, limit: the producer may have produced
                                         ``limit`` values in all; -1: stop
``stream-items``   both ways             stream, first, nvalues, to: ``nvalues`` values of
                                         the stream from number ``first`` on, for the
                                         readers ``to`` (none from a producer); parts:
                                         the pickled list of values and its buffers
``stream-ack``     worker -> scheduler   stream, reader, consumed, done: a reader has
                                         taken ``consumed`` values (its first ack says
                                         where it reads); ``done``: it reads no more
``stream-end``     scheduler -> worker   stream, status (finished | error), to: the
                                         stream ended for readers ``to``; an error
                                         carries one part, the exception
``attach``         client -> scheduler   name, pid, host: a process connecting as a
                   (request)             client (``dagger.connect``), never given tasks
                                         to run; it sends ``spawn``, ``put``,
                                         ``forget``, ``cancel-spawned``, ``heartbeat``,
                                         ``publish`` and ``lookup``, and gets
                                         ``task-done``; reply ``Registered(client id)``
``publish``        client -> scheduler   name, key (0: unpublish): keep the task or
                   (request)             chunk ``key`` of this client under ``name``
                                         past the client's life; reply ``Answer(error)``
                                         ("" when done)
``lookup``         client -> scheduler   name; reply ``Found(key, names)``: the key of
                   (request)             what is published as ``name`` (0 if nothing,
                                         with the names that are), reported on from now
                                         on with ``task-done`` as if spawned by it
=================  ====================  ==============================================

Keys: a task's key is its id, a chunk's is minus its id. Tasks spawned on worker N
have ids above ``N * ID_SPACE`` and below ``(N + 1) * ID_SPACE``, each larger than the
one before; a client takes ids the same way, with the id ``attach`` gave it. A
``spawn`` that breaks this is a ProtocolError (two tasks with one id
would share every entry the scheduler keeps by id).

A batch of records for one peer (tasks placed in one loop iteration, completions of
one iteration) goes through :class:`Batch`, the one place where a batch is split into
frames that stay within the frame's limits; :class:`PlainRuns` and :class:`PlainValues`
make the column messages, at most PLAIN_RECORDS tasks and about PLAIN_BYTES of pickled
values each.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import reprlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from ..errors import ProtocolError
from ..memory.shared import host_key as shm_key
from ..memory.shared import load as load_shared
from ..task import ID_SPACE
from .framing import DEFAULT_MAX_FRAME, MAX_BUFFERS, Comm
from .serialize import (
    MAX_OUT_OF_BAND,
    PLAIN_TYPES,
    FunctionCache,
    dumps,
    dumps_args,
    dumps_error,
    dumps_plain,
    loads,
    loads_args,
    loads_error,
    small_size,
)

__all__ = [
    "Ack", "Answer", "Attach", "Batch", "Cancel", "CancelSpawned", "Dep", "Done", "DoneValues", "Endpoint", "Finished",
    "Blocked", "Forget", "Found", "FunctionDef", "Functions", "Get", "Heartbeat", "Holder", "Holding",
    "ID_SPACE", "Item", "Items", "Lookup", "Memory", "Missing", "Oversized", "Publish", "Put", "Register", "Registered",
    "Release", "Replicate",
    "PLAIN_RECORDS", "PLAIN_BYTES", "PlainRuns", "PlainValues", "plain_as_run", "Run", "RunPlain", "RunTask", "Shutdown", "Spawn", "SpawnTask", "Stats", "StatsReply", "StreamAck",
    "StreamCredit", "StreamEnd", "StreamItems", "StreamOpen", "TaskDone", "ValueDef", "Values", "decode", "decode_record", "encode", "message_types", "split_parts",
    # values that come through /dev/shm instead of a frame (memory/shared.py): what
    # names this machine's /dev/shm in a get, and reading a reply's shared segment
    "load_shared", "shm_key",
    # the one serializer (comm/serialize.py), for the payloads messages carry
    "BATCH_BYTES", "BATCH_RECORDS", "DEFAULT_MAX_FRAME", "MAX_BUFFERS", "MAX_OUT_OF_BAND", "PLAIN_TYPES", "ProtocolError",
    "Comm", "FunctionCache", "dumps", "dumps_args", "dumps_error", "dumps_plain", "loads", "loads_args",
    "loads_error", "small_size",
]

logger = logging.getLogger(__name__)

# Field types. A tuple of Python types is checked by exact type (msgpack gives exactly
# these; ``bool`` is not taken for ``int``); COUNT is an int >= 0; a list ``[X]`` is a
# list of X; a record class is decoded as that record.
INT = (int,)
OPT_INT = (int, type(None))
FLOAT = (float, int)
STR = (str,)
BYTES = (bytes,)
BOOL = (bool,)
MAP = (dict,)
COUNT = "count"
IDS = [INT]


# A frame past this many bytes of buffers is sealed before the next record is added:
# the receiver allocates and parses a frame at once, and a huge one delays every
# message queued behind it.
BATCH_BYTES = 64 << 20
# Records without buffers count too: this many keep a header (~50 bytes a record)
# far below the frame's header limit.
BATCH_RECORDS = 16384


def _decoder(cls: type, types: Sequence[Any]) -> Callable[[Any], Any]:
    """Compile the checker of one record or message: a list of fields -> the NamedTuple.

    Generated once per class as straight-line code: a done or run record is decoded
    for every task, and a loop over fields with a check function each costs ~3x more.
    """
    fields = cls._fields  # type: ignore[attr-defined]
    env: dict[str, Any] = {"_cls": cls, "_new": tuple.__new__, "_bad": _bad, "_list": list}
    lines = ["def decode(raw):",
             f"    if type(raw) is not _list or len(raw) != {len(fields)}:",
             "        _bad(_cls, None, raw)"]
    names = ", ".join(f"f{i}" for i in range(len(fields))) + ("," if len(fields) == 1 else "")
    if fields:
        lines.append(f"    {names} = raw")
    for i, (field, kind) in enumerate(zip(fields, types, strict=True)):
        lines += _check_lines(f"f{i}", repr(field), kind, env, f"t{i}", "    ")
    lines.append(f"    return _new(_cls, ({names}))" if fields else "    return _new(_cls, ())")
    exec("\n".join(lines), env)  # noqa: S102 - code built from the class's own field table
    return env["decode"]


def _check_lines(var: str, field: str, kind: Any, env: dict[str, Any], tag: str,
                 indent: str) -> list[str]:
    if kind == COUNT:
        return [f"{indent}if type({var}) is not int or {var} < 0:",
                f"{indent}    _bad(_cls, {field}, {var})"]
    if isinstance(kind, tuple):
        env[tag] = kind
        test = f"type({var}) is not {kind[0].__name__}" if len(kind) == 1 else f"type({var}) not in {tag}"
        if len(kind) == 1:
            env[kind[0].__name__] = kind[0]
        return [f"{indent}if {test}:", f"{indent}    _bad(_cls, {field}, {var})"]
    if isinstance(kind, list):
        (item,) = kind
        lines = [f"{indent}if type({var}) is not _list:", f"{indent}    _bad(_cls, {field}, {var})"]
        if isinstance(item, type) and hasattr(item, "_decode"):
            env[tag] = item  # its decoder looked up when called: it may not be compiled yet
            # most such lists are empty (a task's missing inputs): no comprehension then
            return lines + [f"{indent}if {var}:",
                            f"{indent}    {var} = [{tag}._decode(x) for x in {var}]"]
        lines.append(f"{indent}for x_{tag} in {var}:")
        return lines + _check_lines(f"x_{tag}", field, item, env, tag + "i", indent + "    ")
    if isinstance(kind, type) and hasattr(kind, "_decode"):
        env[tag] = kind
        return [f"{indent}{var} = {tag}._decode({var})"]
    raise TypeError(f"unknown field type {kind!r}")


def _bad(cls: type, field: str | None, value: Any) -> None:
    if field is None:
        raise ProtocolError(f"malformed {cls.__name__}: expected {len(cls._fields)} fields "  # type: ignore[attr-defined]
                            f"in a list, got {_brief(value)}")
    raise ProtocolError(f"malformed {cls.__name__}: field {field} is {_brief(value)}")


# Bounded in depth and length: a hostile value may nest as deep as msgpack allows (past
# the recursion limit of a plain repr) or be a header's worth of items.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = 60


def _brief(value: Any) -> str:
    return f"{type(value).__name__} {_REPR.repr(value)}"


def _lazy_decoder(cls: type, types: Sequence[Any]) -> Callable[[Any], Any]:
    """A decoder compiled on its first call: compiling every one at import cost a worker
    process 8 ms of its start (W0), and most processes use a few."""
    def decode(raw: Any) -> Any:
        compiled = _decoder(cls, types)
        cls._decode = staticmethod(compiled)  # type: ignore[attr-defined]
        return compiled(raw)
    return decode


def record(*types: Any) -> Callable[[type], type]:
    """Attach a decoder (``cls._decode(raw)``) to a NamedTuple record."""
    def attach(cls: type) -> type:
        cls._decode = staticmethod(_lazy_decoder(cls, types))  # type: ignore[attr-defined]
        return cls
    return attach


_MESSAGES: dict[str, type] = {}


def message(op: str, *types: Any, reply: type | None = None,
            buffers: Callable[[Any], int | None] | None = None) -> Callable[[type], type]:
    """Register a message class under ``op``.

    ``buffers(msg)`` says how many buffers the message must come with (None: at least
    one, the sender's choice); without it, none.
    """
    def attach(cls: type) -> type:
        if op in _MESSAGES:
            raise ValueError(f"op {op!r} is defined twice")
        cls.OP = op  # type: ignore[attr-defined]
        cls.REPLY = reply  # type: ignore[attr-defined]
        cls._decode = staticmethod(_lazy_decoder(cls, types))  # type: ignore[attr-defined]
        cls._nbuffers = staticmethod(buffers or (lambda msg: 0))  # type: ignore[attr-defined]
        _MESSAGES[op] = cls
        return cls
    return attach


def _sum_parts(records: Iterable[Any]) -> int:
    return sum(r.nparts for r in records)


# -- records ---------------------------------------------------------------------------
@record(INT, STR)
class Holder(NamedTuple):
    """A worker holding a chunk, and its data server's address."""
    worker: int
    address: str


@record(INT, [Holder])
class Dep(NamedTuple):
    """An input a worker must fetch: its key and who holds it."""
    key: int
    holders: list[Holder]


@record(BYTES)
class FunctionDef(NamedTuple):
    """A function sent once per worker, named by its content hash from then on (1 part)."""
    hash: bytes


@record(INT, COUNT)
class ValueDef(NamedTuple):
    """An input value that lives in the scheduler's process, sent along with its task."""
    key: int
    nparts: int


@record(INT, STR, BYTES, STR, INT, COUNT, [Dep], BOOL, BOOL, IDS, BOOL, IDS, INT)
class RunTask(NamedTuple):
    """One task for a worker to run; with ``waits``, one sent ahead of its inputs."""
    key: int
    name: str
    fn_hash: bytes
    kind: str          # "thread", "async", "thread-async"; "gpu", "gpu-async", with ":N" for device N
    attempt: int
    nparts: int        # (callbacks pickle if callbacks), arguments pickle, its buffers
    deps: list[Dep]    # inputs the worker lacks, with their holders
    callbacks: bool    # restore / checkpoint callbacks come first in the parts
    refs: bool         # the arguments hold task/chunk references to substitute
    inputs: list[int]  # every input key the task reads (to load and pin)
    files: bool = False  # the arguments hold dagger.Files, read by the worker as the task runs
    # Inputs still running (or held) on this worker: the task is held until each has
    # finished here, then starts; one that ends otherwise drops it ("dropped"). Each is
    # among ``inputs``.
    waits: list[int] = []
    priority: int = 0  # the task's priority: a chain of held tasks yields to a higher one


@record(INT, [INT])
class Missing(NamedTuple):
    """An input no holder could provide; ``holders``: those that said they lack it."""
    key: int
    holders: list[int]


FINISHED_STATUSES = frozenset(("ok", "value", "error", "missing", "cancelled", "dropped"))
_INF = float("inf")


@record(INT, INT, STR, COUNT, FLOAT, FLOAT, COUNT, [Missing])
class Finished(NamedTuple):
    """One run of a task ended on a worker."""
    key: int
    attempt: int
    status: str            # "ok" (1 + buffers parts if inline), "value" (1 part: a small
                           # value of a builtin type that the worker did not keep), "error"
                           # (1 part), "missing", "cancelled", "dropped": a held task that did
                           # not start, an input it waited for having ended here without a result
    size: int              # bytes of the result
    start: float           # perf_counter on the worker
    seconds: float
    nparts: int
    missing: list[Missing]  # status "missing" only


@record(COUNT, COUNT, COUNT, COUNT)
class Memory(NamedTuple):
    """A worker's memory counters, as ``cluster.workers`` shows them."""
    used: int
    spilled_bytes: int
    spill_errors: int
    running: int


@record(INT, COUNT)
class Item(NamedTuple):
    """A value in a ``get`` reply."""
    key: int
    nparts: int


@record(INT, STR, COUNT)
class Shared(NamedTuple):
    """A value in a ``get`` reply's place, in a shared segment on the asker's machine."""
    key: int
    path: str
    size: int


@record(INT, COUNT)
class Oversized(NamedTuple):
    """A value in a ``get`` reply's place that no frame of the connection could carry."""
    key: int
    size: int


@record(INT, BYTES, COUNT, BOOL)
class SpawnTask(NamedTuple):
    """A task spawned by a task on a worker: parts are function, options, arguments."""
    key: int
    fn_hash: bytes
    nparts: int
    refs: bool


# -- messages --------------------------------------------------------------------------
@message("registered", INT)
class Registered(NamedTuple):
    worker_id: int


@message("register", STR, INT, STR, INT, STR, OPT_INT, IDS, IDS, FLOAT, MAP, reply=Registered)
class Register(NamedTuple):
    name: str
    pid: int
    host: str
    threads: int
    address: str
    memory_limit: int | None
    # Keys a reconnecting worker still holds from before: the scheduler keeps those it
    # still needs (no recomputation) and releases the rest.
    holds: list[int] = []
    # The devices of its GPU processors (none without cupy or a CUDA device).
    gpus: list[int] = []
    # Its perf_counter() as it sent this: the scheduler's estimate of its clock's offset.
    clock: float = 0.0
    # Amounts of named resources it declares ({"db": 4}): tasks asking for them run here.
    resources: dict[str, float] = {}  # noqa: RUF012 - a NamedTuple default, never mutated


@message("listen", BOOL)
class Listen(NamedTuple):
    """Whether to send ``events``: an observer of the scheduler's events is attached."""
    on: bool


@record(INT, INT, STR)
class RunEvent(NamedTuple):
    """The thread a run of task ``key`` used."""
    key: int
    attempt: int
    thread: str


@record(INT, COUNT, INT, FLOAT, FLOAT)
class MoveEvent(NamedTuple):
    """Value ``key`` came here from worker ``source``."""
    key: int
    nbytes: int
    source: int
    start: float
    stop: float


STORE_HOWS = frozenset(("spilled", "loaded", "sent"))


@record(INT, COUNT, STR, FLOAT, FLOAT)
class StoreEvent(NamedTuple):
    """The store moved chunk ``key``: ``how`` is "spilled", "loaded" or "sent" (from its file)."""
    key: int
    nbytes: int
    how: str
    start: float
    stop: float


@message("events", [RunEvent], [MoveEvent], [StoreEvent])
class Events(NamedTuple):
    runs: list[RunEvent]
    moves: list[MoveEvent]
    stores: list[StoreEvent]


@message("heartbeat", MAP)
class Heartbeat(NamedTuple):
    stats: dict[str, Any]


@message("blocked", INT)
class Blocked(NamedTuple):
    """How many of the worker's threads now wait in ``fetch()`` inside a task. Each hands
    its slot back: the scheduler may send that many more tasks, else a graph whose tasks
    wait on tasks they spawned deadlocks once every slot waits."""
    threads: int


@message("functions", [FunctionDef], buffers=lambda m: len(m.defs))
class Functions(NamedTuple):
    defs: list[FunctionDef]


@message("values", [ValueDef], buffers=lambda m: _sum_parts(m.defs))
class Values(NamedTuple):
    defs: list[ValueDef]


@message("run", [RunTask], buffers=lambda m: _sum_parts(m.tasks))
class Run(NamedTuple):
    tasks: list[RunTask]


@message("done", [Finished], Memory, buffers=lambda m: _sum_parts(m.results))
class Done(NamedTuple):
    results: list[Finished]
    memory: Memory


@message("run-plain", IDS, [BYTES], [STR], [COUNT], [COUNT], IDS, buffers=lambda m: 1)
class RunPlain(NamedTuple):
    """Thread tasks without inputs whose arguments are small builtins
    (serialize.small_size), in columns: W4's tiny tasks without a record, a pickle and
    a buffer each. One buffer: the pickled list of the tasks' argument tuples, in order."""
    keys: list[int]
    fns: list[bytes]       # function hashes, one per (function, name) pair of the batch
    names: list[str]       # the tasks' names, aligned with fns
    which: list[int]       # for each task, its entry in fns and names
    attempts: list[int]
    priorities: list[int]


@message("done-values", IDS, [COUNT], [FLOAT], [FLOAT], Memory, buffers=lambda m: 1)
class DoneValues(NamedTuple):
    """Runs that ended with a small builtin value (serialize.small_size) that the worker
    did not keep, in columns; as a Finished of status "value" each. One buffer: the
    pickled list of the values, in order."""
    keys: list[int]
    attempts: list[int]
    starts: list[float]    # perf_counter on the worker
    seconds: list[float]
    memory: Memory


@message("holding", IDS)
class Holding(NamedTuple):
    keys: list[int]


@message("cancel", IDS)
class Cancel(NamedTuple):
    ids: list[int]


@message("release", IDS)
class Release(NamedTuple):
    keys: list[int]


@message("put", INT, buffers=lambda m: None)
class Put(NamedTuple):
    key: int


@message("items", [Item], IDS, IDS, [Oversized], [Shared], buffers=lambda m: _sum_parts(m.items))
class Items(NamedTuple):
    items: list[Item]
    missing: list[int]
    later: list[int]  # held, but past what one frame carries: ask again
    oversized: list[Oversized]  # held, but larger than any frame of this connection
    shared: list[Shared]  # in shared segments (only for a get with the holder's shm key)


@message("get", IDS, STR, reply=Items)
class Get(NamedTuple):
    keys: list[int]
    shm: str = ""  # the asker's memory.shared.host_key(): same machine, segments welcome


@message("stats-reply", MAP)
class StatsReply(NamedTuple):
    stats: dict[str, Any]


@message("stats", reply=StatsReply)
class Stats(NamedTuple):
    pass


@message("ack")
class Ack(NamedTuple):
    pass


@message("replicate", [Dep], reply=Ack)
class Replicate(NamedTuple):
    items: list[Dep]


@message("shutdown")
class Shutdown(NamedTuple):
    pass


@message("spawn", [SpawnTask], buffers=lambda m: _sum_parts(m.tasks))
class Spawn(NamedTuple):
    tasks: list[SpawnTask]


TASK_DONE_STATUSES = frozenset(("finished", "failed", "cancelled"))


@message("task-done", INT, STR, [Holder], STR,
         buffers=lambda m: 1 if m.status == "failed" else 0 if m.status == "cancelled" or m.holders
         else None)
class TaskDone(NamedTuple):
    key: int
    status: str              # "finished": parts are the value, or none and holders say where
    holders: list[Holder]    # "failed": one part, the error; "cancelled": none
    reason: str


@message("forget", IDS)
class Forget(NamedTuple):
    ids: list[int]


@message("cancel-spawned", IDS)
class CancelSpawned(NamedTuple):
    ids: list[int]


# -- clients (dagger.connect): processes that spawn on a shared cluster ------------------
@message("attach", STR, INT, STR, reply=Registered)
class Attach(NamedTuple):
    name: str
    pid: int
    host: str


@message("answer", STR)
class Answer(NamedTuple):
    error: str  # "" when the request was done


@message("publish", STR, INT, reply=Answer)
class Publish(NamedTuple):
    name: str
    key: int  # 0: unpublish ``name``


@message("found", INT, [STR])
class Found(NamedTuple):
    key: int  # 0: nothing is published under that name
    names: list[str]  # the published names, when nothing was found


@message("lookup", STR, reply=Found)
class Lookup(NamedTuple):
    name: str


# -- streams (aiodagger/streaming.py): values of a streaming task, batched, with credit --
@message("stream-open", INT)
class StreamOpen(NamedTuple):
    stream: int


@message("stream-credit", INT, INT)
class StreamCredit(NamedTuple):
    stream: int
    limit: int  # values the producer may have produced in all; -1: stop now


@message("stream-items", INT, COUNT, COUNT, IDS, buffers=lambda m: None)
class StreamItems(NamedTuple):
    stream: int
    first: int       # the number of the first value in the stream
    nvalues: int
    to: list[int]    # the readers they are for; none from a producer


@message("stream-ack", INT, INT, COUNT, BOOL)
class StreamAck(NamedTuple):
    stream: int
    reader: int
    consumed: int    # values the reader has taken so far
    done: bool       # it reads no more (finished, closed, or dropped)


STREAM_END_STATUSES = frozenset(("finished", "error"))


@message("stream-end", INT, STR, IDS, buffers=lambda m: 1 if m.status == "error" else 0)
class StreamEnd(NamedTuple):
    stream: int
    status: str      # "finished"; "error": one part, the exception (a cancellation too)
    to: list[int]


def message_types() -> dict[str, type]:
    """Every message class, by op."""
    return dict(_MESSAGES)


# -- translation -----------------------------------------------------------------------
def encode(msg: Any) -> dict[str, Any]:
    """The frame header of a message."""
    return {"op": msg.OP, "a": msg}


def decode(header: Mapping[str, Any], nbuffers: int, cls: type | None = None) -> Any:
    """The message in a frame header, checked whole; ``cls``: the type expected (a reply).

    Raises ProtocolError for an unknown op, a malformed message, or buffers that do not
    match what its records announce.
    """
    op = header.get("op")
    if cls is None:
        if type(op) is not str:
            raise ProtocolError(f"a message's op must be a string, got {_brief(op)}")
        cls = _MESSAGES.get(op)
        if cls is None:
            raise ProtocolError(f"unknown op {op!r}")
    msg = cls._decode(header.get("a", ()))  # type: ignore[attr-defined]
    _check_values(msg)
    expected = cls._nbuffers(msg)  # type: ignore[attr-defined]
    if expected is None:
        if nbuffers < 1:
            raise ProtocolError(f"{op} came without the buffers it carries")
    elif expected != nbuffers:
        raise ProtocolError(f"{op} announces {expected} buffer(s) and came with {nbuffers}")
    return msg


def _check_values(msg: Any) -> None:
    """Checks beyond types: statuses that exist, parts that make a whole record."""
    if type(msg) is Done:
        for r in msg.results:
            if r.status not in FINISHED_STATUSES:
                raise ProtocolError(f"malformed Finished: unknown status {r.status!r}")
            # A run's times train the estimates every later placement is priced with:
            # one NaN, infinity or negative duration would stay in them for good.
            if not (0.0 <= r.seconds < _INF and -_INF < r.start < _INF):
                raise ProtocolError(f"malformed Finished: a run that started at {r.start!r} and "
                                    f"took {r.seconds!r} s (times are finite, durations >= 0)")
            if (r.status in ("error", "value") and r.nparts != 1) or (
                    r.status in ("missing", "cancelled", "dropped") and r.nparts):
                raise ProtocolError(f"malformed Finished: status {r.status!r} with {r.nparts} part(s)")
    elif type(msg) is Run:
        for t in msg.tasks:
            if t.nparts < 1 + t.callbacks:
                raise ProtocolError(f"malformed RunTask: {t.nparts} part(s) cannot hold its arguments")
            if t.waits and (t.key in t.waits or not set(t.waits) <= set(t.inputs)):
                raise ProtocolError(f"malformed RunTask: task {t.key} waits for {t.waits!r}, which are "
                                    f"not all among its inputs {t.inputs!r} (or include itself)")
    elif type(msg) is RunPlain:
        n = len(msg.keys)
        groups = len(msg.fns)
        if len(msg.which) != n or len(msg.attempts) != n or len(msg.priorities) != n or \
                len(msg.names) != groups:
            raise ProtocolError(f"malformed RunPlain: columns of unequal lengths ({n} keys)")
        if any(i >= groups for i in msg.which):
            raise ProtocolError(f"malformed RunPlain: a task names a function past the {groups} sent")
    elif type(msg) is DoneValues:
        n = len(msg.keys)
        if len(msg.attempts) != n or len(msg.starts) != n or len(msg.seconds) != n:
            raise ProtocolError(f"malformed DoneValues: columns of unequal lengths ({n} keys)")
        for start, seconds in zip(msg.starts, msg.seconds, strict=True):
            if not (0.0 <= seconds < _INF and -_INF < start < _INF):
                raise ProtocolError(f"malformed DoneValues: a run that started at {start!r} and "
                                    f"took {seconds!r} s (times are finite, durations >= 0)")
    elif type(msg) is Spawn:
        for s in msg.tasks:
            if s.nparts < 3:
                raise ProtocolError(f"malformed SpawnTask: {s.nparts} part(s), at least 3 needed")
    elif type(msg) is Values or type(msg) is Items:
        values: list[Any] = msg.defs if type(msg) is Values else msg.items  # type: ignore[union-attr]
        for v in values:
            if v.nparts < 1:
                raise ProtocolError(f"malformed {type(v).__name__}: a value takes at least one part")
    elif type(msg) is TaskDone and msg.status not in TASK_DONE_STATUSES:
        raise ProtocolError(f"malformed TaskDone: unknown status {msg.status!r}")
    elif type(msg) is StreamItems and msg.nvalues < 1:
        raise ProtocolError("malformed StreamItems: no values")
    elif type(msg) is StreamEnd and msg.status not in STREAM_END_STATUSES:
        raise ProtocolError(f"malformed StreamEnd: unknown status {msg.status!r}")
    elif type(msg) is StreamCredit and msg.limit < -1:
        raise ProtocolError(f"malformed StreamCredit: limit {msg.limit}")
    elif type(msg) is Blocked and msg.threads < 0:
        raise ProtocolError(f"malformed Blocked: {msg.threads} threads")
    elif type(msg) is Register and msg.threads < 1:
        raise ProtocolError(f"malformed Register: a worker needs threads >= 1, got {msg.threads}")
    elif type(msg) is Register and not -_INF < msg.clock < _INF:
        raise ProtocolError(f"malformed Register: clock {msg.clock!r} (times are finite)")
    elif type(msg) is Events:
        # Observers draw these: a NaN or an inverted span would draw nonsense for good.
        spans: list[MoveEvent | StoreEvent] = [*msg.moves, *msg.stores]
        for span in spans:
            if not -_INF < span.start <= span.stop < _INF:
                raise ProtocolError(f"malformed {type(span).__name__}: from {span.start!r} to {span.stop!r}")
        for stored in msg.stores:
            if stored.how not in STORE_HOWS:
                raise ProtocolError(f"malformed StoreEvent: unknown kind {stored.how!r}")


def decode_record(cls: type, raw: Any) -> Any:
    """``raw``, a list of fields, as the record ``cls``, checked as in a message (a
    ProtocolError if malformed): for records that travel inside a map, such as the
    memory counters in a heartbeat's stats."""
    return cls._decode(raw)  # type: ignore[attr-defined]


def split_parts(records: Iterable[Any], buffers: Sequence[Any]) -> Iterable[tuple[Any, Sequence[Any]]]:
    """Each record with its own buffers (the message was checked: they add up)."""
    index = 0
    for rec in records:
        n = rec.nparts
        yield rec, buffers[index:index + n]
        index += n


class Batch:
    """Records for one peer, gathered over a loop iteration and sent as few frames.

    ``add`` appends a record and its buffers; ``take`` hands back the messages to send,
    in order: a new frame is started whenever the next record would take the current
    one past the frame's buffer limit, past ``max_bytes`` (``BATCH_BYTES``, or less on
    a connection that takes smaller frames), or past ``BATCH_RECORDS`` records. A
    record is never split: one larger than a frame may be is refused before it is added.
    """

    __slots__ = ("_build", "_max_bytes", "_frames", "_records", "_buffers", "_bytes")

    def __init__(self, build: Callable[[list[Any]], Any], max_bytes: int = BATCH_BYTES) -> None:
        self._build = build
        self._max_bytes = min(max_bytes, BATCH_BYTES)
        self._frames: list[tuple[list[Any], list[Any]]] = []
        self._records: list[Any] = []
        self._buffers: list[Any] = []
        self._bytes = 0

    def __bool__(self) -> bool:
        return bool(self._records or self._frames)

    def add(self, rec: Any, parts: Sequence[Any] = ()) -> None:
        # Once per task on both sides of the wire (W4): no generator, one test per limit.
        records = self._records
        if parts:
            nparts = len(parts)
            if nparts > MAX_BUFFERS:
                raise ValueError(f"one record with {nparts} buffers cannot fit in a frame "
                                 f"(at most {MAX_BUFFERS})")
            size = 0
            for part in parts:
                size += part.nbytes if type(part) is memoryview else len(part)
            if records and (len(self._buffers) + nparts > MAX_BUFFERS or len(records) >= BATCH_RECORDS
                            or self._bytes + size > self._max_bytes):
                self._seal()
                records = self._records
            self._buffers.extend(parts)
            self._bytes += size
        elif len(records) >= BATCH_RECORDS:
            self._seal()
            records = self._records
        records.append(rec)

    def _seal(self) -> None:
        self._frames.append((self._records, self._buffers))
        self._records, self._buffers, self._bytes = [], [], 0

    def take(self) -> list[tuple[Any, list[Any]]]:
        """The messages gathered so far, with their buffers; the batch is empty after."""
        if self._records:
            self._seal()
        frames, self._frames = self._frames, []
        return [(self._build(records), buffers) for records, buffers in frames]


# A RunPlain or DoneValues message takes at most this many tasks and about this many
# bytes of pickled arguments or values (serialize.small_size): well inside the smallest
# frame a connection may take (MIN_MAX_FRAME, 1 MiB), header included.
PLAIN_RECORDS = 4096
PLAIN_BYTES = 256 << 10


class PlainRuns:
    """RunPlain messages in the making, for one worker: ``add`` a task, ``take`` the
    messages with their buffer (the arguments are pickled then, all in one call)."""

    __slots__ = ("_args", "_attempts", "_bytes", "_fns", "_groups", "_keys", "_last", "_names",
                 "_priorities", "_sealed", "_which")

    def __init__(self) -> None:
        self._sealed: list[tuple[Any, list[Any]]] = []
        self._reset()

    def _reset(self) -> None:
        self._groups: dict[tuple[bytes, str], int] = {}
        self._fns: list[bytes] = []
        self._names: list[str] = []
        self._keys: list[int] = []
        self._which: list[int] = []
        self._attempts: list[int] = []
        self._priorities: list[int] = []
        self._args: list[tuple[Any, ...]] = []
        self._bytes = 0
        self._last = -1  # the group of the task added last: most bursts run one function

    def __bool__(self) -> bool:
        return bool(self._keys or self._sealed)

    def add(self, key: int, fn_hash: bytes, name: str, attempt: int, priority: int,
            args: tuple[Any, ...], size: int) -> None:
        if self._keys and (len(self._keys) >= PLAIN_RECORDS or self._bytes + size > PLAIN_BYTES):
            self._seal()
        group = self._last
        if group < 0 or self._fns[group] is not fn_hash or self._names[group] is not name:
            group = self._groups.get((fn_hash, name), -1)
            if group < 0:
                group = self._groups[fn_hash, name] = len(self._fns)
                self._fns.append(fn_hash)
                self._names.append(name)
            self._last = group
        self._keys.append(key)
        self._which.append(group)
        self._attempts.append(attempt)
        self._priorities.append(priority)
        self._args.append(args)
        self._bytes += size

    def _seal(self) -> None:
        self._sealed.append((RunPlain(self._keys, self._fns, self._names, self._which,
                                      self._attempts, self._priorities), [dumps_plain(self._args)]))
        self._reset()

    def take(self) -> list[tuple[Any, list[Any]]]:
        if self._keys:
            self._seal()
        sealed, self._sealed = self._sealed, []
        return sealed


def plain_as_run(msg: RunPlain, buffers: Sequence[Any]) -> tuple[Run, list[Any]]:
    """A RunPlain as the Run it stands for, with that Run's buffers (one per task)."""
    records, parts = [], []
    for key, which, attempt, priority, args in zip(msg.keys, msg.which, msg.attempts, msg.priorities,
                                                   loads(buffers[0]), strict=True):
        records.append(RunTask(key, msg.names[which], msg.fns[which], "thread", attempt, 1, [],
                               False, False, [], False, [], priority))
        parts.append(dumps_plain((args, {})))
    return Run(records), parts


class PlainValues:
    """DoneValues messages in the making, for a worker's scheduler: ``add`` a run's end,
    ``take`` the messages (the values pickled then, in one call)."""

    __slots__ = ("_attempts", "_bytes", "_keys", "_sealed", "_seconds", "_starts", "_values")

    def __init__(self) -> None:
        self._sealed: list[tuple[list[int], list[int], list[float], list[float], list[Any]]] = []
        self._reset()

    def _reset(self) -> None:
        self._keys: list[int] = []
        self._attempts: list[int] = []
        self._starts: list[float] = []
        self._seconds: list[float] = []
        self._values: list[Any] = []
        self._bytes = 0

    def __bool__(self) -> bool:
        return bool(self._keys or self._sealed)

    def add(self, key: int, attempt: int, start: float, seconds: float, value: Any, size: int) -> None:
        if self._keys and (len(self._keys) >= PLAIN_RECORDS or self._bytes + size > PLAIN_BYTES):
            self._seal()
        self._keys.append(key)
        self._attempts.append(attempt)
        self._starts.append(start)
        self._seconds.append(seconds)
        self._values.append(value)
        self._bytes += size

    def _seal(self) -> None:
        self._sealed.append((self._keys, self._attempts, self._starts, self._seconds, self._values))
        self._reset()

    def take(self, memory: Memory) -> list[tuple[Any, list[Any]]]:
        """The messages so far, each with ``memory``, the worker's counters now."""
        if self._keys:
            self._seal()
        sealed, self._sealed = self._sealed, []
        return [(DoneValues(keys, attempts, starts, seconds, memory), [dumps_plain(values)])
                for keys, attempts, starts, seconds, values in sealed]


# -- a connection that speaks the protocol ---------------------------------------------
Handler = Callable[[Any, list[Any]], Any]


class Endpoint:
    """One connection, speaking in messages: sends, requests with replies, a handler table.

    Each incoming message goes to ``handlers[type(msg)]``, in order. A type missing from
    the table is a ProtocolError that ends this connection only (the table may change
    with the connection's state: a worker must register before anything else). For a
    request the handler's result (or its awaited result) is the reply: ``(message,
    buffers)``. A handler that returns an awaitable for a one-way message runs as a task,
    so a slow one (a big chunk being sent) never holds up the messages after it.
    """

    def __init__(self, comm: Comm, handlers: Mapping[type, Handler] | None = None) -> None:
        self.comm = comm
        self.handlers: Mapping[type, Handler] = handlers or {}
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Any], type]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_seen = 0.0  # loop time of the last message received (set by serve)

    @property
    def peer(self) -> str:
        return self.comm.peer

    @property
    def closed(self) -> bool:
        return self.comm.closed

    @property
    def bytes_received(self) -> int:
        return self.comm.parser.bytes_received

    async def serve(self) -> None:
        """Read messages until the connection ends (then raise what ended it)."""
        comm = self.comm
        loop = asyncio.get_running_loop()
        self.last_seen = loop.time()
        try:
            while True:
                # Handled in a call of its own: a local here would keep the message's
                # buffers (a 256 MiB value, say) alive until the next message came.
                self._handle(*await comm.recv())
                self.last_seen = loop.time()
        finally:
            err = ConnectionResetError(f"connection to {comm.peer} lost")
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()

    def _handle(self, header: dict[str, Any], buffers: list[Any]) -> None:
        reply_to = header.get("reply_to")
        if reply_to is not None:
            self._settle(reply_to, header, buffers)
            return
        msg = decode(header, len(buffers))
        req = header.get("req")
        if (req is None) != (msg.REPLY is None) or (req is not None and type(req) is not int):
            raise ProtocolError(f"{self.peer} sent {msg.OP!r} with req {_brief(req)}: "
                                f"{'a request needs' if msg.REPLY else 'a one-way message takes no'} "
                                "request id")
        handler = self.handlers.get(type(msg))
        if handler is None:
            raise ProtocolError(f"{self.peer} sent {msg.OP!r}, which is not taken here now")
        result = handler(msg, buffers)
        if req is not None:
            self._spawn(self._answer(req, result))
        elif result is not None:
            self._spawn(result)

    def _settle(self, reply_to: Any, header: Mapping[str, Any], buffers: list[Any]) -> None:
        if type(reply_to) is not int:
            raise ProtocolError(f"{self.peer} sent a reply to {_brief(reply_to)}, not a request id")
        entry = self._pending.pop(reply_to, None)
        if entry is None:
            return
        fut, cls = entry
        if fut.done():
            return
        try:
            fut.set_result((decode(header, len(buffers), cls), buffers))
        except ProtocolError as exc:
            fut.set_exception(exc)
            raise

    async def _answer(self, req: int, result: Any) -> None:
        if isinstance(result, Awaitable):
            result = await result
        reply, buffers = result
        await self.comm.send({"op": "reply", "reply_to": req, "a": reply}, buffers)

    def _spawn(self, aw: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, ConnectionError):
                logger.info("handler on %s: %s", self.peer, exc)
            else:
                logger.error("handler on %s failed", self.peer, exc_info=exc)

    def send_nowait(self, msg: Any, buffers: Sequence[Any] = ()) -> None:
        """Queue a message without waiting for the transport (small messages)."""
        self.comm.send_nowait({"op": msg.OP, "a": msg}, buffers)

    async def send(self, msg: Any, buffers: Sequence[Any] = ()) -> None:
        """Send a message; large buffers go out as the transport drains."""
        await self.comm.send({"op": msg.OP, "a": msg}, buffers)

    async def request(self, msg: Any, buffers: Sequence[Any] = (),
                      timeout: float | None = None) -> tuple[Any, list[Any]]:
        """Send a request and wait for its reply: ``(reply message, buffers)``."""
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, msg.REPLY)
        try:
            await self.comm.send({"op": msg.OP, "a": msg, "req": rid}, buffers)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def close(self) -> None:
        self.comm.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
