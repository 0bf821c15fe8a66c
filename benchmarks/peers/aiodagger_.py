"""aiodagger itself: the system every other row is compared against."""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

from benchmarks.peers.base import Peer, Unavailable
from benchmarks.workloads import Workload, inc, sleep0_identity

# The public API the workloads use; checked up front so that a half-built or
# shadowed package yields one clear 'not importable' line, not a traceback per run.
_API = ("Cluster", "spawn", "gather")


def load() -> Any:
    """Import aiodagger, or raise Unavailable('not importable (...)') saying why not."""
    try:
        import aiodagger as dagger
    except Exception as exc:  # any import-time failure, not only ImportError
        raise Unavailable(f"not importable ({type(exc).__name__}: {exc})") from exc
    missing = [name for name in _API if not hasattr(dagger, name)]
    if missing:
        # An empty directory named aiodagger imports as a namespace package.
        where = getattr(dagger, "__file__", None) or ", ".join(getattr(dagger, "__path__", []))
        raise Unavailable(f"not importable (package at {where} lacks {', '.join(missing)})")
    return dagger


class AiodaggerPeer(Peer):
    name: ClassVar[str] = "aiodagger"

    def __init__(self) -> None:
        self._dagger: Any = None
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        dagger = load()
        self._dagger = dagger
        await self._stack.enter_async_context(dagger.Cluster())

    async def stop(self) -> None:
        await self._stack.aclose()

    async def w1(self, w: Workload) -> list[int]:
        d = self._dagger
        tasks = [d.spawn(inc, i) for i in range(w.n)]
        return list(await d.gather(*tasks))

    async def w2(self, w: Workload) -> int:
        d = self._dagger
        t = d.spawn(inc, 0)
        for _ in range(w.n - 1):
            t = d.spawn(inc, t)
        return int(await t)

    async def w3(self, w: Workload) -> list[int]:
        d = self._dagger
        tasks = [d.spawn(sleep0_identity, i) for i in range(w.n)]
        return list(await d.gather(*tasks))
