"""Loss scaling (trainer/losses.py `recon_scale`; arXiv 2404.16014 App. D.1.1-D.1.2): hand-computed
values on tiny float64 toys, and the factor the trainer actually applies."""
import math

import pytest
import torch

from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.loop import SweepTrainer
from saeforge.trainer.losses import recon_scale, sae_loss
from saeforge.trainer.normaliser import Normaliser
from saeforge.trainer.sae import BaselineSAE, GatedSAE

F64 = torch.float64
X = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=F64)  # E||x||^2 = (5 + 9) / 2 = 7
LAM = 0.25


@pytest.mark.parametrize("scaling,arch,expected", [
    ("paper", "gated", 1 / 4),  # "divide by n" only (App. D.1.1)
    ("paper", "baseline", 1 / (4 * 7.0)),  # baselines "further divide ... by E||x||^2"
    ("per_dim", "gated", 1 / 4),
    ("per_dim", "baseline", 1 / 4),
    ("sum", "gated", 1.0),
    ("sum", "baseline", 1.0),
])
def test_recon_scale_values(scaling, arch, expected):
    assert recon_scale(scaling, arch, 4, 7.0) == pytest.approx(expected, rel=1e-15)


def hand_baseline() -> BaselineSAE:
    """f = ReLU(x @ diag(0.5, 0.5) + (0, -0.5)), x_hat = f (identity decoder, zero b_dec)."""
    sae = BaselineSAE(2, 2, dtype=F64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5]))
        sae.W_dec.copy_(torch.eye(2))
    return sae


def hand_gated() -> GatedSAE:
    """pi_gate = x + (0.5, -2); pi_mag = exp(r_mag) * x + b_mag with exp(r_mag) = (1, 2), b_mag = (-0.5, 0);
    identity decoder, zero b_dec."""
    sae = GatedSAE(2, 2, dtype=F64)
    with torch.no_grad():
        sae.W_gate.copy_(torch.eye(2))
        sae.b_gate.copy_(torch.tensor([0.5, -2.0]))
        sae.r_mag.copy_(torch.tensor([0.0, math.log(2.0)], dtype=F64))
        sae.b_mag.copy_(torch.tensor([-0.5, 0.0]))
        sae.W_dec.copy_(torch.eye(2))
    return sae


# Baseline on X: row (2, 1): f = (1, 0), x_hat = (1, 0), ||x - x_hat||^2 = 1 + 1 = 2, ||f||_1 = 1;
#                row (0, 3): f = (0, 1), x_hat = (0, 1), ||x - x_hat||^2 = 0 + 4 = 4, ||f||_1 = 1.
BASELINE_SSE, BASELINE_L1 = (2 + 4) / 2, (1 + 1) / 2
# Gated on X: row (2, 1): pi_gate = (2.5, -1), pi_mag = (1.5, 2), f = (1.5, 0), ||x - x_hat||^2 = 0.25 + 1;
#   ReLU(pi_gate) = (2.5, 0): L1 2.5, aux x_hat = (2.5, 0), ||x - aux||^2 = 0.25 + 1.
#             row (0, 3): pi_gate = (0.5, 1), pi_mag = (-0.5, 6), f = (0, 6), ||x - x_hat||^2 = 0 + 9;
#   ReLU(pi_gate) = (0.5, 1): L1 1.5, aux x_hat = (0.5, 1), ||x - aux||^2 = 0.25 + 4.
GATED_SSE, GATED_AUX, GATED_L1 = (1.25 + 9) / 2, (1.25 + 4.25) / 2, (2.5 + 1.5) / 2
GATED_L1_OF_F = (1.5 + 6) / 2  # what an L1 on the final features would give instead


