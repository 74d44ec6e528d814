"""The training loop on plain batch iterators: sweeps equal single runs, resume equality, metrics, configs."""
import math

import pytest
import torch

from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.loop import SweepTrainer, fit

D_IN, ROWS = 8, 64
F64 = torch.float64


def stream(seed=0, n_features=24):
    """Sparse synthetic activations: a few of `n_features` random directions per row; dict batches."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, D_IN, generator=g)
    while True:
        on = torch.rand(ROWS, n_features, generator=g) < 0.1
        yield {"h": (on * torch.rand(ROWS, n_features, generator=g) * 4) @ D + 0.5}


TRAIN = TrainConfig(hook="h", steps=40, batch_rows=ROWS, lr_warmup_steps=5, l1_warmup_steps=5, log_every=10,
                    resample_every=15, dead_window=5, resample_rows=2 * ROWS, resample_until=40)
SAES = [SAEConfig(arch="gated", d_sae=16, l1_coefficient=0.5, lr=1e-2, seed=1),
        SAEConfig(arch="baseline", d_sae=24, l1_coefficient=0.05, lr=1e-2, seed=2),
        SAEConfig(arch="gated", d_sae=16, l1_coefficient=3.0, lr=5e-3, seed=3),
        SAEConfig(arch="gated", d_sae=32, l1_coefficient=1.0, lr=1e-2, seed=4, regime="anthropic")]


def kill_features_(trainer, n=3):
    """Make the first `n` features of every SAE dead (gate/encoder bias far below zero) so resampling runs."""
    with torch.no_grad():
        for g in trainer.groups:
            getattr(g.sae, "b_enc" if g.cfgs[0].arch == "baseline" else "b_gate")[..., :n] = -1e3


def run(saes, train=TRAIN, steps=None, dtype=F64, **kw):
    trainer = SweepTrainer(saes, train, D_IN, dtype=dtype, b_dec=torch.full((D_IN,), 0.5))
    kill_features_(trainer)
    resampled = {}
    fit(trainer, stream(), steps=steps or train.steps, hook="h", on_resample=resampled.update, **kw)
    return trainer, resampled


def test_sweep_of_k_equals_k_separate_runs():
    sweep, resampled = run(SAES)
    assert resampled, "the test must exercise resampling inside the sweep"
    assert len(sweep.groups) == 3  # the two d_sae=16 paper-regime Gated SAEs share one stacked module
    for i, cfg in enumerate(SAES):
        alone, _ = run([cfg])
        for name, t in sweep.sae(i).state_dict().items():
            torch.testing.assert_close(t, alone.sae(0).state_dict()[name], rtol=1e-9, atol=1e-10)


def test_stack_size_bound_splits_stacks_without_changing_results():
    from dataclasses import replace

    saes = [SAEConfig(arch="gated", d_sae=16, l1_coefficient=0.5 * (i + 1), lr=1e-2, seed=i) for i in range(3)]
    base = replace(TRAIN, batch_rows=8192)  # one SAE's (rows, d_sae) fp32 activation: 8192 * 16 * 4 B = 0.5 MiB
    tight = replace(base, stack_mib=1)  # 1 MiB holds two of them
    stacked, _ = run(saes, train=base, steps=20)
    split, _ = run(saes, train=tight, steps=20)
    assert [len(g.indices) for g in stacked.groups] == [3]
    assert [len(g.indices) for g in split.groups] == [2, 1]
    for i in range(3):
        for name, t in stacked.sae(i).state_dict().items():
            torch.testing.assert_close(t, split.sae(i).state_dict()[name], rtol=1e-12, atol=1e-12)


def test_resume_from_saved_state_equals_uninterrupted_run():
    full, _ = run(SAES[:2])
    first, _ = run(SAES[:2], steps=20)
    states = [first.sae_state(i) for i in range(2)]
    resumed = SweepTrainer(SAES[:2], TRAIN, D_IN, dtype=F64, b_dec=torch.full((D_IN,), 0.5))
    for i, state in enumerate(states):
        resumed.load_sae_state(i, state)
    it = stream()
    for _ in range(20 + 2):  # the 20 batches trained on plus the 2 drawn for the resample at step 15
        next(it)
    fit(resumed, it, steps=40, hook="h")
    for i in range(2):
        for name, t in full.sae(i).state_dict().items():
            assert torch.equal(t, resumed.sae(i).state_dict()[name]), name


def test_metrics_and_resample_lr_drop():
    rows = []
    trainer, resampled = run(SAES[:1], on_log=rows.extend)
    keys = {"step", "loss", "l_recon", "l_sparsity", "l_aux", "l0", "mse", "explained_variance", "gamma",
            "dead_fraction", "lr", "l1_coefficient", "data_wait_fraction", "steps_per_s"}
    assert len(rows) == 4 and keys <= set(rows[0])
    assert all(math.isfinite(r["loss"]) and r["l0"] >= 0 for r in rows)
    assert rows[-1]["explained_variance"] > rows[0]["explained_variance"]
    assert resampled == {0: 3}  # the three killed features, once (at step 15; they fire again afterwards)
    assert rows[1]["lr"] == pytest.approx(SAES[0].lr * 0.1 + SAES[0].lr * 0.9 * (1 - math.cos(math.pi * 5 / 1000)) / 2)


def test_anthropic_regime_leaves_decoder_unconstrained():
    trainer, _ = run(SAES[3:], steps=10)
    norms = trainer.sae(0).W_dec.norm(dim=1)
    assert (norms - 1).abs().max() > 1e-4


def test_bf16_autocast_trains():
    train = TrainConfig(hook="h", steps=5, batch_rows=ROWS, autocast="bf16", lr_warmup_steps=0, log_every=5)
    rows = []
    run(SAES[:2], train=train, dtype=torch.float32, on_log=rows.extend)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_config_errors_name_every_bad_field():
    with pytest.raises(ValueError, match=r"d_sae.*l1_coefficient.*lr"):
        SAEConfig(d_sae=0, l1_coefficient=-1.0, lr=5.0)
    with pytest.raises(ValueError, match=r"steps.*batch_rows"):
        TrainConfig(steps=0, batch_rows=-3)
    with pytest.raises(ValueError, match="apply to arch .gated. only"):
        SAEConfig(arch="baseline", tie_weights=False)
