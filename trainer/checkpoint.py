"""Per-run checkpoints (`rundir.CHECKPOINT_FILE`, the previous one kept as `rundir.PREV_CHECKPOINT_FILE`).

A checkpoint holds one SAE's weights (training scale), Adam moments and step, resampling state (steps since
each feature fired, last resample step, the SAE's generator) and the loader position after the last batch
trained on: `loader` (rank 0's), `loader_ranks` (every rank's, in rank order) and `world_size` (the number of
data-parallel ranks; a run resumes only with the same, `check_world_size`). It is written to a temporary file and renamed into place; the previous one is kept so that a
sweep interrupted between two runs' renames still finds a step that every run has.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from saeforge.stores.files import atomic_path
from saeforge.trainer.errors import ResumeMismatch, RunCorrupt
from saeforge.trainer.rundir import CHECKPOINT_FILE, PREV_CHECKPOINT_FILE

FORMAT = 1


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write `run_dir`'s checkpoint atomically; the one it replaces becomes the previous checkpoint."""
    run_dir = Path(run_dir)
    with atomic_path(run_dir / CHECKPOINT_FILE) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
        if (run_dir / CHECKPOINT_FILE).exists():
            os.replace(run_dir / CHECKPOINT_FILE, run_dir / PREV_CHECKPOINT_FILE)


def read_checkpoint(path: Path) -> dict:
    """One checkpoint (CPU tensors); RunCorrupt naming the file when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise RunCorrupt(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                         "move it away (a good previous checkpoint is used then) or choose another output") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise RunCorrupt(f"{path} is not a saeforge checkpoint (no step); move it away or choose another output")
    return state


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    """{step: path} of the checkpoints present in `run_dir`."""
    out = {}
    for name in (PREV_CHECKPOINT_FILE, CHECKPOINT_FILE):
        path = Path(run_dir) / name
        if path.is_file():
            out[read_checkpoint(path)["step"]] = path
    return out


def checkpoint_record(run_dir: Path) -> dict:
    """The run record saved in the newest checkpoint ({} without one): the run's identity when cfg.json has not
    been written yet (a run stopped between its first checkpoint and its first weights)."""
    steps = checkpoint_steps(run_dir)
    return read_checkpoint(steps[max(steps)]).get("record", {}) if steps else {}


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
    return [read_checkpoint(a[step]) for a in available]


def check_world_size(run_dir: Path, checkpoint: dict, world_size: int) -> None:
    """ResumeMismatch when `checkpoint` (of `run_dir`) was written by another number of data-parallel ranks: each
    rank's loader position belongs to its world size, so the rows of the following steps would differ."""
    saved = int(checkpoint.get("world_size", 1))
    if saved != world_size:
        how = "without torchrun" if saved == 1 else f"with torchrun --nproc-per-node {saved}"
        raise ResumeMismatch(f"{run_dir} was checkpointed by {saved} process(es), not {world_size}: resume it {how} "
                             "(or train into a new output)")


def loader_position(checkpoint: dict, rank: int) -> dict:
    """The loader state of `rank` saved in `checkpoint` (checkpoints before `loader_ranks` hold rank 0's only)."""
    return checkpoint.get("loader_ranks", [checkpoint["loader"]])[rank]
