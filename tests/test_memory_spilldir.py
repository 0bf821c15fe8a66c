"""Spill directories shared by several hosts: an owner's lock, not its PID, keeps a directory.

The other owners are real processes: one that holds its lock as a live worker elsewhere
does, one killed while spilling, one that exited. "Another host" is a directory whose
host tag is not this one's, as another machine (or a container in another PID
namespace) writing to the same ``--spill-dir`` names its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from aiodagger.memory import ChunkStore, spilldir
from tests.memory_disks import private_dir
from tests.workers import read_line

OTHER_HOST = "0badc0de"

# An owner on another host, as aiodagger there leaves it: the directory, then its
# owner file, locked, then who it is. It holds the lock until its stdin closes.
OWNER = textwrap.dedent("""
    import fcntl, os, sys
    path, host = sys.argv[1], sys.argv[2]
    os.mkdir(path, 0o700)
    fd = os.open(os.path.join(path, ".owner"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"host={host}\\npid={os.getpid()}\\n".encode())
    with open(os.path.join(path, "1.spill"), "wb") as f:
        f.write(b"a chunk of a live worker")
    print("locked", flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def base():
    with private_dir() as path:
        yield path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)  # reaped: the PID names no process now
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def end(proc: subprocess.Popen[bytes], sig: int | None = None) -> None:
    """Close its pipes (an owner waiting on stdin exits then), or send ``sig``; reap it."""
    if sig is not None and proc.poll() is None:
        os.kill(proc.pid, sig)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise


class Owner:
    """A process that owns ``path`` as a worker on ``host`` does, until it is ended."""

    def __init__(self, path: Path, host: str = "elsewhere") -> None:
        self.path = path
        self.proc = subprocess.Popen([sys.executable, "-c", OWNER, str(path), host],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            line = read_line(self.proc)
            assert line == b"locked\n", f"the owner did not start: {line!r}"
        except BaseException:
            end(self.proc, signal.SIGKILL)
            raise

    def end(self) -> None:
        end(self.proc)


def quiet_store(base: Path, name: str = "w0") -> ChunkStore:
    return ChunkStore("64MiB", spill_dir=base, worker_name=name, monitor_interval=None)


async def test_a_live_owner_on_another_host_keeps_its_directory_though_its_pid_is_dead_here(base):
    # Its PID names no process here, as any PID of another machine may not.
    theirs = base / f"aiodagger-spill-{dead_pid()}-proc-1@{OTHER_HOST}"
    owner = Owner(theirs)
    try:
        async with quiet_store(base):
            assert (theirs / "1.spill").read_bytes() == b"a chunk of a live worker"
        assert (theirs / "1.spill").exists()
    finally:
        owner.end()
    async with quiet_store(base):  # the owner has gone: its lock is free
        assert not theirs.exists()


async def test_a_dead_owner_on_another_host_is_removed_though_its_pid_is_alive_here(base):
    # Another machine's PID that happens to be a live process here says nothing either.
    theirs = base / f"aiodagger-spill-{os.getppid()}-proc-1@{OTHER_HOST}"
    Owner(theirs).end()
    async with quiet_store(base):
        assert not theirs.exists()


async def test_a_worker_killed_while_spilling_leaves_a_directory_the_next_start_removes(base):
    script = textwrap.dedent("""
        import asyncio, sys
        from aiodagger.memory import ChunkStore

        async def main():
            store = ChunkStore("4MiB", spill_dir=sys.argv[1], worker_name="w1", monitor_interval=None)
            await store.start()
            for i in range(8):
                store.put(i, b"x" * (1 << 20))
            async with asyncio.timeout(30):
                while not store.spilled_bytes:
                    await asyncio.sleep(0.01)
            print(store.directory, flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(base)], stdout=subprocess.PIPE)
    try:
        left = Path(read_line(proc).decode().strip())
        assert any(left.glob("*.spill"))
    finally:
        end(proc, signal.SIGKILL)
    assert left.is_dir()
    async with quiet_store(base):
        assert not left.exists()


async def test_without_an_owner_file_only_a_pid_of_this_host_says_it_is_gone(base):
    # Made, and its maker died before it wrote its owner file.
    ours = base / f"aiodagger-spill-{dead_pid()}-w2@{spilldir.host_tag()}"
    theirs = base / f"aiodagger-spill-{dead_pid()}-w2@{OTHER_HOST}"
    alive = base / f"aiodagger-spill-{os.getppid()}-w2@{spilldir.host_tag()}"
    for path in (ours, theirs, alive):
        path.mkdir()
    async with quiet_store(base):
        assert not ours.exists()
        assert theirs.exists() and alive.exists()


async def test_a_store_holds_its_lock_and_says_who_it_is(base):
    async with quiet_store(base) as store:
        owner = (store.directory / ".owner").read_text()
        assert f"pid={os.getpid()}\n" in owner and f"host={os.uname().nodename}\n" in owner
        probe = subprocess.run(
            [sys.executable, "-c", "import fcntl, os, sys\n"
             "fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except BlockingIOError:\n    sys.exit(3)\n",
             str(store.directory / ".owner")], timeout=30)
        assert probe.returncode == 3  # held by this process
    assert not store.directory.exists()
