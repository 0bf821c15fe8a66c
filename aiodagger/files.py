"""Files: ``dagger.File(path, load=None)`` and ``await dagger.tofile(x, path, save=None)``.

A :class:`File` is a lazy reference, small and picklable (an absolute path and a load
callable), so it travels to any worker as it is. Among a task's arguments (also inside
lists, tuples and dicts, as DTasks are) it is replaced by the file's data when the task
runs, on the worker that runs it: read on that worker's pool thread for a sync
function, without blocking the loop for an ``async def`` one. The caller's process never
reads it, so a file on a worker's disk (or on a shared filesystem) feeds that worker
only. A relative path is made absolute against the working directory of the caller, at
the time of the call: a worker's own working directory plays no part.

Default formats, by the path's suffix: ``.npy`` through numpy (one array, no pickled
objects), anything else pickle. ``load(path) -> value`` and ``save(value, path)`` take
any callable instead, ``async def`` ones too.

Writing is atomic: the data goes to a temporary file beside the target (same directory,
same suffix, which savers such as ``numpy.save`` and pandas go by), then
``os.replace`` gives it its name, so a crash never leaves half a file under the final
name.

Reading and writing a pickle on an event loop go through aiofiles (one executor hop per
call: a File is one file, not the thousands of small chunks that made the spill path
keep its own writer, ``memory/spillfile.py``); a custom or ``.npy`` loader or saver,
which does its own I/O, runs in the loop's default executor.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import io
import os
import pickle
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

from ._asynclib import run_in_thread
from ._callables import classify
from .errors import SerializationError
from .task import FINISHED, REMOTE, Chunk, DTask
from .taskoptions import Scope, TaskOptions

__all__ = ["File", "aread_file", "read_file", "tofile", "write_file"]

Loader = Callable[[str], Any]
Saver = Callable[[Any, str], Any]


class File:
    """A file read by the task that uses it, on the worker that runs that task.

    ``File(path)`` reads ``.npy`` with numpy and anything else with pickle;
    ``File(path, load=fn)`` calls ``fn(path)`` there instead. ``path`` is absolute:
    a relative one is resolved against the working directory at construction.
    Equal Files (same path, same load) are read once per task.
    """

    __slots__ = ("_load", "_path")

    def __init__(self, path: str | os.PathLike[str], load: Loader | None = None) -> None:
        self._path = _absolute(path, "File()")
        if load is not None and not callable(load):
            raise TypeError(
                f"File(load=...) takes a callable that reads the file at a path and returns its "
                f"value, e.g. load=numpy.load; got {type(load).__name__}: {load!r}")
        self._load = load

    @property
    def path(self) -> str:
        """The absolute path."""
        return self._path

    @property
    def load(self) -> Loader | None:
        """The load callable, or None for the default format of the path's suffix."""
        return self._load

    def __fspath__(self) -> str:
        return self._path

    def __eq__(self, other: object) -> bool:
        if type(other) is not File:
            return NotImplemented
        return self._path == other._path and self._load == other._load

    def __hash__(self) -> int:
        return hash(self._path)  # load may be unhashable; equal Files share a path anyway

    def __repr__(self) -> str:
        if self._load is None:
            return f"dagger.File({self._path!r})"
        name = getattr(self._load, "__qualname__", None) or repr(self._load)
        return f"dagger.File({self._path!r}, load={name})"


def _absolute(path: Any, what: str) -> str:
    if isinstance(path, (str, os.PathLike)):
        text = os.fspath(path)
        if isinstance(text, str):
            return os.path.abspath(text)
    hint = " (decode bytes with os.fsdecode first)" if isinstance(path, bytes) else ""
    raise TypeError(f"{what} takes a path as a str or an os.PathLike such as pathlib.Path, "
                    f"got {type(path).__name__}: {path!r}{hint}")


def _is_npy(path: str) -> bool:
    return path.lower().endswith(".npy")


# -- reading (on the worker that runs the task) ----------------------------------------------

def _default_load(path: str) -> Any:
    if _is_npy(path):
        import numpy

        return numpy.load(path, allow_pickle=False)
    with open(path, "rb") as fh:
        return pickle.load(fh)


def read_file(file: File, reader: str) -> Any:
    """The data of ``file``, read on this (pool) thread; ``reader`` names the task."""
    load = file._load or _default_load
    try:
        value = load(file._path)
        if inspect.iscoroutine(value):  # an ``async def`` load, on a thread: its own loop
            value = asyncio.run(value)
    except FileNotFoundError as exc:
        if os.path.exists(file._path):
            raise  # the loader's own business: some other file
        raise _missing(file, reader) from exc
    return value


async def aread_file(file: File, reader: str) -> Any:
    """The data of ``file``, read without blocking the running loop."""
    load = file._load
    try:
        if load is None and not _is_npy(file._path):
            import aiofiles

            async with aiofiles.open(file._path, "rb") as fh:
                data = await fh.read()
            return pickle.loads(data)
        if load is not None and classify(load) == "async":
            return await load(file._path)
        return await asyncio.get_running_loop().run_in_executor(None, load or _default_load,
                                                                file._path)
    except FileNotFoundError as exc:
        if os.path.exists(file._path):
            raise
        raise _missing(file, reader) from exc


