"""Who may see the dashboard: the address it binds, and the checks every request passes.

The page shows function names, worker addresses and tracebacks, so it is treated like
the cluster's own listener: loopback by default, and a non-loopback address only with
the cluster's token. Three checks run on every request, in this order:

1. ``Host`` must name this server (the bound address, a loopback form when bound to
   loopback or a wildcard, or this machine's names and addresses when bound to a
   wildcard) with its port. This defeats DNS rebinding: a page on ``evil.example`` that
   re-points its name at 127.0.0.1 still sends ``Host: evil.example``.
2. An ``Origin``, when sent, must be the page's own origin (``http://`` + the Host).
   Browsers send one on every websocket handshake and cross-origin request, so a
   foreign page can neither open the websocket (cross-site websocket hijacking) nor
   read ``/metrics`` through a CORS-less fetch that still reaches the server.
3. Off loopback, the token: ``?token=`` (the server then sets it as an HttpOnly,
   SameSite=Strict cookie), the cookie, or ``Authorization: Bearer``. Missing: 401;
   wrong: 403. Compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from dataclasses import dataclass, field

from ..comm.server import is_loopback
from ..comm.tokens import weak_token_message

__all__ = ["DEFAULT_ADDRESS", "Bind", "parse_dashboard"]

DEFAULT_ADDRESS = "127.0.0.1:8787"
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Bind:
    """Where the dashboard listens, and the token it asks for (None on loopback)."""

    host: str
    port: int
    token: str | None
    option: str  # how the user spelled it, for errors: "Cluster(dashboard='...')"
    names: frozenset[str] = field(default=frozenset())  # Host names accepted (port apart)

    @property
    def loopback(self) -> bool:
        return self.token is None

    def with_port(self, port: int) -> Bind:
        """The same bind once listening: port 0 replaced by the one the kernel chose."""
        return Bind(self.host, port, self.token, self.option, self.names)

    def url_host(self) -> str:
        """The host a browser on this machine uses to reach the server."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    def host_allowed(self, header: str | None) -> bool:
        """Whether a ``Host`` header (``name:port``) names this server."""
        if not header:
            return False
        name, port = _split_host(header)
        return port == self.port and name.lower() in self.names

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        """Whether ``origin`` is the origin of the page this request's Host serves."""
        return hmac.compare_digest(origin.lower().rstrip("/"), f"http://{host_header}".lower())

    def token_ok(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())


def parse_dashboard(spec: object, token: str | None, option: str) -> Bind:
    """Check ``spec`` ("HOST:PORT") now, not at start.

    ``option`` names where it came from in errors ("Cluster(dashboard=...)", or the
    environment variable). Raises ValueError (TypeError for a wrong type) that says what
    to write instead.
    """
    if not isinstance(spec, str):
        raise TypeError(f"{option} takes 'HOST:PORT' (e.g. {DEFAULT_ADDRESS!r}; port 0 for any "
                        f"free port) or None, got {type(spec).__name__}: {spec!r}")
    host, sep, port_text = spec.strip().rpartition(":")
    if "://" in spec or not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{option}: {spec!r} is not HOST:PORT; write e.g. {DEFAULT_ADDRESS!r} "
                         "(port 0 for any free port), or '0.0.0.0:8787' with token=... to "
                         "serve other machines")
    host = host.strip("[]") or "127.0.0.1"
    if host.lower() == "localhost":
        host = "127.0.0.1"  # one socket: with port 0, IPv4 and IPv6 would get two ports
    port = int(port_text)
    if is_loopback(host):
        return Bind(host, port, None, option, _LOOPBACK_NAMES | {host.lower()})
    if not token:
        raise ValueError(
            f"{option} serves {host!r}, which other machines can reach, so the page needs the "
            "cluster's token: pass token=... (then open the page with ?token=...), or bind "
            f"{DEFAULT_ADDRESS!r}")
    weak = weak_token_message(token, option)
    if weak is not None:
        raise ValueError(f"{weak} (or bind {DEFAULT_ADDRESS!r})")
    return Bind(host, port, token, option, _names_for(host))


def _names_for(host: str) -> frozenset[str]:
    """The Host names of a server bound to ``host``: a wildcard answers on every
    address of this machine, and on its names."""
    names = {host.lower()}
    if host in ("0.0.0.0", "::"):
        names |= _LOOPBACK_NAMES
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        names |= _interface_addresses()
    return frozenset(names)


def _interface_addresses() -> set[str]:
    import psutil  # a dependency: the machine's memory, here its interfaces

    out = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                out.add(addr.address.split("%", 1)[0].lower())  # fe80::1%eth0: no zone
    return out


def _split_host(header: str) -> tuple[str, int | None]:
    """``name:port`` / ``[v6]:port`` -> (name, port); a missing port is None (port 80)."""
    header = header.strip()
    if header.startswith("["):
        name, _, rest = header[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = header.rpartition(":") if header.count(":") == 1 else (header, "", "")
    if not port.isdigit():
        return name, None
    try:  # one spelling per address: "0:0:0:0:0:0:0:1" is "::1"
        name = str(ipaddress.ip_address(name))
    except ValueError:
        pass
    return name, int(port)
