"""TLS contexts of a worker process, made from certificate files.

Remote workers get the files on their command line (``--tls-cert/--tls-key/--tls-ca``);
subprocess workers get the same paths from ``Cluster(tls_cert=, tls_key=, tls_ca=)``.
Paths, never key material: a command line is visible to every user of the machine.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

__all__ = ["worker_contexts"]


def worker_contexts(cert: Any, key: Any, ca: Any) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(client, server) contexts: the client one verifies peers against ``ca`` and shows
    ``cert`` if given; the server one, for the worker's data server, exists with ``cert``.

    Raises ValueError for a certificate without its key (or the reverse), and the
    ``OSError`` / ``ssl.SSLError`` of a file that cannot be read or used.
    """
    if not (cert or ca):
        return None, None
    if bool(cert) != bool(key):
        raise ValueError("a TLS certificate and its key go together: give both, or neither")
    cafile = None if ca is None else os.fspath(ca)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    server = None
    if cert:
        client.load_cert_chain(os.fspath(cert), os.fspath(key))
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cafile)
        server.load_cert_chain(os.fspath(cert), os.fspath(key))
    return client, server