def _missing(file: File, reader: str) -> FileNotFoundError:
    """The error for a File whose path is not there, naming where the read happened."""
    import socket

    return FileNotFoundError(
        errno.ENOENT,
        f"{file!r}, an argument of {reader}, does not exist where that task ran: in process "
        f"{os.getpid()} on host {socket.gethostname()!r}. A File is read by the worker that "
        "runs the task, not by the caller: the path must exist on that worker's machine (a "
        "shared filesystem for workers on other machines), or write the file there first "
        "(`await dagger.tofile(value, path)`), or give the task a scope naming a worker "
        "that has it")


# -- writing ---------------------------------------------------------------------------------

def _encode(value: Any, path: str) -> bytes:
    """The bytes of the default format of ``path``'s suffix."""
    if _is_npy(path):
        import numpy

        if not isinstance(value, numpy.ndarray):
            raise TypeError(
                f"{path}: a .npy file holds one numpy array, got {type(value).__name__}; give "
                "the path another suffix (pickled), or pass save=")
        buf = io.BytesIO()
        try:
            numpy.save(buf, value, allow_pickle=False)
        except ValueError as exc:  # an object array: it would only load with allow_pickle
            raise ValueError(f"{path}: {exc}; give the path another suffix (pickled), or "
                             "pass save=") from exc
        return buf.getvalue()
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - lambdas, local classes: cloudpickle's job
        pass
    import cloudpickle

    try:
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"a {type(value).__name__} cannot be pickled to {path}: {exc}. Pass save= a "
            "function that writes it (called as save(value, path))") from exc


def _temp_path(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{secrets.token_hex(4)}.tmp{os.path.splitext(name)[1]}")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _saved(save: Saver, path: str, temp: str) -> None:
    """Check that ``save`` wrote ``temp``, then give it its name."""
    if not os.path.exists(temp):
        raise FileNotFoundError(
            errno.ENOENT, f"save={getattr(save, '__qualname__', save)!r} wrote no file at the "
            f"path it was given ({temp}, renamed to {path} once written): it must write "
            "exactly that path")
    os.replace(temp, path)


def write_file(value: Any, path: str, save: Saver | None) -> str:
    """Write ``value`` to ``path`` atomically, on this thread; return ``path``."""
    temp = _temp_path(path)
    try:
        if save is None:
            data = _encode(value, path)
            with open(temp, "wb") as fh:
                fh.write(data)
            os.replace(temp, path)
        else:
            done = save(value, temp)
            if inspect.iscoroutine(done):  # an ``async def`` save, on a thread: its own loop
                asyncio.run(done)
            _saved(save, path, temp)
    except BaseException:
        _remove_quietly(temp)
        raise
    return path


async def _awrite_file(value: Any, path: str, save: Saver | None) -> None:
    """:func:`write_file` without blocking the running loop."""
    if save is not None:
        loop = asyncio.get_running_loop()
        if classify(save) == "async":
            temp = _temp_path(path)
            try:
                await save(value, temp)
                await loop.run_in_executor(None, _saved, save, path, temp)
            except BaseException:
                _remove_quietly(temp)
                raise
            return
        await loop.run_in_executor(None, write_file, value, path, save)
        return
    import aiofiles
    import aiofiles.os

    data = _encode(value, path)
    temp = _temp_path(path)
    try:
        async with aiofiles.open(temp, "wb") as fh:
            await fh.write(data)
        await aiofiles.os.replace(temp, path)
    except BaseException:
        _remove_quietly(temp)
        raise


def tofile(x: Any, path: str | os.PathLike[str], save: Saver | None = None, *,
           load: Loader | None = None) -> Coroutine[Any, Any, File]:
    """Write ``x`` to ``path`` and return a :class:`File` for it: ``await dagger.tofile(x, path)``.

    ``x`` a plain value: written from here, without blocking the loop. ``x`` a DTask (or
    a Chunk): written by a task on the worker where its value lives, so the value does
    not travel (not to this process either). ``save(value, path)`` writes it instead of
    the default format of the suffix; ``load`` goes into the File returned, to read
    back what ``save`` wrote. ``path`` and the callables are checked now, and a relative
    path is resolved against the working directory now, not when awaited.

    From synchronous code: ``asyncio.run(dagger.tofile(x, path))``.
    """
    file = File(_absolute(path, "tofile()"), load)
    if save is not None and not callable(save):
        raise TypeError(
            f"tofile(save=...) takes a callable that writes a value to a path, called as "
            f"save(value, path); got {type(save).__name__}: {save!r}")
    if isinstance(x, (DTask, Chunk)):
        return _tofile_remote(x, file, save)
    return _tofile_here(x, file, save)


async def _tofile_here(x: Any, file: File, save: Saver | None) -> File:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio's run (aiodagger/_asynclib.py): the writer on its worker thread
        await run_in_thread(functools.partial(write_file, x, file._path, save))
    else:
        await _awrite_file(x, file._path, save)
    return file


async def _tofile_remote(x: DTask[Any] | Chunk[Any], file: File, save: Saver | None) -> File:
    if isinstance(x, DTask):
        await x.wait()
        if x._cancelled or x._state is not FINISHED:
            x.result()  # raises its error
    sched = x._sched
    if x._where:
        # Any worker that holds it, also when a small value came here inline: writing is
        # I/O that a worker process does better than the application's own.
        where = Scope(workers=frozenset(x._where))
    elif x._value is not REMOTE:
        where = Scope(process=os.getpid())  # only here: worker 0, or this worker process
    else:
        where = Scope()  # every copy lost: wherever it is computed again
    opts = TaskOptions(name="tofile", scope=where)
    writer: DTask[str] = sched.spawn(opts, write_file, (x, file._path, save), {})
    await writer
    return file
