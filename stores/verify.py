"""verify_store: the cheap check of ``open_store`` (``integrity.check_store``), then every chunk read: there
(never a fill value), its crc32c, decodable, finite, and the statistics recomputed from the rows."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from saeforge.stores import schema
from saeforge.stores.errors import StoreError
from saeforge.stores.integrity import check_store
from saeforge.stores.progress import progress_bar
from saeforge.stores.remote import remote_error, remote_errors
from saeforge.stores.stats import StatsAccumulator
from saeforge.stores.tidy import tidy_complete

_SHOWN_ROWS = 10
"""Row indices named in a report of non-finite rows."""


class VerifyReport(NamedTuple):
    ok: bool
    path: str
    n_rows: int
    chunks_checked: int
    bad_chunks: list
    """Human-readable names of the chunks that failed (first one first)."""
    problems: list
    """Every problem found (chunks, counts, metadata), as one line each."""
    seconds: float

    @property
    def first_bad_chunk(self) -> str | None:
        return self.bad_chunks[0] if self.bad_chunks else None


def chunk_name(store, name: str, lo: int) -> str:
    rows = store.chunk_rows if name in store.hooks else store.shard_rows
    shard_rows = store.shard_rows
    key = f"{name}/c/{lo // shard_rows}" + ("/0" if name in store.hooks else "")
    return f"{name} rows {lo}:{min(lo + rows, store.n_rows)} (chunk {lo // rows}, file {key})"


def verify_store(path_or_url, *, progress: bool = False, storage_options: dict | None = None) -> VerifyReport:
    """Check the attributes, metadata and files (as ``open_store`` does), then read every chunk of every array
    and compare row counts, values and statistics with the attributes. Every problem is one line.
    ``storage_options``: of the fsspec filesystem of a store at a URL (``open_store``). A remote filesystem
    failing (endpoint out of reach, access refused) is raised as such, never reported as bad chunks. ``progress``:
    a bar on stderr counting the chunks read, shown once verifying takes more than a second."""
    from saeforge.stores.reader import read_attrs

    loc, attrs = read_attrs(path_or_url, storage_options=storage_options)
    with remote_errors(loc):
        return _verify(loc, attrs, progress)


def _verify(loc, attrs, progress: bool) -> VerifyReport:
    from saeforge.stores.reader import Store

    t0 = time.perf_counter()
    tidy_complete(loc)
    found = check_store(loc, attrs)
    problems = [p.text for p in found]
    if any(p.blocking for p in found):
        return VerifyReport(False, loc.url, attrs.n_rows if type(attrs.n_rows) is int else 0, 0, [], problems,
                            time.perf_counter() - t0)
    store = Store(loc, attrs)
    unreadable = {p.array for p in found if p.array}  # their metadata or files are wrong: not read
    acc = StatsAccumulator.empty({h: store.d(h) for h in store.hooks})
    names = [n for n in [*store.hooks, *schema.META_ARRAYS] if n not in unreadable]
    with progress_bar(sum(-(-store.n_rows // _step(store, n)) for n in names), desc="verify", unit="chunk",
                      enabled=progress, quick=True) as bar:
        bad, n_checked = [], 0
        for name in names:
            failed, more, n = _check_array(store, name, acc, bar)
            bad, problems, n_checked = bad + failed, problems + more, n_checked + n
            unreadable |= {name} if failed else set()
    problems += _check_stats(store, acc, skip=unreadable)
    return VerifyReport(not problems, store.path, store.n_rows, n_checked, bad, problems, time.perf_counter() - t0)


def _check_array(store, name: str, acc: StatsAccumulator, bar) -> tuple[list[str], list[str], int]:
    """Read every chunk of one array: (its bad chunks, its problems, chunks read); a hook's rows go into ``acc``."""
    bad, problems, nonfinite, n_checked = [], [], [], 0
    step = _step(store, name)
    for lo in range(0, store.n_rows, step):
        n_checked += 1
        bar.update(1)
        block, reason = _read_chunk(store, name, lo, lo + step)
        if reason:
            bad.append(chunk_name(store, name, lo))
            problems.append(f"{chunk_name(store, name, lo)}: {reason}")
        elif name in store.hooks:
            nonfinite += (lo + np.nonzero(schema.nonfinite_rows(block, store.dtype))[0]).tolist()
            acc.add({name: block}, store.dtype)
    if nonfinite:
        shown = ", ".join(map(str, nonfinite[:_SHOWN_ROWS])) + (" ..." if len(nonfinite) > _SHOWN_ROWS else "")
        problems.append(f"{name}: {len(nonfinite)} row(s) hold NaN or inf (rows {shown}); the writer stores "
                        "finite rows only, so they were altered after it wrote them")
    return bad, problems, n_checked


def _step(store, name: str) -> int:
    """Rows per chunk read: a hook's chunks; a row-aligned 1-D array's shards (its chunks are tiny)."""
    return store.chunk_rows if name in store.hooks else store.shard_rows


def _read_chunk(store, name: str, lo: int, hi: int) -> tuple[np.ndarray | None, str | None]:
    """One chunk's rows, or None and why they cannot be read (absent, checksum, decode)."""
    try:
        store.check_present(name, lo, hi)
    except StoreError as e:
        return None, _reason(e)
    try:
        return store.array(name)[lo:hi], None
    except Exception as e:  # noqa: BLE001 - any decode failure is a bad chunk; report it by name
        if remote_error(store.loc, e) is not None:
            raise  # not the chunk's fault: verify_store raises it as the remote failure it is
        return None, _reason(e)


def _reason(e: Exception) -> str:
    text = str(e)
    if "checksum" in text.lower():
        return f"crc32c checksum mismatch (the bytes on disk are corrupt): {text}"
    if "missing from the shard's index" in text:
        return "missing from its shard's index (zarr would read it as zeros)"
    return f"{type(e).__name__}: {text}"


def _check_stats(store, acc: StatsAccumulator, skip: set) -> list[str]:
    problems = []
    fresh = acc.finish({h: store.d(h) for h in store.hooks}, store.n_rows)
    for h in store.hooks:
        saved = store.stats(h)
        if h in skip or saved.mean.shape != fresh[h].mean.shape:  # not all rows read, or already reported
            continue
        if not (np.allclose(saved.mean, fresh[h].mean, rtol=1e-9, atol=1e-9)
                and np.isclose(saved.mean_sq_norm, fresh[h].mean_sq_norm, rtol=1e-9)
                and np.isclose(saved.mean_norm, fresh[h].mean_norm, rtol=1e-9)):
            problems.append(f"statistics of {h} do not match its rows (stored mean_sq_norm "
                            f"{saved.mean_sq_norm}, recomputed {fresh[h].mean_sq_norm})")
    return problems


__all__ = ["verify_store", "VerifyReport"]
