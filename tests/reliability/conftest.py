"""The chaos suite: real faults injected into real clusters (``tox -e reliability``).

Left out of the default test run (``--ignore`` in pyproject's addopts) because it kills,
stops, partitions and starves processes for minutes; `.ci/run` runs its short soak.
Every scenario prints the seed it drew (``AIODAGGER_CHAOS_SEED`` replays it) and ends
with ``no_leaks``: no process, thread, file descriptor, spill directory or shared-memory
segment more than when it began.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time

import psutil
import pytest
import uvloop

SPILL_PREFIX = "aiodagger-spill-"

# The first uvloop loop of a process opens a pipe that libuv keeps for good (its
# process-wide signal lock): opened here, before any scenario counts descriptors.
uvloop.new_event_loop().close()


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _spill_dirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith(SPILL_PREFIX)}


class Snapshot:
    """What this process and the machine hold, to compare before and after a scenario."""

    def __init__(self) -> None:
        me = psutil.Process()
        self.children = {p.pid for p in me.children(recursive=True)}
        self.fds = me.num_fds()
        self.threads = {t.ident for t in threading.enumerate()}
        self.shm = _shm()
        self.spill = _spill_dirs()

    def leaks(self, before: Snapshot) -> list[str]:
        found = []
        if extra := self.children - before.children:
            found.append(f"processes left running: {sorted(extra)}")
        if self.fds > before.fds:
            found.append(f"file descriptors: {before.fds} before, {self.fds} after")
        if extra := self.threads - before.threads:
            names = [t.name for t in threading.enumerate() if t.ident in extra]
            found.append(f"threads left running: {names}")
        if extra := self.shm - before.shm:
            found.append(f"shared-memory segments left in /dev/shm: {sorted(extra)}")
        if extra := self.spill - before.spill:
            found.append(f"spill directories left in {tempfile.gettempdir()}: {sorted(extra)}")
        return found


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves a process, thread, fd, segment or spill directory."""
    before = Snapshot()
    yield
    deadline = time.monotonic() + 10
    while True:
        leaks = Snapshot().leaks(before)
        if not leaks or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not leaks, "; ".join(leaks)


@pytest.fixture
def seed(request) -> int:
    """The scenario's random seed, printed so that a failure can be replayed."""
    value = int(os.environ.get("AIODAGGER_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\n{request.node.nodeid}: AIODAGGER_CHAOS_SEED={value}")
    request.node.user_properties.append(("seed", value))
    return value


def pytest_runtest_logreport(report):
    if report.failed:
        for name, value in report.user_properties:
            if name == "seed":
                report.sections.append(("chaos seed", f"replay with AIODAGGER_CHAOS_SEED={value}"))

