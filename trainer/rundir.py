"""The run directory: the one module that names its files, and their readers.

    <run>/cfg.json                  SAELens v6 config; saeforge's run record under `saeforge` (saelens_files.py)
    <run>/sae_weights.safetensors   the SAE in the activations' original scale (saelens_files.py)
    <run>/metrics.jsonl             one JSON line per logging window, plus event lines ({"event": "resample"})
    <run>/checkpoint.pt             resumable state; the previous one kept as checkpoint.prev.pt (checkpoint.py)
    <run>/.<file>.<pid>.<thread>.tmp  an atomic write in progress; one a kill left is removed by the next run
    <run>/eval.json                 written by `saeforge eval` (saeforge.pipeline.eval_files)
    <run>/wandb.jsonl               the run's wandb id and the steps sent, with `--log-to wandb` (loggers.py)
    <run>/tensorboard/              TensorBoard event files, with `--log-to tensorboard` and no --log-dir (loggers.py)
    <sweep>/sweep.json              a sweep's run names (in order), store, hooks and configs

cfg.json's `saeforge` record holds the run's identity (`sae`, `train`, `store`, `d_in`, `input_scale`,
`compute_dtype`, `store_sha256`: the store's fingerprint, `steps_done`) and `store_info` (`store_info` below):
what evaluation needs from the training store, so a run can be evaluated with the store moved or gone as long
as its text is available.

Two explained variances, defined once here:

- metrics.jsonl `explained_variance_window` (training): per logging window,
  1 - sum_batches SSE / sum_batches sum_rows ||x - mean_batch(x)||^2, deviations taken from each batch's own
  mean (a ratio, so the input scale cancels). It moves with the weights inside the window.
- eval.json `explained_variance` (evaluation, saeforge.pipeline.metrics): over the whole eval set,
  1 - E||x - x_hat||^2 / E||x - mean_eval(x)||^2, with the final weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from saeforge.stores.attrs import HookStats
from saeforge.stores.files import write_atomic
from saeforge.stores.lock import pid_alive
from saeforge.trainer.errors import RunCorrupt, RunNotFound

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
PREV_CHECKPOINT_FILE = "checkpoint.prev.pt"
EVAL_FILE = "eval.json"
SWEEP_FILE = "sweep.json"
LEGACY_METRICS = {"explained_variance": "explained_variance_window"}
"""metrics.jsonl keys written before their rename -> today's name (`read_metrics` maps them)."""
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.\d+\.tmp|\.(?P<old>.+)\.tmp(?P<old_pid>\d+)")
"""Temporary names of atomic writes: `stores.files.atomic_path`'s, and `.<name>.tmp<pid>` of earlier versions."""


# ------------------------------------------------------------------ leftovers


def _temp_pid(name: str) -> int | None:
    """The writer's pid when `name` is the temporary file of an atomic write of a run-directory file."""
    m = _TEMP.fullmatch(name)
    if m is None or (m["name"] or m["old"]) not in (CFG_FILE, WEIGHTS_FILE, CHECKPOINT_FILE, SWEEP_FILE):
        return None
    return int(m["pid"] or m["old_pid"])


def is_leftover(name: str) -> bool:
    """What a run killed before its first checkpoint may leave: metrics.jsonl, or a temporary file of one of its
    atomic writes. A directory holding only these holds no run (the same command starts it)."""
    return name == METRICS_FILE or _temp_pid(name) is not None


def remove_temp_files(directory: str | Path) -> None:
    """Remove the temporary files a kill between writing and renaming left in a run (or sweep) directory; those of
    a live process (this one, or another still writing) stay."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        pid = _temp_pid(p.name)
        if pid is not None and not pid_alive(pid):
            p.unlink(missing_ok=True)




# ------------------------------------------------------------------ cfg.json


def read_cfg(run_dir: str | Path) -> dict:
    """The whole cfg.json of a run; RunNotFound when there is none, RunCorrupt (naming the file) when it is not
    a JSON object."""
    path = Path(run_dir) / CFG_FILE
    if not path.is_file():
        raise RunNotFound(f"{run_dir} is not an SAE run directory (no {CFG_FILE})")
    return read_json_object(path)


def read_record(run_dir: str | Path) -> dict:
    """cfg.json's `saeforge` record (what identifies the run); {} when the directory has no cfg.json."""
    path = Path(run_dir) / CFG_FILE
    record = read_json_object(path).get("saeforge", {}) if path.is_file() else {}
    if not isinstance(record, dict):
        raise RunCorrupt(f"{path}: its `saeforge` entry is not a JSON object; move the file away or choose another "
                         "output")
    return record


def read_json_object(path: Path) -> dict:
    """A run-directory JSON file that must hold an object; RunCorrupt naming the file and the fault otherwise."""
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunCorrupt(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); move it away "
                         "or choose another output") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunCorrupt(f"{path} cannot be read ({e}); move it away or choose another output") from None
    if not isinstance(obj, dict):
        raise RunCorrupt(f"{path} should hold a JSON object, not {type(obj).__name__}; move it away or choose "
                         "another output")
    return obj


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
    renamed since a line was written come back under today's name (`LEGACY_METRICS`). A last line cut short
    (a run killed while appending) is left out; a bad line elsewhere is RunCorrupt."""
    path = Path(run_dir) / METRICS_FILE
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise RunCorrupt(f"{path}: line {i + 1} is not valid JSON; move the file away or choose another "
                                 "output") from None
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
    keep = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
    write_atomic(path, "".join(line + "\n" for line in keep))


def _step_of(line: str) -> float:
    """A metrics line's step; inf (dropped by `truncate_metrics`) for a blank line or one cut short by a kill."""
    try:
        row = json.loads(line)
    except ValueError:
        return float("inf")
    return row.get("step", 0) if isinstance(row, dict) else float("inf")


# ------------------------------------------------------------------ sweep.json, eval.json


def read_sweep(sweep_dir: str | Path) -> dict | None:
    """sweep.json of a sweep directory (`runs`, `store`, `hooks`, `train`, `saes`); None when absent."""
    path = Path(sweep_dir) / SWEEP_FILE
    return read_json_object(path) if path.is_file() else None


def write_sweep(sweep_dir: str | Path, record: dict) -> None:
    write_atomic(Path(sweep_dir) / SWEEP_FILE, json.dumps(record, indent=2))


def sweep_run_dirs(sweep_dir: str | Path) -> list[Path] | None:
    """The run directories sweep.json lists, in its order; None when there is no sweep.json."""
    sweep = read_sweep(sweep_dir)
    return None if sweep is None else [Path(sweep_dir) / name for name in sweep.get("runs", [])]


def eval_path(run_dir: str | Path) -> Path:
    """Where `saeforge eval` writes the run's eval.json."""
    return Path(run_dir) / EVAL_FILE
