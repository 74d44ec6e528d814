"""What the evaluation keeps on disk: the clean/ablation CE cache and eval.json, and when eval.json is current.

CE cache (one JSON file per (model, dtype, hook, eval tokens, store mean)): the clean, zero- and mean-ablated
CE of a hook, as means and as per-window sums with the per-window counts of scored predictions (the paired
bootstrap of `saeforge.pipeline.bootstrap` needs them). `CACHE_FORMAT` is part of every cache key, so a
file written in an older format is never found, let alone misread.

eval.json is current ("up to date") when it parses, has this `EVAL_FORMAT` and every metric, and its
`identity` equals the one the run would get now: the eval settings after device and dtype resolution (all of
`EvalConfig` but the cache location), the sha256 of the run's `sae_weights.safetensors`, and the sha256 of
the training store's attributes (rows, hooks, statistics, provenance). Both files are written atomically.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from saeforge.pipeline.splice import AblationCE
from saeforge.stores.files import sha256_file, write_atomic
from saeforge.trainer.rundir import EVAL_FILE, WEIGHTS_FILE  # the run directory's file names, named once

EVAL_FORMAT = 2
"""2: per-window paired bootstrap intervals, lm_dtype/store_lm_dtype, identity (format 1 had neither)."""
CACHE_FORMAT = 2
"""2: per-window CE sums and counts (format 1 stored means only)."""
NOT_IN_IDENTITY = ("cache_dir",)
"""EvalConfig fields that do not change eval.json's numbers."""
REQUIRED_METRICS = ("ce_clean", "ce_sae", "loss_recovered", "loss_recovered_ci95", "delta_ce", "delta_ce_ci95",
                    "l0", "gamma")


def digest(*parts) -> str:
    """sha256 over bytes as they are and anything else as canonical JSON."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ clean/ablation CE cache


def cache_root(cache_dir: str | None) -> Path:
    """The CE cache's directory: `cache_dir`, or ~/.cache/saeforge/eval."""
    return Path(cache_dir) if cache_dir else Path.home() / ".cache" / "saeforge" / "eval"


def cache_path(cache_dir: str | None, key: dict) -> Path:
    return cache_root(cache_dir) / f"{digest({**key, 'cache_format': CACHE_FORMAT})}.json"


def _array(values, dtype) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=dtype)


def read_cache(path: Path) -> AblationCE | None:
    """The cached ablation CEs, or None when absent, unreadable or not of `CACHE_FORMAT`."""
    try:
        d = json.loads(path.read_text())
        if d.get("cache_format") != CACHE_FORMAT:
            return None
        return AblationCE(d["clean"], d["zero"], d["mean"], d["n_scored"], _array(d["clean_w"], np.float64),
                          _array(d["zero_w"], np.float64), _array(d["mean_w"], np.float64),
                          _array(d["n_scored_w"], np.int64))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cache(path: Path, abl: AblationCE, key: dict) -> None:
    """Write one hook's ablation CEs (floats as JSON reprs: they round-trip exactly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in abl._asdict().items()}
    write_atomic(path, json.dumps({"cache_format": CACHE_FORMAT, **rec, "key": key}))


# ------------------------------------------------------------------ eval.json


def run_identity(config: dict, run_dir: Path, store_attrs: dict) -> dict:
    """What eval.json's numbers depend on: settings, the run's weights, the store (see the module docstring)."""
    settings = {k: v for k, v in config.items() if k not in NOT_IN_IDENTITY}
    ident = {"eval_format": EVAL_FORMAT, "config": settings,
             "weights_sha256": sha256_file(Path(run_dir) / WEIGHTS_FILE), "store_sha256": digest(store_attrs)}
    return json.loads(json.dumps(ident))  # as it reads back from eval.json


def read_current(run_dir: Path, identity: dict) -> dict | None:
    """The run's eval.json when it is complete and was made with `identity`; None otherwise."""
    try:
        rec = json.loads((Path(run_dir) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("format") != EVAL_FORMAT or rec.get("identity") != identity:
        return None
    if not all(k in rec.get("metrics", {}) for k in REQUIRED_METRICS):
        return None
    return rec


def write_eval(run_dir: Path, rec: dict) -> None:
    """Replace the run's eval.json atomically (a temporary file renamed over it)."""
    write_atomic(Path(run_dir) / EVAL_FILE, json.dumps(rec, indent=2))
