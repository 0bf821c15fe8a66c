"""The per-store spill directory: its name, its creation, and stale ones from dead processes.

``<base>/aiodagger-spill-<pid>-<worker name>``: the PID tells a later process whether
the owner is still alive, so directories left by a crash are removed at the next start
while a running worker's directory on the same disk is left alone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import psutil

__all__ = ["PREFIX", "claim", "create", "path_for", "release", "remove", "remove_stale"]

logger = logging.getLogger(__name__)

PREFIX = "aiodagger-spill-"
_NAME_RE = re.compile(r"^aiodagger-spill-(\d+)-(.+)$")
_WORKER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Directories claimed by stores of this process: two stores with one worker name
# would remove each other's files.
_claimed: set[Path] = set()
_claimed_lock = threading.Lock()


def path_for(spill_dir: str | os.PathLike[str] | None, worker_name: str) -> Path:
    """Where a store of ``worker_name`` in this process keeps its files."""
    if not isinstance(worker_name, str) or not _WORKER_NAME_RE.match(worker_name):
        raise ValueError(f"worker_name={worker_name!r} is used in a directory name: use letters, "
                         "digits, '.', '_' and '-' only, starting with a letter or digit "
                         "(for example 'w0' or 'worker-3')")
    base = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
    return base / f"{PREFIX}{os.getpid()}-{worker_name}"


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
    """Remove the spill directories in ``base`` whose process is gone; return them.

    A directory named after this process but claimed by no store here is stale too:
    a container restarted with the same PID left it.
    """
    removed: list[Path] = []
    try:
        children = list(os.scandir(base))
    except OSError as exc:
        logger.debug("cannot list %s for stale spill directories: %s", base, exc)
        return removed
    me = os.getpid()
    for child in children:
        match = _NAME_RE.match(child.name)
        if match is None or not child.is_dir(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        path = Path(child.path)
        if pid == me:
            with _claimed_lock:
                if path in _claimed:
                    continue
        elif psutil.pid_exists(pid):
            continue
        try:
            shutil.rmtree(path)
        except OSError as exc:  # another user's directory in a shared /tmp, say
            logger.debug("cannot remove stale spill directory %s: %s", path, exc)
            continue
        logger.info("removed stale spill directory %s (process %d is gone)", path, pid)
        removed.append(path)
    return removed


def create(path: Path) -> None:
    """Make ``path`` (parents included), private to this user, after removing stale ones.

    Called with ``path`` claimed, so an existing directory of that name is stale.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():  # an earlier process with this PID (a restarted container) left it
        shutil.rmtree(path)
    os.mkdir(path, 0o700)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
