"""A worker's memory: chunks kept under a limit by spilling them to disk.

:class:`ChunkStore` is the store a worker keeps its results in; :mod:`.sizes` parses
memory limits and sizes chunks; :mod:`.spillfile` is the on-disk format, the wire's
out-of-band layout with checksums.
"""

from .sizes import parse_memory_limit, sizeof
from .spillfile import SpillCorruptedError
from .store import ChunkStore, StoreState, admit

__all__ = ["ChunkStore", "SpillCorruptedError", "StoreState", "admit", "parse_memory_limit", "sizeof"]
