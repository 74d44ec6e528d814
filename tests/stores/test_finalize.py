"""The second pass as shard tasks: whatever runs them (in the writer's process, a pool of threads or processes, a
dask executor), the store is the same bytes; tasks stay within the memory limit; a failed task leaves a
resumable store; the plan covers every pending shard once."""
from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from saeforge.stores import InvalidInput, StoreError, StoreWriter, finalize, open_store, verify_store

from .helpers import stream

HOOKS = {"blocks.0.hook_resid_post": 12, "blocks.1.hook_mlp_out": 8}
CASES = {  # name: writer settings (with shards of 4 chunks of 32 rows: ~4k rows are 32-36 shards)
    "in-memory buckets": dict(dtype="float32", expected_rows=None, memory_limit_bytes=256 << 10),  # 16 of ~290 rows
    "oversized buckets recurse": dict(dtype="bfloat16", expected_rows=1000, memory_limit_bytes=96 << 10),  # 5 of ~800
}


def staged(path: Path, case: str) -> int:
    """A store whose rows are all staged and none written (as a writer killed before close() leaves it): whole
    flushes only, so that ``abort`` loses nothing. Returns its row count."""
    settings = CASES[case]
    w = StoreWriter(path, HOOKS, seed=5, chunk_rows=32, shard_chunks=4, **settings)
    n = w.spec.stage_rows * max(1, -(-4000 // w.spec.stage_rows))
    for acts, tok, seq, pos in stream(n, HOOKS, batch=w.spec.stage_rows):
        w.append(acts, token_ids=tok, seq_idx=seq, pos=pos)
    assert w.rows_staged == n
    w.abort()
    return n


def finish(path: Path, case: str, executor=None, **pool) -> None:
    with StoreWriter(path, HOOKS, seed=5, chunk_rows=32, shard_chunks=4, **CASES[case], **pool) as w:
        w.close(executor)


def files(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=sorted(CASES))
def serial(request, tmp_path_factory):
    """The staged input of one case, and the store one worker in the writer's process makes from it."""
    root = tmp_path_factory.mktemp("finalize")
    n = staged(root / "staged", request.param)
    shutil.copytree(root / "staged", root / "serial")
    finish(root / "serial", request.param, finalize_workers=1)
    return request.param, root, n


def test_the_cases_need_more_than_one_task_and_the_recursive_one_recurses(serial):
    case, root, n = serial
    files_ = StoreWriter(root / "staged", HOOKS, seed=5, chunk_rows=32, shard_chunks=4, **CASES[case])
    try:
        sizes, spec = finalize.bucket_sizes(files_._staged_files()), files_.spec
    finally:
        files_.abort()
    assert finalize.max_tasks_in_memory(spec, sizes) >= 2 and n // spec.shard_rows >= 8
    assert (sizes.max() > spec.bucket_max_rows) == (case == "oversized buckets recurse")


@pytest.mark.parametrize("pool", [dict(finalize_workers=2, finalize_executor="threads"),
                                  dict(finalize_workers=2, finalize_executor="processes"),
                                  dict(finalize_workers=0)], ids=["2 threads", "2 processes", "default"])
def test_any_number_of_workers_writes_the_same_bytes(serial, tmp_path, pool):
    case, root, n = serial
    shutil.copytree(root / "staged", tmp_path / "s")
    finish(tmp_path / "s", case, **pool)
    got, want = files(tmp_path / "s"), files(root / "serial")
    assert sorted(got) == sorted(want) and "zarr.json" in got
    assert [k for k in want if got[k] != want[k]] == []  # arrays, their metadata, the statistics: all of it
    assert open_store(tmp_path / "s").n_rows == n


class Counting(Executor):
    """An executor that counts what it is given and hands it on."""

    def __init__(self, inner: Executor):
        self.inner, self.submitted = inner, 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return self.inner.submit(fn, *args, **kwargs)


def test_an_executor_passed_to_close_runs_the_tasks_dask_included(serial, tmp_path):
    from distributed import Client, LocalCluster

    case, root, _ = serial
    for name in ("threads", "dask"):
        shutil.copytree(root / "staged", tmp_path / name)
    with ThreadPoolExecutor(3) as pool:
        threads = Counting(pool)
        finish(tmp_path / "threads", case, threads, finalize_workers=3)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dask = Counting(client.get_executor())
        finish(tmp_path / "dask", case, dask, finalize_workers=2)
    assert threads.submitted >= 3 and dask.submitted >= 2  # every task went to the executor given
    for name in ("threads", "dask"):
        assert files(tmp_path / name) == files(root / "serial"), name


def test_tasks_in_flight_never_exceed_what_fits_in_memory(serial, tmp_path, monkeypatch):
    case, root, _ = serial
    shutil.copytree(root / "staged", tmp_path / "s")
    write, running, peak, lock = finalize.write_shards, [0], [0], threading.Lock()

    def counted(*args, **kw):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return write(*args, **kw)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(finalize, "write_shards", counted)
    w = StoreWriter(tmp_path / "s", HOOKS, seed=5, chunk_rows=32, shard_chunks=4, **CASES[case],
                    finalize_workers=16, finalize_executor="threads")
    sizes = finalize.bucket_sizes(w._staged_files())
    cap = finalize.max_tasks_in_memory(w.spec, sizes)
    w.close()
    assert 2 <= peak[0] <= cap < 16
    # a task: its largest bucket (an oversized one is read a sub-bucket of at most bucket_max_rows at a time)
    # with its permutation, and two shards
    bucket = min(sizes.max(), w.spec.bucket_max_rows) * (w.spec.row_bytes + 8)
    per_task = bucket + 2 * w.spec.shard_rows * w.spec.row_bytes
    assert cap * per_task <= w.spec.memory_limit_bytes < (cap + 1) * per_task


def test_a_failed_task_stops_the_others_and_leaves_a_resumable_store(serial, tmp_path, monkeypatch):
    case, root, n = serial
    shutil.copytree(root / "staged", tmp_path / "s")
    commit, calls, lock = finalize.commit_shard, [0], threading.Lock()
    failed, closed = threading.Event(), threading.Event()
    after_failure, after_close = [], []

    def commit_or_fail(job, shard, *args):
        time.sleep(0.25)  # shards slow enough that the writer hears of a failure within one
        with lock:
            calls[0] += 1
            (after_close if closed.is_set() else after_failure if failed.is_set() else []).append(shard)
            if calls[0] == 5:
                failed.set()
                raise OSError("the store's filesystem went away")
        commit(job, shard, *args)

    monkeypatch.setattr(finalize, "commit_shard", commit_or_fail)
    with ThreadPoolExecutor(2) as pool:  # an executor of the caller's: nobody but the writer waits for its tasks
        with pytest.raises(OSError, match="went away"):
            finish(tmp_path / "s", case, pool, finalize_workers=2)
        closed.set()
        time.sleep(0.5)
    assert after_close == []  # close() returned once no task was running
    assert len(after_failure) <= 2  # the other task stopped at its next shard or so (it had 5 or more to go)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "s")
    monkeypatch.undo()
    finish(tmp_path / "s", case, finalize_workers=2, finalize_executor="threads")  # resumes: skips those shards
    assert files(tmp_path / "s") == files(root / "serial") and verify_store(tmp_path / "s").ok


def test_the_progress_follows_the_shards_as_they_commit(serial, tmp_path, monkeypatch):
    case, root, n = serial
    monkeypatch.setattr(finalize, "POLL_S", 0.01)
    for pool in (dict(finalize_workers=1), dict(finalize_workers=2, finalize_executor="threads")):
        shutil.copytree(root / "staged", tmp_path / "s")
        w = StoreWriter(tmp_path / "s", HOOKS, seed=5, chunk_rows=32, shard_chunks=4, **CASES[case], **pool)
        steps: list[int] = []
        job = finalize.FinalizeJob(w.loc, w.spec, n, w._state_dir)
        w._start_writing()
        finalize.run(job, w._staged_files(), w.finalize, None, steps.append)
        w.abort()
        assert sum(steps) == n and len(steps) >= (job.n_shards if pool["finalize_workers"] == 1 else 3)
        shutil.rmtree(tmp_path / "s")


def test_the_plan_covers_every_pending_shard_once_with_the_buckets_it_needs(serial):
    case, root, n = serial
    w = StoreWriter(root / "staged", HOOKS, seed=5, chunk_rows=32, shard_chunks=4, **CASES[case])
    try:
        files_ = w._staged_files()
    finally:
        w.abort()
    job = finalize.FinalizeJob(w.loc, w.spec, n, "unused")
    sizes = finalize.bucket_sizes(files_)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pending = [k for k in range(job.n_shards) if k % 7 != 3]  # as if every 7th shard from the 4th were done
    gaps = sum(1 for a, b in zip(pending, pending[1:]) if b != a + 1)
    for workers in (1, 2, 5):
        tasks = finalize.plan(job, files_, pending, workers)
        assert [k for t in tasks for k in range(t.first, t.stop)] == pending  # each once, in order, no gap inside
        per_task = finalize.shards_per_task(job, sizes, len(pending), workers)
        assert all(t.stop - t.first <= per_task for t in tasks)
        # one worker: one task per run of consecutive shards; more: tasks small enough for 2 per worker
        assert len(tasks) == gaps + 1 if workers == 1 else per_task <= -(-len(pending) // (2 * workers))
        for t in tasks:
            lo, hi = job.rows_of(t.first)[0], job.rows_of(t.stop - 1)[1]
            needed = [b for b in range(len(sizes)) if sizes[b] and starts[b] < hi and starts[b + 1] > lo]
            assert [s.salt[1] for s in t.spans] == needed
            assert all(s.start == starts[s.salt[1]] and s.size == sum(p.count for p in s.pieces) for s in t.spans)
    assert len(finalize.plan(job, files_, list(range(job.n_shards)), 1)) == 1  # one worker: one task


@pytest.mark.parametrize("pool, match", [
    (dict(finalize_workers=-1), "finalize_workers must be an int >= 0"),
    (dict(finalize_workers=1.5), "finalize_workers must be an int >= 0"),
    (dict(finalize_executor="gpu"), "finalize_executor must be 'threads' or 'processes', got 'gpu'"),
])
def test_bad_finalize_options_are_refused_before_anything_is_written(tmp_path, pool, match):
    with pytest.raises(InvalidInput, match=match):
        StoreWriter(tmp_path / "s", HOOKS, **pool)
    assert not (tmp_path / "s").exists()


def test_processes_cannot_write_a_memory_store_threads_can():
    url = "memory://finalize-processes"
    with pytest.raises(InvalidInput, match="memory:// store .* use 'threads'"):
        StoreWriter(url, HOOKS, finalize_executor="processes")
    with StoreWriter(url, HOOKS, dtype="float32", expected_rows=3000, memory_limit_bytes=256 << 10, chunk_rows=32,
                     shard_chunks=4, finalize_workers=2) as w:  # the default executor: threads there
        for acts, tok, seq, pos in stream(3000, HOOKS):
            w.append(acts, token_ids=tok, seq_idx=seq, pos=pos)
    assert open_store(url).n_rows == 3000 and verify_store(url).ok


def test_workers_are_what_fits_and_by_default_what_the_rows_make_worth_it(monkeypatch):
    from saeforge.stores.schema import locate
    from saeforge.stores.spec import WriterSpec
    from saeforge.stores.staging import StagedFile

    monkeypatch.setattr(finalize.os, "cpu_count", lambda: 16)
    spec = WriterSpec.build(hooks={"h": 576}, dtype="bfloat16", seed=0, expected_rows=2_000_000, provenance={},
                            memory_limit_bytes=1 << 30, chunk_rows=None, shard_chunks=32)

    def workers(n_rows, **options):
        counts = np.full(spec.n_buckets, n_rows // spec.n_buckets)
        counts[0] += n_rows - counts.sum()
        job = finalize.FinalizeJob(locate("unused"), spec, n_rows, "unused")
        opts = finalize.FinalizeOptions(**options)
        return finalize.workers_for(job, [StagedFile("f", counts)], job.n_shards, opts,
                                    auto=options.get("workers") in (None, 0))

    # 1 GiB: a task holds a bucket of ~115k rows (134 MiB) and two shards of 65k rows (2 x 75 MiB)
    assert finalize.max_tasks_in_memory(spec, np.full(spec.n_buckets, 2_000_000 // spec.n_buckets)) == 3
    assert workers(2_000_000) == 3  # 16 cores, 2.2 GiB of rows: the memory limit decides
    assert workers(300_000) == 1  # 334 MiB of rows: one worker, in the writer's process
    assert workers(300_000, workers=2) == 2  # asked for: given
    assert workers(2_000_000, workers=8) == 3  # never more than fit in memory
    assert workers(100_000, workers=8) == 2  # nor than there are shards


SCRIPT = """
import numpy as np
from saeforge.stores import StoreWriter

def write(path):
    hooks = {"a": 12, "b": 8}
    with StoreWriter(path, hooks, dtype="float32", seed=5, expected_rows=None, memory_limit_bytes=256 << 10,
                     chunk_rows=32, shard_chunks=4, finalize_workers=2, finalize_executor="processes") as w:
        rng = np.random.default_rng(0)
        if w.rows_staged == 0:  # a rerun resumes
            w.append({h: rng.standard_normal((4000, d)).astype(np.float32) for h, d in hooks.items()})
"""


def test_a_script_without_a_main_guard_gets_one_clear_error_and_a_resumable_store(tmp_path):
    import subprocess
    import sys

    script, store = tmp_path / "script.py", tmp_path / "s"
    script.write_text(SCRIPT + f"\nwrite({str(store)!r})\n")  # no `if __name__ == '__main__':`
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("saeforge.stores.errors.StoreError") and "if __name__ == '__main__':" in last, last
    assert "opened while a finalize worker process imported the main script" in proc.stderr  # the worker's own
    script.write_text(SCRIPT + f"\nif __name__ == '__main__':\n    write({str(store)!r})\n")
    assert subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120).returncode == 0
    assert open_store(store).n_rows == 4000 and verify_store(store).ok
