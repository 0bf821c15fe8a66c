"""The hosts of an SSH cluster: parsing ``[user@]host[:port]``, connecting with errors
that say what to check, and the few SSH connections each host needs.

asyncssh is imported inside the functions that use it: this module loads with
``aiodagger.deploy``, which must not need it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DeployConnectionError

if TYPE_CHECKING:
    import asyncssh

__all__ = ["Host", "HostSpec", "connect", "parse_host"]

logger = logging.getLogger(__name__)

# Worker sessions per SSH connection: OpenSSH's sshd allows 10 (MaxSessions); two stay
# free for the `kill` and `getconf` commands a host may need while its workers run.
SESSIONS_PER_CONNECTION = 8


@dataclass(frozen=True)
class HostSpec:
    """One entry of ``hosts=``: ``label`` is the entry as given, for messages."""

    label: str
    host: str
    port: int | None = None
    username: str | None = None


def parse_host(entry: Any) -> HostSpec:
    """``node1``, ``alice@node1``, ``node1:2222``, ``[fe80::1]:2222``, or a bare IPv6 address."""
    if not isinstance(entry, str) or not entry.strip():
        raise TypeError(f"SSHCluster(hosts=[...]) takes host names as strings "
                        f"('node1', 'user@node1:2222'), got {entry!r}")
    rest = entry.strip()
    username = None
    if "@" in rest:
        username, _, rest = rest.rpartition("@")
    port: str | None = None
    if rest.startswith("["):  # [IPv6]:port
        host, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise ValueError(f"SSHCluster(hosts=[{entry!r}]): write an IPv6 address with a port "
                             "as '[fe80::1]:2222'")
        port = tail[1:] or None
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:  # a name, an IPv4 address, or a bare IPv6 address
        host = rest
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"SSHCluster(hosts=[{entry!r}]): {port!r} is not a port number")
    if not host or (username is not None and not username):
        raise ValueError(f"SSHCluster(hosts=[{entry!r}]): write hosts as 'node1', "
                         "'user@node1' or 'node1:2222'")
    return HostSpec(entry, host, int(port) if port else None, username)


async def connect(spec: HostSpec, options: Mapping[str, Any],
                  timeout: float) -> asyncssh.SSHClientConnection:
    """An SSH connection to ``spec``, or a :class:`DeployConnectionError` that names the
    host and what to check."""
    import asyncssh

    kwargs = dict(options)
    if spec.port is not None:
        kwargs["port"] = spec.port
    if spec.username is not None:
        kwargs["username"] = spec.username
    kwargs.setdefault("connect_timeout", timeout)
    port = kwargs.get("port", 22)
    user = kwargs.get("username") or "the local user name"
    label = spec.label
    try:
        # asyncssh's own timeout covers the handshake and authentication too; this one
        # guards against a server that stalls somewhere it does not count.
        return await asyncio.wait_for(asyncssh.connect(spec.host, **kwargs), timeout + 5.0)
    except asyncssh.PermissionDenied as exc:
        raise DeployConnectionError(
            f"{label}: the SSH server refused to log in {user}: {exc.reason}; check "
            "connect_options' username and client_keys (or the agent's keys), and that the "
            "public key is in that user's ~/.ssh/authorized_keys there", host=label) from exc
    except asyncssh.HostKeyNotVerifiable as exc:
        raise DeployConnectionError(
            f"{label}: its SSH host key is not trusted: {exc.reason}; add it to "
            f"~/.ssh/known_hosts (ssh-keyscan -p {port} {spec.host}), or pass "
            "connect_options={'known_hosts': FILE}", host=label) from exc
    except asyncssh.Error as exc:  # the server disconnected, a protocol failure...
        raise DeployConnectionError(
            f"{label}: the SSH connection failed: {exc.reason}", host=label) from exc
    except TimeoutError as exc:
        raise DeployConnectionError(
            f"{label}: no SSH connection within {timeout:g} s: check that the host is up and "
            f"reachable from here, and that no firewall drops port {port} (connect_timeout= "
            "waits longer)", host=label) from exc
    except OSError as exc:  # refused, no route, unknown name
        raise DeployConnectionError(
            f"cannot reach {label} over SSH (port {port}): {exc.strerror or exc}; check the "
            "host name, that sshd runs there and listens on that port, and firewalls",
            host=label) from exc


class Host:
    """One machine: its SSH connections, opened as its workers need sessions."""

    def __init__(self, spec: HostSpec, options: Mapping[str, Any], timeout: float) -> None:
        self.spec = spec
        self._options = options
        self._timeout = timeout
        self._conns: list[asyncssh.SSHClientConnection] = []
        self._sessions: dict[asyncssh.SSHClientConnection, int] = {}
        self._lock = asyncio.Lock()

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def local_address(self) -> str:
        """This machine's address on the route to the host: where its workers reach us."""
        address = str(self._conns[0].get_extra_info("sockname")[0])
        mapped = ipaddress.ip_address(address)
        if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
            return str(mapped.ipv4_mapped)
        return address

    async def connect(self) -> None:
        """The first connection: reachable, its key trusted, the login accepted."""
        async with self._lock:
            if not self._conns:
                self._add(await connect(self.spec, self._options, self._timeout))

    def _add(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conns.append(conn)
        self._sessions[conn] = 0

    async def session(self) -> asyncssh.SSHClientConnection:
        """A connection with room for one more worker session (call :meth:`release` after)."""
        async with self._lock:
            for conn in self._conns:
                if self._sessions[conn] < SESSIONS_PER_CONNECTION:
                    break
            else:
                conn = await connect(self.spec, self._options, self._timeout)
                self._add(conn)
            self._sessions[conn] += 1
            return conn

    def release(self, conn: asyncssh.SSHClientConnection) -> None:
        if conn in self._sessions:
            self._sessions[conn] -= 1

    async def run(self, command: str, timeout: float = 10.0) -> tuple[int | None, str]:
        """A short command's exit status and output; (None, why) if it could not run."""
        import asyncssh

        try:
            result = await self._conns[0].run(command, timeout=timeout)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            return None, str(exc)
        return result.exit_status, str(result.stdout or "")

    async def cpus(self) -> int | None:
        code, out = await self.run("getconf _NPROCESSORS_ONLN")
        return int(out) if code == 0 and out.strip().isdigit() else None

    async def close(self) -> None:
        conns, self._conns = self._conns, []
        self._sessions.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            try:
                await asyncio.wait_for(conn.wait_closed(), 5.0)
            except (TimeoutError, OSError) as exc:
                logger.debug("closing the SSH connection to %s: %s", self.label, exc)
