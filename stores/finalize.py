"""The writer's second pass as shard tasks, serial or parallel by the same code: plan, run, commit, combine.

Shard k of the store holds rows [k*S, min((k+1)*S, n)) of the shuffled order (S = ``spec.shard_rows``);
from the staged files' bucket counts every bucket's first row in the store is known, so any shard can be
written without the others. A task writes consecutive whole shards (writes never overlap: one shard is
one file per array): it reads the buckets its rows come from, permutes each with the same generator as
ever (``shuffle.bucket_rows``), fills a shard, writes it to every array, sums its statistics and commits
it by writing a small record, atomically::

    <store>/.saeforge/shards/s0000012.json     shard 12 is written: its rows and float64 sums (exact JSON)
    <store>/.saeforge/sub/t0000012-3f9c1a2b/    scratch of the task starting at shard 12 (oversized buckets)
    <store>/.saeforge/stop                      the writer gave up (a task failed): the others stop at a shard

A resumed writer skips the shards that have a record. At the end the records' sums are added in shard
order, so the statistics, like the arrays, are the same bytes whatever ran the tasks. Tasks run in the
writer's process one after another (one worker), in a local pool of threads or processes, or on any
``concurrent.futures.Executor`` passed in (a dask ``Client.get_executor()``): ``write_shards`` is a
module-level function of picklable arguments.
"""
from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, NamedTuple

import numpy as np

from saeforge.stores.errors import InvalidInput, StoreError
from saeforge.stores.files import read_json, write_json_atomic
from saeforge.stores.schema import Location
from saeforge.stores.shuffle import Piece, Segment, ShuffleContext, bucket_rows, bucket_starts, pieces_of
from saeforge.stores.spec import WriterSpec
from saeforge.stores.staging import StagedFile
from saeforge.stores.stats import StatsAccumulator

SHARDS, SCRATCH, STOP = "shards", "sub", "stop"
MIN_BYTES_PER_WORKER = 256 << 20
"""Rows (in bytes) below which another worker is not started by default (``workers_for``)."""
POLL_S = 0.5
"""Seconds between looks at the shard records while a pool runs (the progress bar's step)."""
DEFAULT_EXECUTOR = "processes"
"""Processes, measured faster (``scripts/bench_harvest.py --section finalize``, 2M rows of d=576 bf16, 2-core
Intel Xeon; ``scripts/results/bench_harvest_finalize.json``): against one worker, 2 processes 1.62x on disk
and 1.46x in tmpfs (medians), 2 threads 1.54x and 0.90x. Threads gain only while the kernel's writes run:
zarr's write path (one event-loop thread, copies made holding the GIL) is about one core however many threads
call it (whole-shard zarr writes: 255k rows/s from 1 thread, 222k from 2). A process costs ~0.5 s to start,
and one worker already uses ~1.2 cores (zarr encodes a shard's chunks in its own threads), so 2 cores give
~1.5x, not 2x."""


@dataclass(frozen=True, kw_only=True)
class FinalizeOptions:
    """How the writer runs its second pass; nothing here changes the store's bytes."""

    workers: int | None = None
    """Shard tasks at a time: None or 0 = the machine's cores (``os.cpu_count()``), one per
    ``MIN_BYTES_PER_WORKER`` of rows at most; 1 = one after another in the writer's own process. Always capped
    so that the tasks fit in ``memory_limit_bytes`` together."""
    executor: Literal["threads", "processes"] | None = None
    """What runs the tasks when ``close()`` is given no executor: a pool of threads or of processes; None =
    ``DEFAULT_EXECUTOR`` (threads for a ``memory://`` store, which other processes cannot see). Processes are
    spawned and import the main script: a script keeps its work under ``if __name__ == '__main__':``."""

    def __post_init__(self):
        problems = []
        if self.workers is not None and (type(self.workers) is not int or self.workers < 0):
            problems.append(f"finalize_workers must be an int >= 0 (0 or None: every core), got {self.workers!r}")
        if self.executor not in (None, "threads", "processes"):
            problems.append(f"finalize_executor must be 'threads' or 'processes', got {self.executor!r}")
        if problems:
            raise InvalidInput("; ".join(problems))

    def resolved(self, loc: Location) -> tuple[int, str]:
        """(workers, executor kind) for a store at ``loc``."""
        protocols = (loc.fs.protocol,) if isinstance(loc.fs.protocol, str) else tuple(loc.fs.protocol)
        shared = loc.is_local or "memory" not in protocols
        if self.executor == "processes" and not shared:
            raise InvalidInput(f"{loc.url}: finalize_executor='processes' cannot write a memory:// store (each "
                               "process has its own memory filesystem); use 'threads'")
        kind = self.executor or (DEFAULT_EXECUTOR if shared else "threads")
        return self.workers or os.cpu_count() or 1, kind


