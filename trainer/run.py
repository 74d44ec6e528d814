"""Train one SAE or a sweep from a store: run directories, checkpoints, resume, metrics and progress.

    train_from_store(store, [SAEConfig(...)], TrainConfig(hook=...), out)              # one run: out is the run dir
    train_from_store(store, saes, train, out, sweep=True)                            # out/sweep.json + out/<name>/

File names and readers of a run directory: rundir.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from saeforge.stores.errors import StoreError
from saeforge.stores.progress import progress_bar
from saeforge.trainer import ddp, guards, rundir
from saeforge.trainer.checkpoint import (check_world_size, checkpoint_record, checkpoint_steps, load_common_checkpoints,
                                         loader_position, save_checkpoint)
from saeforge.trainer.config import SAEConfig, TrainConfig, config_dict
from saeforge.trainer.errors import ConfigError, NonFinite, ResumeMismatch, RunExists
from saeforge.trainer.loggers import TRACKER_FIELDS, JsonlSink, check_trackers, close_sinks, open_sinks
from saeforge.trainer.fit import FitEvents, fit
from saeforge.trainer.loop import SweepTrainer
from saeforge.trainer.normaliser import Normaliser
from saeforge.trainer.saelens_files import save_sae

# TrainConfig fields a resumed run may change (they do not alter what is trained).
RESUMABLE = {"steps", "log_every", "checkpoint_every", "device", "loader_threads", "compile", "stack_mib",
             *TRACKER_FIELDS}


def run_dirs_for(out: Path, saes: list[SAEConfig], sweep: bool) -> list[Path]:
    if not sweep:
        if len(saes) != 1:
            raise ConfigError(f"a single run trains one SAE, got {len(saes)}; use a sweep")
        return [out]
    names = [s.run_name for s in saes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"sweep run names must be unique; repeated: {', '.join(dupes)}")
    return [out / n for n in names]


def run_record(sae: SAEConfig, train: TrainConfig, *, store: str, d_in: int, input_scale: float,
               compute_dtype: str = "float32", store_sha256: str | None = None) -> dict:
    """What identifies a run (saved under cfg.json's `saeforge` key and compared on resume). `compute_dtype` is
    what `autocast` resolved to on this machine (recorded, not compared: a run may resume elsewhere);
    `store_sha256` is the store's fingerprint (`guards.store_fingerprint`; compared, the path is not: a store
    may move)."""
    return {"sae": config_dict(sae), "train": config_dict(train), "store": store, "d_in": d_in,
            "input_scale": input_scale, "compute_dtype": compute_dtype, "store_sha256": store_sha256}


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


def _steps_done(run_dir: Path, record: dict) -> int | None:
    """Steps the run in `run_dir` has trained (None: it holds no run). Refuses a directory that holds something
    else, a different run, or a run of another store."""
    has_cfg = (run_dir / rundir.CFG_FILE).is_file()
    held = has_cfg or bool(checkpoint_steps(run_dir)) if run_dir.is_dir() else False
    if not held:
        if run_dir.is_dir() and any(p for p in run_dir.iterdir() if not rundir.is_leftover(p.name)):
            raise RunExists(f"{run_dir} is not empty and holds no saeforge run; choose another output")
        return None
    # Stopped between its first checkpoint and its first weights: the checkpoint knows what the run is.
    saved = rundir.read_record(run_dir) if has_cfg else checkpoint_record(run_dir)
    if saved.get("d_in") not in (None, record["d_in"]):
        raise ResumeMismatch(f"{run_dir} was trained with d_in={saved['d_in']} but hook "
                             f"{record['sae'].get('hook') or record['train']['hook']!r} of the store has "
                             f"d_in={record['d_in']}")
    diffs = _differences(saved, record)
    if diffs:
        raise RunExists(f"{run_dir} holds a different run ({'; '.join(diffs[:4])}); choose another output")
    guards.check_same_store(run_dir, saved, record)
    return int(saved.get("steps_done", 0))


def check_run_dirs(run_dirs: list[Path], records: list[dict], *, steps: int, resume: bool) -> str:
    """What to do with the output: `new` (start), `resume` (continue from the checkpoints) or `complete` (every
    run already trained `steps` steps: nothing to do). Refuses, writing nothing, to overwrite a directory that
    holds something else or a different run, or to shorten a run."""
    done = [_steps_done(d, r) for d, r in zip(run_dirs, records)]
    if all(d is None for d in done):
        if resume:
            out = run_dirs[0].parent if len(run_dirs) > 1 else run_dirs[0]
            why = ("no checkpoint was written yet (it stopped before its first)" if out.is_dir()
                   else "it does not exist")
            raise ResumeMismatch(f"nothing to resume in {out}: {why}; the same command without --resume starts it")
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
    sweep = rundir.read_sweep(out)
    if sweep is not None and sweep.get("runs", []) != names:
        raise RunExists(f"{out} holds a different sweep (runs {sweep.get('runs', [])}); choose another output")


class _Run(FitEvents):
    """`fit`'s events for a store-backed run: metrics lines, checkpoints, weights, progress bar. `loader` is
    the batch source whose `state_dict()` is the position after the last batch handed out and whose
    `counters.wait_s` is the time spent waiting for it."""

    def __init__(self, trainer: SweepTrainer, run_dirs: list[Path], records: list[dict], store_infos: list[dict],
                 loader, progress: bool):
        self.trainer, self.run_dirs, self.records, self.store_infos = trainer, run_dirs, records, store_infos
        self.loader = loader
        self.writer = trainer.dist is None or trainer.dist.rank == 0
        """Whether this process writes the run directories (rank 0 of a data-parallel run)."""
        self.sinks = [JsonlSink(d) for d in run_dirs] if self.writer else []
        """Where each SAE's metrics rows go (trainer/loggers.py); `_train` adds the trackers."""
        self.last: list[dict] = []
        self.saved_step: int | None = None
        """The step of the checkpoint on disk (None: none yet)."""
        self.bar = progress_bar(trainer.train.steps, desc="", unit="step", enabled=progress and self.writer,
                                initial=trainer.step,
                                dynamic_ncols=True)

    def wait_s(self) -> float:
        return self.loader.counters.wait_s

    def on_log(self, rows: list[dict]) -> None:
        for sink, row in zip(self.sinks, rows):
            sink.log(row)
        self.last = rows
        self.bar.update(self.trainer.step - self.bar.n)
        if rows:
            self.bar.set_postfix(L0=f"{rows[0]['l0']:.1f}", MSE=f"{rows[0]['mse']:.3g}",
                                 wait=f"{rows[0]['data_wait_fraction']:.0%}", refresh=False)

    def on_resample(self, done: dict[int, int]) -> None:
        for i, n in done.items() if self.writer else ():
            self.sinks[i].log({"step": self.trainer.step, "event": "resample", "features": n})

    def on_checkpoint(self) -> None:
        """Save every run, or none when any weights are not finite (the last good checkpoint stays)."""
        bad = [self.run_dirs[i].name for i in self.trainer.nonfinite_saes()]
        if bad:
            raise NonFinite(f"step {self.trainer.step}: the weights of {', '.join(bad[:3])} are not finite although "
                            "every loss up to here was, so training diverged; lower lr or l1_coefficient (or "
                            "lengthen lr_warmup_steps) and train into a new output")
        dist, position = self.trainer.dist, self.loader.state_dict()
        positions = [position] if dist is None else dist.all_gather_object(position)  # every rank's, in rank order
        for i, (run_dir, record) in enumerate(zip(self.run_dirs, self.records) if self.writer else ()):
            save_checkpoint(run_dir, {**self.trainer.sae_state(i), "loader": positions[0], "loader_ranks": positions,
                                      "world_size": len(positions), "record": record})
            self.save_weights(i)
        self.saved_step = self.trainer.step

    def kept(self) -> str:
        """What the run directories hold after a failure (for the one-line message)."""
        where = str(self.run_dirs[0]) if len(self.run_dirs) == 1 else f"every run of {self.run_dirs[0].parent}"
        if self.saved_step is None:
            return f"nothing was saved in {where}"
        return f"{where} keeps its checkpoint and weights of step {self.saved_step}"

    def save_weights(self, i: int) -> None:
        hook, info = self.trainer.sae_hooks[i], self.store_infos[i]
        save_sae(self.trainer.sae(i), self.run_dirs[i], hook_name=hook, normaliser=self.trainer.normalisers[hook],
                 model_name=info["model"], store=self.records[i]["store"], provenance=info["provenance"],
                 saeforge={**self.records[i], "steps_done": self.trainer.step, "store_info": info})


