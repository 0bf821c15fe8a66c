"""Observability: record the scheduler's events, then export them.

    dagger.enable_logging()
    ...                                   # spawn and await tasks
    logs = await dagger.fetch_logs()
    logs.to_chrome_trace("trace.json")    # open in ui.perfetto.dev
    logs.gantt("timeline.png")            # needs matplotlib (extra "plot")
    print(logs.to_dot())                  # Graphviz

``recorder`` attaches to the scheduler's event stream; ``records`` holds the event
types and the ``Logs`` view; ``trace``, ``gantt`` and ``dot`` are the exports.
"""

from .recorder import EventLog, disable_logging, enable_logging, fetch_logs, logging_enabled
from .records import Done, Event, Lane, Logs, Ran, Spawned

__all__ = [
    "Done", "Event", "EventLog", "Lane", "Logs", "Ran", "Spawned", "disable_logging",
    "enable_logging", "fetch_logs", "logging_enabled",
]
