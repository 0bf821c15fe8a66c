"""``In``, ``Out`` and ``InOut``: how a datadeps task uses an argument.

Kept apart from :mod:`aiodagger.regions` (which orders the tasks) so that argument
scanning can recognise a stray annotation without importing the region machinery.
"""

from __future__ import annotations

import contextvars
from typing import Any, ClassVar, Generic, TypeVar

__all__ = ["Access", "In", "InOut", "Out", "open_regions"]

T = TypeVar("T")

# How many datadeps regions are open in this context: an annotation made elsewhere
# would be silently passed to a plain task as a wrapper object, so it is refused.
open_regions: contextvars.ContextVar[int] = contextvars.ContextVar("aiodagger_regions", default=0)


class Access(Generic[T]):
    """An argument of ``dd.spawn`` with the access its task makes of it."""

    __slots__ = ("value",)
    reads: ClassVar[bool] = True
    writes: ClassVar[bool] = False

    def __init__(self, value: T) -> None:
        if isinstance(value, Access):
            raise TypeError(f"{type(self).__name__}({value!r}): give the object itself, not another annotation")
        if not open_regions.get():
            raise RuntimeError(
                f"{type(self).__name__}(...) declares how a task of a datadeps region uses an "
                "argument; use it inside `async with dagger.datadeps() as dd:`, as an argument "
                "of dd.spawn (plain dagger.spawn passes arguments as they are)")
        self.value = value

    def __repr__(self) -> str:
        return f"dagger.{type(self).__name__}({self.value!r})"

    def __reduce__(self) -> Any:
        raise TypeError(f"{self!r} only means something to dd.spawn of a datadeps region, "
                        "as a direct argument; it cannot be sent anywhere")


class In(Access[T]):
    """The task reads this argument."""

    __slots__ = ()


class Out(Access[T]):
    """The task writes this argument (in place) without reading it."""

    __slots__ = ()
    reads = False
    writes = True


class InOut(Access[T]):
    """The task reads and writes this argument (in place)."""

    __slots__ = ()
    writes = True
