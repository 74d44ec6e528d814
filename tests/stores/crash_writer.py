"""A producer that test_crash.py kills with SIGKILL: deterministic stream, resumes by skipping rows_staged.

    python crash_writer.py PATH
Prints "started" once the writer is open, "staged" before close(); exits 0 when the store is complete.
"""
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


def main(path):
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
    sys.exit(main(sys.argv[1]))
