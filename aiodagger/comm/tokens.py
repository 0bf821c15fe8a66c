"""Cluster tokens: making a strong one, and telling a weak one before it is used.

A token guards a listener that runs whatever an authenticated peer sends, so one that
can be guessed is as good as none. The handshake lets nobody test a guess offline
without first knowing the token (the client proves first), but a listener on the
network still answers guesses online, so tokens off loopback must be strong. Strength
is estimated without a dictionary, from what the token itself shows; the estimate errs
low: a strong-looking token can still be weak (a leaked one), never the other way.
"""

from __future__ import annotations

import math
import re
import secrets
import string
import zlib

__all__ = ["MIN_TOKEN_BITS", "entropy_bits", "new_token", "weak_token_message"]

MIN_TOKEN_BITS = 128
MAKE_ONE = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'

_CLASSES = (
    frozenset(string.ascii_lowercase), frozenset(string.ascii_uppercase),
    frozenset(string.digits), frozenset(string.punctuation + " "),
)
_ASCII = frozenset().union(*_CLASSES)
_OTHER_CLASS = 128  # characters outside ASCII: counted as one more modest class
_PARTS = re.compile(r"[A-Za-z]+|[0-9]+|[^A-Za-z0-9]+")


def new_token() -> str:
    """A fresh random token (256 bits) for a cluster and its workers."""
    return secrets.token_urlsafe(32)


def entropy_bits(token: str) -> float:
    """A conservative estimate of the bits an attacker must guess to find ``token``.

    Each character is worth log2 of the size of the character classes the token draws
    from (lower case, upper case, digits, punctuation, anything else), or, when it uses
    fewer different characters than half its length, of their number: words and other
    human choices reuse few letters ("correct horse battery staple" uses 13, for 28
    characters), while a random draw of 32 from 64 uses about 25. A
    character that continues a run ("aaa", "123", "cba") is worth 1 bit, and so is a
    run of 3 or more letters or digits seen before ("password123password123"). The total
    is capped by the token's compressed size, which catches other repetition.
    """
    if not token:
        return 0.0
    alphabet = sum(len(c) for c in _CLASSES if not c.isdisjoint(token))
    if not _ASCII.issuperset(token):
        alphabet += _OTHER_CLASS
    distinct = len(set(token))
    if 2 * distinct < len(token):
        # Characters reused more than a random draw would (which, for 32 characters
        # from 64, uses about 25 different ones): count the token's own alphabet.
        alphabet = min(alphabet, distinct)
    per_char = math.log2(alphabet) if alphabet > 1 else 0.0
    bits = 0.0
    seen: set[str] = set()
    for part in _PARTS.findall(token):
        bits += 1.0 if len(part) >= 3 and part in seen else _run_bits(part, per_char)
        seen.add(part)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: no header to discount
    compressed = compressor.compress(token.encode()) + compressor.flush()
    return min(bits, 8.0 * len(compressed))


def _run_bits(text: str, per_char: float) -> float:
    bits = 0.0
    for i, ch in enumerate(text):
        if i >= 2:
            step = ord(ch) - ord(text[i - 1])
            if abs(step) <= 1 and step == ord(text[i - 1]) - ord(text[i - 2]):
                bits += min(1.0, per_char)
                continue
        bits += per_char
    return bits


def weak_token_message(token: str, where: str) -> str | None:
    """Why ``token`` is too weak to guard ``where`` (a listener off loopback), or None."""
    bits = entropy_bits(token)
    if bits >= MIN_TOKEN_BITS:
        return None
    return (f"{where} is reachable from the network, and its token is too easy to guess: "
            f"about {bits:.0f} bits of entropy by a conservative estimate ({len(token)} characters), "
            f"where at least {MIN_TOKEN_BITS} are needed. Use a random token of 32 bytes or more, "
            f"e.g. from: {MAKE_ONE}")
