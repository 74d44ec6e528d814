"""The logging window: one step's sums over its batch (`StepStats`), and `Metrics`, which adds steps up and turns a
window of them into one metrics row per SAE (the rows `metrics.jsonl` and the trackers get, `trainer/run.py`)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from saeforge.trainer.loop import SweepTrainer


class StepStats(NamedTuple):
    """Sums over one batch, one entry per SAE of the sweep (in sweep order); tensors, no host sync."""
    l_recon: Tensor
    l_sparsity: Tensor
    l_aux: Tensor
    l0: Tensor
    """Mean count of f > 0 per row."""
    sse: Tensor
    """Sum over rows of ||x - x_hat||^2."""
    xhat_sq: Tensor
    """Sum over rows of ||x_hat||^2."""
    x_dot_xhat: Tensor
    """Sum over rows of x . x_hat."""
    x_var: Tensor
    """Sum over rows of ||x - mean_rows(x)||^2 of the SAE's hook (the explained variance's denominator)."""


MEAN_STATS = ("l_recon", "l_sparsity", "l_aux", "l0")
"""StepStats fields that are means over the batch's rows (the others are sums)."""


class Metrics:
    """Accumulates StepStats over a logging window and turns them into one dict per SAE."""

    def __init__(self, trainer: SweepTrainer):
        self.trainer = trainer
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.rows = self.steps = 0
        self.start_clock()

    def start_clock(self) -> None:
        """Time the window from now (a resumed window's steps before the restart are not timed)."""
        self.t0, self.timed_steps = time.perf_counter(), 0

    def state(self, i: int) -> dict:
        """SAE `i`'s share of the open window (plain floats: float64 sums round-trip exactly)."""
        return {"steps": self.steps, "rows": self.rows, "sums": {k: float(v[i]) for k, v in self.sums.items()}}

    def load_state(self, i: int, state: dict) -> None:
        """Put SAE `i`'s saved share of a window back (every SAE of a resumed sweep saved the same step)."""
        if not state["steps"]:
            return
        t = self.trainer
        sums = {"x_var": state.get("x_var"), **state["sums"]}  # checkpoints before x_var was a StepStats field
        for name, value in sums.items():
            if name not in self.sums:
                self.sums[name] = torch.zeros(len(t.saes), device=t.device, dtype=torch.float64)
            self.sums[name][i] = value
        self.steps, self.rows = state["steps"], state["rows"]

    def add(self, stats: StepStats, x: Tensor | dict[str, Tensor]) -> None:
        """Add one step's (global) StepStats; `x` is this rank's batch (its rows, times the ranks, are the step's)."""
        for name, v in stats._asdict().items():
            self.sums[name] = self.sums.get(name, 0) + v
        self.rows += next(iter(self.trainer.by_hook(x).values())).shape[0] * self.trainer.world_size
        self.steps += 1
        self.timed_steps += 1

    def flush(self, wait_s: float = 0.0) -> list[dict]:
        """One dict per SAE for the window since the last flush; then reset."""
        if not self.steps:
            return []
        s = {k: v.cpu().tolist() for k, v in self.sums.items()}
        wall = max(time.perf_counter() - self.t0, 1e-9)
        t, rows = self.trainer, self.rows
        out = []
        for i, hook in enumerate(t.sae_hooks):
            l_recon, l_sp, l_aux = (s[k][i] / self.steps for k in ("l_recon", "l_sparsity", "l_aux"))
            xx, xh = s["xhat_sq"][i], s["x_dot_xhat"][i]
            out.append({
                "step": t.step, "loss": l_recon + l_sp + l_aux, "l_recon": l_recon, "l_sparsity": l_sp,
                "l_aux": l_aux, "l0": s["l0"][i] / self.steps,
                "mse": t.normalisers[hook].original_mse(s["sse"][i], rows, t.d_ins[hook]),
                # per logging window (trainer/rundir.py defines it beside eval.json's explained_variance)
                "explained_variance_window": 1 - s["sse"][i] / max(s["x_var"][i], 1e-30),
                "gamma": xx / xh if xh else float("nan"),  # arXiv 2404.16014 eq. 10, a ratio of window means
                "dead_fraction": t.dead_fraction(i), "lr": t.lr_now(i), "l1_coefficient": t.l1_now(i),
                "steps_per_s": self.timed_steps / wall, "data_wait_fraction": min(1.0, wait_s / wall),
            })
        self.reset()
        return out
