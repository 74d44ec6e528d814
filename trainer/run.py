"""Train one SAE or a sweep from a store: run directories, checkpoints, resume, metrics and progress.

    train_from_store(store, [SAEConfig(...)], TrainConfig(hook=...), out)              # one run: out is the run dir
    train_from_store(store, saes, train, out, sweep=True)                            # out/sweep.json + out/<name>/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from saeforge.trainer.checkpoint import (METRICS, append_metrics, checkpoint_steps, load_common_checkpoints,
                                         save_checkpoint, truncate_metrics)
from saeforge.trainer.config import SAEConfig, TrainConfig, config_dict
from saeforge.trainer.device import resolve_device
from saeforge.trainer.errors import ResumeMismatch, RunExists
from saeforge.trainer.io import CFG_FILE, save_sae, write_atomic
from saeforge.trainer.loop import SweepTrainer, fit, prepare_fn
from saeforge.trainer.losses import recon_scale
from saeforge.trainer.prefetch import Prefetcher

SWEEP_FILE = "sweep.json"
# TrainConfig fields a resumed run may change (they do not alter what is trained).
RESUMABLE = {"steps", "log_every", "checkpoint_every", "device", "loader_threads", "compile", "stack_mib"}


def run_dirs_for(out: Path, saes: list[SAEConfig], sweep: bool) -> list[Path]:
    if not sweep:
        if len(saes) != 1:
            raise ValueError(f"a single run trains one SAE, got {len(saes)}; use a sweep")
        return [out]
    names = [s.run_name for s in saes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"sweep run names must be unique; repeated: {', '.join(dupes)}")
    return [out / n for n in names]


def run_record(sae: SAEConfig, train: TrainConfig, *, store: str, d_in: int, input_scale: float,
               compute_dtype: str = "float32") -> dict:
    """What identifies a run (saved under cfg.json's `saeforge` key and compared on resume). `compute_dtype` is
    what `autocast` resolved to on this machine (recorded, not compared: a run may resume elsewhere)."""
    return {"sae": config_dict(sae), "train": config_dict(train), "store": store, "d_in": d_in,
            "input_scale": input_scale, "compute_dtype": compute_dtype}


def _differences(saved: dict, wanted: dict) -> list[str]:
    diffs = []
    for section in ("sae", "train"):
        a, b = saved.get(section, {}), wanted[section]
        for key in sorted(set(a) | set(b)):
            if key in RESUMABLE or key == "name":
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{key}: saved {a.get(key)!r}, requested {b.get(key)!r}")
    return diffs


def check_run_dirs(run_dirs: list[Path], records: list[dict], *, steps: int, resume: bool) -> str:
    """What to do with the output: `new` (start), `resume` (continue from the checkpoints) or `complete` (every
    run already trained `steps` steps: nothing to do). Refuses, writing nothing, to overwrite a directory that
    holds something else or a different run, or to shorten a run."""
    done = []
    for run_dir, record in zip(run_dirs, records):
        cfg_path = run_dir / CFG_FILE
        held = cfg_path.is_file() or bool(checkpoint_steps(run_dir)) if run_dir.is_dir() else False
        if not held:
            if run_dir.is_dir() and any(p for p in run_dir.iterdir() if p.name != "metrics.jsonl"):
                raise RunExists(f"{run_dir} is not empty and holds no saeforge run; choose another output")
            done.append(None)
            continue
        saved = json.loads(cfg_path.read_text()).get("saeforge", {}) if cfg_path.is_file() else {}
        if saved.get("d_in") not in (None, record["d_in"]):
            raise ResumeMismatch(f"{run_dir} was trained with d_in={saved['d_in']} but hook "
                                 f"{record['sae'].get('hook') or record['train']['hook']!r} of the store has "
                                 f"d_in={record['d_in']}")
        diffs = _differences(saved, record)
        if diffs:
            raise RunExists(f"{run_dir} holds a different run ({'; '.join(diffs[:4])}); choose another output")
        done.append(int(saved.get("steps_done", 0)))
    if all(d is None for d in done):
        if resume:
            raise ResumeMismatch(f"nothing to resume in {run_dirs[0].parent if len(run_dirs) > 1 else run_dirs[0]}:"
                                 " it holds no run")
        return "new"
    if any(d is None for d in done) and any(d for d in done):
        missing = [str(r) for r, d in zip(run_dirs, done) if d is None]
        raise ResumeMismatch(f"cannot resume: {', '.join(missing[:3])} hold no run while the others do; "
                             "choose another output")
    if any(d is None for d in done):
        return "new"  # interrupted while writing the step-0 checkpoints: start again
    longer = [f"{r} ({d} steps)" for r, d in zip(run_dirs, done) if d > steps]
    if longer:
        raise RunExists(f"{longer[0]} already trained more than the {steps} steps asked for; raise --steps or "
                        "choose another output")
    return "complete" if all(d == steps for d in done) else "resume"


def check_sweep_file(out: Path, names: list[str]) -> None:
    path = out / SWEEP_FILE
    if path.is_file():
        saved = json.loads(path.read_text()).get("runs", [])
        if saved != names:
            raise RunExists(f"{out} holds a different sweep (runs {saved}); choose another output")


def last_metrics(run_dir: Path) -> dict:
    """The last metrics line of a run (events such as resampling skipped)."""
    path = run_dir / METRICS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    rows = [r for r in rows if "event" not in r]
    return rows[-1] if rows else {}


class _Run:
    """Callbacks of `fit` for a store-backed run: metrics lines, checkpoints, weights, progress bar."""

    def __init__(self, trainer: SweepTrainer, run_dirs: list[Path], records: list[dict], prefetch: Prefetcher,
                 store, progress: bool):
        from tqdm import tqdm

        self.trainer, self.run_dirs, self.records, self.prefetch = trainer, run_dirs, records, prefetch
        self.store = store
        self.last: list[dict] = []
        self.bar = tqdm(total=trainer.train.steps, initial=trainer.step, file=sys.stderr, disable=not progress,
                        unit="step", dynamic_ncols=True)

    def on_log(self, rows: list[dict]) -> None:
        for run_dir, row in zip(self.run_dirs, rows):
            append_metrics(run_dir, [row])
        self.last = rows
        self.bar.update(self.trainer.step - self.bar.n)
        if rows:
            self.bar.set_postfix(L0=f"{rows[0]['l0']:.1f}", MSE=f"{rows[0]['mse']:.3g}",
                                 wait=f"{rows[0]['data_wait_fraction']:.0%}", refresh=False)

    def on_resample(self, done: dict[int, int]) -> None:
        for i, n in done.items():
            append_metrics(self.run_dirs[i], [{"step": self.trainer.step, "event": "resample", "features": n}])

    def on_checkpoint(self) -> None:
        loader_state = self.prefetch.state_dict()
        for i, (run_dir, record) in enumerate(zip(self.run_dirs, self.records)):
            state = self.trainer.sae_state(i)
            save_checkpoint(run_dir, {**state, "loader": loader_state, "record": record})
            self.save_weights(i)

    def save_weights(self, i: int) -> None:
        prov = self.store.provenance if self.store is not None else {}
        hook = self.trainer.sae_hooks[i]
        save_sae(self.trainer.sae(i), self.run_dirs[i], hook_name=hook, input_scale=self.trainer.input_scales[hook],
                 model_name=prov.get("model"), store=self.records[i]["store"], provenance=prov,
                 saeforge={**self.records[i], "steps_done": self.trainer.step})


def train_from_store(store: str | Path, saes: list[SAEConfig], train: TrainConfig, out: str | Path, *,
                     sweep: bool = False, resume: bool = False, progress: bool = True,
                     dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """Train `saes` (each on its `hook`, default `train.hook`) on the store at `store`; returns one summary dict
    per SAE. Idempotent: a run directory that already holds these runs is resumed from its checkpoints, or left
    as it is when complete; `resume=True` only insists that there is something to resume.

    Raises the store's errors (StoreNotFound, StoreIncomplete, HookNotInStore), RunExists, ResumeMismatch or
    ValueError before anything is written."""
    from saeforge.stores import StoreLoader, open_store

    st = open_store(store)
    sae_hooks = [s.hook or train.hook for s in saes]
    hooks = list(dict.fromkeys(sae_hooks))
    st.check_hooks(hooks)
    d_ins = {h: st.d(h) for h in hooks}
    stats = {h: st.stats(h) for h in hooks}
    scales = {h: float(stats[h].scale) if train.normalize_inputs else 1.0 for h in hooks}
    out = Path(out)
    run_dirs = run_dirs_for(out, saes, sweep)
    device = resolve_device(train.device)
    trainer = SweepTrainer(saes, train, d_ins, device=device, dtype=dtype, input_scale=scales,
                           b_dec={h: torch.as_tensor(stats[h].mean, dtype=torch.float32) * scales[h]
                                  if train.b_dec_init == "mean" else None for h in hooks},
                           mean_sq_norm={h: float(stats[h].mean_sq_norm) * scales[h] ** 2 for h in hooks})
    compute = "bfloat16" if trainer.autocast else str(dtype).removeprefix("torch.")
    records = [run_record(s, train, store=str(st.path), d_in=d_ins[h], input_scale=scales[h], compute_dtype=compute)
               for s, h in zip(saes, sae_hooks)]
    if sweep:
        check_sweep_file(out, [d.name for d in run_dirs])
    state = check_run_dirs(run_dirs, records, steps=train.steps, resume=resume)
    summary = lambda rows, wait: [  # noqa: E731
        {"run_dir": str(d), **row, "arch": s.arch, "d_sae": s.d_sae, "hook": h,
         "recon_scale": recon_scale(train.loss_scaling, s.arch, d_ins[h], float(stats[h].mean_sq_norm) * scales[h] ** 2),
         "loader_wait_s": wait}
        for d, s, h, row in zip(run_dirs, saes, sae_hooks, rows)]
    if state == "complete":
        return summary([last_metrics(d) for d in run_dirs], 0.0)

    loader = StoreLoader(st, hooks=hooks, batch_rows=train.batch_rows, seed=train.data_seed,
                         threads=train.loader_threads, pin_memory=device.type == "cuda")
    if state == "resume":
        states = load_common_checkpoints(run_dirs)
        for i, ckpt in enumerate(states):
            trainer.load_sae_state(i, ckpt)
        loader.load_state_dict(states[0]["loader"])
        for d in run_dirs:
            truncate_metrics(d, trainer.step)
    else:
        for d in run_dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / METRICS).unlink(missing_ok=True)
        if sweep:
            write_atomic(out / SWEEP_FILE, json.dumps({"runs": [d.name for d in run_dirs], "store": str(st.path),
                                                       "hooks": hooks, "train": config_dict(train),
                                                       "saes": [config_dict(s) for s in saes]}, indent=2))

    pick = hooks if len(hooks) > 1 else hooks[0]
    prefetch = Prefetcher(loader, transform=prepare_fn(pick, device, dtype, scales if len(hooks) > 1 else scales[pick]),
                          state_fn=loader.state_dict)
    run = _Run(trainer, run_dirs, records, prefetch, st, progress)
    try:
        if state == "new":
            run.on_checkpoint()  # step 0: the directory holds a resumable run from the start
        fit(trainer, prefetch, steps=train.steps, prepare=lambda x: x, on_log=run.on_log,
            on_checkpoint=run.on_checkpoint, on_resample=run.on_resample, wait_s=lambda: prefetch.wait_s)
    finally:
        prefetch.close()
        run.bar.close()
    return summary(run.last or [last_metrics(d) for d in run_dirs], round(prefetch.wait_s, 3))
