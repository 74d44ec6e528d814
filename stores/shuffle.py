"""The external two-pass shuffle: scatter rows to random buckets on disk, then permute each bucket.

Pass 1 gives every row a bucket drawn from a hash of (seed, its index in the stream), so the result does
not depend on how the producer batched its rows or where a crash cut the stream. Pass 2 permutes each
bucket in memory with a generator seeded by (seed, bucket); the store is the buckets' permuted rows, bucket
after bucket. Independent uniform buckets + a uniform permutation per bucket = a uniform permutation of all
rows (Rao 1961; Sandelius 1962). A bucket too large for memory is itself scattered to sub-buckets and
shuffled the same way, recursively, so memory stays bounded whatever the bucket sizes turn out to be.

Pass 2 is random access: :func:`bucket_rows` gives any range of one bucket's shuffled rows, so the writer
can cut the store into shards and write them in any order, in parallel (``stores/finalize.py``).
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import numpy as np

from saeforge.stores.hashing import bucket_of, salt_key
from saeforge.stores.schema import Location
from saeforge.stores.staging import Field, StagedFile, write_staged


class ShuffleContext(NamedTuple):
    loc: Location
    fields: list[Field]
    seed: int
    stage_rows: int
    """Rows buffered in memory before a flush to a staged file."""
    bucket_max_rows: int
    """Largest bucket permuted in memory; larger ones recurse."""
    scratch: str
    """Directory for sub-bucket files (rewritten from scratch after a crash); one per concurrent reader."""


class Piece(NamedTuple):
    """The rows of one bucket in one staged file: the file and their count, without the file's other counts
    (a task that reads a few buckets carries a few numbers per file, not the whole count table)."""

    path: str
    n_buckets: int
    """Length of the file's header of counts."""
    n_rows: int
    """Rows in the file (every field's block has this many)."""
    start: int
    """Rows of the file before this bucket's."""
    count: int


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


def bucket_starts(files: list[StagedFile]) -> np.ndarray:
    """(files, buckets): rows of each file before each bucket's (the offsets ``pieces_of`` needs)."""
    counts = np.array([f.counts for f in files], np.int64).reshape(len(files), -1)
    return np.cumsum(counts, axis=1) - counts


def pieces_of(files: list[StagedFile], bucket: int, starts: np.ndarray) -> list[Piece]:
    """Where one bucket's rows are, file by file (stream order); ``starts`` is ``bucket_starts(files)``."""
    return [Piece(f.path, len(f.counts), f.n_rows, int(starts[i, bucket]), int(f.counts[bucket]))
            for i, f in enumerate(files) if f.counts[bucket]]


def read_bucket(ctx: ShuffleContext, pieces: list[Piece]) -> dict:
    """All rows of one bucket, in stream order, one array per field (read straight into them)."""
    size = sum(p.count for p in pieces)
    out = {f.name: np.empty((size, *f.tail), f.dtype) for f in ctx.fields}
    at = 0
    for p in pieces:
        read_rows_into(ctx, p, {name: arr[at : at + p.count] for name, arr in out.items()})
        at += p.count
    return out


def read_rows(ctx: ShuffleContext, p: Piece) -> dict:
    """One piece's rows, for every field."""
    out = {f.name: np.empty((p.count, *f.tail), f.dtype) for f in ctx.fields}
    read_rows_into(ctx, p, out)
    return out


def read_rows_into(ctx: ShuffleContext, p: Piece, out: dict) -> None:
    """Read one piece's rows into ``out[field]`` (contiguous arrays of ``p.count`` rows). The layout is
    ``staging.py``'s: a header of ``n_buckets`` int64 counts, then each field's ``n_rows`` rows sorted by
    bucket (``staging.read_piece`` reads the same bytes)."""
    base = 8 * p.n_buckets
    opener = open if ctx.loc.is_local else ctx.loc.fs.open
    with opener(p.path, "rb") as f:
        for fld in ctx.fields:
            f.seek(base + p.start * fld.row_bytes)
            view = memoryview(out[fld.name].reshape(-1).view(np.uint8))
            if f.readinto(view) != len(view):
                raise OSError(f"{p.path}: staged file is shorter than its counts say")
            base += p.n_rows * fld.row_bytes


Segment = tuple[dict, np.ndarray]
"""(rows, index): the shuffled rows are ``rows[field][index]``, in store order."""


def bucket_rows(ctx: ShuffleContext, pieces: list[Piece], salt: tuple[int, ...], lo: int, hi: int
                ) -> Iterator[Segment]:
    """Rows [lo, hi) of one bucket's shuffled order. ``salt``: the bucket's path, ``(0, bucket)`` for a bucket
    of pass 1, one more entry per level of recursion; its permutation is ``default_rng([seed, *salt])``.
    Holds one bucket (at most ``bucket_max_rows`` rows) in memory at a time."""
    size = sum(p.count for p in pieces)
    if size <= ctx.bucket_max_rows:
        data = read_bucket(ctx, pieces)
        perm = np.random.default_rng([ctx.seed, *salt]).permutation(size)
        yield data, perm[lo:hi]
    else:
        yield from _recurse(ctx, pieces, size, salt, lo, hi)


def _recurse(ctx: ShuffleContext, pieces: list[Piece], size: int, salt: tuple[int, ...], lo: int, hi: int):
    """Shuffle one oversized bucket by scattering it to sub-buckets on disk (the whole bucket: the
    sub-buckets' sizes decide where row ``lo`` is)."""
    n_sub = max(2, -(-2 * size // ctx.bucket_max_rows))
    directory = f"{ctx.scratch}/{'_'.join(map(str, salt))}"
    ctx.loc.fs.makedirs(directory, exist_ok=True)
    try:
        stager = Stager(ctx, directory, n_sub, salt)
        for p in pieces:
            stager.add(read_rows(ctx, p))
        stager.flush()
        starts, at = bucket_starts(stager.files), 0
        for sub in range(n_sub):
            sub_pieces = pieces_of(stager.files, sub, starts)
            n = sum(p.count for p in sub_pieces)
            if max(lo, at) < min(hi, at + n):
                yield from bucket_rows(ctx, sub_pieces, (*salt, sub), max(lo, at) - at, min(hi, at + n) - at)
            at += n
    finally:
        ctx.loc.fs.rm(directory, recursive=True)