@pytest.mark.parametrize("scaling", ["paper", "per_dim", "sum"])
def test_baseline_loss_terms_by_hand(scaling):
    s = {"paper": 1 / (2 * 7.0), "per_dim": 1 / 2, "sum": 1.0}[scaling]
    assert recon_scale(scaling, "baseline", 2, 7.0) == pytest.approx(s, rel=1e-15)
    out = sae_loss(hand_baseline(), X, LAM, recon_scale=s)
    assert out.l_recon.item() == pytest.approx(s * BASELINE_SSE, rel=1e-14)
    assert out.l_sparsity.item() == pytest.approx(LAM * BASELINE_L1, rel=1e-14)  # never scaled
    assert out.l_aux.item() == 0
    assert out.loss.item() == pytest.approx(s * BASELINE_SSE + LAM * BASELINE_L1, rel=1e-14)


@pytest.mark.parametrize("scaling", ["paper", "per_dim", "sum"])
def test_gated_aux_term_shares_the_reconstruction_scale_and_l1_does_not(scaling):
    s = {"paper": 1 / 2, "per_dim": 1 / 2, "sum": 1.0}[scaling]  # Gated "paper" ignores E||x||^2
    assert recon_scale(scaling, "gated", 2, 7.0) == pytest.approx(s, rel=1e-15)
    out = sae_loss(hand_gated(), X, LAM, recon_scale=s)
    assert out.l_recon.item() == pytest.approx(s * GATED_SSE, rel=1e-14)
    assert out.l_aux.item() == pytest.approx(s * GATED_AUX, rel=1e-14)
    assert out.l_sparsity.item() == pytest.approx(LAM * GATED_L1, rel=1e-14)
    assert out.l_sparsity.item() != pytest.approx(LAM * GATED_L1_OF_F)
    assert out.loss.item() == pytest.approx(s * (GATED_SSE + GATED_AUX) + LAM * GATED_L1, rel=1e-14)


@pytest.mark.parametrize("scaling", ["paper", "per_dim", "sum"])
@pytest.mark.parametrize("mean_sq_norm", [None, 7.0])
def test_sweep_trainer_applies_the_configured_scaling(scaling, mean_sq_norm):
    """The terms `train_step` reports (on the pre-step weights) carry recon_scale(loss_scaling, arch, d_in,
    mean_sq_norm), with E||x||^2 = d_in when `mean_sq_norm` is not given; L_aux the same factor, L1 none."""
    d_in, d_sae, lam = 4, 6, 0.3
    msn = d_in if mean_sq_norm is None else mean_sq_norm
    expected = {"paper": {"gated": 1 / d_in, "baseline": 1 / (d_in * msn)},
                "per_dim": {"gated": 1 / d_in, "baseline": 1 / d_in},
                "sum": {"gated": 1.0, "baseline": 1.0}}[scaling]
    saes = [SAEConfig(arch=a, d_sae=d_sae, l1_coefficient=lam, lr=1e-3, seed=i)
            for i, a in enumerate(["gated", "baseline"])]
    trainer = SweepTrainer(saes, TrainConfig(steps=1, batch_rows=8, lr_warmup_steps=0, loss_scaling=scaling), d_in,
                           normalisers=Normaliser(mean=torch.full((d_in,), 0.2), mean_sq_norm=mean_sq_norm), dtype=F64)
    x = torch.randn(8, d_in, generator=torch.Generator().manual_seed(0), dtype=F64) + 1
    before = [trainer.sae(i) for i in range(2)]
    stats = trainer.train_step(x)
    for i, (cfg, sae) in enumerate(zip(saes, before)):
        s = expected[cfg.arch]
        with torch.no_grad():
            enc = sae.encode_full(x)
            sse = (sae.decode(enc.f) - x).pow(2).sum(-1).mean()
            acts = torch.relu(enc.pi_gate) if cfg.arch == "gated" else enc.f
            aux = (acts @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean() if cfg.arch == "gated" else 0.0
        assert stats.l_recon[i].item() == pytest.approx(s * float(sse), rel=1e-12), cfg.arch
        assert stats.l_aux[i].item() == pytest.approx(s * float(aux), rel=1e-12, abs=0), cfg.arch
        assert stats.l_sparsity[i].item() == pytest.approx(lam * float(acts.sum(-1).mean()), rel=1e-12), cfg.arch
