"""The wire (internal).

* :mod:`.protocol` - every op and record, the batch splitter, the handler-table
  :class:`~.protocol.Endpoint`: the only part the scheduler imports.
* :mod:`.serialize` - the one serializer (values, arguments, errors, functions).
* :mod:`.framing` - frames on a byte stream; :mod:`.handshake` - version check and
  mutual authentication; :mod:`.tokens` - making tokens and telling weak ones;
  :mod:`.server` - the listener (and its bounds before authentication) and addresses;
  :mod:`.tls` - workers' TLS contexts from certificate files.
"""
