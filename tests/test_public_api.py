"""The exported surface is pinned: a change here is a change of the public contract."""

from __future__ import annotations

import aiodagger


def test_all_is_exactly_the_contract():
    assert sorted(aiodagger.__all__) == sorted([
        "MISSING", "AuthenticationError", "Chunk", "Cluster", "DTask", "DaggerError",
        "Logs", "NoProcessorError", "Options", "ProtocolError", "Scope", "SerializationError",
        "TaskCancelledError", "TaskGroup", "TaskTimeoutError", "UpstreamError", "WorkerInfo",
        "WorkerLostError", "__version__", "as_completed", "disable_logging", "enable_logging", "fetch",
        "fetch_logs", "gather", "options", "progress", "put", "scope", "spawn", "tochunk", "wait",
    ])
    for name in aiodagger.__all__:
        assert hasattr(aiodagger, name), name


def test_dtask_methods_of_the_contract():
    for name in ("fetch", "wait", "done", "cancelled", "cancel", "exception", "result",
                 "add_done_callback", "state", "__await__"):
        assert hasattr(aiodagger.DTask, name), name
