"""The handshake every connection starts with: protocol version, then mutual
HMAC-SHA256 challenge-response over a key derived from the cluster's shared token.

::

    client                                   server
      hello     {version, nonce_c, info}  ->
                                          <-  challenge {version, nonce_s, salt}
      auth      {proof_c}                 ->      (checked: else "refused")
                                          <-  welcome   {proof_s, ...}
      (proof_s checked before anything in the welcome is used)

The hello and the welcome also say the largest frame their sender takes
(``max_frame``): nothing larger is sent to it.

The key is scrypt(token, salt), the salt random per cluster (its listeners share it);
each proof is HMAC(key, role || nonce_c || nonce_s || salt). The client proves first,
so a peer that does not know the token learns nothing it could test guesses against
offline; and even a recorded handshake costs an attacker one scrypt per guess. The
first handshake of a process with a cluster costs it that scrypt too (12 ms here);
later ones 0.12 ms, as before it. Until the handshake is over,
frames are limited to a small msgpack header without buffers (every Comm starts that
way; see framing.Comm), and nothing is unpickled: a peer that does not know the token
cannot make us run code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any

from ..errors import AuthenticationError, ProtocolError
from .framing import Comm
from .tokens import new_token

__all__ = ["HANDSHAKE_TIMEOUT", "PROTOCOL_VERSION", "ServerKey", "client_handshake", "new_token",
           "server_handshake"]

# 2: the messages of comm/protocol.py; 3: the client proves first; 4: RunTask.files;
# 5: get with the asker's shm key, items with shared segments; RunTask.waits and
# .priority (tasks sent ahead of their inputs), status "dropped"; 6: Register.gpus; 7:
# attach, publish, lookup (clients); 8: status "value";
# 9: run-plain and done-values (tiny tasks and their small results, in columns)
PROTOCOL_VERSION = 9
# The whole handshake, from the first byte: a peer that has not proved itself by then
# holds one of the listener's few pending slots for nothing.
HANDSHAKE_TIMEOUT = 5.0
# A wrong proof is answered this late: online guessing gets a few tries a second per
# pending slot, while an honest client with the right token never waits for it.
REFUSAL_DELAY = 0.5
# scrypt with 8 MiB of memory: 12-15 ms here, once per cluster (its listeners share a
# key) and once per process that connects to it (cached), and as much per guess for
# whoever tries tokens.
_SCRYPT = {"n": 1 << 13, "r": 8, "p": 1, "maxmem": 32 << 20, "dklen": 32}
SALT_SIZE = 16


@functools.lru_cache(maxsize=16)
def _derive(token: str, salt: bytes) -> bytes:
    return hashlib.scrypt(token.encode(), salt=salt, **_SCRYPT)


class ServerKey:
    """A listener's side of the token: its salt, and the key derived with it on first
    use (or :meth:`derive` ahead of it, off the critical path). A cluster's listeners
    share one."""

    def __init__(self, token: str) -> None:
        self.salt = secrets.token_bytes(SALT_SIZE)
        self._token: str | None = token
        self._key = b""

    def derive(self) -> bytes:
        if self._token is not None:
            self._key, self._token = _derive(self._token, self.salt), None
        return self._key


def _proof(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes, salt: bytes) -> bytes:
    return hmac.new(key, role + client_nonce + server_nonce + salt, hashlib.sha256).digest()


async def _expect(comm: Comm, op: str) -> dict[str, Any]:
    header, _ = await comm.recv()
    if header.get("op") == "refused":
        raise AuthenticationError(f"{comm.peer} refused the connection: {header.get('reason')}")
    if header.get("op") != op:
        raise ProtocolError(f"expected {op!r} during the handshake, got {header.get('op')!r}")
    return header


def _note_peer_limit(comm: Comm, header: dict[str, Any]) -> None:
    """The largest frame the peer takes (it says so in its hello or welcome): nothing
    larger is sent to it, so that a value too large fails its task, not the connection."""
    value = header.get("max_frame")
    if value is None:
        return
    if type(value) is not int or value < 1:
        raise ProtocolError(f"handshake field 'max_frame' is malformed: {value!r}")
    comm.peer_max_frame = value


def _bytes(header: dict[str, Any], key: str, lo: int = 16, hi: int = 64) -> bytes:
    value = header.get(key)
    if not isinstance(value, bytes) or not lo <= len(value) <= hi:
        raise ProtocolError(f"handshake field {key!r} is missing or malformed")
    return value


async def client_handshake(comm: Comm, token: str, info: dict[str, Any],
                           timeout: float = HANDSHAKE_TIMEOUT) -> dict[str, Any]:
    """Authenticate to the server at the other end of ``comm``; return its welcome header."""
    ours = secrets.token_bytes(32)
    try:
        comm.send_nowait({"op": "hello", "version": PROTOCOL_VERSION, "nonce": ours, "info": info,
                          "max_frame": comm.max_frame})
    except ConnectionError:
        raise comm.closed_error() from None  # e.g. the server's first bytes were not a frame
    async with asyncio.timeout(timeout):
        challenge = await _expect(comm, "challenge")
        theirs, salt = _bytes(challenge, "nonce"), _bytes(challenge, "salt")
        key = _derive(token, salt)
        comm.send_nowait({"op": "auth", "proof": _proof(key, b"client", ours, theirs, salt)})
        welcome = await _expect(comm, "welcome")
    if not hmac.compare_digest(_bytes(welcome, "proof"), _proof(key, b"server", ours, theirs, salt)):
        comm.close()
        raise AuthenticationError(f"{comm.peer} failed to prove it knows the cluster token")
    _note_peer_limit(comm, welcome)
    comm.authenticated()
    del welcome["proof"]
    return welcome


async def server_handshake(comm: Comm, key: ServerKey, welcome: dict[str, Any] | None = None,
                           timeout: float = HANDSHAKE_TIMEOUT,
                           on_hello: Callable[[], None] | None = None) -> dict[str, Any]:
    """Authenticate the client at the other end of ``comm``; return its hello info.

    ``on_hello`` is called once a well-formed hello has arrived.
    """
    async with asyncio.timeout(timeout):
        hello = await _expect(comm, "hello")
        if on_hello is not None and isinstance(hello.get("nonce"), bytes):
            on_hello()
        if hello.get("version") != PROTOCOL_VERSION:
            comm.send_nowait({"op": "refused", "reason": f"protocol version {PROTOCOL_VERSION} required, "
                                                         f"peer speaks {hello.get('version')!r}"})
            raise AuthenticationError(f"it speaks protocol version {hello.get('version')!r}, "
                                      f"this cluster {PROTOCOL_VERSION}")
        theirs = _bytes(hello, "nonce")
        ours = secrets.token_bytes(32)
        comm.send_nowait({"op": "challenge", "version": PROTOCOL_VERSION, "nonce": ours, "salt": key.salt})
        auth = await _expect(comm, "auth")
        if not hmac.compare_digest(_bytes(auth, "proof"), _proof(key.derive(), b"client", theirs, ours, key.salt)):
            error = AuthenticationError("wrong token")
            await asyncio.sleep(REFUSAL_DELAY)
            with contextlib.suppress(ConnectionError):  # it may not wait for the answer
                comm.send_nowait({"op": "refused", "reason": "wrong token"})
            raise error
    _note_peer_limit(comm, hello)
    comm.send_nowait({"op": "welcome", **(welcome or {}), "max_frame": comm.max_frame,
                      "proof": _proof(key.derive(), b"server", theirs, ours, key.salt)})
    comm.authenticated()
    info = hello.get("info")
    return info if isinstance(info, dict) else {}
