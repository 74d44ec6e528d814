"""Metric functions against hand-computed values and direct computations (arXiv 2404.16014 §2.3 eq. 5, §4.2 eq. 10)."""
import math

import numpy as np
import pytest
import torch

from saeforge.pipeline import metrics as M


def _acc(x, x_hat, f=None, batches=1):
    f = torch.ones(x.shape[0], 3) if f is None else f
    acc = M.ReconstructionAccumulator(x.shape[1], f.shape[1])
    for xs, hs, fs in zip(x.chunk(batches), x_hat.chunk(batches), f.chunk(batches)):
        acc.update(xs, hs, fs)
    return acc.result()


def test_loss_recovered_reproduces_paper_table():
    # Gemma-7B resid L20, Gated lambda=7e-4 (Tables): 97.70%.
    assert M.loss_recovered(2.5426, 2.9353, 19.5891) == pytest.approx(0.97696, abs=5e-6)


def test_loss_recovered_endpoints_exact():
    assert M.loss_recovered(2.5, 2.5, 7.0) == 1.0
    assert M.loss_recovered(2.5, 7.0, 7.0) == 0.0
    assert math.isnan(M.loss_recovered(2.5, 3.0, 2.5))
    assert M.delta_ce(2.5, 2.75) == 0.25


def _gamma_v1(sum_xhat_sq, sum_x_sq, sum_sq_err):
    """A v1-style form (wrong): gives 1/sqrt(3) for x=1, x_hat=1/2, as Sam Marks reported."""
    return math.sqrt(sum_xhat_sq / (sum_x_sq - sum_sq_err))


def test_gamma_one_dimensional_shrinkage_case_is_one_half():
    x = torch.ones(1, 1, dtype=torch.float64)
    r = _acc(x, 0.5 * x)
    assert r.gamma == 0.5
    assert _gamma_v1(0.25, 1.0, 0.25) == pytest.approx(1 / math.sqrt(3))
    assert r.gamma != pytest.approx(1 / math.sqrt(3), abs=1e-3)


@pytest.mark.parametrize("c", [0.25, 0.8, 1.0, 1.7])
def test_gamma_equals_scale_and_both_forms_agree(c):
    torch.manual_seed(0)
    x = torch.randn(500, 16, dtype=torch.float64) + 3.0
    r = _acc(x, c * x, batches=7)
    assert r.gamma == pytest.approx(c, abs=1e-12)
    noisy = c * x + 0.3 * torch.randn_like(x)
    acc = M.ReconstructionAccumulator(16, 3)
    for xs, hs in zip(x.chunk(5), noisy.chunk(5)):
        acc.update(xs, hs, torch.ones(len(xs), 3))
    g1 = M.gamma(acc.sum_xhat_sq, acc.sum_dot)
    g2 = M.gamma_from_norms(acc.sum_xhat_sq, acc.sum_x_sq, acc.sum_sq_err)
    assert abs(g1 - g2) < 1e-10


def test_gamma_is_ratio_of_dataset_means_not_mean_of_ratios():
    x = torch.tensor([[1.0], [10.0]], dtype=torch.float64)
    x_hat = torch.tensor([[0.5], [10.0]], dtype=torch.float64)
    r = _acc(x, x_hat, batches=2)
    assert r.gamma == pytest.approx((0.25 + 100) / (0.5 + 100), abs=1e-15)
    assert r.gamma != pytest.approx((0.5 + 1.0) / 2)


def test_explained_variance_relative_to_mean():
    torch.manual_seed(1)
    x = torch.randn(400, 8, dtype=torch.float64) * 2 + 50.0  # large mean: EV relative to zero would be ~1
    r_mean = _acc(x, x.mean(0, keepdim=True).expand_as(x), batches=9)
    assert abs(r_mean.explained_variance) < 1e-10
    assert _acc(x, x.clone(), batches=3).explained_variance == 1.0
    noisy = x + 0.5 * torch.randn_like(x)
    direct = 1 - ((x - noisy) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert _acc(x, noisy, batches=4).explained_variance == pytest.approx(float(direct), abs=1e-12)


def test_mse_l2_ratio_and_l0_match_direct_computation():
    torch.manual_seed(2)
    x = torch.randn(64, 5, dtype=torch.float64)
    x_hat = x + 0.1 * torch.randn_like(x)
    f = torch.relu(torch.randn(64, 12))
    r = _acc(x, x_hat, f, batches=4)
    assert r.mse == pytest.approx(float(((x - x_hat) ** 2).mean()), rel=1e-12)
    assert r.sq_err == pytest.approx(float(((x - x_hat) ** 2).sum(-1).mean()), rel=1e-12)
    assert r.l2_ratio == pytest.approx(float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()), rel=1e-12)
    assert r.l0 == pytest.approx(float((f > 0).sum(-1).double().mean()))
    assert (r.feature_counts == (f > 0).sum(0).numpy()).all()


def test_kl_zero_for_identical_logits_and_matches_direct():
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 11)
    scored = torch.ones(2, 5, dtype=torch.bool)
    ref = M.log_probs(logits)
    assert M.kl_sum(ref, logits.clone(), scored) == 0.0
    other = logits + torch.randn_like(logits)
    p, q = torch.softmax(logits[:, :-1].double(), -1), torch.softmax(other[:, :-1].double(), -1)
    direct = float((p * (p.log() - q.log())).sum())
    assert M.kl_sum(ref, other, scored) == pytest.approx(direct, rel=1e-5)


def test_next_token_ce_respects_scored_mask():
    torch.manual_seed(4)
    logits = torch.randn(1, 4, 7)
    tokens = torch.tensor([[1, 2, 3, 4]])
    scored = torch.tensor([[True, False, True]])
    logp = torch.log_softmax(logits.double(), -1)
    want = -(logp[0, 0, 2] + logp[0, 2, 4])
    assert M.next_token_ce_sum(logits, tokens, scored) == pytest.approx(float(want), rel=1e-6)


def test_feature_density_dead_dense_and_histogram():
    counts = np.array([0, 0, 1, 50, 500, 1000])
    d = M.feature_density(counts, n_rows=1000)
    assert d.n_dead == 2 and d.n_dense == 2 and d.frac_alive == pytest.approx(4 / 6)
    assert len(d.counts) == len(d.log10_edges) - 1 == 32
    # densities 1e-3, 0.05, 0.5, 1.0 -> log10 -3 (a left edge), -1.30, -0.30, 0 (the last edge: last bin)
    assert [i for i, c in enumerate(d.counts) if c] == [20, 26, 30, 31] and sum(d.counts) == 4
    rare = M.feature_density(np.array([1, 0]), n_rows=10**9)  # density 1e-9: below the first edge, in bin 0
    assert rare.counts[0] == 1 and sum(rare.counts) == 1 and rare.n_dead == 1 and rare.n_dense == 0
