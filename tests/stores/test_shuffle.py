"""The writer's shuffle is a uniform random permutation: chi-square on where early rows land, no serial correlation."""
from __future__ import annotations

import numpy as np
import pytest

from saeforge.stores import StoreWriter, open_store
from saeforge.stores.hashing import bucket_of, salt_key

N = 20000
CHI2_9DOF_P001 = 27.877  # 99.9% quantile of chi-square with 9 degrees of freedom


def shuffled_ids(path, seed, expected_rows):
    """Write N rows whose token id is their stream index; return the token ids in store order."""
    with StoreWriter(path, {"h": 1}, dtype="float16", seed=seed, expected_rows=expected_rows,
                     memory_limit_bytes=256 << 10, chunk_rows=1024, shard_chunks=1) as w:
        for lo in range(0, N, 4000):
            idx = np.arange(lo, lo + 4000)
            w.append({"h": np.zeros((4000, 1), np.float32)}, token_ids=idx)
    return open_store(path).token_ids()


@pytest.mark.parametrize("seed,expected_rows", [(0, N), (1, N), (2, None)])  # None: oversized buckets recurse
def test_permutation_is_uniform_and_serially_uncorrelated(tmp_path, seed, expected_rows):
    tid = shuffled_ids(str(tmp_path / "s"), seed, expected_rows)
    assert np.array_equal(np.sort(tid), np.arange(N))
    where = np.argsort(tid)  # where[i]: final position of the i-th appended row
    first = where[: N // 100]  # the first 1% of appended rows
    counts = np.bincount(first * 10 // N, minlength=10)
    expected = len(first) / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_9DOF_P001, f"first 1% of rows land unevenly over deciles: {counts}"
    # adjacent stored rows come from unrelated stream positions
    r = np.corrcoef(tid[:-1], tid[1:])[0, 1]
    assert abs(r) < 4 / np.sqrt(N)
    gaps = np.abs(np.diff(tid.astype(np.int64)))
    assert np.median(gaps) > N / 5  # uniform pairs: median |i - j| ~ 0.29 N


def test_positions_are_uniform_for_every_decile_of_the_stream(tmp_path):
    """Sharper than the 1% test: a 10x10 contingency table of (stream decile, store decile)."""
    tid = shuffled_ids(str(tmp_path / "s"), 5, N)
    table = np.zeros((10, 10))
    np.add.at(table, (tid * 10 // N, np.arange(N) * 10 // N), 1)
    chi2 = ((table - N / 100) ** 2 / (N / 100)).sum()
    assert chi2 < 81 + 5 * np.sqrt(2 * 81), f"stream and store position are dependent: chi2 {chi2:.1f}"


def test_bucket_hash_is_uniform_and_independent_of_batching():
    key = salt_key(0, (0,))
    b = bucket_of(np.arange(100000, dtype=np.uint64), key, 16)
    counts = np.bincount(b, minlength=16)
    assert ((counts - 6250) ** 2 / 6250).sum() < 37.7  # 99.9% quantile, 15 dof
    assert np.array_equal(b[500:700], bucket_of(np.arange(500, 700, dtype=np.uint64), key, 16))
