"""The external two-pass shuffle: scatter rows to random buckets on disk, then permute each bucket.

Pass 1 gives every row a bucket drawn from a hash of (seed, its index in the stream), so the result does
not depend on how the producer batched its rows or where a crash cut the stream. Pass 2 reads the
buckets in order, permutes each in memory with a generator seeded by (seed, bucket), and concatenates.
Independent uniform buckets + a uniform permutation per bucket = a uniform permutation of all rows
(Rao 1961; Sandelius 1962). A bucket too large for memory is itself scattered to sub-buckets and
shuffled the same way, recursively, so memory stays bounded whatever the bucket sizes turn out to be.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import numpy as np

from saeforge.stores.hashing import bucket_of, salt_key
from saeforge.stores.schema import Location
from saeforge.stores.staging import Field, StagedFile, read_piece, write_staged


class ShuffleContext(NamedTuple):
    loc: Location
    fields: list[Field]
    seed: int
    stage_rows: int
    """Rows buffered in memory before a flush to a staged file."""
    bucket_max_rows: int
    """Largest bucket permuted in memory; larger ones recurse."""
    scratch: str
    """Directory for sub-bucket files (rewritten from scratch after a crash)."""


class Stager:
    """Buffers rows, gives each a bucket from its stream index, and flushes staged files."""

    def __init__(self, ctx: ShuffleContext, directory: str, n_buckets: int, salt: tuple[int, ...], *,
                 next_index: int = 0, n_files: int = 0, on_flush: Callable[[StagedFile], None] | None = None):
        self.ctx, self.directory, self.n_buckets = ctx, directory, n_buckets
        self.key = salt_key(ctx.seed, salt)
        self.next_index, self.n_files, self.on_flush = next_index, n_files, on_flush
        self.files: list[StagedFile] = []
        self._parts: list[dict] = []
        self._rows = 0

    def add(self, data: dict) -> None:
        n = len(next(iter(data.values())))
        for lo in range(0, n, self.ctx.stage_rows):
            part = {k: v[lo : lo + self.ctx.stage_rows] for k, v in data.items()}
            self._parts.append(part)
            self._rows += len(next(iter(part.values())))
            if self._rows >= self.ctx.stage_rows:
                self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        data = {f.name: np.concatenate([p[f.name] for p in self._parts]) for f in self.ctx.fields}
        index = np.arange(self.next_index, self.next_index + self._rows, dtype=np.uint64)
        buckets = bucket_of(index, self.key, self.n_buckets)
        path = f"{self.directory}/f{self.n_files:07d}.bin"
        sf = write_staged(self.ctx.loc, path, self.ctx.fields, data, buckets, self.n_buckets)
        self.files.append(sf)
        self.n_files += 1
        self.next_index += self._rows
        self._parts, self._rows = [], 0
        if self.on_flush:
            self.on_flush(sf)


def read_bucket(ctx: ShuffleContext, files: list[StagedFile], bucket: int) -> dict:
    """All rows of one bucket, in stream order, one array per field."""
    size = sum(int(f.counts[bucket]) for f in files)
    out = {f.name: np.empty((size, *f.tail), f.dtype) for f in ctx.fields}
    at = 0
    for sf in files:
        n = int(sf.counts[bucket])
        if n:
            piece = read_piece(ctx.loc, sf, ctx.fields, bucket)
            for name, arr in piece.items():
                out[name][at : at + n] = arr
            at += n
    return out


def iter_shuffled(ctx: ShuffleContext, files: list[StagedFile], n_buckets: int, salt: tuple[int, ...],
                  skip: int = 0) -> Iterator[dict]:
    """Yield the shuffled rows, bucket by bucket, after skipping the first ``skip`` of them."""
    sizes = np.zeros(n_buckets, np.int64)
    for sf in files:
        sizes += sf.counts
    start = 0
    for b in range(n_buckets):
        size, local_skip = int(sizes[b]), max(0, skip - start)
        start += size
        if size == 0 or local_skip >= size:
            continue
        if size <= ctx.bucket_max_rows:
            data = read_bucket(ctx, files, b)
            perm = np.random.default_rng([ctx.seed, *salt, b]).permutation(size)[local_skip:]
            yield {k: v[perm] for k, v in data.items()}
        else:
            yield from _recurse(ctx, files, b, size, (*salt, b), local_skip)


def _recurse(ctx: ShuffleContext, files, bucket: int, size: int, salt: tuple[int, ...], skip: int):
    """Shuffle one oversized bucket by scattering it to sub-buckets on disk."""
    n_sub = max(2, -(-2 * size // ctx.bucket_max_rows))
    directory = f"{ctx.scratch}/{'_'.join(map(str, salt))}"
    ctx.loc.fs.makedirs(directory, exist_ok=True)
    stager = Stager(ctx, directory, n_sub, salt)
    for sf in files:
        if sf.counts[bucket]:
            stager.add(read_piece(ctx.loc, sf, ctx.fields, bucket))
    stager.flush()
    try:
        yield from iter_shuffled(ctx, stager.files, n_sub, salt, skip)
    finally:
        ctx.loc.fs.rm(directory, recursive=True)
