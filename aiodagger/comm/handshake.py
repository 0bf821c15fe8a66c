"""The handshake every connection starts with: protocol version, then mutual
HMAC-SHA256 challenge-response over the cluster's shared token.

Both sides prove they know the token without sending it: each sends a fresh random
nonce and answers with HMAC(token, role || their nonce || our nonce). Until the
handshake is over, frames are limited to a small msgpack header without buffers (every
Comm starts that way; see framing.Comm), and nothing is unpickled: a peer that does not know the token cannot make us run code.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from typing import Any

from ..errors import AuthenticationError, ProtocolError
from .framing import Comm
from .tokens import new_token

__all__ = ["PROTOCOL_VERSION", "client_handshake", "new_token", "server_handshake"]

PROTOCOL_VERSION = 2  # 2: the messages of comm/protocol.py
HANDSHAKE_TIMEOUT = 10.0


def _proof(token: bytes, role: bytes, theirs: bytes, ours: bytes) -> bytes:
    return hmac.new(token, role + theirs + ours, hashlib.sha256).digest()


async def _expect(comm: Comm, op: str, timeout: float) -> dict[str, Any]:
    header, _ = await asyncio.wait_for(comm.recv(), timeout)
    if header.get("op") == "refused":
        raise AuthenticationError(f"{comm.peer} refused the connection: {header.get('reason')}")
    if header.get("op") != op:
        raise ProtocolError(f"expected {op!r} during the handshake, got {header.get('op')!r}")
    return header


def _bytes(header: dict[str, Any], key: str) -> bytes:
    value = header.get(key)
    if not isinstance(value, bytes) or not 16 <= len(value) <= 64:
        raise ProtocolError(f"handshake field {key!r} is missing or malformed")
    return value


async def client_handshake(comm: Comm, token: str, info: dict[str, Any],
                           timeout: float = HANDSHAKE_TIMEOUT) -> dict[str, Any]:
    """Authenticate to the server at the other end of ``comm``; return its welcome header."""
    key = token.encode()
    ours = secrets.token_bytes(32)
    try:
        comm.send_nowait({"op": "hello", "version": PROTOCOL_VERSION, "nonce": ours, "info": info})
    except ConnectionError:
        raise comm.closed_error() from None  # e.g. the server's first bytes were not a frame
    challenge = await _expect(comm, "challenge", timeout)
    theirs = _bytes(challenge, "nonce")
    if not hmac.compare_digest(_bytes(challenge, "proof"), _proof(key, b"server", ours, theirs)):
        comm.close()
        raise AuthenticationError(f"{comm.peer} failed to prove it knows the cluster token")
    comm.send_nowait({"op": "auth", "proof": _proof(key, b"client", theirs, ours)})
    welcome = await _expect(comm, "welcome", timeout)
    comm.authenticated()
    return welcome


async def server_handshake(comm: Comm, token: str, welcome: dict[str, Any] | None = None,
                           timeout: float = HANDSHAKE_TIMEOUT) -> dict[str, Any]:
    """Authenticate the client at the other end of ``comm``; return its hello info."""
    key = token.encode()
    hello = await _expect(comm, "hello", timeout)
    if hello.get("version") != PROTOCOL_VERSION:
        comm.send_nowait({"op": "refused", "reason": f"protocol version {PROTOCOL_VERSION} required, "
                                                     f"peer speaks {hello.get('version')!r}"})
        raise AuthenticationError(f"{comm.peer} speaks protocol version {hello.get('version')!r}, "
                                  f"this cluster {PROTOCOL_VERSION}")
    theirs = _bytes(hello, "nonce")
    ours = secrets.token_bytes(32)
    comm.send_nowait({"op": "challenge", "version": PROTOCOL_VERSION, "nonce": ours,
                      "proof": _proof(key, b"server", theirs, ours)})
    auth = await _expect(comm, "auth", timeout)
    if not hmac.compare_digest(_bytes(auth, "proof"), _proof(key, b"client", ours, theirs)):
        comm.send_nowait({"op": "refused", "reason": "wrong token"})
        raise AuthenticationError(f"{comm.peer} failed to authenticate (wrong token)")
    comm.send_nowait({"op": "welcome", **(welcome or {})})
    comm.authenticated()
    info = hello.get("info")
    return info if isinstance(info, dict) else {}
