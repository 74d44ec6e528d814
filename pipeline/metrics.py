"""Pure evaluation metrics for SAEs spliced into an LM (arXiv 2404.16014 §4).

No I/O, no model: tensors in, numbers out. Dataset-level quantities (γ, explained variance) are ratios of
dataset means, accumulated in float64 over batches by `ReconstructionAccumulator`, never means of
per-batch ratios. Dimension key: `batch`, `pos`, `rows` (flattened batch x pos), `d_in`, `d_sae`, `d_vocab`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

DENSE_THRESHOLD = 0.1
"""A feature active on more than this fraction of tokens is "dense" (JumpReLU paper's 10% line)."""

DENSITY_EDGES = np.linspace(-8.0, 0.0, 33)
"""log10(feature density) bin edges shared by every SAE, so histograms compare across a sweep."""


def loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """Eq. 5: (CE(ablated) - CE(spliced)) / (CE(ablated) - CE(clean)); NaN when ablation changes nothing."""
    denom = ce_ablated - ce_clean
    if denom == 0:
        return math.nan
    return (ce_ablated - ce_spliced) / denom


def delta_ce(ce_clean: float, ce_spliced: float) -> float:
    """Cross-entropy added by the splice, in nats per token."""
    return ce_spliced - ce_clean


def next_token_ce_sum(logits: torch.Tensor, token_ids: torch.Tensor, scored: torch.Tensor) -> float:
    """Sum over scored predictions of -log p(token[t+1] | logits[t]), in float64.

    logits: (batch, pos, d_vocab); token_ids: (batch, pos); scored: (batch, pos - 1) bool, True where the
    prediction made at position t (target token t+1) counts.
    """
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    nll = F.cross_entropy(pred, token_ids[:, 1:].reshape(-1), reduction="none")
    return float(nll.double()[scored.reshape(-1)].sum())


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (batch, pos - 1, d_vocab) in float32 (the positions that are scored)."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def kl_sum(ref_logp: torch.Tensor, logits: torch.Tensor, scored: torch.Tensor) -> float:
    """Sum over scored predictions of KL(p_ref || p), in float64; ref_logp from `log_probs` of the clean run."""
    logp = log_probs(logits)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return float(kl.double()[scored].sum())


def gamma(sum_xhat_sq: float, sum_dot: float) -> float:
    """Eq. 10 (v2), first form: E||x_hat||^2 / E[x_hat . x]; the rescale 1/γ minimises E||x_hat/γ - x||^2."""
    return sum_xhat_sq / sum_dot if sum_dot != 0 else math.nan


def gamma_from_norms(sum_xhat_sq: float, sum_x_sq: float, sum_sq_err: float) -> float:
    """Eq. 10 (v2), second form: 2 E||x_hat||^2 / (E||x_hat||^2 + E||x||^2 - E||x_hat - x||^2)."""
    denom = sum_xhat_sq + sum_x_sq - sum_sq_err
    return 2 * sum_xhat_sq / denom if denom != 0 else math.nan


class ReconstructionMetrics(NamedTuple):
    """Dataset-level reconstruction and sparsity metrics of one SAE over the evaluated rows."""

    n_rows: int
    mse: float
    """E||x - x_hat||^2 / d_in (mean squared error per element)."""
    sq_err: float
    """E||x - x_hat||^2 (summed over d_in, mean over rows)."""
    explained_variance: float
    """1 - E||x - x_hat||^2 / E||x - mean(x)||^2 (relative to the eval-set mean, not to zero)."""
    gamma: float
    """Relative reconstruction bias, eq. 10 (ratio of dataset means)."""
    l2_ratio: float
    """E[||x_hat|| / ||x||] over rows with x != 0 (SAELens's convention: a mean of per-row ratios)."""
    l0: float
    """E||f||_0: nonzero final feature activations per row (gated: f_gate * f_mag)."""
    feature_counts: np.ndarray
    """(d_sae,) int64: rows on which each feature was nonzero."""


class ReconstructionAccumulator:
    """Streams (x, x_hat, f) batches into float64 sums; `result()` gives dataset-level metrics.

    The variance about the mean is merged across batches with Chan et al.'s pairwise update, so explained
    variance stays exact-ish (1e-12) even when the activations have a large mean.
    """

    def __init__(self, d_in: int, d_sae: int):
        self.d_in, self.d_sae = d_in, d_sae
        self.n = 0
        self.sum_sq_err = self.sum_x_sq = self.sum_xhat_sq = self.sum_dot = 0.0
        self.sum_l2_ratio, self.n_ratio, self.sum_l0 = 0.0, 0, 0
        self.mean = np.zeros(d_in, dtype=np.float64)
        self.m2 = 0.0
        self.feature_counts = np.zeros(d_sae, dtype=np.int64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """x, x_hat: (rows, d_in); f: (rows, d_sae) final feature activations."""
        if x.shape[0] == 0:
            return
        x, x_hat = x.double(), x_hat.double()
        self.sum_sq_err += float(((x - x_hat) ** 2).sum())
        self.sum_x_sq += float((x**2).sum())
        self.sum_xhat_sq += float((x_hat**2).sum())
        self.sum_dot += float((x * x_hat).sum())
        norm_x, norm_hat = x.norm(dim=-1), x_hat.norm(dim=-1)
        nz = norm_x > 0
        self.sum_l2_ratio += float((norm_hat[nz] / norm_x[nz]).sum())
        self.n_ratio += int(nz.sum())
        active = f != 0
        self.sum_l0 += int(active.sum())
        self.feature_counts += active.sum(0).cpu().numpy().astype(np.int64)
        self._merge_moments(x)

    def _merge_moments(self, x: torch.Tensor) -> None:
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = float(((x - mean_b) ** 2).sum())
        mean_b = mean_b.cpu().numpy()
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + float(delta @ delta) * self.n * n_b / n
        self.mean += delta * n_b / n
        self.n = n

    def result(self) -> ReconstructionMetrics:
        n = max(self.n, 1)
        return ReconstructionMetrics(
            n_rows=self.n,
            mse=self.sum_sq_err / (n * self.d_in),
            sq_err=self.sum_sq_err / n,
            explained_variance=1 - self.sum_sq_err / self.m2 if self.m2 > 0 else math.nan,
            gamma=gamma(self.sum_xhat_sq, self.sum_dot),
            l2_ratio=self.sum_l2_ratio / self.n_ratio if self.n_ratio else math.nan,
            l0=self.sum_l0 / n,
            feature_counts=self.feature_counts.copy(),
        )


class FeatureDensity(NamedTuple):
    """Per-SAE summary of how often features fire over the eval set."""

    n_dead: int
    """Features never active on any evaluated row."""
    n_dense: int
    """Features active on more than `threshold` of rows."""
    frac_alive: float
    log10_edges: list[float]
    """Histogram bin edges over log10(density) of the alive features (values below the first edge go in bin 0)."""
    counts: list[int]
    threshold: float


def feature_density(feature_counts: np.ndarray, n_rows: int, threshold: float = DENSE_THRESHOLD,
                    edges: np.ndarray = DENSITY_EDGES) -> FeatureDensity:
    """Dead/dense counts and the log10 feature-density histogram of alive features."""
    density = feature_counts / max(n_rows, 1)
    alive = density > 0
    logd = np.clip(np.log10(density[alive]), edges[0], edges[-1])
    hist, _ = np.histogram(logd, bins=edges)
    return FeatureDensity(
        n_dead=int((~alive).sum()), n_dense=int((density > threshold).sum()),
        frac_alive=float(alive.mean()) if len(density) else math.nan,
        log10_edges=[float(e) for e in edges], counts=[int(c) for c in hist], threshold=threshold,
    )
