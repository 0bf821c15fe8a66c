"""The chaos suite: real faults injected into real clusters (``tox -e reliability``).

Left out of the default test run (``--ignore`` in pyproject's addopts) because it kills,
stops, partitions and starves processes for minutes; `.ci/run` runs its short soak.
Every scenario prints the seed it drew (``AIODAGGER_CHAOS_SEED`` replays it) and ends
with ``no_leaks``: no process, thread, file descriptor, spill directory or shared-memory
segment more than when it began.
"""

from __future__ import annotations

import gc
import os
import random
import tempfile
import threading
import time

import psutil
import pytest
import uvloop

SPILL_PREFIX = "aiodagger-spill-"

# libuv makes one signal pipe per process, with the first loop, and keeps it: made
# here, it is part of every baseline instead of a leak of whichever test came first.
uvloop.new_event_loop().close()


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _fds() -> dict[int, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) <= 2:
            continue  # pytest's output capture swaps what stdio points at between phases
        try:
            found[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the directory's own descriptor, closed by now
    return found


class Snapshot:
    """What this process and the machine hold, to compare before and after a scenario."""

    def __init__(self) -> None:
        me = psutil.Process()
        self.children = {p.pid for p in me.children(recursive=True)}
        self.fds = _fds()
        self.threads = {t.ident for t in threading.enumerate()}
        self.shm = _shm()
        self.base = tempfile.gettempdir()
        self.spill = self.spill_base()

    def spill_base(self) -> set[str]:
        """The spill directories now in the directory this snapshot listed."""
        return {os.path.join(self.base, name) for name in os.listdir(self.base)
                if name.startswith(SPILL_PREFIX)}

    def leaks(self, before: Snapshot) -> list[str]:
        found = []
        if extra := self.children - before.children:
            found.append(f"processes left running: {sorted(extra)}")
        if extra := set(self.fds.items()) - set(before.fds.items()):
            found.append(f"file descriptors left open: {sorted(extra)}")
        if extra := self.threads - before.threads:
            names = [t.name for t in threading.enumerate() if t.ident in extra]
            found.append(f"threads left running: {names}")
        if extra := self.shm - before.shm:
            found.append(f"shared-memory segments left in /dev/shm: {sorted(extra)}")
        if extra := before.spill_base() - before.spill:
            found.append(f"spill directories left: {sorted(extra)}")
        return found


@pytest.fixture
def no_leaks(request):
    """Fails the test if it leaves a process, thread, fd, segment or spill directory.

    The check runs after every fixture is torn down (the hook below): the event loop
    fixture closes its own descriptors only then.
    """
    request.node.stash[BASELINE] = Snapshot()
    yield


BASELINE = pytest.StashKey[Snapshot]()


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory):
    """Spill directories of this run go to a directory of its own (workers inherit
    TMPDIR), so that the leak check sees only them, not other programs' files."""
    path = tmp_path_factory.mktemp("tmpdir")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(path)
    yield path
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    outcome = yield
    before = item.stash.get(BASELINE, None)
    if before is None or outcome.excinfo is not None:
        return
    gc.collect()  # a closed uvloop loop lets its self-pipe go only when collected
    deadline = time.monotonic() + 10
    while (leaks := Snapshot().leaks(before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if leaks:
        outcome.force_exception(AssertionError("; ".join(leaks)))


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

