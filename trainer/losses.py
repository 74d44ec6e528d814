"""Training losses: baseline Eq. 4 and Gated Eq. 8 of arXiv 2404.16014. Pure functions, NamedTuple outputs.

Every term is a per-SAE mean over rows: shape `()` for a plain SAE, `(K,)` for a stack of K. `loss` is their
sum over the stack, so one backward pass trains every SAE of a stack independently.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.functional import relu

from saeforge.trainer.sae import SAE, GatedSAE


class LossOutput(NamedTuple):
    loss: Tensor
    """Scalar to backpropagate: the sum over the stack of l_recon + l_sparsity + l_aux."""
    l_recon: Tensor
    """recon_scale * mean_rows ||x - x_hat||^2."""
    l_sparsity: Tensor
    """lambda * mean_rows ||ReLU(.)||_1 (baseline: f; gated: ReLU(pi_gate)); weighted by ||d_i|| if asked."""
    l_aux: Tensor
    """Gated: recon_scale * mean_rows ||x - x_hat_frozen(ReLU(pi_gate))||^2; baseline: 0."""
    f: Tensor
    """Final feature activations (rows, d_sae) or (K, rows, d_sae)."""
    x_hat: Tensor
    """Reconstruction (rows, d_in) or (K, rows, d_in)."""
    sq_err: Tensor
    """||x - x_hat||^2 per row, detached: (rows,) or (K, rows)."""


def recon_scale(loss_scaling: str, arch: str, d_in: int, mean_sq_norm: float) -> float:
    """Factor on the squared-error terms (arXiv 2404.16014 App. D.1). `paper`: 1/n, and 1/(n E||x||^2) for baselines;
    `per_dim`: 1/n; `sum`: 1. `mean_sq_norm` is E||x||^2 of the inputs as the SAE sees them."""
    if loss_scaling == "sum":
        return 1.0
    if loss_scaling == "per_dim" or arch == "gated":
        return 1.0 / d_in
    return 1.0 / (d_in * mean_sq_norm)


def l1_training_factor(loss_scaling: str, arch: str, input_scale: float) -> float:
    """Factor turning the paper's lambda (loss on RAW activations x) into the lambda to use on inputs s*x.

    An SAE on s*x is the raw SAE with every activation and bias times s (decoder rows stay unit norm), so its
    L1 term is s times the raw one, and its squared errors are s^2 times the raw ones, times the ratio of the
    reconstruction scales (`recon_scale` on s*x over on x). Requiring loss(s*x; lambda') = c * loss(x; lambda)
    for every SAE gives c = s^2 * ratio and lambda' = lambda * c / s:

    - `paper` baseline (1/(n E||x||^2), scale-free): c = 1, lambda' = lambda / s;
    - Gated, `per_dim`, `sum` (1/n or 1): c = s^2, lambda' = lambda * s.
    So `l1_coefficient` means what the paper's lambda means (arXiv 2404.16014 App. D.1) whatever the store's
    normalisation scale s (`tests/trainer/test_lambda_units.py`)."""
    c = 1.0 if (loss_scaling == "paper" and arch == "baseline") else input_scale ** 2
    return c / input_scale


def _as_stack(value: Tensor | float, like: Tensor) -> Tensor:
    """lambda as a tensor broadcastable against per-SAE terms of shape `like.shape`."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(like.shape)


def _l1(acts: Tensor, sae: SAE, weight_by_decoder_norm: bool) -> Tensor:
    if weight_by_decoder_norm:
        acts = acts * sae.W_dec.norm(dim=-1).unsqueeze(-2)
    return acts.sum(-1).mean(-1)


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 per row: (rows,) or (K, rows)."""
    return (x_hat - x).pow(2).sum(-1)


def baseline_loss(sae: SAE, x: Tensor, l1_coefficient: Tensor | float, *, recon_scale: float = 1.0,
                  weight_l1_by_decoder_norm: bool = False) -> LossOutput:
    """Eq. 4: ||x - x_hat(f(x))||^2 + lambda ||f(x)||_1, x: (rows, d_in)."""
    f, _ = sae.encode_full(x)
    x_hat = sae.decode(f)
    sq_err = squared_error(x, x_hat)
    l_recon = recon_scale * sq_err.mean(-1)
    l_sparsity = _as_stack(l1_coefficient, l_recon) * _l1(f, sae, weight_l1_by_decoder_norm)
    l_aux = torch.zeros_like(l_recon)
    return LossOutput((l_recon + l_sparsity).sum(), l_recon, l_sparsity, l_aux, f, x_hat, sq_err.detach())


def gated_loss(sae: GatedSAE, x: Tensor, l1_coefficient: Tensor | float, *, recon_scale: float = 1.0,
               weight_l1_by_decoder_norm: bool = False, freeze_aux_decoder: bool = True) -> LossOutput:
    """Eq. 8: L_reconstruct + lambda ||ReLU(pi_gate)||_1 + L_aux, with L_aux reconstructing x from
    ReLU(pi_gate) through a frozen decoder (stop-gradient on W_dec and b_dec in that term only)."""
    f, pi_gate, *_ = sae.encode_full(x)
    x_hat = sae.decode(f)
    W_dec, b_dec, gate_acts = sae.W_dec, sae.b_dec, relu(pi_gate)
    if freeze_aux_decoder:
        x_hat_gate = gate_acts @ W_dec.detach() + b_dec.detach()
    else:  # the "unfreeze decoder" ablation and the anthropic regime
        x_hat_gate = gate_acts @ W_dec + b_dec
    sq_err = squared_error(x, x_hat)
    l_recon = recon_scale * sq_err.mean(-1)
    l_sparsity = _as_stack(l1_coefficient, l_recon) * _l1(gate_acts, sae, weight_l1_by_decoder_norm)
    l_aux = recon_scale * squared_error(x, x_hat_gate).mean(-1)
    return LossOutput((l_recon + l_sparsity + l_aux).sum(), l_recon, l_sparsity, l_aux, f, x_hat, sq_err.detach())


def sae_loss(sae: SAE, x: Tensor, l1_coefficient: Tensor | float, *, recon_scale: float = 1.0,
             weight_l1_by_decoder_norm: bool = False, freeze_aux_decoder: bool = True) -> LossOutput:
    """The loss of `sae`'s architecture."""
    if isinstance(sae, GatedSAE):
        return gated_loss(sae, x, l1_coefficient, recon_scale=recon_scale, freeze_aux_decoder=freeze_aux_decoder,
                          weight_l1_by_decoder_norm=weight_l1_by_decoder_norm)
    return baseline_loss(sae, x, l1_coefficient, recon_scale=recon_scale,
                         weight_l1_by_decoder_norm=weight_l1_by_decoder_norm)
