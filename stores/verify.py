"""verify_store: decode every chunk (checking its crc32c), then counts and statistics against the attributes."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from saeforge.stores import schema
from saeforge.stores.stats import StatsAccumulator


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


def verify_store(path_or_url, *, progress: bool = False) -> VerifyReport:
    """Read every chunk of every array; compare row counts, widths and statistics with the attributes."""
    from saeforge.stores.reader import open_store

    t0 = time.perf_counter()
    store = open_store(path_or_url)
    problems, bad, n_checked = _check_shapes(store), [], 0
    acc = StatsAccumulator.empty({h: store.d(h) for h in store.hooks})
    for name in [*store.hooks, *schema.META_ARRAYS]:
        arr = store.group[name]
        step = store.chunk_rows if name in store.hooks else store.shard_rows
        for lo in range(0, min(arr.shape[0], store.n_rows), step):
            n_checked += 1
            try:
                block = arr[lo : lo + step]
            except Exception as e:  # noqa: BLE001 - any decode failure is a bad chunk; report it by name
                bad.append(chunk_name(store, name, lo))
                problems.append(f"{chunk_name(store, name, lo)}: {_reason(e)}")
                continue
            if name in store.hooks:
                acc.add({name: block}, store.dtype)
    if not bad:
        problems += _check_stats(store, acc)
    return VerifyReport(not problems, store.path, store.n_rows, n_checked, bad, problems, time.perf_counter() - t0)


def _reason(e: Exception) -> str:
    text = str(e)
    if "checksum" in text.lower():
        return f"crc32c checksum mismatch (the bytes on disk are corrupt): {text}"
    return f"{type(e).__name__}: {text}"


def _check_shapes(store) -> list[str]:
    problems = []
    for name in [*store.hooks, *schema.META_ARRAYS]:
        if name not in store.group:
            problems.append(f"array {name} is missing")
            continue
        shape = store.group[name].shape
        want = (store.n_rows, store.d(name)) if name in store.hooks else (store.n_rows,)
        if tuple(shape) != want:
            problems.append(f"array {name} has shape {tuple(shape)}, attributes say {want}")
    complete = store.attrs.complete
    if complete is None or complete.rows != store.n_rows:
        problems.append(f"completion record says {store.attrs.to_json()['complete']} but n_rows is {store.n_rows}")
    return problems


def _check_stats(store, acc: StatsAccumulator) -> list[str]:
    problems = []
    fresh = acc.finish({h: store.d(h) for h in store.hooks}, store.n_rows)
    for h in store.hooks:
        saved = store.stats(h)
        if not (np.allclose(saved.mean, fresh[h].mean, rtol=1e-9, atol=1e-9)
                and np.isclose(saved.mean_sq_norm, fresh[h].mean_sq_norm, rtol=1e-9)):
            problems.append(f"statistics of {h} do not match its rows (stored mean_sq_norm "
                            f"{saved.mean_sq_norm}, recomputed {fresh[h].mean_sq_norm})")
    return problems


__all__ = ["verify_store", "VerifyReport"]
