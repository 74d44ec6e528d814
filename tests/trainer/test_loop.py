"""The training loop on plain batch iterators: sweeps equal single runs, resume equality, metrics, configs."""
import math

import pytest
import torch

from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.fit import FitEvents, fit
from saeforge.trainer.loop import SweepTrainer
from saeforge.trainer.normaliser import Normaliser

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


MEAN = Normaliser(mean=torch.full((D_IN,), 0.5))  # b_dec starts at 0.5, inputs unscaled


class Recorder(FitEvents):
    """Keeps what `fit` reports: metrics rows, {SAE index: features resampled}, the checkpoint steps."""

    def __init__(self, trainer=None):
        self.rows, self.resampled, self.checkpoints, self.trainer = [], {}, [], trainer

    def on_checkpoint(self):
        self.checkpoints.append(self.trainer.step if self.trainer else None)

    def on_log(self, rows):
        self.rows.extend(rows)

    def on_resample(self, done):
        self.resampled.update(done)


def run(saes, train=TRAIN, steps=None, dtype=F64, events=None):
    trainer = SweepTrainer(saes, train, D_IN, dtype=dtype, normalisers=MEAN)
    kill_features_(trainer)
    events = events or Recorder()
    fit(trainer, map(trainer.prepare, stream()), steps=steps or train.steps, events=events)
    return trainer, events.resampled


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
    resumed = SweepTrainer(SAES[:2], TRAIN, D_IN, dtype=F64, normalisers=MEAN)
    for i, state in enumerate(states):
        resumed.load_sae_state(i, state)
    it = stream()
    for _ in range(20 + 2):  # the 20 batches trained on plus the 2 drawn for the resample at step 15
        next(it)
    fit(resumed, map(resumed.prepare, it), steps=40)
    for i in range(2):
        for name, t in full.sae(i).state_dict().items():
            assert torch.equal(t, resumed.sae(i).state_dict()[name]), name


def recording(trainer, batches, drawn: dict):
    """Yield `batches`, keeping {trainer.step: (x, copy of SAE 0)} as each is drawn. `fit` draws a step's
    training batch last at that step (resampling batches come right after the step before), so each entry
    ends as the batch step s trained on and the weights it saw."""
    for b in batches:
        drawn[trainer.step] = (b["h"], trainer.sae(0))
        yield b


def test_metrics_and_resample_lr_drop():
    drawn = {}
    trainer = SweepTrainer(SAES[:1], TRAIN, D_IN, dtype=F64, normalisers=MEAN)
    events = Recorder(trainer)
    kill_features_(trainer)
    fit(trainer, map(trainer.prepare, recording(trainer, stream(), drawn)), steps=TRAIN.steps, events=events)
    rows, resampled = events.rows, events.resampled
    keys = {"step", "loss", "l_recon", "l_sparsity", "l_aux", "l0", "mse", "explained_variance_window", "gamma",
            "dead_fraction", "lr", "l1_coefficient", "data_wait_fraction", "steps_per_s"}
    assert len(rows) == 4 and keys <= set(rows[0])
    for r in rows:  # each window's metrics equal direct computations from the weights every step saw
        window = [drawn[s] for s in range(r["step"] - TRAIN.log_every, r["step"])]
        with torch.no_grad():
            f = [sae.encode(x) for x, sae in window]
            x_hat = [sae.decode(fs) for fs, (_, sae) in zip(f, window)]
        xs = [x for x, _ in window]
        l0 = sum((fs > 0).sum(-1).double().mean() for fs in f) / len(f)
        sse = sum((xh - x).pow(2).sum() for xh, x in zip(x_hat, xs))
        gamma = sum(xh.pow(2).sum() for xh in x_hat) / sum((xh * x).sum() for xh, x in zip(x_hat, xs))
        assert 0 < l0 < SAES[0].d_sae
        assert r["l0"] == pytest.approx(l0.item(), rel=1e-12)
        assert r["mse"] == pytest.approx(sse.item() / (len(xs) * ROWS * D_IN), rel=1e-9)
        assert r["gamma"] == pytest.approx(gamma.item(), rel=1e-6)  # the loop sums x_hat in float32
    assert rows[-1]["explained_variance_window"] > rows[0]["explained_variance_window"]
    assert events.checkpoints == [TRAIN.steps]  # checkpoint_every 5000: only the last step
    assert resampled == {0: 3}  # the three killed features, once (at step 15; they fire again afterwards)
    assert rows[1]["lr"] == pytest.approx(SAES[0].lr * 0.1 + SAES[0].lr * 0.9 * (1 - math.cos(math.pi * 5 / 1000)) / 2)


