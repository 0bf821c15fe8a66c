"""Finding the dependencies among a task's arguments, and replacing them by values.

DTasks and Chunks count as dependencies anywhere in ``args``/``kwargs``, also nested
inside lists, tuples and dicts (values, not keys). Other containers are left alone:
walking arbitrary objects would cost every task and surprise users. Files
(:class:`~aiodagger.files.File`) are found the same way, and replaced by their data
where the task runs: first, before the dependencies, so that the walk never enters a
dependency's value (a File inside one stays a File, as a DTask inside one stays a DTask).

Whether a task needs anything replaced is one value, ``DTask._resolve``: ``False``,
``True`` (dependencies only: the common case, and what the wire's ``refs`` flag takes
as it is), or an int of ``DEPS | FILES`` bits once a File is among the arguments. So
tasks without a File never test for one.

A task receives the caller's own objects wherever no dependency sits, as it would
with no dependencies at all: only a container holding one is rebuilt, with the values
in place, and the caller's container keeps its DTasks.
"""

from __future__ import annotations

from typing import Any

from .access import Access
from .files import File
from .placed import Placed
from .task import Chunk, DTask

__all__ = ["DEPS", "FILES", "LEAF_TYPES", "STREAM", "find_dependencies", "find_files", "replace_files",
           "resolve_arguments"]

DEPS = 1  # DTasks or Chunks to replace by their values
FILES = 2  # Files to read where the task runs
# A Stream, read while it runs rather than waited for (aiodagger/streaming.py): the
# scheduler binds the task to it at spawn, and it is no dependency.
STREAM = 4

_CONTAINERS = (list, tuple, dict)
# Types that cannot hold a dependency: skipped without a function call, since most
# arguments of small tasks are numbers and strings (this runs on every spawn).
LEAF_TYPES = frozenset((int, float, str, bytes, bool, type(None), complex))


def find_dependencies(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[DTask[Any]], int]:
    """Return (unique DTask dependencies in first-seen order, what needs resolving: see
    the module's docstring; STREAM also if a stream is among them)."""
    deps: list[DTask[Any]] = []
    found: int = False
    for value in args:
        if type(value) not in LEAF_TYPES:
            found |= _scan(value, deps)
    if kwargs:
        for value in kwargs.values():
            if type(value) not in LEAF_TYPES:
                found |= _scan(value, deps)
    if len(deps) > 1:
        deps = list(dict.fromkeys(deps))  # keyed by identity: DTask defines no __eq__
    return deps, found


def _scan(value: Any, deps: list[DTask[Any]], path: set[int] | None = None) -> int:
    kind = type(value)
    if kind is DTask:
        deps.append(value)
        return True
    if kind is Chunk:
        return True
    if kind in _CONTAINERS:
        # The containers being walked, by identity: one that holds itself (``x.append(x)``)
        # is walked once, not until the stack overflows; 0, no object's id, marks that.
        top = path is None
        if path is None:
            path = set()
        elif id(value) in path:
            path.add(0)
            return False
        path.add(id(value))
        found: int = False
        for item in value.values() if kind is dict else value:
            found |= _scan(item, deps, path)
        path.discard(id(value))
        if top and found and 0 in path:
            raise TypeError(
                "an argument holds a dagger task, chunk or File inside a list, tuple or dict that "
                "contains itself: it cannot be rebuilt with the value in place. Pass the "
                "task separately, or use a container that does not contain itself")
        return found
    if kind is File:
        # By exact type, apart from the isinstance below: any other object (an array)
        # pays this identity test, 46 -> 53 ns for the branch, where File as a third
        # class of the isinstance measured 71 ns.
        return FILES
    if isinstance(value, (DTask, Chunk)):
        if isinstance(value, DTask):
            if value._streaming:
                return STREAM
            deps.append(value)
        return True
    if isinstance(value, Placed):  # a mutable or shard: the scheduler binds the task to it
        deps.append(value)  # type: ignore[arg-type]
        return True
    if isinstance(value, Access):
        raise TypeError(
            f"{value!r} reached a plain task: In/Out/InOut order the tasks of a datadeps "
            "region and are understood only as direct arguments of dd.spawn, not by "
            "dagger.spawn or inside containers")
    return False


def resolve_arguments(args: tuple[Any, ...], kwargs: dict[str, Any],
                      inputs: dict[int, Any] | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Replace every DTask/Chunk by its value; the dependencies have all finished.

    ``inputs`` holds, by task id, the values of dependencies kept in a ChunkStore
    (loaded and pinned for this run) rather than on their DTask.
    """
    if inputs is None:
        # A chain's links take their dependency as a plain argument: no call for that.
        return (tuple([v._value if type(v) is DTask else _resolve(v, None) for v in args]),
                {k: _resolve(v, None) for k, v in kwargs.items()} if kwargs else kwargs)
    return (tuple([_resolve(v, inputs) for v in args]),
            {k: _resolve(v, inputs) for k, v in kwargs.items()} if kwargs else kwargs)


def _resolve(value: Any, inputs: dict[int, Any] | None) -> Any:
    # Copied only once an item changes: no second pass to learn whether one will.
    kind = type(value)
    if kind is DTask:
        return inputs[value.id] if inputs is not None and value.id in inputs else value._value
    if kind is Chunk:
        return value._value
    if kind is list or kind is tuple:
        items: list[Any] | None = None
        for i, item in enumerate(value):
            if type(item) in LEAF_TYPES:
                continue
            new = _resolve(item, inputs)
            if new is not item:
                if items is None:
                    items = list(value)
                items[i] = new
        if items is None:
            return value
        return items if kind is list else tuple(items)
    if kind is dict:
        mapping: dict[Any, Any] | None = None
        for key, item in value.items():
            if type(item) in LEAF_TYPES:
                continue
            new = _resolve(item, inputs)
            if new is not item:
                if mapping is None:
                    mapping = dict(value)
                mapping[key] = new
        return value if mapping is None else mapping
    if isinstance(value, DTask):
        return inputs[value.id] if inputs is not None and value.id in inputs else value._value
    if isinstance(value, Chunk):
        return value._value
    return value


def find_files(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[File]:
    """The distinct Files among the arguments, in first-seen order."""
    found: dict[File, None] = {}
    path: set[int] = set()
    for value in args:
        if type(value) not in LEAF_TYPES:
            _find_files(value, found, path)
    for value in kwargs.values():
        if type(value) not in LEAF_TYPES:
            _find_files(value, found, path)
    return list(found)


def _find_files(value: Any, found: dict[File, None], path: set[int]) -> None:
    kind = type(value)
    if kind in _CONTAINERS:
        if id(value) in path:  # a container that holds itself holds no File (_scan said so)
            return
        path.add(id(value))
        for item in value.values() if kind is dict else value:
            if type(item) not in LEAF_TYPES:
                _find_files(item, found, path)
        path.discard(id(value))
    elif kind is File:
        found[value] = None


def replace_files(args: tuple[Any, ...], kwargs: dict[str, Any],
                  data: dict[File, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments with each File replaced by ``data[file]``; as with dependencies,
    only the containers holding one are rebuilt."""
    path: set[int] = set()
    return (tuple([_replace(v, data, path) for v in args]),
            {k: _replace(v, data, path) for k, v in kwargs.items()} if kwargs else kwargs)


def _replace(value: Any, data: dict[File, Any], path: set[int]) -> Any:
    kind = type(value)
    if kind in _CONTAINERS:
        if id(value) in path:
            return value
        path.add(id(value))
        result: Any = value
        if kind is dict:
            mapping = {k: _replace(v, data, path) for k, v in value.items()}
            if any(mapping[k] is not v for k, v in value.items()):
                result = mapping
        else:
            items = [_replace(v, data, path) for v in value]
            if any(a is not b for a, b in zip(items, value, strict=True)):
                result = items if kind is list else tuple(items)
        path.discard(id(value))
        return result
    if kind is File:
        return data[value]
    return value
