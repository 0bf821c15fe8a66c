"""`aiodagger worker` processes for the tests, and task functions they can import.

Workers run as a user runs them (``python -m aiodagger worker ADDRESS --token-file F``),
with the repository on their path so that the functions below are found by reference.
Every process started here is ended, by its pid, when the test ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcesses:
    """Starts `aiodagger worker` processes and ends each of them (by pid) on ``stop_all``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def start(self, address: str, token_file: Path | None, *extra: str, prefix: tuple[str, ...] = (),
              threads: int = 2, env_token: str | None = None) -> subprocess.Popen[bytes]:
        """Without ``token_file``, the token is given in $AIODAGGER_TOKEN (``env_token``)."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        env.pop("AIODAGGER_TOKEN", None)
        if env_token is not None:
            env["AIODAGGER_TOKEN"] = env_token
        token_args = ["--token-file", str(token_file)] if token_file is not None else []
        log = self.log_dir / f"worker-{len(self.procs)}.log"
        with open(log, "wb") as out, open(log.with_suffix(".err"), "wb") as err:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "aiodagger", "worker", address,
                 *token_args, "--threads", str(threads), *extra],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=ROOT,
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        """What it printed, then what it wrote to stderr (its log lines)."""
        return self.logs[proc.pid].read_text(errors="replace") + self.errors(proc)

    def errors(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].with_suffix(".err").read_text(errors="replace")

    async def wait_exit(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int | None:
        """Its exit status, or None if it is still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return proc.returncode

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)

    def stop_all(self) -> None:
        for proc in self.procs:
            self.stop(proc)

    async def wait_joined(self, cluster, procs, timeout: float = 30.0):
        """The WorkerInfo of each process in ``procs`` once all have joined ``cluster``."""
        deadline = time.monotonic() + timeout
        while True:
            by_pid = {w.pid: w for w in cluster.workers}
            if all(p.pid in by_pid for p in procs):
                return [by_pid[p.pid] for p in procs]
            for p in procs:
                if p.poll() is not None:
                    raise AssertionError(f"worker pid {p.pid} exited with {p.returncode} before "
                                         f"joining:\n{self.output(p)}")
            if time.monotonic() > deadline:
                logs = "\n".join(self.output(p) for p in procs)
                raise AssertionError(f"workers did not join within {timeout} s; cluster has "
                                     f"{cluster.workers}\n{logs}")
            await asyncio.sleep(0.05)


def read_line(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bytes:
    """The next line ``proc`` prints, waiting at most ``timeout`` for it to begin."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"process {proc.pid} said nothing within {timeout} s")
    return proc.stdout.readline()


def write_token(directory: Path, token: str) -> Path:
    path = directory / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


# -- task functions (found by reference in the worker processes) ------------------------------

def pid_of(_dep=None) -> int:
    return os.getpid()


def where(_dep=None) -> tuple[int, str]:
    """This process's pid and its network namespace: which of the test hosts it runs on."""
    return os.getpid(), os.readlink("/proc/self/ns/net")


def block(size: int, seed: int) -> tuple[int, bytes]:
    """A result larger than what travels inline with a completion, so it stays where it is made."""
    return os.getpid(), bytes([seed % 256]) * size


def digest(*blocks: tuple[int, bytes]) -> tuple[int, list[tuple[int, int, str]]]:
    """Where each block was made, its size and hash, and where this ran."""
    return os.getpid(), [(pid, len(data), hashlib.sha256(data).hexdigest()) for pid, data in blocks]


def token_exposure(token: str) -> dict[str, bool]:
    """Where a task finds ``token``: its environment, the environment its process
    started with, its command line, and the environment of a process it starts."""
    child = subprocess.run([sys.executable, "-c", "import os; print(repr(dict(os.environ)))"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    with open("/proc/self/environ", "rb") as f:
        initial = f.read()
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read()
    return {
        "os.environ": any(token in value for value in os.environ.values()),
        "/proc/self/environ": token.encode() in initial,
        "/proc/self/cmdline": token.encode() in cmdline,
        "child's environment": token in child,
    }


def wait_for_file(path: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    return os.getpid()
