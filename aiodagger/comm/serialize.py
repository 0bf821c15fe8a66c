"""The one serializer: values, task arguments, errors and functions as bytes.

Everything that crosses a process boundary or goes to a spill file is pickled here.

* Values are (pickle bytes, out-of-band buffers), pickle protocol 5: a numpy array's
  data (any contiguous buffer that supports out-of-band pickling) comes back as a
  separate buffer instead of being copied into the pickle, so the wire and the spill
  files write it as it is. The stdlib C pickler is tried first (a tiny result costs
  ~1 µs), cloudpickle takes over for what it cannot do (lambdas, notebook classes).
* Arguments are pickled once per task with pickle protocol 5: DTasks and Chunks
  inside them become persistent references (their task/chunk id), and the worker
  substitutes the values it holds or fetched when it unpickles. Large buffers (numpy
  data) stay out of band. The stdlib C pickler is tried first (fast); cloudpickle
  takes over for lambdas, closures and notebook code.
* Functions are pickled (cloudpickle) once per function object and sent to a worker
  once; later tasks name them by content hash.
* A failure travels as its own exception, pickled with its traceback (tblib), so the
  caller re-raises the original type with the remote frames.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle
from tblib import pickling_support

from ..errors import SerializationError
from ..gpu.arrays import host_reducers
from ..task import Chunk, DTask

__all__ = [
    "FunctionCache",
    "dumps",
    "dumps_args",
    "dumps_error",
    "dumps_plain",
    "loads",
    "loads_args",
    "loads_error",
    "small_size",
    "trust_main",
]

Buffers = list[memoryview]


def _ref_id(obj: Any, chunks: list[Any]) -> Any:
    # A task's key is its id, a chunk's is minus its id: the two never collide.
    kind = type(obj)
    if kind is DTask:
        return obj.id
    if kind is Chunk:
        chunks.append(obj)
        return -obj.id
    return None


class _FromMain(Exception):
    """An object of ``__main__``: it goes by value (cloudpickle), not by name."""


class _GuardedPickler(pickle.Pickler):
    """The C pickler, but objects of ``__main__`` (a script's or notebook's functions,
    classes and their instances) are refused, so cloudpickle sends them by value: by
    name they resolve here, in the user's script, but in no worker process."""

    def reducer_override(self, obj: Any) -> Any:
        # Not called for ints, floats, strs, bytes, lists, tuples, dicts...: the common
        # small arguments pay nothing; an array pays one call.
        if getattr(obj, "__module__", None) == "__main__":
            raise _FromMain
        return NotImplemented


# Whether this process's __main__ is the user's (False in a worker process, whose
# __main__ is aiodagger's own: there the C pickler finds no user name and falls back by
# itself, and results take the one-call path).
_guard_main = True


def trust_main() -> None:
    """Called by a worker process at start: see ``_guard_main``."""
    global _guard_main
    _guard_main = False


class _RefPickler(_GuardedPickler):
    chunks: list[Any]

    def persistent_id(self, obj: Any) -> Any:
        return _ref_id(obj, self.chunks)


class _CloudRefPickler(cloudpickle.Pickler):
    chunks: list[Any]

    def persistent_id(self, obj: Any) -> Any:
        return _ref_id(obj, self.chunks)


# At most this many buffers of one value travel out of band; the rest are copied into
# the pickle. A message holds at most 4,096 buffers (comm/framing.py), and a value (or a
# task's arguments) must always fit in one: a list of 5,000 small arrays is one part more.
MAX_OUT_OF_BAND = 1024


class _Collector:
    """A pickle ``buffer_callback``: the first MAX_OUT_OF_BAND buffers out of band."""

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: list[pickle.PickleBuffer] = []

    def __call__(self, buf: pickle.PickleBuffer) -> bool:
        if len(self.buffers) >= MAX_OUT_OF_BAND:
            return True  # true: pickled in band
        self.buffers.append(buf)
        return False

    def views(self) -> Buffers:
        return [b.raw() for b in self.buffers]


