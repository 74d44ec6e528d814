"""Which rows a loader rank reads in an epoch, and in what order: pure arithmetic, no I/O.

An epoch is a seeded permutation of read units (runs of whole chunks). Concatenated, the units form a
sequence of every row once; rank r of W takes the contiguous slice [r*N//W, (r+1)*N//W) of it, so ranks
are disjoint, cover every row, and differ by at most one row. A mixing window permutes rows inside
consecutive windows of that slice; a position in the slice is the loader's whole resumable state.

`interleaved_plan` shards differently, for data-parallel training: the ranks take turns in blocks of the
one-process stream (epochs back to back), so the ranks' j-th blocks together are the one-process stream's j-th
run of `block_rows * world_size` rows.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Segment(NamedTuple):
    unit: int
    """Index of the read unit (rows [unit * unit_rows, ...) of the store)."""
    lo: int
    """First row used, relative to the unit start."""
    hi: int
    """One past the last row used, relative to the unit start."""


class EpochPlan(NamedTuple):
    segments: list[Segment]
    n_rows: int
    """Rows this rank sees in this epoch."""


def epoch_plan(n_rows: int, unit_rows: int, seed: int, epoch: int, rank: int, world_size: int) -> EpochPlan:
    n_units = -(-n_rows // unit_rows)
    lens = np.full(n_units, unit_rows, np.int64)
    lens[-1] = n_rows - unit_rows * (n_units - 1)
    order = np.random.default_rng([seed, epoch, 0x5AE]).permutation(n_units)
    ends = np.cumsum(lens[order])
    starts = ends - lens[order]
    r0, r1 = rank * n_rows // world_size, (rank + 1) * n_rows // world_size
    segs = []
    for u, s, e in zip(order.tolist(), starts.tolist(), ends.tolist()):
        lo, hi = max(s, r0), min(e, r1)
        if lo < hi:
            segs.append(Segment(u, lo - s, hi - s))
    return EpochPlan(segs, r1 - r0)


def interleaved_plan(n_rows: int, unit_rows: int, seed: int, epoch: int, rank: int, world_size: int,
                     block_rows: int) -> EpochPlan:
    """Rank `rank`'s rows of `epoch` when block i of `block_rows` rows of the one-process stream (the world-size-1
    plans of epochs 0, 1, ... back to back) goes to rank i % world_size; segments in stream order."""
    start = epoch * n_rows  # the stream position of the epoch's first row
    segs, at, n = [], start, 0
    for seg in epoch_plan(n_rows, unit_rows, seed, epoch, 0, 1).segments:
        end, p = at + seg.hi - seg.lo, at
        while p < end:
            block = p // block_rows
            turn = (rank - block) % world_size
            if turn:  # another rank's block: jump to this rank's next one
                p = (block + turn) * block_rows
                continue
            q = min((block + 1) * block_rows, end)
            segs.append(Segment(seg.unit, seg.lo + p - at, seg.lo + q - at))
            n, p = n + q - p, q
        at = end
    return EpochPlan(segs, n)


def window_order(seed: int, epoch: int, rank: int, window: int, size: int) -> np.ndarray:
    """Permutation of one mixing window's rows."""
    return np.random.default_rng([seed, epoch, rank, window, 0x313]).permutation(size)


def skip_segments(segments: list[Segment], skip: int) -> list[Segment]:
    """The segments left after dropping the first ``skip`` rows."""
    out = []
    for seg in segments:
        n = seg.hi - seg.lo
        if skip >= n:
            skip -= n
            continue
        out.append(Segment(seg.unit, seg.lo + skip, seg.hi))
        skip = 0
    return out