class BucketSpan(NamedTuple):
    """One bucket a task reads: its salt (``(0, bucket)``), its first row in the store, its rows' places."""

    salt: tuple[int, ...]
    start: int
    size: int
    pieces: tuple[Piece, ...]


class ShardTask(NamedTuple):
    """Shards [first, stop) and the buckets their rows come from."""

    first: int
    stop: int
    spans: tuple[BucketSpan, ...]


class FinalizeJob(NamedTuple):
    """What every task shares (picklable: a Location pickles with its fsspec filesystem)."""

    loc: Location
    spec: WriterSpec
    n_rows: int
    state_dir: str

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.spec.shard_rows)

    def rows_of(self, shard: int) -> tuple[int, int]:
        lo = shard * self.spec.shard_rows
        return lo, min(lo + self.spec.shard_rows, self.n_rows)

    def size_of(self, shard: int) -> int:
        lo, hi = self.rows_of(shard)
        return hi - lo

    def record(self, shard: int) -> str:
        return f"{self.state_dir}/{SHARDS}/s{shard:07d}.json"

    @property
    def stop(self) -> str:
        """Written when the writer gives up (a task failed, an interrupt): running tasks stop at a shard."""
        return f"{self.state_dir}/{STOP}"


# --- the task -----------------------------------------------------------------------------------------
def write_shards(job: FinalizeJob, task: ShardTask, on_shard: Callable[[int], None] | None = None) -> None:
    """Write and commit shards [task.first, task.stop) of every array, stopping at a shard boundary when the
    writer gave up (``job.stop``). Runs anywhere the store's location can be written; ``on_shard(rows)`` after
    each commit (in the writer's process only)."""
    arrays = _open_arrays(job)
    # a scratch folder of its own: two tasks that read the same oversized boundary bucket never collide, nor
    # do two attempts of one task (an executor may rerun a task it presumed lost); the scatter of an oversized
    # bucket buffers a quarter of a bucket (the bytes it gives do not depend on that)
    spec, scratch = job.spec, f"{job.state_dir}/{SCRATCH}/t{task.first:07d}-{secrets.token_hex(4)}"
    ctx = ShuffleContext(job.loc, spec.fields(), spec.seed, max(1, spec.bucket_max_rows // 4),
                         spec.bucket_max_rows, scratch)
    shards = _fill(_task_rows(ctx, task, job), [job.size_of(k) for k in range(task.first, task.stop)], ctx)
    try:
        for k, shard in zip(range(task.first, task.stop), shards):
            if job.loc.fs.exists(job.stop):
                return
            _write_shard(job, arrays, k, shard)
            if on_shard is not None:
                on_shard(job.size_of(k))
    finally:
        shards.close()  # the open buckets' scratch folders go first
        if job.loc.fs.exists(scratch):
            job.loc.fs.rm(scratch, recursive=True)


def _open_arrays(job: FinalizeJob) -> dict:
    import zarr

    group = zarr.open_group(job.loc.zarr_store(), mode="r+")
    # every chunk is written, even one equal to the fill value: a reader then knows that a chunk file
    # or shard-index entry that is not there is damage, never a chunk of zeros
    return {f.name: group[f.name].with_config({"write_empty_chunks": True}) for f in job.spec.fields()}


def _write_shard(job: FinalizeJob, arrays: dict, k: int, shard: dict) -> None:
    a, b = job.rows_of(k)
    for name, arr in arrays.items():
        arr[a:b] = shard[name]
    acc = StatsAccumulator.empty(job.spec.hooks)
    acc.add({h: shard[h] for h in job.spec.hooks}, job.spec.dtype)
    commit_shard(job, k, b - a, acc)


def commit_shard(job: FinalizeJob, shard: int, rows: int, acc: StatsAccumulator) -> None:
    """The shard's commit point: after its rows are in every array, before anything counts them."""
    write_json_atomic(job.loc, job.record(shard), {"rows": int(rows), "stats": acc.to_json()})


def _task_rows(ctx: ShuffleContext, task: ShardTask, job: FinalizeJob) -> Iterator[Segment]:
    lo, hi = job.rows_of(task.first)[0], job.rows_of(task.stop - 1)[1]
    for span in task.spans:
        a, b = max(lo, span.start) - span.start, min(hi, span.start + span.size) - span.start
        yield from bucket_rows(ctx, list(span.pieces), span.salt, a, b)


def _fill(segments: Iterator[Segment], sizes: list[int], ctx: ShuffleContext) -> Iterator[dict]:
    """One shard of ``sizes[i]`` rows after another, gathered from the segments (one bucket held at a time).
    The shards share one buffer: each is written before the next is asked for."""
    buffer = {f.name: np.empty((max(sizes), *f.tail), f.dtype) for f in ctx.fields}
    data, idx, at = None, np.empty(0, np.int64), 0
    try:
        for n in sizes:
            shard, filled = {name: arr[:n] for name, arr in buffer.items()}, 0
            while filled < n:
                if at == len(idx):
                    data = idx = None  # let the last bucket go before the next is read
                    data, idx, at = *_next(segments, ctx), 0
                k = min(n - filled, len(idx) - at)
                for name, arr in data.items():  # mode="clip": in range; the default mode copies via a buffer
                    np.take(arr, idx[at : at + k], axis=0, out=shard[name][filled : filled + k], mode="clip")
                filled, at = filled + k, at + k
            yield shard
    finally:
        segments.close()  # an open oversized bucket's scratch goes now, not whenever the collector runs


def _next(segments: Iterator[Segment], ctx: ShuffleContext) -> Segment:
    if (segment := next(segments, None)) is None:
        raise StoreError(f"{ctx.loc.url}: the staged buckets end before the shards do; the staging is damaged: "
                         "delete the store and write it again")
    return segment


# --- planning -----------------------------------------------------------------------------------------
def plan(job: FinalizeJob, files: list[StagedFile], pending: list[int], workers: int) -> list[ShardTask]:
    """Tasks covering the ``pending`` shards (runs of consecutive shards, cut to ``shards_per_task``)."""
    sizes = bucket_sizes(files)
    if int(sizes.sum()) != job.n_rows:
        raise StoreError(f"{job.loc.url}: the staged files hold {int(sizes.sum())} rows, the store {job.n_rows}; "
                         "its staging is damaged: delete the store and write it again")
    offsets, starts = np.cumsum(sizes) - sizes, bucket_starts(files)
    per_task = shards_per_task(job, sizes, len(pending), workers)
    runs, tasks = _runs(pending, per_task), []
    for first, stop in runs:
        lo, hi = job.rows_of(first)[0], job.rows_of(stop - 1)[1]
        first_b, stop_b = np.searchsorted(offsets, lo, "right") - 1, np.searchsorted(offsets, hi, "left")
        tasks.append(ShardTask(first, stop, tuple(
            BucketSpan((0, b), int(offsets[b]), int(sizes[b]), tuple(pieces_of(files, b, starts)))
            for b in range(int(first_b), int(stop_b)) if sizes[b] and offsets[b] + sizes[b] > lo)))
    return tasks


def bucket_sizes(files: list[StagedFile]) -> np.ndarray:
    """(buckets,) rows of each bucket over all staged files."""
    return np.array([f.counts for f in files], np.int64).reshape(len(files), -1).sum(axis=0)


def shards_per_task(job: FinalizeJob, sizes: np.ndarray, n_pending: int, workers: int) -> int:
    """Shards per task: large enough to amortise the buckets read twice, small enough to balance workers."""
    if workers <= 1:
        return max(1, n_pending)  # one task: no bucket is read twice (the serial writer of old)
    # A task boundary inside a bucket makes both tasks read (and permute) that bucket. A boundary falls in
    # bucket b with probability size_b / n, so it costs E = sum(size_b * cost_b) / n rows read again, with
    # cost_b = size_b, or 3 size_b for an oversized bucket (scattered to disk and read back). Tasks of 8 E
    # rows keep that under 1/8 of what a task writes. But a worker that is done while another still has a
    # long task idles (and on a shared machine task times vary): at least 2 tasks per worker, this rule
    # winning when the two conflict (a 2M-row store of d=576 on 2 workers: E ~ 1.7 shards, 4 tasks of 8).
    cost = np.where(sizes > job.spec.bucket_max_rows, 3 * sizes, sizes).astype(np.float64)
    boundary_rows = float((sizes * cost).sum()) / max(1, job.n_rows)
    amortised = int(np.ceil(8 * boundary_rows / job.spec.shard_rows))
    balanced = -(-n_pending // (2 * workers))
    return max(1, min(amortised, balanced))


def max_tasks_in_memory(spec: WriterSpec, sizes: np.ndarray) -> int:
    """How many tasks fit in ``memory_limit_bytes`` together."""
    # A task holds one bucket at a time (read whole, then gathered shard by shard: at most bucket_max_rows
    # rows, an oversized bucket being scattered to disk and read back one sub-bucket at a time) with its
    # permutation (8 B a row), and a shard twice: the rows being gathered, plus zarr's encoded copy of them
    # and the float64 block of the statistics. So W tasks need W x (bucket + 2 shards) bytes.
    bucket = min(int(sizes.max(initial=0)), spec.bucket_max_rows) * (spec.row_bytes + 8)
    return max(1, spec.memory_limit_bytes // (bucket + 2 * spec.shard_rows * spec.row_bytes))


def workers_for(job: FinalizeJob, files: list[StagedFile], n_pending: int, options: FinalizeOptions,
                auto: bool) -> int:
    """Tasks at a time: what was asked for (``auto``: every core), no more than fit in memory or than there
    are shards, and when ``auto`` no more than the rows make worth it: a worker process takes ~0.5 s to start
    (its imports), what it finalizes in ~100 MiB of rows, so each is given MIN_BYTES_PER_WORKER at least
    (a small store is finalized in the writer's own process)."""
    workers = min(options.resolved(job.loc)[0], max_tasks_in_memory(job.spec, bucket_sizes(files)), n_pending)
    if auto:
        pending_bytes = n_pending * job.spec.shard_rows * job.spec.row_bytes
        workers = min(workers, max(1, pending_bytes // MIN_BYTES_PER_WORKER))
    return max(1, workers)


def _runs(pending: list[int], per_task: int) -> list[tuple[int, int]]:
    """[first, stop) ranges of at most ``per_task`` consecutive shards of ``pending`` (sorted)."""
    runs = []
    for k in pending:
        if runs and runs[-1][1] == k and k - runs[-1][0] < per_task:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


# --- running ------------------------------------------------------------------------------------------
def committed_shards(job: FinalizeJob) -> set[int]:
    """The shards whose record exists."""
    directory = f"{job.state_dir}/{SHARDS}"
    try:
        job.loc.fs.invalidate_cache(directory)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in job.loc.fs.ls(directory, detail=False)]
    except FileNotFoundError:
        return set()
    return {int(n[1:-5]) for n in names if n.startswith("s") and n.endswith(".json") and n[1:-5].isdigit()}


def run(job: FinalizeJob, files: list[StagedFile], options: FinalizeOptions, executor: Executor | None,
        on_rows: Callable[[int], None]) -> None:
    """Write every shard without a record; ``on_rows(rows)`` as shards commit."""
    prepare(job)
    done = committed_shards(job)
    pending = [k for k in range(job.n_shards) if k not in done]
    if not pending:
        return
    workers = workers_for(job, files, len(pending), options, auto=options.workers in (None, 0) and executor is None)
    tasks = plan(job, files, pending, workers)
    if executor is not None:
        _run_on(executor, job, tasks, workers, on_rows, done)
    elif workers == 1:
        for task in tasks:
            write_shards(job, task, on_rows)
    else:
        with local_executor(options.resolved(job.loc)[1], workers) as pool:
            _run_on(pool, job, tasks, workers, on_rows, done)


def prepare(job: FinalizeJob) -> None:
    """Clear what stopped or killed tasks left (no task runs now: the writer holds the lock)."""
    for leftover in (f"{job.state_dir}/{SCRATCH}", job.stop):
        if job.loc.fs.exists(leftover):
            job.loc.fs.rm(leftover, recursive=True)
    job.loc.fs.makedirs(f"{job.state_dir}/{SHARDS}", exist_ok=True)


def _run_on(executor: Executor, job: FinalizeJob, tasks: list[ShardTask], workers: int,
            on_rows: Callable[[int], None], seen: set[int]) -> None:
    """At most ``workers`` tasks in flight. The first failure (or an interrupt) stops the others at their next
    shard and returns once none runs: nothing writes into the store after the writer gives up its lock."""
    queue, running, seen = list(reversed(tasks)), {}, set(seen)
    try:
        while queue or running:
            while queue and len(running) < workers:
                task = queue.pop()
                running[executor.submit(write_shards, job, task)] = task
            finished, _ = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
            new = committed_shards(job) - seen
            seen |= new
            if new:
                on_rows(sum(job.size_of(k) for k in new))
            for future in finished:
                del running[future]
                _result(future, job)  # a task's error is the writer's
    except BaseException:
        if running:
            with suppress(OSError):  # a full disk: the running tasks then end their whole task
                job.loc.fs.pipe_file(job.stop, b"")
        raise
    finally:
        for future in running:
            future.cancel()
        wait(running)


def _result(future, job: FinalizeJob) -> None:
    try:
        future.result()
    except BrokenProcessPool as e:
        raise StoreError(f"{job.loc.url}: a finalize worker process died ({e}); the store is incomplete and "
                         "resumable. If it died starting, the script that runs the writer must keep its work under "
                         "`if __name__ == '__main__':` (each worker process imports it), or pass "
                         "finalize_executor='threads'; if it was killed (out of memory?), lower finalize_workers "
                         "and rerun") from e


def refuse_in_worker_bootstrap(path_or_url) -> None:
    """A worker process imports the main script before it runs a task; a script whose work is not under
    ``if __name__ == '__main__':`` would start another writer there: refuse it before it writes anything."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # set while spawn imports __main__
        raise StoreError(f"{path_or_url}: a StoreWriter was opened while a finalize worker process imported the "
                         "main script; put the script's work under `if __name__ == '__main__':`, or pass "
                         "finalize_executor='threads'")


@contextmanager
def local_executor(kind: str, workers: int) -> Iterator[Executor]:
    """A pool of ``workers`` threads or processes (spawned: the writer's process may hold threads that a
    fork would copy mid-operation; each worker dies with the writer, so a killed writer leaves none behind)."""
    if kind == "threads":
        pool = ThreadPoolExecutor(workers, thread_name_prefix="saeforge-finalize")
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this worker when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def combined_stats(job: FinalizeJob) -> StatsAccumulator:
    """Every shard's sums, added in shard order (the same bits however many workers wrote them)."""
    total = StatsAccumulator.empty(job.spec.hooks)
    for k in range(job.n_shards):
        record = read_json(job.loc, job.record(k))
        lo, hi = job.rows_of(k)
        if record is None or record.get("rows") != hi - lo:
            raise StoreError(f"{job.loc.url}: shard {k} (rows {lo}-{hi}) has no valid commit record "
                             f"({job.record(k)}); rerun the same command to write it")
        total.merge(StatsAccumulator.from_json(record["stats"]))
    return total
