"""Errors: the original type with notes, UpstreamError to the root cause, pickling."""

from __future__ import annotations

import pickle
import traceback

import pytest

import aiodagger as dagger
from aiodagger import errors
from tests.helpers import boom, inc


class CustomError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code


async def test_original_exception_type_with_notes_and_traceback(cluster):
    t = dagger.options(name="exploder").spawn(boom)
    with pytest.raises(ValueError, match="boom") as info:
        await t
    notes = "\n".join(info.value.__notes__)
    assert "task 'exploder'" in notes and "worker 0" in notes
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "boom" in frames  # the task's own frame is in the traceback
    assert t.state == "failed"
    assert isinstance(t.exception(), ValueError)


async def test_custom_exception_type_from_async_task(cluster):
    async def fail():
        raise CustomError(7, "bad")

    with pytest.raises(CustomError) as info:
        await dagger.spawn(fail)
    assert info.value.code == 7


async def test_upstream_error_points_at_root_cause(cluster):
    a = dagger.options(name="root").spawn(boom)
    b = dagger.spawn(inc, a)
    c = dagger.spawn(inc, b)
    with pytest.raises(dagger.UpstreamError) as info:
        await c
    err = info.value
    assert err.origin is a  # the root cause, not the direct parent b
    assert isinstance(err.__cause__, ValueError)
    assert "root" in str(err) and "ValueError: boom" in str(err)
    with pytest.raises(dagger.UpstreamError):
        await b


async def test_upstream_failure_known_at_spawn(cluster):
    a = dagger.spawn(boom)
    with pytest.raises(ValueError):
        await a
    b = dagger.spawn(inc, a)
    assert b.done()
    with pytest.raises(dagger.UpstreamError) as info:
        await b
    assert info.value.origin is a


async def test_failure_at_head_of_long_chain_does_not_recurse(cluster):
    gate = dagger.spawn(boom)
    t = gate
    for _ in range(20000):
        t = dagger.spawn(inc, t)
    with pytest.raises(dagger.UpstreamError) as info:
        await t
    assert info.value.origin is gate


ALL_ERRORS = [
    errors.DaggerError("base"),
    errors.UpstreamError("up", origin=errors.TaskRef(3, "f")),
    errors.TaskCancelledError("cancelled"),
    errors.TaskTimeoutError("late"),
    errors.WorkerLostError("lost"),
    errors.NoProcessorError("none"),
    errors.SerializationError("cannot pickle"),
    errors.FrameTooLargeError.of("the result of task 'f' (id 3)", 5 << 20, 1 << 20),
    errors.ProtocolError("garbage"),
    errors.AuthenticationError("wrong token"),
    errors.DeployError("no module named aiodagger", host="node1"),
    errors.DeployConnectionError("connection refused", host="node1"),
    errors.DeployTimeoutError("never joined", host="node1"),
    errors.JobStartTimeoutError("job 17 did not start", {"17": "PENDING (PartitionDown)"}),
    errors.ConnectError("cannot reach the scheduler at tcp://10.0.0.5:8786"),
    errors.SchedulerLostError("lost with the connection to the scheduler"),
]


@pytest.mark.parametrize("exc", ALL_ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_survives_pickle(exc):
    exc.add_note("a note")
    exc.__cause__ = KeyError("why")
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc)
    assert again.args == exc.args
    assert again.__notes__ == ["a note"]
    assert isinstance(again.__cause__, KeyError)
    assert isinstance(again, errors.DaggerError)
    assert vars(again) == vars(exc)


def test_every_error_class_is_covered_and_exported():
    classes = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)}
    assert classes == {type(e) for e in ALL_ERRORS}
    for cls in classes:
        assert getattr(dagger, cls.__name__) is cls


async def test_upstream_error_from_live_task_pickles_origin_as_ref(cluster):
    a = dagger.spawn(boom)
    b = dagger.spawn(inc, a)
    with pytest.raises(dagger.UpstreamError) as info:
        await b
    again = pickle.loads(pickle.dumps(info.value))
    assert again.origin == errors.TaskRef(a.id, a.name)
    assert isinstance(again.__cause__, ValueError)


def test_builtin_bases():
    assert issubclass(errors.TaskTimeoutError, TimeoutError)
    assert issubclass(errors.SerializationError, TypeError)
    assert issubclass(errors.DeployConnectionError, ConnectionError)
    assert issubclass(errors.DeployTimeoutError, TimeoutError)
    assert issubclass(errors.JobStartTimeoutError, TimeoutError)
    assert issubclass(errors.JobStartTimeoutError, errors.DeployError)
    assert issubclass(errors.ConnectError, ConnectionError)
    assert issubclass(errors.SchedulerLostError, ConnectionError)
