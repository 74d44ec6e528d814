"""What `train_from_store` refuses before step 1, each refusal one line, nothing written: an output that is not
a local directory this process can write, a run directory that started on another store (`store_fingerprint`),
and a batch larger than the store (it would repeat rows).

The store itself is checked where it is opened and read: `open_store` refuses a damaged store (attributes,
arrays, statistics: `saeforge.stores.integrity`) and the loader refuses non-finite rows, naming them. Losses
and weights are checked by the loop (`fit.check_finite`) and at checkpoints (`run.py`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from saeforge.stores.files import local_dir_problem, sha256_bytes, writable_problem
from saeforge.trainer.errors import ConfigError, ResumeMismatch

FINGERPRINT_KEYS = ("hooks", "dtype", "n_rows", "seed", "provenance", "stats")
"""The store attributes that say which rows a store holds: what `store_fingerprint` hashes."""


# ------------------------------------------------------------------ the output


def check_out(out: str | os.PathLike) -> Path:
    """`out` as a local path; ConfigError for an empty string (not the current directory), a URL (run directories
    are local; the store may be a URL), a file or a path below a file (`stores.files.local_dir_problem`).
    Writability is checked later, once it is known that something will be written (`check_writable`)."""
    text = os.fspath(out)
    if not text.strip():
        raise ConfigError("the output directory is empty (--out ''): give a run directory")
    problem = local_dir_problem(text, "--out", "run directories are", writable=False)
    if problem:
        raise ConfigError(problem)
    return Path(text)


def check_writable(run_dirs: list[Path]) -> None:
    """ConfigError naming the first run directory that this process cannot write into (or create)."""
    for d in run_dirs:
        problem = writable_problem(d)
        if problem:
            raise ConfigError(problem)


# ------------------------------------------------------------------ the store


def store_fingerprint(store) -> str:
    """sha256 of the store's identifying attributes (`FINGERPRINT_KEYS`) as canonical JSON: equal for the same
    store wherever it lies, different for a store with other rows (another harvest, seed, size or text)."""
    attrs = store.attrs.to_json()
    doc = json.dumps({k: attrs.get(k) for k in FINGERPRINT_KEYS}, sort_keys=True, separators=(",", ":"))
    return sha256_bytes(doc.encode())


def check_same_store(run_dir: Path, saved: dict, record: dict) -> None:
    """ResumeMismatch naming both stores when `run_dir` started on another store. Runs recorded before the
    fingerprint existed carry none and are not checked."""
    was, now = saved.get("store_sha256"), record["store_sha256"]
    if was and was != now:
        raise ResumeMismatch(f"{run_dir} was trained on the store {saved.get('store')} (attributes sha256 {was[:12]}), "
                             f"not on {record['store']} ({now[:12]}): a different store; train into a new output or "
                             "pass the original store")


def check_batch_rows(store, batch_rows: int) -> None:
    """ConfigError when one batch would hold some of the store's rows twice."""
    if batch_rows > store.n_rows:
        raise ConfigError(f"batch_rows {batch_rows} is larger than the {store.n_rows} rows of {store.path}: a batch "
                          f"would repeat rows; lower --batch-rows to at most {store.n_rows} or harvest more")
