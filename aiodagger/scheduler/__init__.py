"""Graph bookkeeping, dispatch and placement (internal)."""

from .core import Scheduler
from .placement import Candidate, choose_processor, estimated_finish

__all__ = ["Candidate", "Scheduler", "choose_processor", "estimated_finish"]
