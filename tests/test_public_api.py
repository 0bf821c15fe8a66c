"""The exported surface is pinned: a change here is a change of the public contract."""

from __future__ import annotations

import aiodagger


def test_all_is_exactly_the_contract():
    assert sorted(aiodagger.__all__) == sorted([
        "MISSING", "AuthenticationError", "Chunk", "Cluster", "DTask", "DaggerError", "File",
        "FrameTooLargeError", "Logs", "NoProcessorError", "Options", "ProtocolError", "Scope", "SerializationError",
        "Stream", "TaskCancelledError", "TaskGroup", "TaskTimeoutError", "UpstreamError", "WorkerInfo",
        "WorkerLostError", "__version__", "as_completed", "disable_logging", "enable_logging", "fetch",
        "fetch_logs", "gather", "options", "progress", "put", "scope", "spawn", "tochunk", "wait",
        # Dagger.jl's programming models
        "In", "InOut", "Out", "datadeps", "mutable", "shard", "tofile", "array", "spawn_streaming",
        # GPUs: dagger.gpu.synchronize, dagger.gpu.devices
        "gpu",
        # a producer's brake: dagger.admit() waits while the cluster holds too much work
        "admit",
        # aiodagger.deploy's errors (the clusters themselves are aiodagger.deploy.*)
        "DeployError", "DeployConnectionError", "DeployTimeoutError", "JobStartTimeoutError",
        # shared clusters: dagger.connect(...) attaches this process as a client
        "connect", "ConnectError", "SchedulerLostError",
    ])
    for name in aiodagger.__all__:
        assert hasattr(aiodagger, name), name


def test_dtask_methods_of_the_contract():
    for name in ("fetch", "wait", "done", "cancelled", "cancel", "exception", "result",
                 "add_done_callback", "state", "__await__"):
        assert hasattr(aiodagger.DTask, name), name


def test_public_names_win_over_submodules_of_the_same_name():
    """``aiodagger.options`` and ``aiodagger.progress`` stay the functions, whichever
    modules were imported first (submodules bind their names on the package)."""
    import aiodagger.progress  # noqa: F401
    import aiodagger.taskoptions  # noqa: F401

    assert callable(aiodagger.options) and aiodagger.options.__module__ == "aiodagger.api"
    assert aiodagger.progress.__module__ == "aiodagger.progress" and isinstance(aiodagger.progress, type)
    assert set(aiodagger.__all__) <= set(dir(aiodagger))


def test_a_worker_process_does_not_load_the_cluster_side():
    """Worker processes import this package too; the scheduler, the cluster, the API
    and the logs load on first use, so a worker starts without them (W0)."""
    import subprocess
    import sys

    code = ("import sys, aiodagger.worker.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('aiodagger.scheduler', "
            "'aiodagger.cluster', 'aiodagger.api', 'aiodagger.logs', 'aiodagger.launcher'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_web_helpers_live_apart_and_load_no_framework():
    """``aiodagger.web`` is imported by name, never by ``import aiodagger``, and
    importing it loads no web framework (nor anyio, nor trio)."""
    import subprocess
    import sys

    import aiodagger.web

    assert sorted(aiodagger.web.__all__) == ["CancelOnDisconnect", "RequestTasks", "aiohttp_middleware"]
    assert not set(aiodagger.web.__all__) & set(aiodagger.__all__)
    code = ("import sys, aiodagger; assert 'aiodagger.web' not in sys.modules; "
            "aiodagger.spawn(int, 1).fetch(10); import aiodagger.web; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'aiohttp', 'anyio', 'trio', 'sniffio')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout
