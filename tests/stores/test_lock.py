"""The writer lock: written all at once, refused when it is not a lock (with how to clear it), taken over from a
dead process or from a pid now used by another process, never from a live writer or another host."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from saeforge.stores import StoreLocked, StoreWriter, open_store
from saeforge.stores.lock import process_start
from saeforge.stores.schema import STATE_DIR


def writer(path):
    return StoreWriter(path, {"h": 4}, dtype="float32", seed=0, expected_rows=10)


@pytest.fixture
def store(tmp_path):
    """An incomplete store (its writer aborted), whose lock the tests write by hand."""
    path = tmp_path / "store"
    w = writer(path)
    w.append({"h": np.ones((10, 4), np.float32)})
    w.abort()
    return path


def put_lock(path, content) -> None:
    lock = path / STATE_DIR / "lock"
    lock.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())


def finish(path) -> None:
    with writer(path) as w:
        assert w.rows_staged in (0, 10)
        if w.rows_staged == 0:
            w.append({"h": np.ones((10, 4), np.float32)})
    assert open_store(path).n_rows == 10


@pytest.fixture
def sleeper():
    """A live process that is not a writer."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


HOST = socket.gethostname()


@pytest.mark.parametrize("content, shown", [
    (b"", "it is empty"),
    (b"\xff\xfe\x00 garbage", "garbage"),
    (b"{not json", "{not json"),
    (b"[1, 2]", "[1, 2]"),
    ({"pid": None, "host": HOST}, "null"),
    ({"pid": "123", "host": HOST}, "123"),
    ({"pid": 123}, "123"),
    ({"pid": 123, "host": HOST, "pid_start": "soon"}, "soon"),
])
def test_a_file_that_is_not_a_lock_is_refused_with_how_to_clear_it(store, content, shown):
    put_lock(store, content)
    with pytest.raises(StoreLocked) as e:
        writer(store)
    msg = str(e.value)
    assert "is not a valid writer lock" in msg and shown in msg and "delete that file" in msg
    assert str(store / STATE_DIR / "lock") in msg and "Expecting value" not in msg and "\n" not in msg
    (store / STATE_DIR / "lock").unlink()  # what the message says to do
    finish(store)


def test_the_lock_is_complete_when_seen_and_records_the_process_start(store):
    w = writer(store)
    lock = json.loads((store / STATE_DIR / "lock").read_text())
    assert lock["pid"] == os.getpid() and lock["host"] == HOST
    assert lock["pid_start"] == process_start(os.getpid()) and isinstance(lock["pid_start"], int)
    assert sorted(p.name for p in (store / STATE_DIR).iterdir()) == ["lock", "progress.json", "stage"]  # no temp
    with pytest.raises(StoreLocked, match=f"being written by pid {os.getpid()}"):
        writer(store)
    w.abort()
    assert not (store / STATE_DIR / "lock").exists()


def test_a_lock_of_a_process_killed_on_this_host_is_taken_over(store):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = process_start(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    put_lock(store, {"pid": proc.pid, "host": HOST, "since": 0, "pid_start": start})
    finish(store)


def test_a_lock_whose_pid_now_names_another_process_is_taken_over(store, sleeper):
    start = process_start(sleeper.pid)
    assert start is not None
    put_lock(store, {"pid": sleeper.pid, "host": HOST, "since": 0, "pid_start": start})
    with pytest.raises(StoreLocked, match=f"being written by pid {sleeper.pid}"):
        writer(store)  # the live writer it names: refused
    put_lock(store, {"pid": sleeper.pid, "host": HOST, "since": 0, "pid_start": start - 1})
    finish(store)  # same pid, other start time: the writer that took the lock is gone


def test_a_lock_from_before_a_reboot_is_taken_over(store, sleeper):
    put_lock(store, {"pid": sleeper.pid, "host": HOST, "since": 0, "pid_start": process_start(sleeper.pid),
                     "boot_id": "another-boot"})
    finish(store)


def test_a_lock_of_a_live_pid_without_a_start_time_is_respected(store, sleeper):
    put_lock(store, {"pid": sleeper.pid, "host": HOST, "since": 0})  # a lock from before start times were kept
    with pytest.raises(StoreLocked, match="being written by pid"):
        writer(store)


def test_a_lock_from_another_host_is_never_broken(store):
    put_lock(store, {"pid": 1, "host": HOST + "-elsewhere", "since": 0, "pid_start": 1})
    with pytest.raises(StoreLocked, match=f"on {HOST}-elsewhere"):
        writer(store)


def test_process_start_is_none_for_a_zombie():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert isinstance(process_start(proc.pid), int)
    os.kill(proc.pid, signal.SIGKILL)
    for _ in range(200):  # killed, not yet reaped: a zombie, dead for the lock
        if process_start(proc.pid) is None:
            break
        time.sleep(0.01)
    assert process_start(proc.pid) is None
    proc.wait()


def test_without_hard_links_the_lock_is_still_exclusive(store, monkeypatch):
    import errno

    def no_link(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)  # a filesystem without hard links: O_EXCL instead
    w = writer(store)
    with pytest.raises(StoreLocked, match="being written by pid"):
        writer(store)
    w.abort()
    assert not (store / STATE_DIR / "lock").exists()
    monkeypatch.undo()  # zarr links files too
    finish(store)


def test_breaking_a_stale_lock_never_removes_one_another_writer_took_meanwhile(store, monkeypatch):
    from saeforge.stores import lock

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = json.dumps({"pid": proc.pid, "host": HOST, "since": 0}).encode()
    live = writer(store)  # holds the lock now
    held = (store / STATE_DIR / "lock").read_bytes()
    monkeypatch.setattr(lock, "_read", lambda loc, path: stale)  # we saw the dead writer's lock just before
    with pytest.raises(StoreLocked, match="other writers keep taking it"):
        writer(store)
    assert (store / STATE_DIR / "lock").read_bytes() == held  # put back each time
    assert [p.name for p in (store / STATE_DIR).iterdir() if p.name.endswith(".tmp")] == []
    live.abort()
