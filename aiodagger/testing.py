"""pytest fixtures for code that runs on aiodagger.

Installed with aiodagger, this plugin is loaded by pytest on its own (entry point
``pytest11``), and offers:

``dagger_cluster``
    An in-process cluster, ``async with dagger.Cluster()`` on the test's event loop:
    spawns inside the test use it, and it is closed (unfinished tasks cancelled, its
    threads stopped) when the test ends.

``dagger_process_cluster``
    ``async with dagger.Cluster(processes=2)``: two subprocess workers besides the
    test's own process (worker 0), for tests of code whose tasks must cross a process
    boundary (pickling, worker-to-worker data). Tasks run in those two processes;
    worker 0 runs only what is scoped to it (``scope(worker=0)``). The workers are
    stopped when the test ends.

Both are async fixtures, run by pytest-asyncio (``pip install pytest-asyncio``)::

    async def test_total(dagger_cluster):
        prices = [dagger.spawn(fetch_price, item) for item in (1, 2, 3)]
        assert await dagger.spawn(sum, prices) == 60
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .cluster import Cluster

__all__ = ["dagger_cluster", "dagger_process_cluster"]


def _async_fixture(fn: Callable[[], AsyncIterator[Cluster]]) -> Any:
    try:
        import pytest_asyncio
    except ImportError:
        name = fn.__name__

        @pytest.fixture(name=name)
        def needs_pytest_asyncio() -> None:
            pytest.fail(f"the {name} fixture is async and needs pytest-asyncio: "
                        "pip install pytest-asyncio", pytrace=False)

        return needs_pytest_asyncio
    return pytest_asyncio.fixture(fn)


@_async_fixture
async def dagger_cluster() -> AsyncIterator[Cluster]:
    """An in-process ``dagger.Cluster()`` on the test's loop, closed after the test."""
    from .cluster import Cluster

    async with Cluster() as cluster:
        yield cluster


@_async_fixture
async def dagger_process_cluster() -> AsyncIterator[Cluster]:
    """``dagger.Cluster(processes=2)``: two subprocess workers besides worker 0.

    Tasks run in those two processes, so their arguments and results must pickle
    (cloudpickle, for lambdas and closures); the workers are stopped after the test.
    """
    from .cluster import Cluster

    async with Cluster(processes=2) as cluster:
        yield cluster
