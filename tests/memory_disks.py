"""Real directories for the memory tests: a private temp dir, and a tiny tmpfs to fill up."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def private_dir() -> Iterator[Path]:
    """A fresh directory, removed afterwards whatever the test left in it."""
    path = Path(tempfile.mkdtemp(prefix="aiodagger-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def tmpfs(size: str = "16m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on a fresh directory; skips the test where mounting is refused."""
    with private_dir() as path:
        if shutil.which("mount") is None:
            pytest.skip("no `mount` command here to mount a tmpfs")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.skip(f"mounting a {size} tmpfs was refused (uid {os.getuid()}): "
                        f"{done.stderr.strip() or done.returncode}")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=True, timeout=30)
