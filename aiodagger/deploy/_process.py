"""One ``aiodagger worker`` on another machine, started in an SSH session.

The remote command is ``echo $$; exec [env VAR=...] PYTHON -m aiodagger worker ADDRESS
... --token-fd 3 3<&0 </dev/null``. The shell prints its pid, which ``exec`` hands to
the worker: signals go to that process group with ``kill``, because sshd refuses a
session's own signal requests when the user is root. The token is written to the
session's standard input, and the input closed; the worker reads it to the end from
descriptor 3, a copy of that input, and closes it. It is never on a command line, which
``ps`` shows to every user there, nor in the environment. (Not ``--token-fd 0``: the
worker closes the descriptor it read, its next socket became descriptor 0, and libuv,
under uvloop, aborted the worker when it closed that socket.)

The worker's output is read as it comes, never left to fill the channel (a worker
blocked writing a log line stops working), logged, and its last lines kept for the
error that says why a worker left.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import DeployError

if TYPE_CHECKING:
    import asyncssh

    from ._hosts import Host

__all__ = ["RemoteProcess", "worker_command"]

logger = logging.getLogger(__name__)

TAIL_LINES = 20
# Seconds for the shell's first line (its pid): the session is open by then, so this
# is one round trip and a fork, unless the host is swapping.
PID_TIMEOUT = 30.0
# After SIGTERM: a worker stops its tasks within its own HURRY_GRACE, then its store.
TERM_GRACE = 3.0
KILL_GRACE = 3.0


# The descriptor the worker reads the token from: the session's input, copied there.
TOKEN_FD = 3


def worker_command(python: Sequence[str], env: Mapping[str, str], args: Sequence[str]) -> str:
    """The command line for the remote shell, every word quoted (``args`` after the
    scheduler's address; ``--token-fd`` is added here)."""
    words = ["exec"]
    if env:
        words += ["env", *(f"{k}={v}" for k, v in env.items())]
    words += [*python, "-m", "aiodagger", "worker", *args, "--token-fd", str(TOKEN_FD)]
    return f"echo $$; {shlex.join(words)} {TOKEN_FD}<&0 </dev/null"


class RemoteProcess:
    """A worker process in an SSH session on ``host``, named ``name`` in the cluster."""

    def __init__(self, host: Host, name: str, conn: asyncssh.SSHClientConnection,
                 process: asyncssh.SSHClientProcess[str]) -> None:
        self.host = host
        self.name = name
        self.pid: int | None = None
        self._conn: asyncssh.SSHClientConnection | None = conn
        self._process = process
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._readers = [asyncio.ensure_future(self._drain(process.stderr, True))]
        self.closed = asyncio.ensure_future(self._closed())

    @classmethod
    async def start(cls, host: Host, name: str, command: str, token: str) -> RemoteProcess:
        import asyncssh

        conn = await host.session()
        try:
            process = await conn.create_process(command, encoding="utf-8", errors="replace")
        except (OSError, asyncssh.Error) as exc:
            host.release(conn)
            raise DeployError(f"{host.label}: cannot start a command over SSH: "
                              f"{getattr(exc, 'reason', None) or exc}", host=host.label) from exc
        self = cls(host, name, conn, process)
        try:
            process.stdin.write(token + "\n")
            process.stdin.write_eof()  # the worker reads the token up to here
            first = await asyncio.wait_for(process.stdout.readline(), PID_TIMEOUT)
        except BaseException:
            await self.stop(0.0)
            raise
        if first.strip().isdigit():
            self.pid = int(first)
        elif first:  # a login shell that is not POSIX's, say: signals still reach it
            self._tail.append(first.rstrip("\n"))
        self._readers.append(asyncio.ensure_future(self._drain(process.stdout, False)))
        return self

    async def _drain(self, stream: asyncssh.SSHReader[str], keep: bool) -> None:
        while line := await stream.readline():
            line = line.rstrip("\n")
            if keep:
                self._tail.append(line)
            logger.info("%s on %s: %s", self.name, self.host.label, line)

    async def _closed(self) -> None:
        await self._process.wait_closed()
        self._release()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self.host.release(conn)

    @property
    def returncode(self) -> int | None:
        """The exit status, or minus the signal that ended it; None while it runs."""
        return self._process.returncode

    def output(self) -> str:
        """Its last lines of output, for an error message."""
        return "\n".join(self._tail)

    def why(self) -> str:
        """What its exit says: the status, its last words, and a hint where one fits."""
        code = self.returncode
        out = self.output()
        said = f"; its last output:\n{out}" if out else " and said nothing"
        hint = ""
        if "No module named aiodagger" in out or "No module named 'aiodagger'" in out:
            hint = ("\naiodagger is not installed for that interpreter there: install it, or "
                    "point python= at the interpreter that has it")
        elif code == 127:
            hint = "\nno such command there: python= names the interpreter on that host"
        return f"exited with status {code}{said}{hint}"

    async def wait(self, timeout: float) -> bool:
        """Whether it has exited (its session closed) within ``timeout`` seconds."""
        if not self.closed.done():
            await asyncio.wait([self.closed], timeout=timeout)
        return self.closed.done()

    async def _signal(self, name: str) -> None:
        """SIG``name`` to the worker and whatever it started: to its process group, by the
        pid the shell printed (the session leader's, kept by ``exec``); else through the
        session (sshd refuses that for root, whose session it serves from its privileged
        process: "session signalling requires privilege separation")."""
        if self.pid is not None:
            code, _ = await self.host.run(f"kill -s {name} -- -{self.pid}")
            if code == 0:
                return
        try:
            self._process.send_signal(name)
        except OSError:  # the channel has closed: nothing left to signal
            pass

    async def stop(self, wait_first: float) -> None:
        """Give it ``wait_first`` seconds to exit by itself (it was asked to leave), then
        SIGTERM, then SIGKILL; the session is closed either way."""
        try:
            if await self.wait(wait_first):
                if wait_first and self.returncode != 0:  # asked to leave, it failed on its way
                    logger.warning("worker %s on %s %s", self.name, self.host.label, self.why())
                return
            await self._signal("TERM")
            if await self.wait(TERM_GRACE):
                return
            logger.warning("worker %s on %s (pid %s) did not exit on SIGTERM; killing it",
                           self.name, self.host.label, self.pid)
            await self._signal("KILL")
            if not await self.wait(KILL_GRACE):
                logger.error("worker %s on %s (pid %s) could not be stopped", self.name,
                             self.host.label, self.pid)
        finally:
            self._process.close()
            for reader in self._readers:
                reader.cancel()
            self.closed.cancel()
            self._release()
            await asyncio.gather(*self._readers, self.closed, return_exceptions=True)