def _start(loader, trainer: SweepTrainer, run_dirs: list[Path], state: str, sweep_record: dict | None,
           checkpoints: list[dict] | None, writer: bool) -> None:
    """Resume the trainer and loader from `checkpoints` (the newest common ones; this rank's loader position), or
    start fresh run directories. Either way the temporary files of writes a kill interrupted go. Only the `writer`
    (rank 0) touches the run directories."""
    for d in {*run_dirs, *(d.parent for d in run_dirs if sweep_record is not None)} if writer else ():
        rundir.remove_temp_files(d)
    if state == "resume":
        for i, ckpt in enumerate(checkpoints):
            trainer.load_sae_state(i, ckpt)
        loader.load_state_dict(loader_position(checkpoints[0], loader.rank))
        for d in run_dirs if writer else ():
            rundir.truncate_metrics(d, trainer.step)
        return
    for d in run_dirs if writer else ():
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create {d}: {e.strerror}; choose another output") from None
        rundir.clear_metrics(d)
    if sweep_record is not None and writer:
        rundir.write_sweep(run_dirs[0].parent, sweep_record)


class _Setup(NamedTuple):
    """What `_prepare` checked and built, before anything is written."""
    out: Path
    run_dirs: list[Path]
    store: Any
    sae_hooks: list[str]
    trainer: SweepTrainer
    records: list[dict]
    loader: Any
    state: str | None
    """`new`, `resume` or `complete` (`check_run_dirs`); None on ranks other than 0, which do not read the runs."""
    checkpoints: list[dict] | None
    """The checkpoints to resume from (rank 0 reads them)."""


