"""Per-hook normalisation statistics, accumulated in float64 over every stored row.

The writer adds each shard as it writes it and keeps the running sums in its progress record (exact in
JSON, so a resumed writer continues bit for bit); ``finish`` turns them into the ``HookStats`` of the
store's attributes. ``verify`` recomputes them from the rows the same way.
"""
from __future__ import annotations

import math

import numpy as np

from saeforge.stores.attrs import HookStats
from saeforge.stores.schema import to_float64

_BLOCK = 8192  # rows converted to float64 at a time (bounded memory)


class StatsAccumulator:
    """Running float64 sums, serialisable exactly to JSON (so a resumed writer continues bit for bit)."""

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
            for lo in range(0, len(x), _BLOCK):
                x64 = to_float64(x[lo : lo + _BLOCK], dtype)
                sq = np.einsum("ij,ij->i", x64, x64)
                acc["sum"] += x64.sum(axis=0)
                acc["sum_sq"] += float(sq.sum())
                acc["sum_norm"] += float(np.sqrt(sq).sum())

    def finish(self, hooks: dict[str, int], n_rows: int) -> dict[str, HookStats]:
        out = {}
        for hook, d in hooks.items():
            acc = self.sums[hook]
            msq = acc["sum_sq"] / n_rows
            out[hook] = HookStats(acc["sum"] / n_rows, msq, acc["sum_norm"] / n_rows,
                                  math.sqrt(d / msq) if msq > 0 else 1.0)
        return out
