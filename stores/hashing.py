"""The hash that scatters rows to buckets in the writer's first shuffle pass (``stores/shuffle.py``).

A row's bucket is a function of (seed, salt, its index in the stream) only, never of how the producer
batched its rows or where a crash cut the stream: that is what makes a resumed store bit-identical.
Changing anything here changes every store written afterwards (format version 1 depends on it).
"""
from __future__ import annotations

import numpy as np


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-mixed hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def salt_key(seed: int, salt: tuple[int, ...]) -> np.uint64:
    """A 64-bit key per (seed, salt); the salt names the pass: ``(0,)`` for pass 1, then one more entry
    per level of recursion into an oversized bucket."""
    return np.random.SeedSequence([seed, *salt]).generate_state(1, np.uint64)[0]


def bucket_of(index: np.ndarray, key: np.uint64, n_buckets: int) -> np.ndarray:
    """Bucket of each row from its index in the stream alone: independent of how rows were batched."""
    h = mix64(mix64(index.astype(np.uint64)) ^ key)
    return (h % np.uint64(n_buckets)).astype(np.int64)