def train_from_store(store: str | Path, saes: list[SAEConfig], train: TrainConfig, out: str | Path, *,
                     sweep: bool = False, resume: bool = False, progress: bool = True,
                     dtype: torch.dtype = torch.float32, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Train `saes` (each on its `hook`, default `train.hook`) on the store at `store`; returns one summary dict
    per SAE. Idempotent: a run directory that already holds these runs is resumed from its checkpoints, or left
    as it is when complete; `resume=True` only insists that there is something to resume.

    Refuses before anything is written, with the store's errors (StoreNotFound, StoreIncomplete, HookNotInStore,
    StoreDamaged, ...), RunExists, ResumeMismatch (another run, another store), RunCorrupt (a damaged run file)
    or ConfigError (bad output path, device, batch size). While training, a store error (a chunk that cannot
    be read, non-finite rows) or NonFinite (a loss or weights) stops it, naming the step; the run directory
    keeps its last good checkpoint and weights, and the same command resumes from them.

    `store` may be an fsspec URL, opened with `storage_options` (credentials, endpoint; never recorded); `out` is
    a local path (ConfigError for a URL).

    Under torchrun (`WORLD_SIZE > 1`) every rank calls it alike: data-parallel training (trainer/ddp.py) where
    `batch_rows` is the global batch, rank 0 alone writes, a run resumes only with the world size it was
    checkpointed with, a failure before training stops every rank with one message, and every rank returns the
    summary."""
    with ddp.session(train.device) as (device, dist):
        s = ddp.agreed(dist, lambda: _prepare(store, saes, train, out, sweep=sweep, resume=resume, dtype=dtype,
                                              storage_options=storage_options, device=device, dist=dist))
        share = (lambda x: x) if dist is None else dist.broadcast_object  # rank 0's value, on every rank
        trainer, run_dirs, state = s.trainer, s.run_dirs, share(s.state)
        summary = lambda rows, wait: [  # noqa: E731
            {"run_dir": str(d), **row, "arch": c.arch, "d_sae": c.d_sae, "hook": h,
             "recon_scale": trainer.recon_scale(i), "loader_wait_s": wait}
            for i, (d, c, h, row) in enumerate(zip(run_dirs, saes, s.sae_hooks, rows))]
        writer = dist is None or dist.rank == 0
        if state == "complete":
            return summary(share([rundir.last_metrics(d) for d in run_dirs] if writer else None), 0.0)
        sweep_record = {"runs": [d.name for d in run_dirs], "store": str(s.store.path), "hooks": trainer.hooks,
                        "train": config_dict(train), "saes": [config_dict(c) for c in saes]} if sweep else None
        checkpoints = share(s.checkpoints) if state == "resume" else None
        ddp.agreed(dist, lambda: _start(s.loader, trainer, run_dirs, state, sweep_record, checkpoints, writer))
        run = _Run(trainer, run_dirs, s.records, [rundir.store_info(s.store, h) for h in s.sae_hooks], s.loader,
                   progress)
        run.saved_step = trainer.step if state == "resume" else None
        _train(run, s.loader, state, group=s.out.name if sweep else None)
        return summary(run.last or share([rundir.last_metrics(d) for d in run_dirs] if writer else None),
                       round(run.wait_s(), 3))


def _prepare(store, saes: list[SAEConfig], train: TrainConfig, out, *, sweep: bool, resume: bool, dtype, storage_options,
             device: torch.device, dist: ddp.Dist | None) -> _Setup:
    """Everything `train_from_store` checks and builds before it writes anything (every rank; rank 0 alone reads
    the run directories and their checkpoints)."""
    from saeforge.stores import StoreLoader

    out = guards.check_out(out)
    check_trackers(train.log_to)
    run_dirs = run_dirs_for(out, saes, sweep)
    st, sae_hooks, norms = _open_checked(store, saes, train, storage_options)
    world, rank = (1, 0) if dist is None else (dist.world_size, dist.rank)
    ddp.check_shards(st, train.batch_rows, world)
    d_ins = {h: st.d(h) for h in norms}
    trainer = SweepTrainer(saes, train, d_ins, normalisers=norms, device=device, dtype=dtype, dist=dist)
    compute = "bfloat16" if trainer.autocast else str(dtype).removeprefix("torch.")
    fingerprint = guards.store_fingerprint(st)
    records = [run_record(c, train, store=str(st.path), d_in=d_ins[h], input_scale=norms[h].scale,
                          compute_dtype=compute, store_sha256=fingerprint) for c, h in zip(saes, sae_hooks)]
    state = checkpoints = None
    if rank == 0:
        if sweep:
            check_sweep_file(out, [d.name for d in run_dirs])
        state = check_run_dirs(run_dirs, records, steps=train.steps, resume=resume)
        if state != "complete":
            guards.check_writable([out, *run_dirs] if sweep else run_dirs)
        if state == "resume":
            checkpoints = load_common_checkpoints(run_dirs)
            check_world_size(run_dirs[0], checkpoints[0], world)
    # on CUDA, bf16 rows travel as stored (half the bytes, pinned) and become float32 on the device
    wire = torch.bfloat16 if device.type == "cuda" and st.dtype == "bfloat16" else torch.float32
    loader = StoreLoader(st, hooks=list(norms), batch_rows=train.batch_rows // world, seed=train.data_seed,
                         threads=train.loader_threads, pin_memory=device.type == "cuda", rank=rank, world_size=world,
                         interleave=world > 1, out_dtype=wire)
    return _Setup(out, run_dirs, st, sae_hooks, trainer, records, loader, state, checkpoints)


def _train(run: _Run, loader, state: str, group: str | None = None) -> None:
    """Run `fit` on the loader's batches (it refuses non-finite rows), logging to metrics.jsonl and the trackers
    (opened once the run directories hold a checkpoint; `group`: a sweep's name). A store error or NonFinite leaves
    with one message that names the step and what the run directories kept."""
    trainer, steps = run.trainer, run.trainer.train.steps
    batches, ok = iter(loader), False
    try:
        if state == "new":
            run.on_checkpoint()  # step 0: the directory holds a resumable run from the start
        elif trainer.step >= steps:  # stopped between its last checkpoint and its last weights
            for i in range(len(run.run_dirs)) if run.writer else ():
                run.save_weights(i)
        if run.writer:
            run.sinks = open_sinks(trainer.train, run.run_dirs, run.records, step=trainer.step, group=group)
        fit(trainer, map(trainer.prepare, batches), steps=steps, events=run)
        ok = True
    except (NonFinite, StoreError) as exc:
        where = "" if isinstance(exc, NonFinite) else f"stopped before step {trainer.step + 1}: "
        exc.args = (f"{where}{exc}; {run.kept()}",)
        raise
    finally:
        batches.close()
        run.bar.close()
        close_sinks(run.sinks, ok)


def _open_checked(store, saes: list[SAEConfig], train: TrainConfig,
                  storage_options: dict | None = None) -> tuple[Any, list[str], dict[str, Normaliser]]:
    """Open the store (`open_store` refuses a damaged one) and check it against the run before anything is
    written: the hooks (HookNotInStore) and the batch size (ConfigError). Returns the store, each SAE's hook,
    and one Normaliser per hook in first-use order."""
    from saeforge.stores import open_store

    st = open_store(store, storage_options)
    sae_hooks = [s.hook or train.hook for s in saes]
    hooks = list(dict.fromkeys(sae_hooks))
    st.check_hooks(hooks)
    guards.check_batch_rows(st, train.batch_rows)
    return st, sae_hooks, {h: Normaliser.from_stats(st.stats(h), normalize=train.normalize_inputs) for h in hooks}
