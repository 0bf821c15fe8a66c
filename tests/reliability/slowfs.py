"""A slow disk: a FUSE passthrough filesystem whose reads, writes and syncs wait.

``python -m tests.reliability.slowfs BACKING MOUNTPOINT --seed N`` serves ``BACKING`` at
``MOUNTPOINT`` until it is unmounted. Every read and write waits about ``--io-ms``
(per request: the kernel sends at most 128 KiB in one), every open, create and fsync
about ``--meta-ms``, and one request in ``--stall-every`` stalls ``--stall-ms``, as a
disk busy with something else does. The waits are drawn from ``--seed``.

The files are real and the latency is the kernel's: a writer blocks in ``write(2)``
until this process answers, as it would on a slow device. :func:`mounted` runs it for
a test, and says why where FUSE cannot mount.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Latency:
    """Seeded waits, shared by the filesystem's threads."""

    def __init__(self, seed: int, io_ms: float, meta_ms: float, stall_every: int, stall_ms: float) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.io = io_ms / 1000
        self.meta = meta_ms / 1000
        self.stall_every = stall_every
        self.stall = stall_ms / 1000

    def wait(self, base: float) -> None:
        with self._lock:
            seconds = base * self._rng.uniform(0.5, 1.5)
            if self.stall_every and self._rng.randrange(self.stall_every) == 0:
                seconds += self.stall
        time.sleep(seconds)


def serve(backing: str, mountpoint: str, latency: Latency) -> None:
    from fuse import FUSE, Operations  # fusepy: the reliability extra

    class SlowPassthrough(Operations):
        def _real(self, path: str) -> str:
            return os.path.join(backing, path.lstrip("/"))

        # -- what waits --------------------------------------------------------------
        def read(self, path, size, offset, fh):
            latency.wait(latency.io)
            return os.pread(fh, size, offset)

        def write(self, path, data, offset, fh):
            latency.wait(latency.io)
            return os.pwrite(fh, data, offset)

        def fsync(self, path, datasync, fh):
            latency.wait(latency.meta)
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)

        def open(self, path, flags):
            latency.wait(latency.meta)
            return os.open(self._real(path), flags)

        def create(self, path, mode, fi=None):
            latency.wait(latency.meta)
            return os.open(self._real(path), os.O_RDWR | os.O_CREAT, mode)

        # -- what passes through -----------------------------------------------------
        def flush(self, path, fh):
            return None

        def release(self, path, fh):
            os.close(fh)

        def truncate(self, path, length, fh=None):
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._real(path), length)

        def getattr(self, path, fh=None):
            st = os.lstat(self._real(path)) if fh is None else os.fstat(fh)
            return {key: getattr(st, key) for key in (
                "st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")}

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(self._real(path))]

        def access(self, path, amode):
            if not os.access(self._real(path), amode):
                raise OSError(13, "permission denied")  # EACCES

        def mkdir(self, path, mode):
            os.mkdir(self._real(path), mode)

        def rmdir(self, path):
            os.rmdir(self._real(path))

        def unlink(self, path):
            os.unlink(self._real(path))

        def rename(self, old, new):
            os.rename(self._real(old), self._real(new))

        def chmod(self, path, mode):
            os.chmod(self._real(path), mode)

        def chown(self, path, uid, gid):
            os.chown(self._real(path), uid, gid)

        def utimens(self, path, times=None):
            os.utime(self._real(path), times)

        def readlink(self, path):
            return os.readlink(self._real(path))

        def symlink(self, target, source):
            os.symlink(source, self._real(target))

        def statfs(self, path):
            st = os.statvfs(self._real(path))
            return {key: getattr(st, key) for key in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                "f_flag", "f_frsize", "f_namemax")}

    # big_writes: 128 KiB requests rather than a page each, as a block device gets.
    FUSE(SlowPassthrough(), mountpoint, foreground=True, nothreads=False, big_writes=True)


def _why_not() -> str | None:
    """Why FUSE cannot mount here, or None where it may."""
    try:
        import fuse  # noqa: F401
    except ImportError as exc:
        return f"fusepy is not installed ({exc}): pip install -e '.[reliability]'"
    except OSError as exc:  # fusepy loads libfuse when imported
        return f"libfuse2 is missing ({exc}): .ci/reliability-setup installs it"
    if shutil.which("fusermount") is None:
        return "no fusermount command: .ci/reliability-setup installs the fuse package"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse device in this machine or container"
    return None


@contextlib.contextmanager
def mounted(directory: Path, seed: int, **latency: float) -> Iterator[Path]:
    """A slow disk mounted under ``directory``; the test is skipped, saying why, where
    FUSE cannot mount."""
    import pytest

    why = _why_not()
    if why is not None:
        pytest.skip(f"no slow FUSE disk: {why}")
    backing, mountpoint = directory / "backing", directory / "mount"
    backing.mkdir()
    mountpoint.mkdir()
    options = [f"--{key.replace('_', '-')}={value}" for key, value in latency.items()]
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.slowfs", str(backing),
                             str(mountpoint), f"--seed={seed}", *options],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None:
                assert proc.stderr is not None
                pytest.skip(f"no slow FUSE disk: mounting failed: {proc.stderr.read().decode().strip()}")
            assert time.monotonic() < deadline, "the slow disk did not mount within 30 s"
            time.sleep(0.02)
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount", "-u", str(mountpoint)], check=True, timeout=30)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.slowfs")
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--io-ms", type=float, default=2.0)
    parser.add_argument("--meta-ms", type=float, default=10.0)
    parser.add_argument("--stall-every", type=int, default=100)
    parser.add_argument("--stall-ms", type=float, default=250.0)
    args = parser.parse_args(argv)
    latency = Latency(args.seed, args.io_ms, args.meta_ms, args.stall_every, args.stall_ms)
    serve(args.backing, args.mountpoint, latency)


if __name__ == "__main__":
    main()
