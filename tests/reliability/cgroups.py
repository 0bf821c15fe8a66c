"""Memory cgroups (v1) for the chaos suite: a limit the kernel enforces with a real OOM kill.

A scenario makes a child of this process's own memory cgroup, moves the processes it
started into it, and removes it when done (``with MemoryCgroup(...)``), even on failure.
Pages a process had before it moved stay charged where they were (v1 moves no charge
unless ``memory.move_charge_at_immigrate`` says so): only what it allocates afterwards
counts against the limit, so a worker can be moved in with its imports already done.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

__all__ = ["MemoryCgroup", "memory_cgroups_unavailable"]

MOUNT = Path("/sys/fs/cgroup/memory")


def _own_memory_cgroup() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MOUNT / path.lstrip("/")
    return None


def memory_cgroups_unavailable() -> str | None:
    """Why this machine cannot run the OOM scenarios, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to create memory cgroups"
    parent = _own_memory_cgroup()
    if parent is None or not (parent / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {MOUNT}"
    if not os.access(parent, os.W_OK):
        return f"cannot create a cgroup under {parent}"
    return None


class MemoryCgroup:
    """A memory cgroup with a limit, removed on exit (after its processes are gone)."""

    def __init__(self, limit: int) -> None:
        parent = _own_memory_cgroup()
        assert parent is not None, memory_cgroups_unavailable()
        self.path = parent / f"aiodagger-chaos-{uuid.uuid4().hex[:12]}"
        self.limit = limit

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        except BaseException:
            self.path.rmdir()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]

    @property
    def oom_kills(self) -> int | None:
        """Processes the kernel killed here for memory (None: this kernel does not count)."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
        return None

    def remove(self, timeout: float = 10.0) -> None:
        """Remove the cgroup; its processes must have ended (the scenario ends those it
        started): a dead process may take a moment to leave it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"cgroup {self.path} still holds pids {self.pids()}") from None
                time.sleep(0.05)