def test_resample_in_a_sweep_zeroes_every_moment_of_the_resampled_features_only():
    """SweepTrainer.resample (arXiv 2404.16014 App. D.1.1, trainer/resample.py): both Adam moments of every per-feature parameter (decoder row,
    encoder columns, b_enc / b_gate / b_mag / r_mag) are zero for the resampled features; every other moment,
    weight and SAE of the stack is bit-identical."""
    saes = [SAEConfig(arch="gated", d_sae=16, l1_coefficient=0.5, lr=1e-2, seed=1),
            SAEConfig(arch="gated", d_sae=16, l1_coefficient=0.5, lr=1e-2, seed=3),  # same stack as SAE 0
            SAEConfig(arch="baseline", d_sae=16, l1_coefficient=0.05, lr=1e-2, seed=2),
            SAEConfig(arch="gated", d_sae=16, l1_coefficient=0.5, lr=1e-2, seed=4, tie_weights=False)]
    trainer = SweepTrainer(saes, TRAIN, D_IN, dtype=F64, normalisers=MEAN)
    it = (b["h"].to(F64) for b in stream())
    for _ in range(6):
        trainer.train_step(next(it))
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    for i in range(len(saes)):  # mark features 2, 5, 11 dead in every SAE but SAE 1, nothing else
        state = trainer.sae_state(i)
        state["steps_since_fired"].zero_()
        if i != 1:
            state["steps_since_fired"][[2, 5, 11]] = TRAIN.dead_steps
        trainer.load_sae_state(i, state)
    before = [trainer.sae_state(i) for i in range(len(saes))]
    assert trainer.resample([next(it), next(it)]) == {0: 3, 2: 3, 3: 3}
    for i, old in enumerate(before):
        new = trainer.sae_state(i)
        if i == 1:
            for part in ("weights", "exp_avg", "exp_avg_sq"):
                assert all(torch.equal(t, new[part][n]) for n, t in old[part].items()), part
            continue
        names = set(old["exp_avg"])
        assert names == ({"W_dec", "b_dec", "W_enc", "b_enc"} if i == 2 else
                         {"W_dec", "b_dec", "W_gate", "b_gate", "b_mag"} | ({"r_mag"} if i == 0 else {"W_mag"}))
        for part in ("weights", "exp_avg", "exp_avg_sq"):
            for n in names:
                o, m = old[part][n], new[part][n]
                if n == "b_dec":
                    assert torch.equal(m, o), (i, part, n)
                    continue
                # features first: W_dec's rows, the last axis of the encoder matrices and per-feature vectors
                o, m = (o, m) if n == "W_dec" else (o.movedim(-1, 0), m.movedim(-1, 0))
                assert torch.equal(m[~dead], o[~dead]), (i, part, n)
                if part == "exp_avg_sq":  # every resampled feature had trained moments, so a skipped reset shows
                    assert o[dead].flatten(1).any(1).all(), (i, n)
                if part != "weights":
                    assert not m[dead].any(), (i, part, n)


def test_anthropic_regime_leaves_decoder_unconstrained():
    trainer, _ = run(SAES[3:], steps=10)
    norms = trainer.sae(0).W_dec.norm(dim=1)
    assert (norms - 1).abs().max() > 1e-4


def test_bf16_autocast_trains_like_fp32():
    rows = {}
    for autocast in ("bf16", "none"):
        train = TrainConfig(hook="h", steps=5, batch_rows=ROWS, autocast=autocast, lr_warmup_steps=0, log_every=5)
        rows[autocast] = Recorder()
        run(SAES[:2], train=train, dtype=torch.float32, events=rows[autocast])
        rows[autocast] = rows[autocast].rows
    assert len(rows["bf16"]) == len(rows["none"]) == 2
    for bf, fp in zip(rows["bf16"], rows["none"]):
        assert bf["loss"] != fp["loss"]  # bf16 did run ...
        for key in ("loss", "mse", "l0"):  # ... and trains the same SAEs to within its precision
            assert bf[key] == pytest.approx(fp[key], rel=0.02), key


def test_config_errors_name_every_bad_field():
    with pytest.raises(ValueError, match=r"d_sae.*l1_coefficient.*lr"):
        SAEConfig(d_sae=0, l1_coefficient=-1.0, lr=5.0)
    with pytest.raises(ValueError, match=r"steps.*batch_rows"):
        TrainConfig(steps=0, batch_rows=-3)
    with pytest.raises(ValueError, match="apply to arch .gated. only"):
        SAEConfig(arch="baseline", tie_weights=False)
