"""The wire: serialization, framing, handshake (internal)."""
