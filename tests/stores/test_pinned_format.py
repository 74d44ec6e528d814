"""Format version 1, pinned: a small fixed store must decode to the same rows and attributes, digest for digest.

The same seed and input must always give the same store. This test writes three small stores (float32,
bfloat16, and bfloat16 with too few buckets, so the shuffle takes its recursive path) from an input made
with integer arithmetic only, and compares a sha256 over what they hold with constants recorded when the
format was fixed. The digest covers the DECODED arrays (name, dtype, shape, attributes, values) and the
canonical JSON of the group attributes, read with plain zarr: compressed bytes may change with a numcodecs
release without the store changing. Input values are multiples of 1/256 below 16 in magnitude, so the
float64 sums behind the statistics are exact and do not depend on summation order.

If this fails after a deliberate format change, bump ``schema.FORMAT_VERSION`` and record new digests.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

N = 1000
HOOKS = {"blocks.0.hook_resid_post": 12, "blocks.1.hook_mlp_out": 8}
PROVENANCE = {"model": "pinned", "context_size": 32, "nested": {"list": [1, 2.5, "x"], "none": None}}
CASES = {  # name: (dtype, expected_rows)
    "float32": ("float32", N),
    "bfloat16": ("bfloat16", N),
    "bfloat16_recursive": ("bfloat16", N // 10),  # one bucket of 1000 rows > bucket_max_rows 585
}
PINNED = {  # recorded with the store code as of format version 1 (the same digests before and after the split
    # of stores/ into spec, attrs, files, hashing, lock and staging)
    "float32": "979db0ae7c26f663f313fb30f894f66e22536704074d6374ca30262caa945917",
    "bfloat16": "26b00b57dee9bb609a153ab019ab5e8cad5428388f15d01aa61798779be244aa",
    "bfloat16_recursive": "c043d6aabde4f370e4b065b6746a18994b356fe6f6ca30b9e0684732783ffb3a",
}


def rows(n: int, d: int, k: int) -> np.ndarray:
    """(n, d) float32 multiples of 1/256 in [-16, 16), from the row and column index alone."""
    i, j = np.arange(n, dtype=np.int64)[:, None], np.arange(d, dtype=np.int64)[None, :]
    return (((i * 7919 + j * 104729 + k * 15485863) % 8191 - 4095) / 256).astype(np.float32)


def write_pinned(path: str, dtype: str, expected_rows: int) -> None:
    from saeforge.stores import StoreWriter

    acts = {h: rows(N, d, k) for k, (h, d) in enumerate(HOOKS.items())}
    with StoreWriter(path, HOOKS, dtype=dtype, seed=11, expected_rows=expected_rows, provenance=PROVENANCE,
                     memory_limit_bytes=128 << 10, chunk_rows=64, shard_chunks=2) as w:
        for lo in range(0, N, 300):
            idx = np.arange(lo, min(N, lo + 300))
            w.append({h: a[idx] for h, a in acts.items()}, token_ids=idx, seq_idx=idx // 32, pos=idx % 32)


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def content_digest(path: str) -> str:
    """sha256 over the group attributes and every array's name, dtype, shape, attributes and decoded values."""
    import zarr

    group = zarr.open_group(path, mode="r")
    h = hashlib.sha256(canonical(dict(group.attrs)))
    for name in sorted(name for name, _ in group.members()):
        arr = group[name]
        h.update(canonical([name, str(arr.dtype), list(arr.shape), dict(arr.attrs)]))
        h.update(np.ascontiguousarray(arr[:], dtype=arr.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fixed_store_decodes_to_its_pinned_digest(tmp_path, case):
    path = str(tmp_path / case)
    write_pinned(path, *CASES[case])
    assert content_digest(path) == PINNED[case], f"{case}: the store's content changed (format version 1)"


def test_the_recursive_case_recurses(tmp_path):
    from saeforge.stores import open_store

    path = str(tmp_path / "s")
    write_pinned(path, *CASES["bfloat16_recursive"])
    shuffle = open_store(path).attrs.to_json()["shuffle"]
    assert N / shuffle["n_buckets"] > shuffle["bucket_max_rows"]  # buckets overflow: the recursive path ran
