"""Staged bucket files: the writer's first shuffle pass on disk.

A staged file holds one flush of rows scattered to buckets: an int64 header of per-bucket counts, then
each field's rows sorted (stably) by bucket. Nothing in a staged file counts until the progress record,
replaced atomically afterwards (``files.write_json_atomic``), says so: that record is the commit point of
the writer. The bucket of a row comes from ``stores/hashing.py``; the lock is in ``stores/lock.py``.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from saeforge.stores.schema import Location


class Field(NamedTuple):
    name: str
    dtype: np.dtype
    tail: tuple  # shape of one row: (d,) for hooks, () for token_ids/seq_idx/pos

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.tail))


class StagedFile(NamedTuple):
    path: str
    counts: np.ndarray  # (n_buckets,) int64

    @property
    def n_rows(self) -> int:
        return int(self.counts.sum())


def write_staged(loc: Location, path: str, fields: list[Field], data: dict, buckets: np.ndarray,
                 n_buckets: int) -> StagedFile:
    """Scatter one flush of rows to buckets: header of counts, then each field sorted by bucket."""
    order = np.argsort(buckets, kind="stable")
    counts = np.bincount(buckets, minlength=n_buckets).astype(np.int64)
    opener = open if loc.is_local else loc.fs.open
    try:
        with opener(path, "wb") as f:  # one field at a time: peak memory is one sorted field, not all
            f.write(counts.tobytes())
            for fld in fields:
                f.write(np.ascontiguousarray(data[fld.name][order]).data)
            if loc.is_local:
                f.flush()
                os.fsync(f.fileno())
    except OSError:  # a disk that filled up gets its space back (an uncommitted file is never read)
        try:
            loc.fs.rm_file(path)
        except OSError:
            pass
        raise
    return StagedFile(path, counts)


def read_counts(loc: Location, path: str, n_buckets: int) -> StagedFile:
    with loc.fs.open(path, "rb") as f:
        return StagedFile(path, np.frombuffer(f.read(8 * n_buckets), dtype=np.int64).copy())


def read_piece(loc: Location, sf: StagedFile, fields: list[Field], bucket: int) -> dict:
    """The rows of one bucket in one staged file, for every field."""
    n_buckets = len(sf.counts)
    start = int(sf.counts[:bucket].sum())
    count = int(sf.counts[bucket])
    out, base = {}, 8 * n_buckets
    opener = open if loc.is_local else loc.fs.open
    with opener(sf.path, "rb") as f:
        for fld in fields:
            f.seek(base + start * fld.row_bytes)
            raw = f.read(count * fld.row_bytes)
            out[fld.name] = np.frombuffer(raw, dtype=fld.dtype).reshape((count, *fld.tail))
            base += sf.n_rows * fld.row_bytes
    return out
