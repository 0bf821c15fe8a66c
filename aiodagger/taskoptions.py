"""Task options and scopes: :class:`TaskOptions`, ``dagger.scope(...)``, and the options
in effect.

``dagger.options(...)`` (in :mod:`aiodagger.api`, next to ``spawn``) is both a spawner
and a context manager whose options apply to every spawn inside it; the options in
effect live in a ContextVar here, so they follow asyncio tasks and do not leak between
concurrent requests of a server. (Named ``taskoptions``, not ``options``: the package
attribute ``aiodagger.options`` is the function.)
"""

from __future__ import annotations

import contextvars
import difflib
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .task import DTask

__all__ = ["MISSING", "OPTION_NAMES", "Scope", "TaskOptions", "current_options", "current_options_var",
           "scope", "validate_options"]


class _Missing:
    """The sentinel a ``restore`` callback returns when it has nothing saved."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "dagger.MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Scope:
    """Where a task may run. ``scope("any")`` (the default) admits every processor.

    ``worker=3`` / ``workers=[1, 2]`` restrict the worker, ``process=PID`` the OS
    process, ``thread=True`` asks for a thread processor (a pool thread, even for a
    coroutine function's sibling sync work), ``gpu=True`` any GPU and ``gpu=0`` device 0.
    """

    __slots__ = ("gpu", "process", "thread", "workers")

    def __init__(
        self,
        workers: frozenset[int] | None = None,
        thread: bool | None = None,
        gpu: bool | int | None = None,
        process: int | None = None,
    ) -> None:
        self.workers = workers
        self.thread = thread
        self.gpu = gpu
        self.process = process

    @property
    def wants_gpu(self) -> bool:
        """Whether only a GPU processor will do: ``gpu=True`` or a device number, device 0
        included (a test of ``self.gpu``'s truth would read ``gpu=0`` as "no GPU")."""
        return self.gpu is not None and self.gpu is not False

    @property
    def is_any(self) -> bool:
        return self.workers is None and self.thread is None and self.gpu is None and self.process is None

    def on_worker(self, worker: int) -> Scope:
        """This scope narrowed to ``worker``: what it asks of the processor (a GPU, a
        thread) still holds there. A bare ``Scope({worker})`` put a block or a mutable
        meant for a GPU on one of the worker's CPU threads."""
        return Scope(frozenset([worker]), self.thread, self.gpu, self.process)

    def admits_gpus(self, devices: Collection[int]) -> bool:
        """Whether a worker with GPU processors on ``devices`` has one this scope takes
        (any worker does, for a scope that does not ask for a GPU)."""
        if not self.wants_gpu:
            return True
        if self.gpu is True:
            return bool(devices)
        return self.gpu in devices

    def admits_worker(self, worker_id: int, pid: int) -> bool:
        if self.workers is not None and worker_id not in self.workers:
            return False
        return self.process is None or self.process == pid

    def __repr__(self) -> str:
        if self.is_any:
            return 'scope("any")'
        parts = []
        if self.workers is not None:
            parts.append(f"workers={sorted(self.workers)}")
        for name in ("thread", "gpu", "process"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        return f"scope({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scope) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in self.__slots__))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Scope, (self.workers, self.thread, self.gpu, self.process))


ANY_SCOPE = Scope()


def scope(
    any: str | None = None,
    *,
    worker: int | None = None,
    workers: Collection[int] | None = None,
    thread: bool | None = None,
    gpu: bool | int | None = None,
    process: int | None = None,
) -> Scope:
    """Build a :class:`Scope`: ``scope("any")``, ``scope(worker=1)``, ``scope(gpu=True)``..."""
    if any is not None:
        if any != "any":
            raise ValueError(f'scope() takes "any" or keywords, got {any!r}; e.g. scope(worker=1)')
        if (worker, workers, thread, gpu, process) != (None, None, None, None, None):
            raise ValueError('scope("any") takes no other argument')
        return ANY_SCOPE
    if worker is not None and workers is not None:
        raise ValueError("scope() takes worker= or workers=, not both")
    chosen: frozenset[int] | None = None
    if worker is not None:
        chosen = frozenset([_check_int("worker", worker)])
    elif workers is not None:
        chosen = frozenset(_check_int("workers", w) for w in workers)
        if not chosen:
            raise ValueError("scope(workers=[]) admits no worker; leave it out for any worker")
    if thread is not None and not isinstance(thread, bool):
        raise TypeError(
            f"scope(thread=...) takes True or False, got {thread!r}: the threads of a worker's "
            "pool are interchangeable, so a task can ask for a thread but not for one of them"
        )
    if gpu is not None and not isinstance(gpu, (bool, int)):
        raise TypeError(f"scope(gpu=...) takes True or a device number, got {gpu!r}")
    if gpu is not None and not isinstance(gpu, bool) and gpu < 0:
        raise ValueError(f"scope(gpu=...) takes True or a device number (0, 1, ...), got {gpu!r}")
    if process is not None:
        _check_int("process", process)
    if thread and gpu not in (None, False):
        raise ValueError("scope(thread=True, gpu=...) admits nothing: a task runs on one processor")
    return Scope(chosen, thread, gpu, process)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"scope({name}=...) takes worker ids (ints >= 0), got {value!r}")
    return value


class TaskOptions:
    """The resolved options of one task (immutable; shared by tasks spawned alike)."""

    __slots__ = ("after", "checkpoint", "name", "needs", "occupancy", "plain", "priority", "resources",
                 "restore", "retries", "scope", "timeout")

    def __init__(
        self,
        name: str | None = None,
        scope: Scope = ANY_SCOPE,
        priority: int = 0,
        retries: int = 0,
        timeout: float | None = None,
        checkpoint: Callable[[DTask[Any], Any], None] | None = None,
        restore: Callable[[DTask[Any]], Any] | None = None,
        after: Collection[DTask[Any]] | None = None,
        resources: Mapping[str, float] | None = None,
        occupancy: float = 1.0,
    ) -> None:
        self.name = name
        # Tasks to wait for, whose values this one does not receive (Dagger.jl's syncdeps).
        self.after: tuple[Any, ...] = tuple(after) if after else ()
        self.scope = scope
        self.priority = priority
        self.retries = retries
        self.timeout = timeout
        self.checkpoint = checkpoint
        self.restore = restore
        # Amounts of the workers' declared resources a run holds (Cluster(resources=)).
        self.resources = dict(resources) if resources else None
        # The share of a thread a run takes: below 1, a task that mostly waits, of which
        # a worker runs threads / occupancy at once, each on a thread of its own.
        self.occupancy = occupancy
        # What the scheduler books for a run (scheduler/resources.py): None for most tasks.
        self.needs = _needs(self.resources, occupancy)
        # Nothing that changes where or how a task starts: a coroutine task with these
        # options starts at once on the spawning loop (Scheduler.spawn, AsyncProc.start_plain).
        self.plain = (scope is ANY_SCOPE and timeout is None and checkpoint is None and restore is None
                      and not self.after and self.needs is None)

    def merged(self, overrides: dict[str, Any]) -> TaskOptions:
        values = {n: getattr(self, n) for n in _FIELDS}
        values.update(overrides)
        return TaskOptions(**values)

    def with_after(self, after: tuple[Any, ...]) -> TaskOptions:
        """These options, also waiting for ``after`` (tasks, already checked: this is a
        datadeps region's per-task path, so no keyword parsing or validation)."""
        new = object.__new__(TaskOptions)
        new.name, new.scope, new.priority = self.name, self.scope, self.priority
        new.retries, new.timeout = self.retries, self.timeout
        new.checkpoint, new.restore = self.checkpoint, self.restore
        new.resources, new.occupancy, new.needs = self.resources, self.occupancy, self.needs
        new.after = self.after + after if self.after else after
        return new


# The resource a worker's threads are, shared by its tasks of occupancy below 1.
OCCUPANCY = "occupancy"


def _needs(resources: dict[str, float] | None, occupancy: float) -> dict[str, float] | None:
    if resources is None and occupancy == 1.0:
        return None
    needs = dict(resources or {})
    if occupancy != 1.0:
        needs[OCCUPANCY] = occupancy
    return needs


_FIELDS = tuple(n for n in TaskOptions.__slots__ if n not in ("needs", "plain"))  # derived


DEFAULT_OPTIONS = TaskOptions()
OPTION_NAMES = frozenset(_FIELDS)

current_options_var: contextvars.ContextVar[TaskOptions] = contextvars.ContextVar(
    "aiodagger_options", default=DEFAULT_OPTIONS
)


def current_options() -> TaskOptions:
    return current_options_var.get()


def validate_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Check option names and values; raise TypeError/ValueError saying what to write."""
    for key, value in opts.items():
        if key not in OPTION_NAMES:
            close = difflib.get_close_matches(key, sorted(OPTION_NAMES), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"unknown task option {key!r}.{hint} Valid options: {', '.join(sorted(OPTION_NAMES))}"
            )
        _validate_value(key, value)
    return opts


def _validate_value(key: str, value: Any) -> None:
    if key == "after":
        from .task import DTask

        if value is not None and (not isinstance(value, (list, tuple, set, frozenset))
                                  or not all(isinstance(t, DTask) for t in value)):
            raise TypeError(f"option after= takes a list of tasks (DTasks) to wait for, got {value!r}")
    elif key == "name" and value is not None and not isinstance(value, str):
        raise TypeError(f"option name= takes a str, got {value!r}")
    elif key == "scope" and not isinstance(value, Scope):
        raise TypeError(f"option scope= takes dagger.scope(...), got {value!r}")
    elif key in ("priority", "retries") and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"option {key}= takes an int, got {value!r}")
    elif key == "retries" and value < 0:
        raise ValueError(f"option retries= must be >= 0, got {value}")
    elif key == "timeout" and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"option timeout= takes seconds > 0 (or None), got {value!r}")
    elif key in ("checkpoint", "restore") and value is not None and not callable(value):
        raise TypeError(f"option {key}= takes a callable, got {value!r}")
    elif key == "resources" and value is not None:
        check_resources(value, "option resources=")
    elif key == "occupancy" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or not 0 < value <= 1):
        raise ValueError(f"option occupancy= takes the share of a thread a task takes, "
                         f"0 < occupancy <= 1 (0.25: four such tasks per thread), got {value!r}")


_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:")


def check_resources(value: Any, what: str) -> dict[str, float]:
    """``{"db": 1, "GPU": 0.5}``: names and amounts > 0; ValueError/TypeError otherwise."""
    if not isinstance(value, Mapping) or not value:
        raise TypeError(f'{what} takes a dict of resource names to amounts, e.g. {{"db": 1}}, got {value!r}')
    checked: dict[str, float] = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not name or name == OCCUPANCY or not _NAME_OK.issuperset(name):
            raise ValueError(f"{what}: resource names are non-empty strs of letters, digits, "
                             f"'_', '-', '.' and ':', other than {OCCUPANCY!r} (use occupancy=), got {name!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
            raise ValueError(f"{what}: the amount of {name!r} must be a number > 0, got {amount!r}")
        checked[name] = float(amount)
    return checked
