"""Per-run checkpoints (`checkpoint.pt`, previous one kept as `checkpoint.prev.pt`) and metrics.jsonl.

A checkpoint holds one SAE's weights (training scale), Adam moments and step, resampling state (steps since
each feature fired, last resample step, the SAE's generator) and the loader position after the last batch
trained on. It is written to a temporary file and renamed into place; the previous one is kept so that a
sweep interrupted between two runs' renames still finds a step that every run has.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from saeforge.trainer.errors import ResumeMismatch

CKPT = "checkpoint.pt"
PREV = "checkpoint.prev.pt"
METRICS = "metrics.jsonl"
FORMAT = 1


def save_checkpoint(run_dir: Path, state: dict) -> None:
    run_dir = Path(run_dir)
    tmp = run_dir / f".{CKPT}.tmp{os.getpid()}"
    torch.save({"format": FORMAT, **state}, tmp)
    if (run_dir / CKPT).exists():
        os.replace(run_dir / CKPT, run_dir / PREV)
    os.replace(tmp, run_dir / CKPT)


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    """{step: path} of the checkpoints present in `run_dir`."""
    out = {}
    for name in (PREV, CKPT):
        path = Path(run_dir) / name
        if path.is_file():
            out[int(torch.load(path, map_location="cpu", weights_only=False)["step"])] = path
    return out


def load_common_checkpoints(run_dirs: list[Path]) -> list[dict]:
    """The newest checkpoint step present in every run directory, loaded for each (CPU tensors)."""
    available = [checkpoint_steps(d) for d in run_dirs]
    missing = [str(d) for d, a in zip(run_dirs, available) if not a]
    if missing:
        raise ResumeMismatch(f"nothing to resume: no checkpoint in {', '.join(missing)}")
    common = set.intersection(*(set(a) for a in available))
    if not common:
        raise ResumeMismatch("the runs' checkpoints share no step: "
                             + "; ".join(f"{d}: {sorted(a)}" for d, a in zip(run_dirs, available)))
    step = max(common)
    return [torch.load(a[step], map_location="cpu", weights_only=False) for a in available]


def append_metrics(run_dir: Path, rows: list[dict]) -> None:
    with open(Path(run_dir) / METRICS, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics lines logged after `step` (they will be logged again by the resumed run)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
