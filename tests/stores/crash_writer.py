"""A producer that test_crash.py kills with SIGKILL: deterministic stream, resumes by skipping rows_staged.

    python crash_writer.py PATH [KILL_AT] [--workers N] [--executor threads|processes]
Prints "started" once the writer is open, "staged" before close(); exits 0 when the store is complete.
``--workers``/``--executor``: the writer's finalize_workers/finalize_executor (default 1: serial).
KILL_AT makes it SIGKILL itself at a chosen point instead of at a random time:
``create`` (the first zarr.json written to its temporary file, not yet renamed), ``lock`` (the lock written to
its temporary file, not yet linked), ``shard:K`` (in the write phase, the K-th shard that this process, or with
``--executor processes`` one worker process, has written but not yet committed: the worker kills the writer and
itself), ``completing`` (every shard written and the staged files removed, the completion record not yet
written), ``completed`` (just after the completion record).
"""
import os
import signal
import sys
import threading

import numpy as np

from saeforge.stores import StoreError, StoreWriter

N, BATCH = 4000, 97
HOOKS = {"blocks.0.hook_resid_post": 8, "blocks.0.hook_mlp_out": 4}
SETTINGS = dict(dtype="bfloat16", seed=3, expected_rows=N // 2, memory_limit_bytes=64 << 10, chunk_rows=32,
                shard_chunks=4, provenance={"test": "crash"})
"""expected_rows is half the truth, so some buckets overflow and take the recursive path too; 32 shards, and
memory for two shard tasks at a time (``finalize.max_tasks_in_memory``)."""
KILL_ENV = "SAEFORGE_CRASH_KILL_AT"
"""How a kill point reaches the finalize worker processes (they import this file as ``__mp_main__``)."""
STORE_ENV = "SAEFORGE_CRASH_STORE"
"""The store's path, in the environment of this process and of its workers (test_crash finds survivors by it)."""


def batches():
    rng = np.random.default_rng(0)
    acts = {h: rng.standard_normal((N, d)).astype(np.float32) for h, d in HOOKS.items()}
    for lo in range(0, N, BATCH):
        idx = np.arange(lo, min(N, lo + BATCH))
        yield {h: a[idx] for h, a in acts.items()}, idx


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_writer(writer: int) -> None:
    """In a finalize worker process: kill the writer that started it, then this worker. A worker whose writer
    is gone already (another worker killed it) carries on, as a worker that outlived its writer would."""
    if os.getppid() != writer:
        return
    os.kill(writer, signal.SIGKILL)
    die()


def arm_shard(k: int, kill) -> None:
    """``kill()`` at the k-th shard commit of this process: its rows are in the arrays, its record is not."""
    from saeforge.stores import finalize

    left, commit, lock = [k], finalize.commit_shard, threading.Lock()

    def commit_or_die(*args, **kw):
        with lock:  # in a pool of threads: the k-1 commits before are done when the k-th kills
            left[0] -= 1
            if left[0] == 0:
                kill()
            commit(*args, **kw)

    finalize.commit_shard = commit_or_die


def arm(kill_at: str, executor: str) -> None:
    """Patch the writer's steps so that this process kills itself at ``kill_at``."""
    from saeforge.stores import writer

    if kill_at == "create":
        replace = os.replace
        os.replace = lambda src, dst: die() if str(dst).endswith("zarr.json") else replace(src, dst)
    elif kill_at == "lock":
        os.link = lambda src, dst: die()
    elif kill_at.startswith("shard:"):
        if executor == "processes":
            os.environ[KILL_ENV] = kill_at  # armed in each worker when it imports this file
        else:
            arm_shard(int(kill_at.split(":")[1]), die)
    elif kill_at in ("completing", "completed"):
        write_attrs = writer.write_group_attrs

        def write_then_die(loc, attrs):
            if attrs.is_complete and kill_at == "completing":
                die()
            write_attrs(loc, attrs)
            if attrs.is_complete:
                die()

        writer.write_group_attrs = write_then_die
    else:
        raise SystemExit(f"unknown kill point {kill_at!r}")


def main(path, kill_at=None, workers=1, executor="threads"):
    os.environ[STORE_ENV] = os.path.abspath(path)
    if kill_at:
        arm(kill_at, executor)
    try:
        w = StoreWriter(path, HOOKS, **SETTINGS, finalize_workers=workers, finalize_executor=executor)
    except StoreError as e:
        if "already a complete store" in str(e):
            return 0
        raise
    print("started", flush=True)
    skip = w.rows_staged
    with w:
        for acts, idx in batches():
            keep = idx >= skip
            if keep.any():
                w.append({h: a[keep] for h, a in acts.items()}, token_ids=idx[keep], seq_idx=idx[keep] // 64,
                         pos=idx[keep] % 64)
        print("staged", flush=True)
    return 0


def parse(argv: list[str]) -> dict:
    opts = {"workers": 1, "executor": "threads"}
    positional = []
    while argv:
        arg = argv.pop(0)
        if arg in ("--workers", "--executor"):
            opts[arg[2:]] = argv.pop(0)
        else:
            positional.append(arg)
    opts["workers"] = int(opts["workers"])
    return {"path": positional[0], "kill_at": positional[1] if len(positional) > 1 else None, **opts}


if __name__ == "__main__":
    sys.exit(main(**parse(sys.argv[1:])))
elif __name__ == "__mp_main__" and os.environ.get(KILL_ENV):  # a finalize worker process of an armed writer
    WRITER = os.getppid()
    arm_shard(int(os.environ[KILL_ENV].split(":")[1]), lambda: kill_writer(WRITER))
