"""Helpers for store tests (imported as ``from .helpers import ...``): small real stores written by StoreWriter
with tiny chunks and tiny memory limits, from a deterministic producer."""
from __future__ import annotations

import numpy as np

SMALL = dict(memory_limit_bytes=128 << 10, chunk_rows=64, shard_chunks=2)
"""Writer settings that make a few-thousand-row store span many staged files, buckets and shards."""
HOOKS = {"blocks.0.hook_resid_post": 12, "blocks.1.hook_mlp_out": 8}


def stream(n: int, hooks: dict, seed: int = 0, batch: int = 250):
    """A deterministic producer: batches of (acts, token_ids, seq_idx, pos); token_ids = stream index."""
    rng = np.random.default_rng(seed)  # rows depend on their index only, not on the batching
    full = {h: (rng.standard_t(4, size=(n, d)) * 2).astype(np.float32) for h, d in hooks.items()}
    for lo in range(0, n, batch):
        idx = np.arange(lo, min(n, lo + batch))
        yield {h: x[idx] for h, x in full.items()}, idx, idx // 32, idx % 32


def write_store(url, n=2000, hooks=None, dtype="float32", seed=0, batch=250, **kw):
    """Write a store from ``stream`` and return the appended data (stream order) for comparison. Like a rerun
    of harvest, it resumes an interrupted store (skipping the rows its writer already staged)."""
    from saeforge.stores import StoreWriter

    hooks = hooks or HOOKS
    settings = {**SMALL, "expected_rows": n, **kw}
    acts_all = {h: [] for h in hooks}
    with StoreWriter(url, hooks, dtype=dtype, seed=seed, provenance={"test": True}, **settings) as w:
        skip = w.rows_staged
        for acts, tok, seq, pos in stream(n, hooks, seed=7, batch=batch):
            keep = tok >= skip
            if keep.any():
                w.append({h: a[keep] for h, a in acts.items()}, token_ids=tok[keep], seq_idx=seq[keep],
                         pos=pos[keep])
            for h in hooks:
                acts_all[h].append(acts[h])
    return {h: np.concatenate(v) for h, v in acts_all.items()}
