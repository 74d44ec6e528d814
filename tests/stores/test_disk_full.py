"""A full disk (ENOSPC) while staging or while writing the arrays: one DiskFull line saying roughly how much room
the store needs and that rerunning resumes; the rerun then gives the same store as an uninterrupted write."""
from __future__ import annotations

import errno

import pytest

from saeforge.stores import DiskFull, open_store, shuffle, verify_store
from saeforge.stores.schema import STATE_DIR

from .helpers import write_store
from .test_crash import store_files

N = 2000


def no_space(*_args, **_kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def fail_on_call(real, k: int):
    """``real``, except that its k-th call finds the disk full."""
    calls = [0]

    def call(*args, **kw):
        calls[0] += 1
        return no_space() if calls[0] == k else real(*args, **kw)
    return call


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("full") / "reference"
    write_store(str(path), n=N)
    return path


def assert_says_how_to_go_on(e: DiskFull, *words) -> None:
    msg = str(e)
    assert "\n" not in msg and "disk is full" in msg and "[Errno 28]" in msg
    assert "rerun the same command: it resumes" in msg and "more" in msg and "free now" in msg
    for word in words:
        assert word in msg, msg


def resume_and_compare(path, reference) -> None:
    write_store(str(path), n=N)
    assert store_files(path) == store_files(reference)
    assert verify_store(path).ok and open_store(path).n_rows == N


def test_disk_full_while_staging(tmp_path, reference, monkeypatch):
    path = tmp_path / "store"
    monkeypatch.setattr(shuffle, "write_staged", fail_on_call(shuffle.write_staged, 3))
    with pytest.raises(DiskFull) as e:
        write_store(str(path), n=N)
    assert_says_how_to_go_on(e.value, str(path), "staging rows", "staged so far")
    staged = sorted((path / STATE_DIR / "stage").iterdir())
    assert len(staged) == 2 and not (path / STATE_DIR / "lock").exists()  # nothing half-written, lock given back
    monkeypatch.undo()
    resume_and_compare(path, reference)


def test_disk_full_while_writing_the_arrays(tmp_path, reference, monkeypatch):
    from zarr.storage import LocalStore

    path = tmp_path / "store"
    real_set = LocalStore.set
    calls = [0]

    async def set_or_full(self, key, value):
        calls[0] += "/c/" in key
        if calls[0] == 12:
            no_space()
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_or_full)
    with pytest.raises(DiskFull) as e:
        write_store(str(path), n=N)
    assert_says_how_to_go_on(e.value, "writing the shuffled arrays", f"of {N:,} rows written")
    monkeypatch.undo()
    resume_and_compare(path, reference)


def test_disk_full_while_committing_progress(tmp_path, reference, monkeypatch):
    from saeforge.stores import writer

    path = tmp_path / "store"
    monkeypatch.setattr(writer, "write_json_atomic", fail_on_call(writer.write_json_atomic, 4))
    with pytest.raises(DiskFull):
        write_store(str(path), n=N)
    monkeypatch.undo()
    resume_and_compare(path, reference)
