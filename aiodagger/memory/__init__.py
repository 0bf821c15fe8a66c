"""A worker's memory: chunks kept under a limit by spilling them to disk.

:class:`ChunkStore` is the store a worker keeps its results in; :mod:`.sizes` parses
memory limits and sizes chunks; :mod:`.spillfile` is the on-disk format, the wire's
out-of-band layout with checksums; :mod:`.device` is the tier above RAM, values on a
GPU (:class:`DeviceTier` says which values those are).
"""

from .device import DeviceTier
from .sizes import parse_memory_limit, sizeof
from .spillfile import SpillCorruptedError
from .store import ChunkStore, StoreState, admit

__all__ = ["ChunkStore", "DeviceTier", "SpillCorruptedError", "StoreState", "admit", "parse_memory_limit", "sizeof"]
