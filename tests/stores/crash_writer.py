"""A producer that test_crash.py kills with SIGKILL: deterministic stream, resumes by skipping rows_staged.

    python crash_writer.py PATH [KILL_AT]
Prints "started" once the writer is open, "staged" before close(); exits 0 when the store is complete.
KILL_AT makes it SIGKILL itself at a chosen point instead of at a random time:
``create`` (the first zarr.json written to its temporary file, not yet renamed), ``lock`` (the lock written to
its temporary file, not yet linked), ``shard:K`` (in the write phase, the K-th shard of this run written but
not yet committed), ``completed`` (just after the completion record).
"""
import os
import signal
import sys

import numpy as np

from saeforge.stores import StoreError, StoreWriter

N, BATCH = 4000, 97
HOOKS = {"blocks.0.hook_resid_post": 8, "blocks.0.hook_mlp_out": 4}
SETTINGS = dict(dtype="bfloat16", seed=3, expected_rows=N // 2, memory_limit_bytes=48 << 10, chunk_rows=32,
                shard_chunks=4, provenance={"test": "crash"})
"""expected_rows is half the truth, so many buckets overflow and take the recursive path too."""


def batches():
    rng = np.random.default_rng(0)
    acts = {h: rng.standard_normal((N, d)).astype(np.float32) for h, d in HOOKS.items()}
    for lo in range(0, N, BATCH):
        idx = np.arange(lo, min(N, lo + BATCH))
        yield {h: a[idx] for h, a in acts.items()}, idx


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill_at: str) -> None:
    """Patch the writer's steps so that this process kills itself at ``kill_at``."""
    from saeforge.stores import writer

    if kill_at == "create":
        replace = os.replace
        os.replace = lambda src, dst: die() if str(dst).endswith("zarr.json") else replace(src, dst)
    elif kill_at == "lock":
        os.link = lambda src, dst: die()
    elif kill_at.startswith("shard:"):
        left = [int(kill_at.split(":")[1])]
        commit = writer.StoreWriter._commit

        def commit_or_die(self):
            if self._progress.get("phase") == "writing" and self._progress.get("rows_written"):
                left[0] -= 1
                if left[0] == 0:
                    die()  # the shard's rows are in the arrays; the progress record does not say so yet
            commit(self)

        writer.StoreWriter._commit = commit_or_die
    elif kill_at == "completed":
        write_attrs = writer.write_group_attrs

        def write_then_die(loc, attrs):
            write_attrs(loc, attrs)
            if attrs.is_complete:
                die()

        writer.write_group_attrs = write_then_die
    else:
        raise SystemExit(f"unknown kill point {kill_at!r}")


def main(path, kill_at=None):
    if kill_at:
        arm(kill_at)
    try:
        w = StoreWriter(path, HOOKS, **SETTINGS)
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


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
