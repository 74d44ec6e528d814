"""The paper's end-to-end claims (arXiv 2404.16014 §4.1 Pareto, §4.2 Eq. 10 shrinkage) on a synthetic
problem with a known answer: inputs are sparse non-negative combinations of a planted unit-norm dictionary.
One seeded sweep trains Gated and baseline SAEs with the repository's own `SweepTrainer` + `fit` on the CPU
(a few seconds); the tests read its held-out metrics."""
import pytest
import torch

from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.fit import fit
from saeforge.trainer.loop import SweepTrainer
from saeforge.trainer.normaliser import Normaliser

D_IN, N_ATOMS, ACTIVE, ROWS, STEPS = 16, 32, 3, 256, 400
GATED_L1 = (0.03, 0.06, 0.1)
BASELINE_L1 = (0.001, 0.002, 0.003, 0.005, 0.01)  # the baseline's "paper" loss also divides by E||x||^2 (~7 here)


def planted_batches(seed: int):
    """Batches of rows x = sum of ACTIVE distinct atoms (of N_ATOMS unit-norm ones) with magnitudes in [1, 2]:
    every true feature is either off or well away from 0, so an SAE without shrinkage has gamma = 1."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(N_ATOMS, D_IN, generator=g, dtype=torch.float64)
    atoms /= atoms.norm(dim=1, keepdim=True)

    def batch(n: int) -> torch.Tensor:
        which = torch.rand(n, N_ATOMS, generator=g).argsort(dim=1)[:, :ACTIVE]
        mags = 1 + torch.rand(n, ACTIVE, generator=g, dtype=torch.float64)
        return torch.zeros(n, N_ATOMS, dtype=torch.float64).scatter_(1, which, mags) @ atoms
    return batch


def held_out_metrics(sae, x: torch.Tensor) -> dict:
    """gamma (Eq. 10, a ratio of means over the set), explained variance and L0 of the final features."""
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    return {"gamma": float(x_hat.pow(2).sum(-1).mean() / (x_hat * x).sum(-1).mean()),
            "ev": float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
            "l0": float((f > 0).sum(-1).double().mean())}


@pytest.fixture(scope="module")
def trained() -> dict:
    """{(arch, lambda): held-out metrics} after STEPS steps of one sweep (about 2-3 s on one CPU thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = planted_batches(seed=0)
        x_eval = batch(2048)
        saes = [SAEConfig(arch="gated", d_sae=64, l1_coefficient=lam, lr=1e-2, seed=1) for lam in GATED_L1]
        saes += [SAEConfig(arch="baseline", d_sae=64, l1_coefficient=lam, lr=1e-2, seed=1) for lam in BASELINE_L1]
        train = TrainConfig(steps=STEPS, batch_rows=ROWS, lr_warmup_steps=20, resample_every=0, log_every=STEPS)
        norm = Normaliser(mean_sq_norm=float(x_eval.pow(2).sum(-1).mean()))
        trainer = SweepTrainer(saes, train, D_IN, normalisers=norm, dtype=torch.float32)
        fit(trainer, (trainer.prepare(batch(ROWS)) for _ in range(STEPS)), steps=STEPS)
        return {(c.arch, c.l1_coefficient): held_out_metrics(trainer.sae(i).double(), x_eval)
                for i, c in enumerate(saes)}
    finally:
        torch.set_num_threads(threads)


def test_gated_sae_has_no_shrinkage(trained):
    """The magnitude path carries no L1 penalty, so gamma = E||x_hat||^2 / E[x_hat . x] is ~1."""
    for lam in GATED_L1:
        m = trained["gated", lam]
        assert m["ev"] > 0.8 and 0.97 <= m["gamma"] <= 1.03, (lam, m)


def test_baseline_sae_shrinks_and_shrinks_more_at_higher_lambda(trained):
    """The L1 on f shrinks the baseline's reconstructions (gamma < 1), more so as lambda grows."""
    gammas = [trained["baseline", lam]["gamma"] for lam in BASELINE_L1]
    assert all(g < 0.97 for g in gammas), gammas
    assert all(a > b + 0.02 for a, b in zip(gammas, gammas[1:])), gammas


def test_gated_needs_fewer_features_at_matched_reconstruction(trained):
    """Every Gated point lies beyond the baseline frontier: at the same explained variance (linear
    interpolation between baseline points) the Gated L0 is clearly lower. The planted L0 is 3."""
    frontier = sorted((m["ev"], m["l0"]) for (arch, _), m in trained.items() if arch == "baseline")
    compared = 0
    for lam in GATED_L1:
        ev, l0 = trained["gated", lam]["ev"], trained["gated", lam]["l0"]
        for (ev_a, l0_a), (ev_b, l0_b) in zip(frontier, frontier[1:]):
            if ev_a <= ev <= ev_b:
                baseline_l0 = l0_a + (l0_b - l0_a) * (ev - ev_a) / (ev_b - ev_a)
                assert l0 < 0.8 * baseline_l0, (lam, ev, l0, baseline_l0)
                compared += 1
    assert compared == len(GATED_L1), (frontier, trained)
