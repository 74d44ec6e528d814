"""Per-run checkpoints (`rundir.CHECKPOINT_FILE`, the previous one kept as `rundir.PREV_CHECKPOINT_FILE`).

A checkpoint holds one SAE's weights (training scale), Adam moments and step, resampling state (steps since
each feature fired, last resample step, the SAE's generator) and the loader position after the last batch
trained on. It is written to a temporary file and renamed into place; the previous one is kept so that a
sweep interrupted between two runs' renames still finds a step that every run has.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from saeforge.stores.files import atomic_path
from saeforge.trainer.errors import ResumeMismatch
from saeforge.trainer.rundir import CHECKPOINT_FILE, PREV_CHECKPOINT_FILE

FORMAT = 1


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write `run_dir`'s checkpoint atomically; the one it replaces becomes the previous checkpoint."""
    run_dir = Path(run_dir)
    with atomic_path(run_dir / CHECKPOINT_FILE) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
        if (run_dir / CHECKPOINT_FILE).exists():
            os.replace(run_dir / CHECKPOINT_FILE, run_dir / PREV_CHECKPOINT_FILE)


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    """{step: path} of the checkpoints present in `run_dir`."""
    out = {}
    for name in (PREV_CHECKPOINT_FILE, CHECKPOINT_FILE):
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
