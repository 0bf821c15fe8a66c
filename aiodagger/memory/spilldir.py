"""The per-store spill directory: its name, its owner's lock, and stale ones from dead owners.

``<base>/aiodagger-spill-<pid>-<worker name>@<host tag>``, holding ``.owner``: a file
that says who made the directory (host, machine id, boot id, PID namespace, PID) and
that its owner keeps locked (``flock``) for its store's whole life.

One ``--spill-dir`` may be shared by several machines (NFS, a shared volume) or by
containers whose PIDs collide, so a PID alone says nothing about a directory made
elsewhere. A directory is removed as stale only when its owner's lock can be taken, so
a live owner keeps it wherever its locks reach ours (one kernel, NFS with its lock
manager; on NFS mounted ``nolock`` give each machine a spill directory of its own).
Where there is no lock to ask (a filesystem without locks, or an owner that died
between making the directory and locking it) the PID decides, and only for a directory
of this host tag: this machine, this boot, this PID namespace, where a PID names one
process. So a crash's leftovers here are removed at the next start, and a live worker's
directory is left alone, here or elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import psutil

__all__ = ["OWNER", "PREFIX", "claim", "create", "host_tag", "path_for", "release", "remove",
           "remove_stale"]

logger = logging.getLogger(__name__)

PREFIX = "aiodagger-spill-"
OWNER = ".owner"
# Spill directories, and the directories of shared segments in /dev/shm (memory.shared):
# the same names, owners and locks, so that one sweep removes both kinds of leftovers.
KINDS = ("spill", "shm")
_NAME_RE = re.compile(r"^aiodagger-(?:spill|shm)-(?P<pid>\d+)-(?P<worker>.+)@(?P<tag>[0-9a-f]{8})$")
_WORKER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a lock attempt raises on a filesystem that has no locks (some FUSE and network
# filesystems): there the PID is all there is to go by.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

# Directories claimed by stores of this process: two stores with one worker name
# would remove each other's files. Also the only guard between stores of this process
# on NFS, where flock is a POSIX lock and so never conflicts within one process.
_claimed: set[Path] = set()
_claimed_lock = threading.Lock()


def _read(source: str) -> str:
    try:
        return Path(source).read_text().strip()
    except OSError:
        return ""


@functools.cache
def _identity() -> dict[str, str]:
    """What tells this PID space from any other: machine, boot, PID namespace."""
    try:
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_namespace = ""
    return {"host": socket.gethostname(), "machine_id": _read("/etc/machine-id"),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_namespace": pid_namespace}


def host_tag() -> str:
    """Eight hex digits naming this machine, boot and PID namespace: where a PID names one process."""
    text = "\0".join(_identity().values())
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def path_for(spill_dir: str | os.PathLike[str] | None, worker_name: str, kind: str = "spill") -> Path:
    """Where a store of ``worker_name`` in this process keeps its files (``kind``
    "spill"), or its shared segments ("shm", in ``/dev/shm``)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: one of {KINDS}")
    if not isinstance(worker_name, str) or not _WORKER_NAME_RE.match(worker_name):
        raise ValueError(f"worker_name={worker_name!r} is used in a directory name: use letters, "
                         "digits, '.', '_' and '-' only, starting with a letter or digit "
                         "(for example 'w0' or 'worker-3')")
    base = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
    return base / f"aiodagger-{kind}-{os.getpid()}-{worker_name}@{host_tag()}"


def claim(path: Path) -> None:
    """Reserve ``path`` for one store of this process; RuntimeError if another holds it."""
    with _claimed_lock:
        if path in _claimed:
            raise RuntimeError(f"another ChunkStore in this process already spills to {path}: "
                               "give each store its own worker_name")
        _claimed.add(path)


def release(path: Path) -> None:
    with _claimed_lock:
        _claimed.discard(path)


