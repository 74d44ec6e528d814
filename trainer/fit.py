"""The training loop: `fit` drives a `SweepTrainer` over any iterator of batches and reports through `FitEvents`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

from saeforge.trainer.errors import NonFinite
from saeforge.trainer.window import StepStats

if TYPE_CHECKING:
    from saeforge.trainer.loop import SweepTrainer


class FitEvents:
    """What `fit` tells its caller, as one object (these defaults do nothing): metrics rows at every logging
    step, features resampled, checkpoint time, and the seconds spent waiting for data so far."""

    def on_log(self, rows: list[dict]) -> None:
        """One dict per SAE (sweep order) for the logging window that just ended (`Metrics.flush`)."""

    def on_resample(self, done: dict[int, int]) -> None:
        """{SAE index: features resampled} after a resampling step that changed something."""

    def on_checkpoint(self) -> None:
        """Every `checkpoint_every` steps and at the last step: save what a resumed run needs."""

    def wait_s(self) -> float:
        """Seconds the loop has waited for batches so far (for `data_wait_fraction`)."""
        return 0.0


def fit(trainer: SweepTrainer, batches: Iterable, *, steps: int, events: FitEvents | None = None) -> None:
    """Train until `trainer.step == steps` on `batches`: ANY iterator of prepared batches (`trainer.prepare`:
    {hook: (rows, d_in)} on the trainer's device, in training scale). Resampling draws its scored inputs from
    the same iterator. Reports to `events` every `log_every` steps, checkpoints every `checkpoint_every` steps
    and at the end.

    Raises NonFinite naming the first step whose loss is NaN or infinite, before any resampling, log line or
    checkpoint that would carry it: the losses are read where the host syncs anyway (logging, resampling,
    checkpoints), so the check costs no extra device sync. Batches are assumed finite (a store's loader refuses
    non-finite rows), so such a loss means that training diverged."""
    cfg, events = trainer.train, events or FitEvents()
    metrics = trainer.window
    metrics.start_clock()
    unchecked: list[tuple[int, StepStats]] = []
    it = iter(batches)
    wait0 = events.wait_s()
    while trainer.step < steps:
        x = next(it)
        stats = trainer.train_step(x)
        metrics.add(stats, x)
        unchecked.append((trainer.step, stats))
        if trainer.resample_due():
            check_finite(trainer, unchecked)
            done = trainer.resample([next(it) for _ in range(trainer.resample_batches())])
            if done:
                events.on_resample(done)
        log = trainer.step % cfg.log_every == 0 or trainer.step == steps
        checkpoint = (cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0) or trainer.step == steps
        if log or checkpoint:
            check_finite(trainer, unchecked)
        if log:
            now = events.wait_s()
            rows = metrics.flush(now - wait0)
            wait0 = now
            events.on_log(rows)
        if checkpoint:
            events.on_checkpoint()


def check_finite(trainer: SweepTrainer, unchecked: list[tuple[int, StepStats]]) -> None:
    """Empty `unchecked` ((step, its StepStats) since the last check); NonFinite naming the first step whose loss
    is NaN or infinite and the SAEs it hit. One device-to-host copy of (steps, K) losses."""
    if not unchecked:
        return
    losses = torch.stack([s.l_recon + s.l_sparsity + s.l_aux for _, s in unchecked]).cpu()
    bad = ~torch.isfinite(losses)
    steps = [step for step, _ in unchecked]
    unchecked.clear()
    if not bad.any():
        return
    j = int(bad.any(-1).nonzero()[0])
    hit = bad[j].nonzero().flatten().tolist()
    names = ", ".join(trainer.saes[i].run_name for i in hit[:3]) + (f" and {len(hit) - 3} more" if len(hit) > 3 else "")
    raise NonFinite(f"step {steps[j]}: the loss of {names} is {float(losses[j, hit[0]])} on a finite batch, so "
                    "training diverged; lower lr or l1_coefficient (or lengthen lr_warmup_steps) and train into a new "
                    "output")
