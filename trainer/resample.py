"""Dead-feature resampling (Bricken et al. 2023 "Neuron Resampling", as arXiv 2404.16014 App. D.1 uses it).

For each dead feature i of one SAE: draw an input with probability proportional to its squared loss
||x - x_hat||^2 squared; set d_i to that input at unit norm; set encoder column i to the same direction with norm
0.2 x the mean encoder-column norm of the alive features; zero feature i's biases (gated: b_gate, b_mag and
r_mag, so theta = 0); zero the Adam moments of everything touched. Other features stay bit-identical. The
caller then drops that SAE's LR to 0.1x and warms it back over 1000 steps (optim.resample_multiplier).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saeforge.trainer.optim import StackAdam
from saeforge.trainer.sae import SAE


class ResampleResult(NamedTuple):
    n_resampled: int
    """How many features were resampled."""
    rows: Tensor
    """Index (into the scored inputs) of the input each resampled feature took, (n_resampled,)."""


def sample_inputs(sq_err: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """`n` row indices drawn with probability proportional to sq_err**2 (the loss squared), on the CPU with
    the SAE's own generator; without replacement where there are enough rows with non-zero weight."""
    weights = sq_err.detach().double().cpu().pow(2)
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    replacement = n > int((weights > 0).sum())
    return torch.multinomial(weights, n, replacement=replacement, generator=generator)


@torch.no_grad()
def resample_features_(sae: SAE, k: int | None, dead: Tensor, inputs: Tensor, sq_err: Tensor,
                       generator: torch.Generator, adam: StackAdam | None = None,
                       encoder_scale: float = 0.2) -> ResampleResult:
    """Resample the features flagged in `dead` (d_sae,) bool of SAE `k` of a stack (None: a plain SAE).

    inputs: (rows, d_in) in the SAE's input scale; sq_err: (rows,) that SAE's ||x - x_hat||^2 on them."""
    idx = dead.nonzero().flatten().to(sae.W_dec.device)
    if idx.numel() == 0:
        return ResampleResult(0, torch.zeros(0, dtype=torch.long))
    rows = sample_inputs(sq_err, idx.numel(), generator)
    directions = inputs[rows.to(inputs.device)].to(sae.W_dec.dtype)
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def view(t: Tensor) -> Tensor:  # this SAE's slice, features on the last axis for encoders and biases
        return t if k is None else t[k]

    alive = ~dead.to(sae.W_dec.device)
    enc_names = sae.encoder_weights()
    enc_norms = view(getattr(sae, enc_names[0])).norm(dim=0)  # (d_sae,) column norms
    mean_alive = enc_norms[alive].mean() if alive.any() else torch.ones((), device=enc_norms.device)
    view(sae.W_dec)[idx] = directions
    for name in enc_names:
        view(getattr(sae, name))[:, idx] = (encoder_scale * mean_alive * directions).T.to(sae.W_dec.dtype)
    for name in sae.feature_biases():
        view(getattr(sae, name))[..., idx] = 0
    if adam is not None:
        _reset_moments_(adam, sae, k, idx)
    return ResampleResult(int(idx.numel()), rows)


def _reset_moments_(adam: StackAdam, sae: SAE, k: int | None, idx: Tensor) -> None:
    """Zero Adam's moments for the resampled features in every parameter they own."""
    for moments in (adam.exp_avg, adam.exp_avg_sq):
        for name, t in moments.items():
            t_k = t if k is None else t[k]
            if name == "W_dec":
                t_k[idx] = 0
            elif name in sae.encoder_weights() or name in sae.feature_biases():
                t_k[..., idx] = 0
