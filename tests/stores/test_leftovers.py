"""What a killed writer leaves is its own: it never makes a path foreign, and a complete store keeps none of it.
Run records live inside the store where plain zarr does not warn about them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import warnings

import numpy as np
import pytest

from saeforge.stores import (InvalidInput, StoreError, StoreIncomplete, StoreNotFound, StoreWriter, open_store,
                             read_run_record, verify_store, write_run_record)
from saeforge.stores.schema import STATE_DIR

from .damage import HOOK


@pytest.fixture
def store(store_copy):
    return store_copy


@pytest.fixture(scope="module")
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plain_zarr_warnings(path) -> list[str]:
    import zarr

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group = zarr.open_group(str(path), mode="r")
        assert sorted(name for name, _ in group.arrays()) == sorted([HOOK, "pos", "seq_idx", "token_ids"])
    return [str(w.message) for w in caught]


def small_writer(path):
    return StoreWriter(path, {"h": 4}, dtype="float32", seed=0, expected_rows=10)


@pytest.mark.parametrize("temp_name", [".zarr.json.{pid}.140001.tmp", "zarr.json.{pid}.tmp"])  # now, and before
def test_a_store_killed_while_its_first_zarr_json_was_written_resumes(tmp_path, dead_pid, temp_name):
    path = tmp_path / "store"
    (path / STATE_DIR / "stage").mkdir(parents=True)
    (path / temp_name.format(pid=dead_pid)).write_text('{"zarr_format": 3, "node_ty')
    with pytest.raises(StoreNotFound, match="rerun the same harvest command"):
        open_store(path)
    with small_writer(path) as w:
        w.append({"h": np.ones((10, 4), np.float32)})
    assert sorted(p.name for p in path.iterdir()) == ["h", "pos", "seq_idx", "token_ids", "zarr.json"]
    assert open_store(path).n_rows == 10


def test_anything_else_in_the_folder_still_makes_it_foreign(tmp_path, dead_pid):
    path = tmp_path / "store"
    path.mkdir()
    (path / f".zarr.json.{dead_pid}.1.tmp").write_text("{")
    (path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"exists and is not a saeforge store \(it holds notes.txt\)"):
        small_writer(path)
    assert (path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("leftover", ["lock and progress", "empty state folder", "temporary files"])
def test_opening_a_complete_store_removes_what_its_writer_left(store, dead_pid, leftover):
    state = store / STATE_DIR
    state.mkdir()
    if leftover == "lock and progress":
        (state / "lock").write_text(json.dumps({"pid": dead_pid, "host": os.uname().nodename}))
        (state / "progress.json").write_text(json.dumps({"phase": "writing", "rows_written": 1200}))
    if leftover == "temporary files":
        (store / f".zarr.json.{dead_pid}.7.tmp").write_text("{")
        (state / f".progress.json.{dead_pid}.7.tmp").write_text("{")
    assert plain_zarr_warnings(store)  # zarr warns about every leftover
    s = open_store(store)
    assert sorted(p.name for p in store.iterdir()) == sorted([HOOK, "pos", "seq_idx", "token_ids", "zarr.json"])
    assert plain_zarr_warnings(store) == []
    assert s.n_rows == 1200 and verify_store(store).ok


def test_a_writer_on_a_complete_store_refuses_and_tidies(store, dead_pid):
    (store / STATE_DIR).mkdir()
    (store / STATE_DIR / "lock").write_text(json.dumps({"pid": dead_pid, "host": os.uname().nodename}))
    with pytest.raises(StoreError, match="already a complete store"):
        StoreWriter(store, {HOOK: 16}, dtype="bfloat16")
    assert not (store / STATE_DIR).exists()


def test_a_live_processes_temporary_file_is_kept(store):
    mine = store / f".zarr.json.{os.getpid()}.7.tmp"  # as if this process were writing it right now
    mine.write_text("{")
    open_store(store)
    assert mine.exists()


def test_run_records_round_trip_inside_the_store_without_zarr_warnings(store):
    before = (store / "zarr.json").read_bytes()
    record = {"rows": 1200, "wall_s": 1.5, "bytes_per_hook": {HOOK: 12345}, "hooks": [HOOK]}
    write_run_record(store, "harvest", record)
    write_run_record(open_store(store), "harvest", {**record, "wall_s": 2.5})  # a Store works too; replaces
    write_run_record(store, "eval-cache.v2", [1, 2])
    assert read_run_record(store, "harvest") == {**record, "wall_s": 2.5}
    assert read_run_record(store, "eval-cache.v2") == [1, 2] and read_run_record(store, "other") is None
    assert (store / "zarr.json").read_bytes() == before  # the store's attributes and identity are untouched
    assert plain_zarr_warnings(store) == []
    assert verify_store(store).ok and open_store(store).attrs.extra == {}
    import zarr

    assert zarr.open_group(str(store), mode="r")["records"].attrs["harvest"]["wall_s"] == 2.5  # readable plainly


def test_a_harvest_json_beside_the_arrays_is_what_zarr_warns_about_and_is_still_read(store):
    (store / "harvest.json").write_text(json.dumps({"rows": 1200}))
    assert any("harvest.json" in w for w in plain_zarr_warnings(store))
    assert read_run_record(store, "harvest") == {"rows": 1200}  # stores written before run records


def test_run_records_refuse_bad_input(store, tmp_path):
    with pytest.raises(InvalidInput, match="without NaN"):
        write_run_record(store, "harvest", {"wall_s": float("nan")})
    with pytest.raises(InvalidInput, match="name"):
        write_run_record(store, "../escape", {})
    w = small_writer(tmp_path / "partial")
    w.abort()
    with pytest.raises(StoreIncomplete):
        write_run_record(tmp_path / "partial", "harvest", {})
    with pytest.raises(StoreNotFound):
        read_run_record(tmp_path / "nothing", "harvest")


def test_run_records_on_memory_stores(tmp_path):
    from .helpers import write_store

    url = f"memory://saeforge-records-{uuid.uuid4().hex}/store"
    write_store(url, n=300, hooks={"h": 3})
    write_run_record(url, "harvest", {"rows": 300})
    assert read_run_record(url, "harvest") == {"rows": 300}
    assert open_store(url).n_rows == 300


def test_hook_names_cannot_take_the_stores_own_names(tmp_path):
    for name in ("records", "token_ids", STATE_DIR):
        with pytest.raises(InvalidInput, match="taken by the store's own"):
            StoreWriter(tmp_path / name, {name: 4})
