"""The scheduler's event stream, as observers (logs, progress) see it."""

from __future__ import annotations

import aiodagger as dagger
from aiodagger.scheduler.events import Instrument
from tests.helpers import ainc, boom, inc


class Recorder(Instrument):
    def __init__(self):
        self.events = []

    def task_spawned(self, task, dependencies):
        self.events.append(("spawned", task.id, [d.id for d in dependencies]))

    def task_ran(self, task, worker, processor, start, stop, ok):
        assert stop >= start > 0
        self.events.append(("ran", task.id, worker, processor.split("(")[0], ok))

    def task_done(self, task):
        self.events.append(("done", task.id, task.state))


async def test_events_for_a_small_graph(cluster):
    rec = Recorder()
    cluster._scheduler.instruments.append(rec)
    a = dagger.spawn(inc, 1)
    b = dagger.spawn(ainc, a)
    c = dagger.spawn(boom, b)
    await c.wait()
    ids = (a.id, b.id, c.id)
    assert ("spawned", a.id, []) in rec.events and ("spawned", b.id, [a.id]) in rec.events
    assert ("ran", a.id, 0, "ThreadProc", True) in rec.events
    assert ("ran", b.id, 0, "AsyncProc", True) in rec.events
    assert ("ran", c.id, 0, "ThreadProc", False) in rec.events
    assert [e for e in rec.events if e[0] == "done"] == [
        ("done", ids[0], "finished"), ("done", ids[1], "finished"), ("done", ids[2], "failed")]