def _dump(pickler_cls: type, obj: Any, chunks: list[Any] | None = None) -> tuple[bytes, Buffers]:
    out = io.BytesIO()
    collect = _Collector()
    pickler = pickler_cls(out, protocol=5, buffer_callback=collect)
    pickler.chunks = chunks if chunks is not None else []
    pickler.dump(obj)
    return out.getvalue(), collect.views()


# Values the C pickler writes whole, never from __main__, with no buffer out of band:
# pickled in one call, without a Pickler object (0.24 against 1.43 µs for W4's ``(i,)``,
# where dumps_args was 13 % of the scheduler's process).
_PLAIN = frozenset((int, float, str, bytes, bool, type(None), complex))
PLAIN_TYPES = _PLAIN  # values any process can unpickle: builtins only
# What one value may take to travel in a column batch (protocol.RunPlain, DoneValues):
# many go in one pickle, so each must be small, and its size is known without pickling.
SMALL_BYTES = 256
_FIXED = frozenset((float, bool, type(None), complex))


def small_size(value: Any) -> int:
    """About what ``value`` takes pickled if it is a small builtin (an int of 64 bits or
    fewer, a float, a str or bytes of SMALL_BYTES or fewer...); -1 if it is not one."""
    t = type(value)
    if t is int:
        return 9 if value.bit_length() <= 64 else -1
    if t in _FIXED:
        return 17
    if t is str or t is bytes:
        n = len(value)
        if n > SMALL_BYTES:
            return -1
        return (n << 2 if t is str else n) + 5  # a str's UTF-8: up to 4 bytes a character
    return -1


def dumps_args(task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
               has_refs: bool = True) -> tuple[bytes, Buffers, list[Any]]:
    """Pickle a task's arguments: (pickle, buffers, the Chunks referenced).

    A failure raises SerializationError naming the argument that could not be pickled.
    """
    obj = (args, kwargs)
    chunks: list[Any] = []
    if not has_refs and not kwargs:
        for value in args:
            if type(value) not in _PLAIN:
                break
        else:
            return pickle.dumps(obj, 5), [], chunks
    try:
        if not has_refs:
            payload, buffers = dumps(obj)
            return payload, buffers, chunks
        payload, buffers = _dump(_RefPickler, obj, chunks)
        return payload, buffers, chunks
    except Exception:  # noqa: BLE001 - lambdas, closures, local classes: cloudpickle's job
        chunks.clear()
    try:
        payload, buffers = _dump(_CloudRefPickler, obj, chunks)
        return payload, buffers, chunks
    except Exception as exc:
        raise SerializationError(_which_argument(task_name, args, kwargs, exc)) from exc


def _which_argument(task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception) -> str:
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"keyword argument {k!r}", v)
                                                                    for k, v in kwargs.items()]
    for label, value in named:
        try:
            _dump(_CloudRefPickler, value)
        except Exception as inner:  # noqa: BLE001
            path = _attribute_path(value)
            where = f" (at {path})" if path else ""
            return (f"{label} of task {task_name!r} cannot be sent to a worker: {inner}{where}. "
                    "Create such objects inside the task, or pass what is needed to build them")
    return f"the arguments of task {task_name!r} cannot be sent to a worker: {exc}"


def _attribute_path(value: Any, path: str = "", depth: int = 0) -> str:
    """Find the attribute/item path to the first part of ``value`` that fails to pickle."""
    if depth > 4:
        return path
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        children = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    elif hasattr(value, "__dict__"):
        children = [(f"{path}.{k}", v) for k, v in vars(value).items()]
    for child_path, child in children:
        try:
            cloudpickle.dumps(child)
        except Exception:  # noqa: BLE001
            return _attribute_path(child, child_path, depth + 1)
    return path


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, data: Any, buffers: Any, resolve: Callable[[int], Any]) -> None:
        super().__init__(io.BytesIO(data), buffers=buffers)
        self._resolve = resolve

    def persistent_load(self, pid: Any) -> Any:
        return self._resolve(pid)


