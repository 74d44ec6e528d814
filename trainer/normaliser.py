"""`Normaliser`: one hook's input normalisation, the only place the input scale and mean are applied.

The trainer sees s * x, where s = sqrt(d_in / E||x||^2) is the store's fixed scale for the hook (one factor
per hook, so lambda means the same across a sweep; 1 with `TrainConfig.normalize_inputs = False`). From it
follow: the training batches (`to_training`), the decoder-bias init (the store mean, in training scale), the
training-scale E||x||^2 that the paper's baseline loss scaling divides by (arXiv 2404.16014 App. D.1), the
conversion of lambda (`losses.l1_training_factor`), MSE reported in the original scale, and the fold that
saves weights acting on raw x (`to_original_`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from saeforge.trainer.sae import SAE, fold_input_scale_


class Normaliser(NamedTuple):
    """One hook's normalisation. The defaults (scale 1, no mean, no E||x||^2) leave inputs as they are."""

    scale: float = 1.0
    """s: the trainer sees s * x."""
    mean: np.ndarray | Tensor | None = None
    """(d_in,) mean of the raw activations; None: b_dec starts at 0."""
    mean_sq_norm: float | None = None
    """E||x||^2 of the raw activations; None: taken as d_in in training scale."""

    @classmethod
    def from_stats(cls, stats, *, normalize: bool = True) -> "Normaliser":
        """From a store's `HookStats` (saeforge.stores.stats); `normalize=False` keeps the scale at 1."""
        return cls(float(stats.scale) if normalize else 1.0, stats.mean, float(stats.mean_sq_norm))

    def to_training(self, x: Tensor) -> Tensor:
        """(rows, d_in) raw activations -> training scale."""
        return x * self.scale if self.scale != 1.0 else x

    def b_dec_init(self) -> Tensor | None:
        """(d_in,) float32 initial decoder bias: the mean in training scale (None when there is no mean)."""
        return None if self.mean is None else torch.as_tensor(self.mean, dtype=torch.float32) * self.scale

    def training_mean_sq_norm(self, d_in: int) -> float:
        """E||s x||^2, the baseline's `paper` loss-scaling divisor; d_in when E||x||^2 is unknown."""
        return float(d_in) if self.mean_sq_norm is None else float(self.mean_sq_norm * self.scale ** 2)

    def original_mse(self, sse: float, rows: int, d_in: int) -> float:
        """Mean squared error per element in the original scale from a training-scale sum of squared errors."""
        return sse / (rows * d_in * self.scale ** 2)

    def to_original_(self, sae: SAE) -> SAE:
        """Fold the scale into a training-scale SAE so that it acts on raw x: new(x) == old(s x) / s."""
        fold_input_scale_(sae, self.scale)
        return sae


def for_hook(normalisers: Normaliser | dict[str, Normaliser] | None, hook: str) -> Normaliser:
    """The hook's normaliser from one shared by every hook, a dict keyed by hook, or None (identity)."""
    if isinstance(normalisers, dict):
        return normalisers.get(hook) or Normaliser()
    return normalisers or Normaliser()
