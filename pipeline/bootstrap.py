"""Paired bootstrap 95% intervals over held-out windows for loss recovered (arXiv 2404.16014 eq. 5) and ΔCE.

The clean, ablated and spliced cross-entropies of one evaluation come from the SAME windows, so they are
resampled together: one (n_resamples, n_windows) matrix of window indices drawn with replacement, the same
rows for every CE. Each resample recomputes the statistic as a ratio of means over its windows (never a mean
of per-window ratios), exactly as the point estimate is computed over all windows:

    loss recovered_b = sum_w c_bw (CE_abl,w - CE_sae,w) / sum_w c_bw (CE_abl,w - CE_clean,w)
    ΔCE_b            = sum_w c_bw (CE_sae,w - CE_clean,w) / sum_w c_bw n_w

where c_bw counts how often window w is drawn in resample b, CE_x,w is the SUM of next-token CE over the
scored predictions of window w and n_w their number. The interval is the 2.5th and 97.5th percentile of the
resampled values (numpy's default linear interpolation). Paired differences are resampled (not each CE on its
own), so identical spliced and clean CEs give exactly [1, 1].
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

N_RESAMPLES = 1000
"""Bootstrap resamples per interval (eval.json records the number used)."""

SEED = 0
"""Seed of the resample indices: a rerun on the same windows gives the same interval."""

BLOCK = 256
"""Resamples drawn and reduced per step, bounding memory to BLOCK x n_windows counts."""

PERCENTILES = (2.5, 97.5)


def resample_indices(n_windows: int, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                     block: int = BLOCK) -> Iterator[np.ndarray]:
    """Blocks of resamples, each (<= block, n_windows) int64: one resample's window indices, drawn with
    replacement, per line.

    The concatenated blocks ARE the index matrix; they depend only on (n_windows, n_resamples, seed, block).
    """
    if n_windows < 1 or n_resamples < 1:
        raise ValueError(f"bootstrap needs n_windows >= 1 and n_resamples >= 1, got {n_windows}, {n_resamples}")
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, block):
        yield rng.integers(0, n_windows, size=(min(block, n_resamples - start), n_windows))


def _counts(idx: np.ndarray, n_windows: int) -> np.ndarray:
    """(b, n_windows) window indices of b resamples -> (b, n_windows) float64 counts of each window per resample."""
    b = idx.shape[0]
    flat = (idx + n_windows * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n_windows).reshape(b, n_windows).astype(np.float64)


def resampled_sums(per_window: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(k, n_windows) per-window values -> (n_resamples, k) their sums over each resample's windows.

    Each of the k series is reduced on its own (a matrix-vector product), so two identical series give
    bit-identical resampled sums.
    """
    per_window = np.asarray(per_window, dtype=np.float64)
    k, n_windows = per_window.shape
    out = np.empty((n_resamples, k))
    start = 0
    for idx in resample_indices(n_windows, n_resamples, seed):
        counts = _counts(idx, n_windows)
        for j in range(k):
            out[start:start + len(idx), j] = counts @ per_window[j]
        start += len(idx)
    return out


def percentile_ci(values: np.ndarray) -> list[float] | None:
    """[2.5th, 97.5th] percentile of resampled values; None when any resample is not finite
    (e.g. an ablation that changes nothing on some resample makes eq. 5 undefined)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        return None
    lo, hi = np.percentile(values, PERCENTILES)
    return [float(lo), float(hi)]


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float] | None:
    with np.errstate(divide="ignore", invalid="ignore"):
        return percentile_ci(num / den)


def splice_intervals(clean: np.ndarray, spliced: np.ndarray, n_scored: np.ndarray, *, zero: np.ndarray | None,
                     mean: np.ndarray | None = None, n_resamples: int = N_RESAMPLES,
                     seed: int = SEED) -> dict[str, list[float] | None]:
    """Paired bootstrap 95% intervals of one SAE's splice, from per-window CE sums (each (n_windows,)).

    Returns `loss_recovered_ci95` (zero ablation, eq. 5), `loss_recovered_mean_ci95` (mean ablation) and
    `delta_ce_ci95` (CE_sae - CE_clean, nats per scored prediction); an interval is None when its ablation
    CEs are missing or a resample leaves it undefined. Every statistic uses the same resamples.
    """
    clean, spliced = np.asarray(clean, np.float64), np.asarray(spliced, np.float64)
    series = {"dce": spliced - clean, "n": np.asarray(n_scored, np.float64)}
    for name, ablated in (("zero", zero), ("mean", mean)):
        if ablated is not None:
            ablated = np.asarray(ablated, np.float64)
            series[f"{name}_num"], series[f"{name}_den"] = ablated - spliced, ablated - clean
    sums = dict(zip(series, resampled_sums(np.stack(list(series.values())), n_resamples, seed).T))
    out = {"loss_recovered_ci95": None, "loss_recovered_mean_ci95": None,
           "delta_ce_ci95": _ratio(sums["dce"], sums["n"])}
    for name, key in (("zero", "loss_recovered_ci95"), ("mean", "loss_recovered_mean_ci95")):
        if f"{name}_num" in sums:
            out[key] = _ratio(sums[f"{name}_num"], sums[f"{name}_den"])
    return out
