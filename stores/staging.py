"""Writer state on disk: the lock, the atomic progress record, and staged bucket files.

A staged file holds one flush of rows scattered to buckets: an int64 header of per-bucket counts, then
each field's rows sorted (stably) by bucket. Nothing in a staged file counts until the progress record,
replaced atomically afterwards, says so: that record is the commit point of the writer.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import NamedTuple

import numpy as np

from saeforge.stores.errors import StoreLocked
from saeforge.stores.schema import Location

_HELD_LOCKS: set[str] = set()
"""Locks held by writers in this process (a lock naming our pid but absent here is stale)."""


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-mixed hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def salt_key(seed: int, salt: tuple[int, ...]) -> np.uint64:
    return np.random.SeedSequence([seed, *salt]).generate_state(1, np.uint64)[0]


def bucket_of(index: np.ndarray, key: np.uint64, n_buckets: int) -> np.ndarray:
    """Bucket of each row from its index in the stream alone: independent of how rows were batched."""
    h = mix64(mix64(index.astype(np.uint64)) ^ key)
    return (h % np.uint64(n_buckets)).astype(np.int64)


# --- small files: atomic JSON, fsync -----------------------------------------------------------------
def write_bytes_durable(loc: Location, path: str, data: bytes) -> None:
    """Write a file; on local disks fsync it. Not atomic: callers commit through ``write_json_atomic``."""
    if loc.is_local:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        loc.fs.pipe_file(path, data)


def write_json_atomic(loc: Location, path: str, obj) -> None:
    """Replace ``path`` with ``obj`` as JSON all at once (tmp + fsync + rename locally; one PUT elsewhere)."""
    data = json.dumps(obj, indent=1, allow_nan=False).encode()
    if not loc.is_local:
        loc.fs.pipe_file(path, data)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    write_bytes_durable(loc, tmp, data)
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def read_json(loc: Location, path: str):
    try:
        with loc.fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


# --- the lock ----------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if os.path.exists(f"/proc/{pid}/stat"):  # a killed-but-unreaped child is a zombie: dead for us
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    return True


def acquire_lock(loc: Location, path: str) -> None:
    """Take the writer lock, breaking it only when it names a dead process on this host."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(3):
        if _create_exclusive(loc, path, json.dumps(me).encode()):
            _HELD_LOCKS.add(path)
            return
        holder = read_json(loc, path) or {}
        if not _is_stale(holder, path):
            raise StoreLocked(
                f"{loc.url} is being written by pid {holder.get('pid')} on {holder.get('host')} "
                f"(lock {path}); wait for it, or delete the lock if that process is gone"
            )
        loc.fs.rm_file(path)
    raise StoreLocked(f"could not take the lock {path} of {loc.url}")


def _create_exclusive(loc: Location, path: str, data: bytes) -> bool:
    if loc.is_local:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if loc.fs.exists(path):  # best effort on object stores (no atomic create-if-absent in fsspec)
        return False
    loc.fs.pipe_file(path, data)
    return True


def _is_stale(holder: dict, path: str) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return path not in _HELD_LOCKS
    return not _pid_alive(holder["pid"])


def release_lock(loc: Location, path: str) -> None:
    _HELD_LOCKS.discard(path)
    try:
        loc.fs.rm_file(path)
    except FileNotFoundError:
        pass


# --- staged bucket files -----------------------------------------------------------------------------
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
    with opener(path, "wb") as f:  # one field at a time: peak memory is one sorted field, not all
        f.write(counts.tobytes())
        for fld in fields:
            f.write(np.ascontiguousarray(data[fld.name][order]).data)
        if loc.is_local:
            f.flush()
            os.fsync(f.fileno())
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
