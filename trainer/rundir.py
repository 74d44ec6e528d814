"""The run directory: the one module that names its files, and their readers.

    <run>/cfg.json                  SAELens v6 config; saeforge's run record under `saeforge` (saelens_files.py)
    <run>/sae_weights.safetensors   the SAE in the activations' original scale (saelens_files.py)
    <run>/metrics.jsonl             one JSON line per logging window, plus event lines ({"event": "resample"})
    <run>/checkpoint.pt             resumable state; the previous one kept as checkpoint.prev.pt (checkpoint.py)
    <run>/eval.json                 written by `saeforge eval` (saeforge.pipeline.eval_files)
    <sweep>/sweep.json              a sweep's run names (in order), store, hooks and configs

cfg.json's `saeforge` record holds the run's identity (`sae`, `train`, `store`, `d_in`, `input_scale`,
`compute_dtype`, `steps_done`) and `store_info` (`store_info` below): what evaluation needs from the training
store, so a run can be evaluated with the store moved or gone as long as its text is available.

Two explained variances, defined once here:

- metrics.jsonl `explained_variance_window` (training): per logging window,
  1 - sum_batches SSE / sum_batches sum_rows ||x - mean_batch(x)||^2, deviations taken from each batch's own
  mean (a ratio, so the input scale cancels). It moves with the weights inside the window.
- eval.json `explained_variance` (evaluation, saeforge.pipeline.metrics): over the whole eval set,
  1 - E||x - x_hat||^2 / E||x - mean_eval(x)||^2, with the final weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from saeforge.stores.attrs import HookStats
from saeforge.stores.files import write_atomic
from saeforge.trainer.errors import RunNotFound

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
PREV_CHECKPOINT_FILE = "checkpoint.prev.pt"
EVAL_FILE = "eval.json"
SWEEP_FILE = "sweep.json"
LEGACY_METRICS = {"explained_variance": "explained_variance_window"}
"""metrics.jsonl keys written before their rename -> today's name (`read_metrics` maps them)."""


# ------------------------------------------------------------------ cfg.json


def read_cfg(run_dir: str | Path) -> dict:
    """The whole cfg.json of a run; RunNotFound when there is none."""
    path = Path(run_dir) / CFG_FILE
    if not path.is_file():
        raise RunNotFound(f"{run_dir} is not an SAE run directory (no {CFG_FILE})")
    return json.loads(path.read_text())


def read_record(run_dir: str | Path) -> dict:
    """cfg.json's `saeforge` record (what identifies the run); {} when the directory has no cfg.json."""
    path = Path(run_dir) / CFG_FILE
    return json.loads(path.read_text()).get("saeforge", {}) if path.is_file() else {}


class StoreInfo(NamedTuple):
    """What a run's cfg.json records about its training store (`saeforge.store_info`)."""
    path: str
    """Where the store was when the run trained (path or URL)."""
    model: str | None
    hook: str
    d_in: int
    provenance: dict
    """The store's provenance, as harvest wrote it: model, tokenizer, dataset record, context size, BOS,
    special-token rule and ids, held-out rule."""
    stats: HookStats
    """The hook's statistics in the store: float64 mean (mean ablation), E||x||^2, E||x||, scale."""


def store_info(store, hook: str) -> dict:
    """The `store_info` entry of cfg.json for an SAE trained on `hook` of `store` (a saeforge.stores.Store)."""
    prov = store.provenance
    return {"path": str(store.path), "model": prov.get("model"), "hook": hook, "d_in": store.d(hook),
            "provenance": prov, "stats": store.stats(hook).to_json()}


def read_store_info(run_dir: str | Path) -> StoreInfo | None:
    """The run's StoreInfo; None for runs saved without one (by `save_sae` alone, or before it was recorded)."""
    info = read_cfg(run_dir).get("saeforge", {}).get("store_info")
    if not info:
        return None
    return StoreInfo(info["path"], info.get("model"), info["hook"], int(info["d_in"]), info.get("provenance", {}),
                     HookStats.from_json(info["stats"]))


# ------------------------------------------------------------------ metrics.jsonl


def read_metrics(run_dir: str | Path, *, events: bool = False) -> list[dict]:
    """The run's metrics lines in order (event lines only with `events`); [] without metrics.jsonl. Keys
    renamed since a line was written come back under today's name (`LEGACY_METRICS`)."""
    path = Path(run_dir) / METRICS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [_current_names(r) for r in rows if events or "event" not in r]


def _current_names(row: dict) -> dict:
    renamed = {old: new for old, new in LEGACY_METRICS.items() if old in row and new not in row}
    return {renamed.get(k, k): v for k, v in row.items()}


def last_metrics(run_dir: str | Path) -> dict:
    """The last logging line of a run ({} when there is none)."""
    rows = read_metrics(run_dir)
    return rows[-1] if rows else {}


def append_metrics(run_dir: str | Path, rows: list[dict]) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def clear_metrics(run_dir: str | Path) -> None:
    (Path(run_dir) / METRICS_FILE).unlink(missing_ok=True)


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop metrics lines logged after `step` (they will be logged again by the resumed run)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


# ------------------------------------------------------------------ sweep.json, eval.json


def read_sweep(sweep_dir: str | Path) -> dict | None:
    """sweep.json of a sweep directory (`runs`, `store`, `hooks`, `train`, `saes`); None when absent."""
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_sweep(sweep_dir: str | Path, record: dict) -> None:
    write_atomic(Path(sweep_dir) / SWEEP_FILE, json.dumps(record, indent=2))


def sweep_run_dirs(sweep_dir: str | Path) -> list[Path] | None:
    """The run directories sweep.json lists, in its order; None when there is no sweep.json."""
    sweep = read_sweep(sweep_dir)
    return None if sweep is None else [Path(sweep_dir) / name for name in sweep.get("runs", [])]


def eval_path(run_dir: str | Path) -> Path:
    """Where `saeforge eval` writes the run's eval.json."""
    return Path(run_dir) / EVAL_FILE
