"""dagger.array on GPUs: a GPU scope survives the pinning of blocks and tiles to workers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import aiodagger as dagger
from aiodagger import api
from aiodagger.array import core, linalg
from aiodagger.taskoptions import Scope


# -- placement: the GPU part of the scope survives pinning to a worker ---------------------------
class _Workers:
    """The scheduler's answer for two workers with GPUs (this test needs none): which
    workers a scope admits, each scope asked about kept."""

    def __init__(self) -> None:
        self.asked: list[Scope] = []

    def placeable_workers(self, scope: Scope) -> list[int]:
        self.asked.append(scope)
        return [1, 2]


@pytest.mark.parametrize("gpu", [True, 0, None])
def test_blocks_and_tiles_keep_the_gpu_scope_when_pinned(monkeypatch, gpu):
    """Blocks of new arrays and linalg's tiles are pinned to workers in turn; the scope
    they get keeps the GPU wish of the scope in effect, and the workers come from that
    scope. Nothing runs: the spawns are recorded, not made."""
    workers = _Workers()
    spawned: list[tuple[Scope, Any, tuple[Any, ...]]] = []
    tiles: list[Scope] = []

    def spawn(opts: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        spawned.append((opts.scope, fn, args))
        return object()

    monkeypatch.setattr(core, "_scheduler", lambda: workers)
    monkeypatch.setattr(linalg, "_scheduler", lambda: workers)
    monkeypatch.setattr(api, "spawn_with_options", spawn)
    monkeypatch.setattr(linalg, "mutable", lambda fn, *args, scope: tiles.append(scope))
    scope = dagger.scope("any") if gpu is None else dagger.scope(gpu=gpu)
    with dagger.options(scope=scope):
        a = dagger.array.zeros((6, 6), (2, 2))  # 9 blocks, one task each, no inputs
        linalg._Tiles(a, np.float64)  # 3x3 tiles, each exactly one block: no task cuts them

    assert workers.asked == [scope, scope]
    assert [s for s, _, _ in spawned] == [Scope(frozenset([w]), gpu=gpu) for w in [1, 2] * 4 + [1]]
    assert tiles == [Scope(frozenset([w]), gpu=gpu) for _ in range(3) for w in (1, 2, 1)]
    assert all(s.wants_gpu == (gpu is not None) for s in tiles)