def remove_stale(base: Path) -> list[Path]:
    """Remove the spill (and shared-segment) directories in ``base`` whose owner is
    gone; return them."""
    removed: list[Path] = []
    try:
        children = list(os.scandir(base))
    except OSError as exc:
        logger.debug("cannot list %s for stale spill directories: %s", base, exc)
        return removed
    for child in children:
        match = _NAME_RE.match(child.name)
        if match is None or not child.is_dir(follow_symlinks=False):
            continue
        path = Path(child.path)
        with _claimed_lock:
            if path in _claimed:
                continue
        fd, why = _owner_gone(path, int(match["pid"]), match["tag"])
        try:
            if why is None:
                continue
            # Removed with the owner's lock held: whoever looks meanwhile sees a live owner.
            shutil.rmtree(path)
        except OSError as exc:  # another user's directory in a shared /tmp, say
            logger.debug("cannot remove stale spill directory %s: %s", path, exc)
            continue
        finally:
            if fd is not None:
                os.close(fd)
        logger.info("removed stale spill directory %s (%s)", path, why)
        removed.append(path)
    return removed


def _owner_gone(path: Path, pid: int, tag: str) -> tuple[int | None, str | None]:
    """Why the owner of ``path`` is gone (None: it may be alive), and its lock if taken."""
    try:
        # Read-write: on NFS flock is a POSIX write lock, which needs it.
        fd = os.open(path / OWNER, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:  # its owner died before making it, or is making it now
        return None, _by_pid(pid, tag)
    except OSError as exc:
        logger.debug("cannot open the owner file of %s: %s", path, exc)
        return None, None
    why: str | None = None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # its owner is alive and holds it
    except OSError as exc:
        if exc.errno in _NO_LOCKS:
            why = _by_pid(pid, tag)
    else:
        # Empty: opened before its owner locked and wrote it, or its owner died there.
        why = "its owner's lock is free" if os.pread(fd, 1, 0) else _by_pid(pid, tag)
    if why is None:
        os.close(fd)
        return None, None
    return fd, why


def _by_pid(pid: int, tag: str) -> str | None:
    """With no lock to ask, a PID says something only in this PID space."""
    if tag != host_tag():
        return None  # another machine's, boot's or container's PID names nothing here
    if pid == os.getpid():  # and no store here claims it: an earlier process with this PID
        return f"left by an earlier process {pid}"
    if psutil.pid_exists(pid):
        return None
    return f"process {pid} is gone"


def create(path: Path) -> int:
    """Make ``path`` (parents included), private to this user, after removing stale ones,
    and lock its owner file: the returned descriptor holds the lock until :func:`remove`.

    Called with ``path`` claimed, so an existing directory of that name is stale. On a
    filesystem without locks the descriptor holds none: only the PID speaks for it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():  # an earlier process with this PID, here, left it
        shutil.rmtree(path)
    os.mkdir(path, 0o700)
    owner = path / OWNER
    writable = lock = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            lock = _lock(owner, writable)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            logger.debug("no locks on %s (%s): its spill directories are known by their PIDs",
                         path.parent, exc)
        # Written once locked: a cleaner that finds the file empty asks the PID instead.
        text = "".join(f"{key}={value}\n" for key, value in {**_identity(), "pid": os.getpid()}.items())
        os.write(writable, text.encode())
    except BaseException:
        for fd in {writable, lock}:
            os.close(fd)
        raise
    if lock != writable:
        os.close(writable)
    return lock


def _lock(owner: Path, writable: int) -> int:
    """A descriptor of ``owner`` that holds its lock.

    A read-only one where that works: a disk on which a file is open for writing cannot
    be remounted read-only. Not on NFS, where flock is a POSIX write lock (flock(2)),
    which wants a writable descriptor and ends when any descriptor of the file closes.
    """
    fd = os.open(owner, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        # Waits only for a cleaner that opened the file first: it finds it empty, sees
        # this process alive, and lets go.
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except OSError as exc:
        os.close(fd)
        if exc.errno != errno.EBADF:
            raise
    fcntl.flock(writable, fcntl.LOCK_EX)
    return writable


def remove(path: Path, lock: int | None = None) -> None:
    """Remove ``path``, then let go of its owner lock (``lock``, from :func:`create`)."""
    shutil.rmtree(path, ignore_errors=True)
    if lock is not None:
        os.close(lock)
