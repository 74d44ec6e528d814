"""StoreWriter: rows in arrival order in, a globally shuffled, compressed, crash-safe store out.

Life of a store: ``staging`` (rows scattered to bucket files under ``.saeforge/stage``; each flush is
committed by atomically replacing ``.saeforge/progress.json``) -> ``writing`` (buckets permuted and written
shard by shard, by shard tasks in this process or in parallel: ``finalize.py``; each shard committed by a
record of its own holding its float64 statistics) -> completion record in the group attributes, written
last. A run killed at any point and reopened with the same config resumes from the last commit; the
producer skips ``rows_staged`` rows. What a kill leaves (temporary files, the state folder of a complete
store) is the writer's own (``tidy.py``); a full disk is a ``DiskFull`` saying how much room the store
needs, and rerunning resumes.
"""
from __future__ import annotations

import errno
import shutil
from concurrent.futures import Executor
from contextlib import contextmanager

from saeforge.stores import finalize, schema
from saeforge.stores.attrs import FORMAT_KEY, StoreAttrs, parse_attrs, read_group_attrs, write_group_attrs
from saeforge.stores.errors import DiskFull, SchemaMismatch, StoreError
from saeforge.stores.files import read_json, write_json_atomic
from saeforge.stores.lock import acquire_lock, release_lock
from saeforge.stores.progress import progress_bar
from saeforge.stores.remote import check_remote
from saeforge.stores.shuffle import Stager
from saeforge.stores.spec import WriterSpec, create_arrays
from saeforge.stores.staging import StagedFile, read_counts
from saeforge.stores.tasks import TASKS_DIR, TaskManifest
from saeforge.stores.tidy import foreign_names, remove_temps, tidy_complete

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class StoreWriter:
    """Append rows for every hook (plus token ids) in stream order; ``close()`` shuffles and finalises.

    ``rows_staged``: rows an interrupted earlier run already committed; regenerate the same stream and
    skip that many rows before appending. Use as a context manager: an exception leaves the store
    incomplete and resumable, never complete. ``finalize_workers`` and ``finalize_executor`` say what runs
    the second pass (``finalize.FinalizeOptions``); the store's bytes do not depend on them.
    """

    def __init__(self, path_or_url, hooks: dict[str, int], dtype: str = "bfloat16", seed: int = 0,
                 expected_rows: int | None = None, provenance: dict | None = None,
                 memory_limit_bytes: int = 1 << 30, chunk_rows: int | None = None,
                 shard_chunks: int = schema.SHARD_CHUNKS, progress: bool = False,
                 storage_options: dict | None = None, finalize_workers: int | None = None,
                 finalize_executor: str | None = None):
        finalize.refuse_in_worker_bootstrap(path_or_url)
        self.finalize = finalize.FinalizeOptions(workers=finalize_workers, executor=finalize_executor)
        self.spec = WriterSpec.build(hooks=hooks, dtype=dtype, seed=seed, expected_rows=expected_rows,
                                     provenance=provenance or {}, memory_limit_bytes=memory_limit_bytes,
                                     chunk_rows=chunk_rows, shard_chunks=shard_chunks)
        self.loc = schema.locate(path_or_url, storage_options)
        self.finalize.resolved(self.loc)  # refuse a pool that cannot write there before writing anything
        self.progress_bar = progress
        self._state_dir = self.loc.sub(schema.STATE_DIR)
        self._lock = f"{self._state_dir}/lock"
        self._closed = False
        self._locked = False
        self._progress = None
        with self._disk_full_is_a_store_error():
            self._open_or_create()

    # --- opening -------------------------------------------------------------------------------------
    def _open_or_create(self) -> None:
        fs, loc = self.loc.fs, self.loc
        attrs = self._existing_attrs()
        if attrs is not None and attrs.is_complete:
            tidy_complete(loc)
            raise StoreError(f"{loc.url} is already a complete store ({attrs.n_rows} rows); "
                             "delete it or choose another path to write a new one")
        if not loc.is_local:  # s3fs's makedirs would create a missing bucket: refuse it instead, in one line
            check_remote(loc.url, loc.storage_options, writing=True)
        fs.makedirs(f"{self._state_dir}/stage", exist_ok=True)
        acquire_lock(loc, self._lock)
        self._locked = True
        try:
            attrs = self._existing_attrs()  # again, under the lock: a writer may have finished meanwhile
            if attrs is not None and attrs.is_complete:
                tidy_complete(loc)
                raise StoreError(f"{loc.url} is already a complete store; delete it or choose another path")
            # what writers killed mid-write left (only the lock holder writes here; lock files being
            # created by other writers right now are theirs)
            remove_temps(loc, loc.root, only_dead=False)
            remove_temps(loc, self._state_dir, only_dead=True)
            self._progress = read_json(loc, self._progress_path) if attrs is not None else None
            if attrs is not None:
                self._check_same_config(attrs.writer_config)
            else:
                write_group_attrs(loc, self.spec.initial_attrs())
            if self._progress is None:
                self._progress = {"phase": "staging", "n_files": 0, "rows_staged": 0}
                self._commit()
        except BaseException:
            self._release()
            raise
        self._stager = self._make_stager()

    def _existing_attrs(self) -> StoreAttrs | None:
        """The attributes of the store already at the path (None: nothing there); refuses anything else."""
        fs, loc = self.loc.fs, self.loc
        try:
            raw = read_group_attrs(loc)
        except ValueError as e:  # not JSON
            raise StoreError(f"{loc.url}/zarr.json cannot be read as JSON ({e}); this is no store this writer "
                             "can resume: choose an empty or new path") from None
        if raw is None:
            foreign = foreign_names(loc) if fs.exists(loc.root) else []
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
                raise StoreError(f"{loc.url} exists and is not a saeforge store (it holds {shown}); "
                                 "choose an empty or new path")
            return None
        if FORMAT_KEY not in raw:
            raise StoreError(f"{loc.url} is a zarr group but not a saeforge store; refusing to write there")
        return parse_attrs(loc, raw)

    def _check_same_config(self, stored: dict) -> None:
        mine = self.spec.config_dict()
        diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        if diff:
            detail = "; ".join(f"{k}: store has {stored.get(k)!r}, writer has {mine.get(k)!r}" for k in diff)
            raise SchemaMismatch(f"{self.loc.url} is an incomplete store written with another config "
                                 f"({detail}); resume with the same settings or write to a new path")

    @property
    def _progress_path(self) -> str:
        return f"{self._state_dir}/progress.json"

    def _commit(self) -> None:
        write_json_atomic(self.loc, self._progress_path, self._progress)

    @contextmanager
    def _disk_full_is_a_store_error(self):
        """A full disk (ENOSPC, or a quota) becomes DiskFull: how much room is needed, and that a rerun resumes.
        Nothing committed is lost: the progress record still names the last complete step."""
        try:
            yield
        except OSError as e:
            if e.errno not in _NO_SPACE:
                raise
            self.abort()
            raise DiskFull(self._disk_full_message(e)) from e

    def _disk_full_message(self, e: OSError) -> str:
        p, row = self._progress or {}, self.spec.row_bytes
        if p.get("phase") == "writing":
            where = f"writing the shuffled arrays ({p['rows_written']:,} of {p['n_rows']:,} rows written)"
            need = (f"up to {_size((p['n_rows'] - p['rows_written']) * row)} more for the rest of the arrays "
                    "(their uncompressed size; the staged rows are freed when the store completes)")
        else:
            staged, total = int(p.get("rows_staged", 0)), self.spec.expected_rows
            where = f"staging rows ({staged:,} staged so far)"
            need = (f"about {_size(max(total - staged, 0) * row + total * row)} more "
                    f"({_size(total * row)} staged rows plus at most as much again for the arrays, until the "
                    "staged rows are freed at the end)" if total else
                    f"about twice the raw size of the rows ({row} B per row) in all")
        free = ""
        if self.loc.is_local:
            try:
                free = f", {_size(shutil.disk_usage(self.loc.root).free)} free now"
            except OSError:
                pass
        return (f"{self.loc.url}: the disk is full ([Errno {e.errno}] {e.strerror}) while {where}; the store needs "
                f"{need}{free}. Free some space, then rerun the same command: it resumes from the last step "
                "it committed")

    def _make_stager(self) -> Stager:
        def on_flush(sf):
            self._progress.update(n_files=self._progress["n_files"] + 1,
                                  rows_staged=self._progress["rows_staged"] + sf.n_rows)
            self._commit()

        return Stager(self.spec.shuffle_context(self.loc), f"{self._state_dir}/stage", self.spec.n_buckets, (0,),
                      next_index=self._progress["rows_staged"], n_files=self._progress["n_files"],
                      on_flush=on_flush)

    # --- appending -----------------------------------------------------------------------------------
    @property
    def rows_staged(self) -> int:
        """Rows durably committed by this and earlier runs (the producer skips this many on resume)."""
        return int(self._progress["rows_staged"])

    @property
    def rows_appended(self) -> int:
        """Rows received so far, including those still buffered in memory."""
        return self._stager.next_index + self._stager._rows

    def append(self, acts: dict, token_ids=None, seq_idx=None, pos=None) -> None:
        """Add rows: ``acts[hook]`` is (rows, d) (numpy or torch); the 1-D arrays are (rows,)."""
        if self._closed:
            raise StoreError(f"writer for {self.loc.url} is closed")
        data = self.spec.convert_batch(acts, token_ids=token_ids, seq_idx=seq_idx, pos=pos)
        if not data:
            return
        if self._progress.get("tasks") is not None:
            raise StoreError(f"{self.loc.url} is being staged by a distributed harvest; resume it with the same "
                             "--workers/--scheduler command")
        if self._progress["phase"] != "staging":
            raise StoreError(f"{self.loc.url}: all rows were already staged by an earlier run "
                             f"({self.rows_staged}); skip them and call close() to finish")
        with self._disk_full_is_a_store_error():
            self._stager.add(data)

    # --- finishing -----------------------------------------------------------------------------------
    def close(self, executor: Executor | None = None) -> None:
        """Flush, shuffle, write the final arrays and statistics, then the completion record (last).

        ``executor``: any ``concurrent.futures.Executor`` (a dask ``Client.get_executor()``) to run the shard
        tasks on, at most ``finalize_workers`` at a time; None: this process or a local pool.
        """
        if self._closed:
            return
        try:
            with self._disk_full_is_a_store_error():
                if self._progress["phase"] == "staging":
                    self._stager.flush()
                    self._start_writing()
                self._write_rows(executor)
                self._complete()
        finally:
            self._closed = True
            self._release()
        tidy_complete(self.loc)  # a complete store keeps no writer state: plain zarr lists only its arrays

    def abort(self) -> None:
        """Stop without finishing: the store stays incomplete and resumable."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        if self._locked:
            self._locked = False
            release_lock(self.loc, self._lock)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort() if exc_type else self.close()

    def _staged_files(self) -> list[StagedFile]:
        """Every staged file, in stream order: this writer's own (a prefix of the stream), then the files of
        the tasks a distributed producer staged (``adopt_tasks``). The input of the second pass."""
        own = [read_counts(self.loc, f"{self._state_dir}/stage/f{i:07d}.bin", self.spec.n_buckets)
               for i in range(self._progress["n_files"])]
        plan = self._progress.get("tasks") or {}
        return own + [read_counts(self.loc, self.loc.sub(TASKS_DIR, f), self.spec.n_buckets)
                      for f in plan.get("files") or []]

    # --- rows staged by tasks (a distributed producer: stores/tasks.py) ------------------------------------
    @property
    def task_plan_state(self) -> dict | None:
        """The distributed producer's plan recorded in this store (None: rows come through ``append``)."""
        return self._progress.get("tasks")

    def task_plan(self, batches_per_task: int) -> dict:
        """Record (first call) or return (a resumed run) the plan of a distributed producer: the rows before
        ``base`` are this writer's own staged prefix (an earlier single-process run), the rest come from tasks
        of ``batches_per_task`` batches each, whose numbering depends on this plan (so a resume keeps it)."""
        plan = self._progress.get("tasks")
        if plan is None:
            self._stager.flush()
            plan = {"base": self.rows_staged, "batches_per_task": int(batches_per_task), "files": None}
            self._progress["tasks"] = plan
            self._commit()
        return plan

    def adopt_tasks(self, manifests: list[dict]) -> None:
        """Take the committed tasks' files as staged rows, in stream order; they must cover the stream from the
        plan's ``base`` on, without a gap or an overlap. Idempotent (a rerun adopts the same manifests)."""
        plan, at = self._progress["tasks"], self._progress["tasks"]["base"]
        ordered = sorted((TaskManifest(**m) for m in manifests), key=lambda m: m.row_start)
        for m in ordered:
            if m.row_start != at:
                raise StoreError(f"{self.loc.url}: staged task {m.task} starts at row {m.row_start}, expected "
                                 f"{at}; rerun the same command to stage the missing rows")
            at += m.n_rows
        plan["files"] = [f for m in ordered for f in m.files]
        self._progress["rows_staged"] = at
        self._commit()

    def _start_writing(self) -> None:
        n_rows = self._progress["rows_staged"]
        if n_rows == 0:
            raise StoreError(f"{self.loc.url}: no rows were appended; nothing to write")
        create_arrays(self.loc, self.spec, n_rows)
        self._progress.update(phase="writing", n_rows=n_rows, rows_written=0)
        self._commit()

    def _job(self) -> finalize.FinalizeJob:
        return finalize.FinalizeJob(self.loc, self.spec, self._progress["n_rows"], self._state_dir)

    def _write_rows(self, executor: Executor | None) -> None:
        """Every shard without a commit record; ``rows_written`` in the progress record follows them (for
        people and messages: the shard records are what counts)."""
        p, job = self._progress, self._job()
        p.pop("stats_acc", None)  # the running sums of writers before shard records
        p["rows_written"] = sum(job.size_of(k) for k in finalize.committed_shards(job))
        self._commit()
        if p["rows_written"] == p["n_rows"]:  # all written (then the staged files may be gone already)
            return
        with progress_bar(p["n_rows"], initial=p["rows_written"], desc="shuffle+write", unit="row",
                          enabled=self.progress_bar) as bar:
            def on_rows(n: int) -> None:
                bar.update(n)
                p["rows_written"] += n
                self._commit()

            finalize.run(job, self._staged_files(), self.finalize, executor, on_rows)

    def _complete(self) -> None:
        p = self._progress
        stats = finalize.combined_stats(self._job()).finish(self.spec.hooks, p["n_rows"])
        self._remove_partial_files()
        if self.loc.fs.exists(f"{self._state_dir}/stage"):
            self.loc.fs.rm(f"{self._state_dir}/stage", recursive=True)
        # no timestamps: same seed + same input = bit-identical store
        attrs = self.spec.initial_attrs().completed(p["n_rows"], stats)
        write_group_attrs(self.loc, attrs)  # the completion record: the last write of the store
        try:
            self.loc.fs.rm_file(self._progress_path)
        except FileNotFoundError:  # a reader that opened the complete store has tidied it already
            pass

    def _remove_partial_files(self) -> None:
        """zarr's LocalStore writes ``<key>.<uuid>.partial`` then renames; a kill leaves the temp file."""
        if not self.loc.is_local:
            return
        for name in self.spec.fields():
            for path in self.loc.fs.glob(self.loc.sub(name.name, "**", "*.partial")):
                self.loc.fs.rm_file(path)


def _size(n_bytes: float) -> str:
    if n_bytes < 1024:
        return f"{n_bytes:,.0f} B"
    for unit in ("KiB", "MiB"):
        n_bytes /= 1024
        if n_bytes < 1024:
            return f"{n_bytes:,.1f} {unit}"
    return f"{n_bytes / 1024:,.1f} GiB"
