"""Per-hook normalisation statistics, accumulated in float64 over every stored row.

The writer sums each shard's rows as it writes the shard and commits the sums with it (one record per
shard, exact in JSON); at the end it adds the shards' sums in shard order (``merge``), so the statistics do
not depend on how many workers wrote the shards or in what order they finished, and ``finish`` turns them
into the ``HookStats`` of the store's attributes. ``verify`` recomputes them from the rows.
"""
from __future__ import annotations

import math

import numpy as np

from saeforge.stores.attrs import HookStats
from saeforge.stores.schema import to_float64

_BLOCK_BYTES = 8 << 20
"""float64 bytes converted at a time: bounded memory, and small enough that the allocator reuses the block
(blocks above its mmap threshold, at most 32 MiB in glibc, are page-faulted afresh every time)."""


class StatsAccumulator:
    """Running float64 sums, serialisable exactly to JSON (a resumed writer reads back the same bits)."""

    def __init__(self, sums: dict):
        self.sums = sums

    @classmethod
    def empty(cls, hooks: dict[str, int]) -> "StatsAccumulator":
        return cls({h: {"sum": np.zeros(d), "sum_sq": 0.0, "sum_norm": 0.0} for h, d in hooks.items()})

    @classmethod
    def from_json(cls, obj: dict) -> "StatsAccumulator":
        return cls({h: {"sum": np.asarray(v["sum"], np.float64), "sum_sq": float(v["sum_sq"]),
                        "sum_norm": float(v["sum_norm"])} for h, v in obj.items()})

    def to_json(self) -> dict:
        return {h: {"sum": v["sum"].tolist(), "sum_sq": v["sum_sq"], "sum_norm": v["sum_norm"]}
                for h, v in self.sums.items()}

    def add(self, rows: dict[str, np.ndarray], dtype: str) -> None:
        for hook, x in rows.items():
            acc = self.sums[hook]
            block = max(1, _BLOCK_BYTES // (8 * max(1, x.shape[1])))
            for lo in range(0, len(x), block):
                x64 = to_float64(x[lo : lo + block], dtype)
                sq = np.einsum("ij,ij->i", x64, x64)
                acc["sum"] += x64.sum(axis=0)
                acc["sum_sq"] += float(sq.sum())
                acc["sum_norm"] += float(np.sqrt(sq).sum())

    def merge(self, other: "StatsAccumulator") -> None:
        """Add another accumulator's sums (float64 addition: merge in a fixed order for reproducible bits)."""
        for hook, acc in self.sums.items():
            o = other.sums[hook]
            acc["sum"] += o["sum"]
            acc["sum_sq"] += o["sum_sq"]
            acc["sum_norm"] += o["sum_norm"]

    def finish(self, hooks: dict[str, int], n_rows: int) -> dict[str, HookStats]:
        out = {}
        for hook, d in hooks.items():
            acc = self.sums[hook]
            msq = acc["sum_sq"] / n_rows
            out[hook] = HookStats(acc["sum"] / n_rows, msq, acc["sum_norm"] / n_rows,
                                  math.sqrt(d / msq) if msq > 0 else 1.0)
        return out
