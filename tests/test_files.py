"""dagger.File and dagger.tofile: real files in tmp_path, read and written where the
tasks run, on an in-process cluster and on one with two worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import threading

import numpy as np
import pytest

import aiodagger as dagger
from aiodagger.task import REMOTE

# -- functions the tasks run (module level: worker processes import them by name) -----------

def pid(_=None):
    return os.getpid()


def total(x):
    return float(np.sum(x))


async def atotal(x):
    return float(np.sum(x))


def echo(*args, **kwargs):
    return args, kwargs


async def aecho(*args, **kwargs):
    return args, kwargs


def with_pid(x):
    return x, os.getpid()


async def awith_pid(x):
    return x, os.getpid()


def load_json(path):
    with open(path) as fh:
        return json.load(fh)


def save_json(value, path):
    with open(path, "w") as fh:
        json.dump(value, fh)


async def aload_json(path):
    await asyncio.sleep(0)
    return load_json(path)


def load_recording_pid(path):
    """A real loader that says which process and thread read the file."""
    with open(path, "rb") as fh:
        data = pickle.load(fh)
    return {"data": data, "pid": os.getpid(), "thread": threading.current_thread().name}


def save_recording_pid(value, path):
    """A real saver that writes, beside the value, the pid of the process that wrote it."""
    with open(path, "wb") as fh:
        pickle.dump({"value": value, "pid": os.getpid(),
                     "thread": threading.current_thread().name}, fh)


def make_in_pid():
    # Past the size a worker sends along with its report (64 KiB): the value stays there.
    return {"made_by": os.getpid(), "block": np.arange(100_000.0)}


def file_in_a_list(path):
    return [dagger.File(path)]


def loop_thread_ident():
    return threading.get_ident()


async def aloop_thread_ident():
    return threading.get_ident()


def on(worker_id):
    return dagger.options(scope=dagger.scope(worker=worker_id))


@pytest.fixture(params=["in-process", "processes"])
async def any_cluster(request):
    kwargs = {"threads": 2} if request.param == "in-process" else {"processes": 2, "threads": 2}
    async with dagger.Cluster(**kwargs) as c:
        yield c


@pytest.fixture
async def procs():
    async with dagger.Cluster(processes=2, threads=2) as c:
        yield c


# -- round trips ---------------------------------------------------------------------------


async def test_npy_round_trip(any_cluster, tmp_path):
    array = np.arange(12.0).reshape(3, 4)
    f = await dagger.tofile(array, tmp_path / "a.npy")
    assert isinstance(f, dagger.File) and f.path == str(tmp_path / "a.npy")
    np.testing.assert_array_equal(np.load(f.path, allow_pickle=False), array)  # a real .npy
    assert await dagger.spawn(total, f) == 66.0
    assert await dagger.spawn(atotal, f) == 66.0
    (back,), _ = await dagger.spawn(echo, f)
    assert type(back) is np.ndarray and back.shape == (3, 4)


async def test_pickle_round_trip(any_cluster, tmp_path):
    value = {"name": "x", "items": [1, 2.5, None], "nested": {"t": (1, 2)}}
    f = await dagger.tofile(value, str(tmp_path / "v.bin"))
    with open(tmp_path / "v.bin", "rb") as fh:
        assert pickle.load(fh) == value  # plain pickle
    assert await dagger.spawn(echo, f) == ((value,), {})
    assert await dagger.spawn(aecho, x=f) == ((), {"x": value})
    # A File made by hand reads any pickle, not only those tofile wrote.
    with open(tmp_path / "hand.pkl", "wb") as fh:
        pickle.dump([3, 4], fh)
    assert await dagger.spawn(sum, dagger.File(tmp_path / "hand.pkl")) == 7


async def test_custom_load_and_save(any_cluster, tmp_path):
    value = {"a": [1, 2, 3], "b": "text"}
    f = await dagger.tofile(value, tmp_path / "v.json", save=save_json, load=load_json)
    assert f.load is load_json
    assert json.loads((tmp_path / "v.json").read_text()) == value  # JSON, not a pickle
    assert await dagger.spawn(echo, f) == ((value,), {})
    assert await dagger.spawn(aecho, f) == ((value,), {})
    # An async def load, for sync and async tasks alike.
    g = dagger.File(tmp_path / "v.json", load=aload_json)
    assert await dagger.spawn(echo, g) == ((value,), {})
    assert await dagger.spawn(aecho, g) == ((value,), {})


async def test_files_nested_in_containers_next_to_dependencies(any_cluster, tmp_path):
    f = await dagger.tofile([1, 2], tmp_path / "f.pkl")
    g = await dagger.tofile(np.ones(3), tmp_path / "g.npy")
    dep = dagger.spawn(pid)
    args = [f, 7, (g, dep)]
    kwargs = {"k": {"inner": [f]}, "plain": "s"}
    for fn in (echo, aecho):
        (got,), got_kw = await dagger.spawn(fn, args, **kwargs)
        assert got[0] == [1, 2] and got[1] == 7
        np.testing.assert_array_equal(got[2][0], np.ones(3))
        assert got[2][1] == await dep
        assert got_kw == {"k": {"inner": [[1, 2]]}, "plain": "s"}
    assert args[0] is f and kwargs["k"]["inner"][0] is f  # the caller's containers are untouched


async def test_a_file_inside_a_dependencys_value_stays_a_file(any_cluster, tmp_path):
    # As a DTask inside a value stays a DTask: only the task's own arguments are walked.
    path = str(tmp_path / "f.pkl")
    await dagger.tofile(1, path)
    (got,), _ = await dagger.spawn(echo, dagger.spawn(file_in_a_list, path))
    assert got == [dagger.File(path)]
    (got,), _ = await dagger.spawn(aecho, [dagger.spawn(file_in_a_list, path), dagger.File(path)])
    assert got == [[dagger.File(path)], 1]


# -- where the read happens -----------------------------------------------------------------


async def test_a_file_is_read_on_the_worker_process_that_runs_the_task(procs, tmp_path):
    path = tmp_path / "v.pkl"
    path.write_bytes(pickle.dumps("payload"))
    f = dagger.File(path, load=load_recording_pid)
    for worker in (1, 2):
        for fn in (with_pid, awith_pid):
            loaded, task_pid = await on(worker).spawn(fn, f)
            assert loaded["data"] == "payload"
            assert loaded["pid"] == task_pid == procs.workers[worker].pid != os.getpid()


async def test_a_file_is_read_off_the_event_loop(cluster, tmp_path):
    path = tmp_path / "v.pkl"
    path.write_bytes(pickle.dumps("payload"))
    f = dagger.File(path, load=load_recording_pid)
    loop_ident = await dagger.spawn(aloop_thread_ident)
    # A sync task reads on its pool thread, an async task in an executor thread.
    loaded, _ = await dagger.spawn(with_pid, f)
    assert loaded["thread"].startswith("aiodagger-w0-thread")
    loaded, _ = await dagger.spawn(awith_pid, f)
    assert loaded["pid"] == os.getpid() and loaded["thread"] != threading.current_thread().name
    assert not loaded["thread"].startswith("aiodagger") and loop_ident == threading.get_ident()


async def test_relative_paths_are_resolved_at_call_time(procs, tmp_path, monkeypatch):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    (here / "x.pkl").write_bytes(pickle.dumps("from here"))
    (there / "x.pkl").write_bytes(pickle.dumps("from there"))
    monkeypatch.chdir(here)
    f = dagger.File("x.pkl")
    writing = dagger.tofile("written here", "y.pkl")  # resolved now, awaited below
    monkeypatch.chdir(there)
    assert f.path == str(here / "x.pkl")
    assert await writing == dagger.File(here / "y.pkl")
    assert not (there / "y.pkl").exists()
    # The workers' own working directory (where they started) plays no part.
    for worker in (1, 2):
        assert await on(worker).spawn(echo, f) == (("from here",), {})
        assert await on(worker).spawn(echo, dagger.File(here / "y.pkl")) == (("written here",), {})


# -- tofile of a task's value -----------------------------------------------------------------


async def test_tofile_of_a_dtask_writes_on_the_worker_that_holds_the_value(procs, tmp_path):
    for worker in (1, 2):
        t = on(worker).spawn(make_in_pid)
        path = tmp_path / f"w{worker}.pkl"
        f = await dagger.tofile(t, path, save=save_recording_pid)
        assert f == dagger.File(path)
        with open(path, "rb") as fh:
            written = pickle.load(fh)
        made_by = written["value"]["made_by"]
        assert written["pid"] == made_by == procs.workers[worker].pid != os.getpid()
        assert t._value is REMOTE  # the value never came to this process
        # The default format, from the worker too; the File reads it back anywhere.
        g = await dagger.tofile(t, tmp_path / f"d{worker}.pkl")
        assert t._value is REMOTE
        got, reader = await on(3 - worker).spawn(with_pid, g)
        assert got["made_by"] == made_by and reader == procs.workers[3 - worker].pid


async def test_tofile_of_a_dtask_in_process_writes_on_a_pool_thread(cluster, tmp_path):
    t = dagger.spawn(make_in_pid)
    f = await dagger.tofile(t, tmp_path / "v.pkl", save=save_recording_pid)
    with open(f.path, "rb") as fh:
        written = pickle.load(fh)
    assert written["pid"] == os.getpid() and written["thread"].startswith("aiodagger-w0-thread")
    g = await dagger.tofile(t, tmp_path / "d.pkl")
    assert (await dagger.spawn(echo, g))[0][0]["made_by"] == os.getpid()


async def test_tofile_of_a_failed_dtask_raises_its_error(cluster, tmp_path):
    t = dagger.spawn(int, "not a number")
    with pytest.raises(ValueError, match="invalid literal"):
        await dagger.tofile(t, tmp_path / "v.pkl")
    assert not (tmp_path / "v.pkl").exists()


def test_sync_code_uses_asyncio_run(tmp_path):
    with dagger.Cluster(processes=2, threads=1) as c:
        t = on(1).spawn(make_in_pid)
        f = asyncio.run(dagger.tofile(t, tmp_path / "v.pkl", save=save_recording_pid))
        with open(f.path, "rb") as fh:
            assert pickle.load(fh)["pid"] == c.workers[1].pid
        g = asyncio.run(dagger.tofile([1, 2, 3], tmp_path / "plain.pkl"))
        assert dagger.spawn(sum, g).fetch(timeout=30) == 6


# -- writing ----------------------------------------------------------------------------------


def failing_save(value, path):
    with open(path, "wb") as fh:
        fh.write(b"half a file")
    raise OSError("disk full")


def save_elsewhere(value, path):
    with open(str(path) + ".other", "wb") as fh:
        fh.write(b"x")


async def test_a_failed_write_leaves_no_half_file(cluster, tmp_path):
    target = tmp_path / "v.pkl"
    target.write_bytes(pickle.dumps("old"))
    with pytest.raises(OSError, match="disk full"):
        await dagger.tofile("new", target, save=failing_save)
    assert pickle.loads(target.read_bytes()) == "old"
    t = dagger.spawn(pid)
    with pytest.raises(OSError, match="disk full"):
        await dagger.tofile(t, target, save=failing_save)
    assert pickle.loads(target.read_bytes()) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.pkl"]  # no temporary file left
    # A saver that writes somewhere else than the path it is given is told so.
    with pytest.raises(FileNotFoundError, match="wrote no file at the path it was given"):
        await dagger.tofile("new", target, save=save_elsewhere)
    assert pickle.loads(target.read_bytes()) == "old"


async def test_npy_takes_only_arrays_without_objects(tmp_path):
    with pytest.raises(TypeError, match=r"a \.npy file holds one numpy array, got list"):
        await dagger.tofile([1, 2], tmp_path / "v.npy")
    with pytest.raises(ValueError, match="another suffix"):
        await dagger.tofile(np.array([{}, []], dtype=object), tmp_path / "o.npy")
    assert list(tmp_path.iterdir()) == []


# -- errors -----------------------------------------------------------------------------------


async def test_a_missing_file_is_raised_by_the_task_naming_path_and_worker(any_cluster, tmp_path):
    missing = tmp_path / "nope.pkl"
    worker = 1 if len(any_cluster.workers) > 1 else 0
    worker_pid = await on(worker).spawn(pid)
    f = dagger.File(missing)  # no error here: the caller never reads it
    for fn in (total, atotal):
        with pytest.raises(FileNotFoundError) as info:
            await on(worker).spawn(fn, [f])
        message = str(info.value)
        assert str(missing) in message and f"process {worker_pid}" in message
        assert "the worker that runs the task" in message  # and what to do
        assert any(f"on worker {worker} (pid {worker_pid}" in n for n in info.value.__notes__)
        assert info.value.errno == 2


async def test_a_loaders_own_file_not_found_passes_through(cluster, tmp_path):
    path = tmp_path / "v.json"
    path.write_text("{}")

    def load_other(p):
        return open(str(p) + ".sidecar").read()

    with pytest.raises(FileNotFoundError) as info:
        await dagger.spawn(echo, dagger.File(path, load=load_other))
    assert info.value.filename == str(path) + ".sidecar"


async def test_type_errors_name_what_was_given(tmp_path):
    with pytest.raises(TypeError, match=r"File\(\) takes a path as a str or an os.PathLike.*got int: 3"):
        dagger.File(3)
    with pytest.raises(TypeError, match=r"got NoneType"):
        dagger.File(None)
    with pytest.raises(TypeError, match=r"got bytes: b'x.pkl' \(decode bytes with os.fsdecode"):
        dagger.File(b"x.pkl")
    with pytest.raises(TypeError, match=r"File\(load=...\) takes a callable.*got str: 'json'"):
        dagger.File(tmp_path / "x", load="json")
    with pytest.raises(TypeError, match=r"tofile\(\) takes a path.*got list"):
        dagger.tofile(1, [])
    with pytest.raises(TypeError, match=r"tofile\(save=...\) takes a callable.*got int: 5"):
        dagger.tofile(1, tmp_path / "x", save=5)
    assert list(tmp_path.iterdir()) == []


def test_a_file_is_a_small_picklable_value(tmp_path):
    f = dagger.File(tmp_path / "x.npy")
    assert f.path == str(tmp_path / "x.npy") and f.load is None
    assert repr(f) == f"dagger.File({str(tmp_path / 'x.npy')!r})"
    assert repr(dagger.File("/a/b", load=load_json)) == "dagger.File('/a/b', load=load_json)"
    assert os.fspath(f) == f.path and dagger.File(f) == f
    assert f == dagger.File(str(tmp_path / "x.npy")) and hash(f) == hash(dagger.File(f.path))
    assert f != dagger.File(f.path, load=load_json) and f != f.path
    assert {f, dagger.File(f.path)} == {f}
    for data in (pickle.dumps(f), pickle.dumps(dagger.File(f.path, load=load_json))):
        back = pickle.loads(data)
        assert type(back) is dagger.File and back == pickle.loads(data)
    assert pickle.loads(pickle.dumps(f)) == f
    with pytest.raises(AttributeError):
        f.path = "/elsewhere"  # type: ignore[misc]
