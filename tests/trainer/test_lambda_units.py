"""`l1_coefficient` is the paper's lambda on RAW activations (arXiv 2404.16014 App. D.1), whatever the store's
normalisation scale s: the loss the trainer optimises on s*x is a constant times the paper's loss on x, for
every SAE, so both have the same minimisers (`trainer/losses.py: l1_training_factor`)."""
import pytest
import torch

from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.loop import SweepTrainer
from saeforge.trainer.losses import recon_scale, sae_loss
from saeforge.trainer.normaliser import Normaliser
from saeforge.trainer.sae import init_sae_, load_into_stack_, make_sae

F64 = torch.float64
D_IN, D_SAE, S = 6, 10, 0.37


def raw_sae(arch: str, seed: int):
    """A raw-scale SAE with unit-norm decoder rows and nonzero biases everywhere."""
    g = torch.Generator().manual_seed(seed)
    sae = make_sae(arch, D_IN, D_SAE, dtype=F64)
    init_sae_(sae, [seed])
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)
    return sae


def training_twin_state(sae, s: float) -> dict:
    """The same SAE acting on s*x (decoder rows still unit norm): every activation and bias times s."""
    return {n: (t * s if n.startswith("b_") else t).clone() for n, t in sae.state_dict().items()}


@pytest.mark.parametrize("arch", ["gated", "baseline"])
@pytest.mark.parametrize("loss_scaling", ["paper", "per_dim", "sum"])
def test_training_loss_is_a_constant_times_the_papers_loss_on_raw_inputs(arch, loss_scaling):
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0), dtype=F64) * 2.5 + 1.0
    msn = float(x.pow(2).sum(-1).mean())
    lam = 0.05
    cfg = SAEConfig(arch=arch, d_sae=D_SAE, l1_coefficient=lam)
    train = TrainConfig(hook="h", loss_scaling=loss_scaling, autocast="none")
    trainer = SweepTrainer([cfg], train, D_IN, normalisers=Normaliser(S, mean_sq_norm=msn), dtype=F64)
    group = trainer.groups[0]
    ratios = []
    for seed in (1, 2):  # the constant must not depend on the SAE
        sae = raw_sae(arch, seed)
        load_into_stack_(group.sae, 0, training_twin_state(sae, S))
        ours = group.loss(x * S, 1.0)  # what the trainer optimises on the normalised inputs
        paper = sae_loss(sae, x, lam, recon_scale=recon_scale(loss_scaling, arch, D_IN, msn))
        assert paper.l_sparsity.item() > 0 and paper.l_recon.item() > 0
        c = ours.loss.item() / paper.loss.item()
        for term in ("l_recon", "l_sparsity", "l_aux"):  # every term scales by the same constant
            torch.testing.assert_close(getattr(ours, term).reshape(()), c * getattr(paper, term), rtol=1e-10, atol=0)
        ratios.append(c)
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-10)
    expected = 1.0 if (arch == "baseline" and loss_scaling == "paper") else S ** 2
    assert ratios[0] == pytest.approx(expected, rel=1e-10)


def test_metrics_report_lambda_in_the_papers_units():
    train = TrainConfig(hook="h", autocast="none", lr_warmup_steps=0, resample_every=0)
    trainer = SweepTrainer([SAEConfig(arch="gated", d_sae=D_SAE, l1_coefficient=0.05)], train, D_IN,
                           normalisers=Normaliser(S), dtype=F64)
    assert trainer.l1_now(0) == 0.05
    assert trainer.groups[0].l1.item() == pytest.approx(0.05 * S)