def loads_args(payload: Any, buffers: Any, resolve: Callable[[int], Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Unpickle arguments, replacing each task/chunk reference by ``resolve(id)``
    (None: the sender said there are no references)."""
    if resolve is None:
        args, kwargs = pickle.loads(payload, buffers=buffers)
    else:
        args, kwargs = _RefUnpickler(payload, buffers, resolve).load()
    return args, kwargs


def dumps(value: Any) -> tuple[bytes, Buffers]:
    """Pickle a value: (pickle, out-of-band buffers), large buffers uncopied as memoryviews.

    The C pickler's one-call path first, cloudpickle for what it cannot do."""
    if type(value) in _PLAIN:  # a task's small result: no Pickler, no buffers to collect
        return pickle.dumps(value, 5), []
    collect = _Collector()
    try:
        if "cupy" in sys.modules and (table := host_reducers()) is not None:
            # Device arrays travel as host arrays (the reader may have no GPU).
            out = io.BytesIO()
            pickler = _GuardedPickler(out, protocol=5, buffer_callback=collect)
            pickler.dispatch_table = table
            pickler.dump(value)
            payload = out.getvalue()
        elif _guard_main:
            out = io.BytesIO()
            _GuardedPickler(out, protocol=5, buffer_callback=collect).dump(value)
            payload = out.getvalue()
        else:
            payload = pickle.dumps(value, protocol=5, buffer_callback=collect)
    except Exception:  # noqa: BLE001 - lambdas, local classes, objects of __main__...
        collect = _Collector()
        payload = cloudpickle.dumps(value, protocol=5, buffer_callback=collect)
    return payload, collect.views()


def dumps_plain(values: Any) -> bytes:
    """Pickle a list of small builtins (see small_size), or of tuples of them: the
    columns of RunPlain and DoneValues, one call for a whole batch."""
    return pickle.dumps(values, 5)


def loads(payload: Any, buffers: Any = ()) -> Any:
    """Rebuild a value from :func:`dumps` output (buffers are used in place, not copied)."""
    return pickle.loads(payload, buffers=buffers)


def dumps_error(exc: BaseException) -> bytes:
    """Pickle an exception with its traceback; an unpicklable one becomes a RuntimeError."""
    pickling_support.install(exc)
    try:
        return cloudpickle.dumps(exc)
    except Exception:  # noqa: BLE001 - the error itself may hold unpicklable state
        substitute = RuntimeError(f"{type(exc).__qualname__}: {exc}")
        substitute.add_note(f"aiodagger: the original {type(exc).__qualname__} could not be pickled, "
                            "so it is reported as a RuntimeError")
        substitute.__traceback__ = exc.__traceback__
        pickling_support.install(substitute)
        try:
            return cloudpickle.dumps(substitute)
        except Exception:  # noqa: BLE001
            return cloudpickle.dumps(RuntimeError(f"{type(exc).__qualname__}: {exc}"))


def loads_error(payload: Any) -> BaseException:
    exc = pickle.loads(payload)
    if not isinstance(exc, BaseException):
        raise SerializationError(f"a worker reported a failure that is not an exception: {exc!r}")
    return exc


class FunctionCache:
    """Pickled functions by object (scheduler side): pickle once, name by content hash."""

    _MAX = 1024

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, bytes, bytes]] = {}

    def get(self, fn: Any) -> tuple[bytes, bytes]:
        """(hash, pickled function) for ``fn``."""
        entry = self._by_id.get(id(fn))
        if entry is not None and entry[0] is fn:
            return entry[1], entry[2]
        try:
            data = cloudpickle.dumps(fn)
        except Exception as exc:
            name = getattr(fn, "__qualname__", repr(fn))
            raise SerializationError(f"function {name} cannot be sent to a worker: {exc}") from exc
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if len(self._by_id) >= self._MAX:
            self._by_id.clear()
        # the entry keeps fn alive, so id(fn) cannot be reused by another object meanwhile
        self._by_id[id(fn)] = (fn, digest, data)
        return digest, data
