"""Acceptance checks of the paper's trainer (arXiv 2404.16014 §2-3, App. D-E), in float64 where the check says so."""
import pytest
import torch
from torch.nn.functional import relu

from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.loop import SweepTrainer
from saeforge.trainer.losses import baseline_loss, gated_loss, sae_loss
from saeforge.trainer.optim import StackAdam, project_decoder_grad_, resample_multiplier
from saeforge.trainer.resample import resample_features_
from saeforge.trainer.sae import (BaselineSAE, GatedSAE, count_parameters, fold_decoder_norms_, init_sae_)

D_IN, D_SAE, ROWS = 6, 10, 32
F64 = torch.float64


def random_gated(seed=0, **kw) -> GatedSAE:
    g = torch.Generator().manual_seed(seed)
    sae = GatedSAE(D_IN, D_SAE, dtype=F64, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)
    return sae


def grads(term, sae) -> dict:
    """d term / d param for every parameter (zeros where autograd finds no path)."""
    params = dict(sae.named_parameters())
    gs = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), gs)}


@pytest.fixture
def x():
    return torch.randn(ROWS, D_IN, generator=torch.Generator().manual_seed(1), dtype=F64)


def test_1_jumprelu_equivalence(x):
    sae = random_gated()
    with torch.no_grad():  # half the thresholds negative, half positive
        sae.b_mag[:5] = -1.0
        sae.b_gate[:5] = 1.0
        sae.b_mag[5:] = 1.0
        sae.b_gate[5:] = -1.0
    theta = sae.b_mag - sae.r_mag.exp() * sae.b_gate
    assert (theta[:5] < 0).all() and (theta[5:] > 0).all()
    z = (x - sae.b_dec) @ (sae.W_gate * sae.r_mag.exp()) + sae.b_mag
    expected = relu(z) * (z > theta)
    f = sae.encode(x)
    near_boundary = ((z - theta).abs() < 1e-9) | (z.abs() < 1e-9)
    assert (f - expected)[~near_boundary].abs().max() < 1e-12
    neg = (theta <= 0).expand_as(z) & ~near_boundary
    assert (f[neg] - relu(z)[neg]).abs().max() < 1e-12
    assert torch.allclose(sae.threshold(), theta)


def test_2_parameter_count():
    M, n = D_SAE, D_IN
    base = count_parameters(BaselineSAE(n, M))
    assert base == 2 * M * n + M + n
    assert count_parameters(GatedSAE(n, M)) == base + 2 * M
    assert count_parameters(GatedSAE(n, M, tie_weights=False)) == base + M * n + M
    assert not hasattr(GatedSAE(n, M), "b_enc")


def test_3_heaviside_is_strict_and_in_model_dtype():
    sae = GatedSAE(D_IN, D_SAE, dtype=F64)
    with torch.no_grad():
        sae.b_dec.fill_(0.3)
        sae.W_gate.normal_()
        sae.b_mag.fill_(1.0)  # magnitude path is positive, so only the gate can switch a feature off
    enc = sae.encode_full(sae.b_dec.detach().expand(4, D_IN))  # x = b_dec: pi_gate == 0 exactly
    assert (enc.pi_gate == 0).all() and (enc.f_mag > 0).all()
    assert (enc.f == 0).all() and enc.f_gate.dtype == F64
    bf = random_gated().to(torch.bfloat16)
    enc = bf.encode_full(torch.randn(4, D_IN, dtype=torch.bfloat16))
    assert enc.f_gate.dtype == torch.bfloat16 and enc.f.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision training step does not error
        out = gated_loss(random_gated().float(), torch.randn(4, D_IN), 0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_4_tying_with_zero_r_mag(x):
    sae = random_gated()
    with torch.no_grad():
        sae.r_mag.zero_()
    enc = sae.encode_full(x)
    assert torch.allclose(enc.pi_mag - enc.pi_gate, (sae.b_mag - sae.b_gate).expand_as(enc.pi_mag), atol=1e-12)


def test_5_aux_sends_no_gradient_to_the_decoder(x):
    sae = random_gated()
    out = gated_loss(sae, x, 0.1)
    g = grads(out.l_aux, sae)
    assert torch.equal(g["W_dec"], torch.zeros_like(g["W_dec"]))
    # b_dec only through the pre-encoder role: -W_gate^T [1[pi_gate>0] * dL_aux/dReLU(pi_gate)], summed over rows
    enc = sae.encode_full(x)
    x_hat_gate = relu(enc.pi_gate) @ sae.W_dec + sae.b_dec
    dl_drelu = 2 * (x_hat_gate - x) @ sae.W_dec.T / ROWS
    expected = -((enc.pi_gate > 0) * dl_drelu) @ sae.W_gate.T
    assert torch.allclose(g["b_dec"], expected.sum(0), atol=1e-12)


def test_6_no_l1_pressure_on_the_magnitude_path_or_decoder(x):
    sae = random_gated()
    out = gated_loss(sae, x, 0.1)
    g_aux, g_sp = grads(out.l_aux, sae), grads(out.l_sparsity, sae)
    for name in ("r_mag", "b_mag"):
        assert not g_aux[name].any() and not g_sp[name].any()
    assert not g_sp["W_dec"].any()
    assert g_sp["W_gate"].any() and g_sp["b_gate"].any()


def test_7_reconstruction_reaches_w_gate_only_through_the_tied_magnitude_path(x):
    sae = random_gated()
    g = grads(gated_loss(sae, x, 0.1).l_recon, sae)
    assert not g["b_gate"].any()
    assert g["W_gate"].abs().sum() > 0
    untied = random_gated(tie_weights=False)
    g = grads(gated_loss(untied, x, 0.1).l_recon, untied)
    assert not g["W_gate"].any() and not g["b_gate"].any() and g["W_mag"].any()


def test_8_loss_value_on_a_hand_set_toy():
    sae = GatedSAE(2, 3, dtype=F64)
    with torch.no_grad():
        sae.W_gate.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]))
        sae.b_gate.copy_(torch.tensor([-0.5, 0.5, 0.25]))
        sae.r_mag.copy_(torch.tensor([0.0, 0.5, -0.5]))
        sae.b_mag.copy_(torch.tensor([0.1, -0.2, 0.3]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([0.1, -0.1]))
    x = torch.tensor([[1.0, 0.5]], dtype=F64)
    lam = 0.7
    xc = x[0] - sae.b_dec.detach()  # [0.9, 0.6]
    x_enc = torch.tensor([0.9, 1.2, -0.9 + 0.6], dtype=F64)
    assert torch.allclose(xc @ sae.W_gate.detach(), x_enc)
    pi_gate = x_enc + torch.tensor([-0.5, 0.5, 0.25], dtype=F64)  # [0.4, 1.7, -0.05]
    pi_mag = torch.exp(torch.tensor([0.0, 0.5, -0.5], dtype=F64)) * x_enc + torch.tensor([0.1, -0.2, 0.3])
    f = (pi_gate > 0) * relu(pi_mag)
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    l_recon = ((f @ W_dec + b_dec - x[0]) ** 2).sum()
    l_sparsity = lam * relu(pi_gate).sum()  # L1 of ReLU(pi_gate), not of f
    l_aux = ((relu(pi_gate) @ W_dec + b_dec - x[0]) ** 2).sum()
    out = gated_loss(sae, x, lam)
    assert torch.allclose(out.l_recon, l_recon) and torch.allclose(out.l_sparsity, l_sparsity)
    assert torch.allclose(out.l_aux, l_aux)
    assert torch.allclose(out.loss, l_recon + l_sparsity + l_aux, atol=1e-14)
    assert not torch.allclose(l_sparsity, lam * f.sum())


def test_9_ablation_switches(x):
    sae = random_gated()
    g = grads(gated_loss(sae, x, 0.1, freeze_aux_decoder=False).l_aux, sae)
    assert g["W_dec"].any()  # check 5 fails as designed when the aux decoder is unfrozen
    untied, base = GatedSAE(D_IN, D_SAE, tie_weights=False), BaselineSAE(D_IN, D_SAE)
    assert count_parameters(untied) == count_parameters(base) + D_SAE * D_IN + D_SAE
    fixed = GatedSAE(D_IN, D_SAE, use_r_mag=False)
    assert "r_mag" not in dict(fixed.named_parameters()) and not fixed.r_mag.any()
    cfg = SAEConfig(arch="gated", d_sae=D_SAE, use_r_mag=False, lr=1e-2)
    trainer = SweepTrainer([cfg], TrainConfig(steps=3, batch_rows=ROWS, lr_warmup_steps=0), D_IN)
    for _ in range(3):
        trainer.train_step(torch.randn(ROWS, D_IN))
    assert not trainer.sae(0).r_mag.any()
    with pytest.raises(ValueError, match="authors warn against"):
        SAEConfig(regime="anthropic", freeze_aux_decoder=True)


def test_10_unit_norm_decoder_after_every_step_and_projected_gradients():
    cfgs = [SAEConfig(arch=a, d_sae=D_SAE, lr=3e-2, seed=i) for i, a in enumerate(["baseline", "gated"])]
    trainer = SweepTrainer(cfgs, TrainConfig(steps=20, batch_rows=ROWS, lr_warmup_steps=0), D_IN)
    for step in range(20):
        trainer.train_step(torch.randn(ROWS, D_IN, generator=torch.Generator().manual_seed(step)) * 3)
        for i in range(2):
            norms = trainer.sae(i).W_dec.norm(dim=1)  # rows of (d_sae, d_in) storage = paper's columns
            assert norms.shape == (D_SAE,) and (norms - 1).abs().max() < 1e-5
    W = torch.nn.Parameter(torch.randn(D_SAE, D_IN))
    W.grad = torch.randn(D_SAE, D_IN)
    project_decoder_grad_(W)
    d_hat = W / W.norm(dim=1, keepdim=True)
    assert ((W.grad * d_hat).sum(1).abs() < 1e-6 * W.grad.norm(dim=1)).all()


def _adam_reference_step(sae, state, t, lr, betas, eps):
    """Parameters after one `torch.optim.Adam`-style step from the grads in `sae` and the moments in `state`."""
    b1, b2 = betas
    new = {}
    for name, p in sae.named_parameters():
        g = p.grad
        m = b1 * state["exp_avg"][name].reshape(g.shape) + (1 - b1) * g
        v = b2 * state["exp_avg_sq"][name].reshape(g.shape) + (1 - b2) * g * g
        new[name] = p.detach() - lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + eps)
    return new


@pytest.mark.parametrize("arch", ["baseline", "gated"])
def test_10_train_step_projects_the_decoder_gradient_before_the_adam_step(arch):
    """SweepTrainer.train_step = projected gradient (g_i -= (g_i . d^_i) d^_i, trainer/optim.py; unit-norm
    decoder of arXiv 2404.16014 §2.2), Adam, renormalise. The reference below does that by hand; without the
    projection the step also moves along each row, and the renormalised rows come out O(lr) away from it, so
    unit norm alone would not see the difference."""
    cfg = SAEConfig(arch=arch, d_sae=D_SAE, l1_coefficient=0.1, lr=1e-2, seed=3)
    train = TrainConfig(steps=4, batch_rows=ROWS, lr_warmup_steps=0, loss_scaling="sum")
    trainer = SweepTrainer([cfg], train, D_IN, dtype=F64)
    for t in range(1, 5):
        x = torch.randn(ROWS, D_IN, generator=torch.Generator().manual_seed(t), dtype=F64) * 2 + 1
        ref, state = trainer.sae(0), trainer.sae_state(0)
        sae_loss(ref, x, cfg.l1_coefficient).loss.backward()
        g, d_hat = ref.W_dec.grad, ref.W_dec.detach() / ref.W_dec.detach().norm(dim=1, keepdim=True)
        parallel = (g * d_hat).sum(1, keepdim=True)
        assert (parallel.abs().squeeze(1) > 0.1 * g.norm(dim=1)).sum() >= D_SAE // 2  # the projection matters
        ref.W_dec.grad = g - parallel * d_hat
        expected = _adam_reference_step(ref, state, t, cfg.lr, train.adam_betas, train.adam_eps)
        expected["W_dec"] = expected["W_dec"] / expected["W_dec"].norm(dim=1, keepdim=True)
        trainer.train_step(x)
        after = trainer.sae_state(0)
        for name, want in expected.items():
            torch.testing.assert_close(after["weights"][name].reshape(want.shape), want, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, name=name, t=t: f"{name} after step {t}: {m}")
        m = after["exp_avg"]["W_dec"]  # beta1 = 0: this step's (projected) gradient, orthogonal to the old rows
        assert ((m * d_hat).sum(1).abs() <= 1e-10 * m.norm(dim=1)).all()


def test_11_optimiser_defaults_and_resample_lr_schedule():
    cfg, sae = TrainConfig(), SAEConfig()
    assert cfg.adam_betas == (0.0, 0.999) and cfg.batch_rows == 4096 and sae.lr == 3e-4
    values = resample_multiplier(torch.tensor([0, 500, 1000, 5000]))
    assert torch.allclose(values, torch.tensor([0.1, 0.55, 1.0, 1.0], dtype=F64))


def _train_toy(sae, loss_fn, trainable, steps=4000, lr=0.05):
    opt = torch.optim.SGD([getattr(sae, n) for n in trainable], lr=lr)
    x = torch.ones(1, 1, dtype=F64)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(sae, x).loss.backward()
        opt.step()
    return sae(x).item()


def test_12_shrinkage_toy():
    base = BaselineSAE(1, 1, dtype=F64)
    with torch.no_grad():
        base.W_dec.fill_(1.0)
        base.W_enc.fill_(0.3)
    x_hat = _train_toy(base, lambda s, x: baseline_loss(s, x, 1.0), ["W_enc", "b_enc"])
    assert abs(x_hat - 0.5) < 1e-3
    gated = GatedSAE(1, 1, dtype=F64)
    with torch.no_grad():
        gated.W_dec.fill_(1.0)
        gated.W_gate.fill_(0.3)
    x_hat = _train_toy(gated, lambda s, x: gated_loss(s, x, 1.0), ["W_gate", "b_gate", "r_mag", "b_mag"])
    assert abs(x_hat - 1.0) < 1e-3


@pytest.mark.parametrize("arch", ["baseline", "gated"])
def test_13_resampling(arch, x):
    sae = (BaselineSAE if arch == "baseline" else GatedSAE)(D_IN, D_SAE, dtype=F64)
    init_sae_(sae, [0])
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    adam = StackAdam(dict(sae.named_parameters()))
    for p in sae.parameters():
        p.grad = torch.randn_like(p)
    adam.step(torch.tensor(1e-3, dtype=F64))
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {(which, n): m.clone() for which, store in (("exp_avg", adam.exp_avg), ("exp_avg_sq", adam.exp_avg_sq))
               for n, m in store.items()}
    assert all(m.all() for m in moments.values())  # every moment non-zero, so a missed reset shows
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    enc = sae.encoder_weights()[0]
    mean_alive = before[enc][:, ~dead].norm(dim=0).mean()
    sq_err = torch.zeros(ROWS, dtype=F64)
    sq_err[5] = 2.0  # every sample must pick row 5 (probability proportional to loss^2)
    res = resample_features_(sae, None, dead, x, sq_err, torch.Generator().manual_seed(0), adam)
    assert res.n_resampled == 3 and (res.rows == 5).all()
    direction = x[5] / x[5].norm()
    assert torch.allclose(sae.W_dec[dead], direction.expand(3, D_IN))
    assert torch.allclose(sae.W_dec[dead].norm(dim=1), torch.ones(3, dtype=F64))
    enc_cols = getattr(sae, enc)[:, dead]
    assert torch.allclose(enc_cols.norm(dim=0), (0.2 * mean_alive).expand(3))
    for name in sae.feature_biases():
        assert not getattr(sae, name)[dead].any()
    per_feature = {"baseline": {"W_dec", "W_enc", "b_enc"},
                   "gated": {"W_dec", "W_gate", "b_gate", "b_mag", "r_mag"}}[arch]
    assert {n for _, n in moments} == per_feature | {"b_dec"}
    for (which, n), old in moments.items():  # both moments of every per-feature parameter are reset
        m = getattr(adam, which)[n]
        if n == "W_dec":  # features are rows
            assert not m[dead].any(), (which, n)
            assert torch.equal(m[~dead], old[~dead]), (which, n)
        elif n == "b_dec":  # not per-feature: untouched
            assert torch.equal(m, old), (which, n)
        else:  # features on the last axis
            assert not m[..., dead].any(), (which, n)
            assert torch.equal(m[..., ~dead], old[..., ~dead]), (which, n)
    for n, p in sae.named_parameters():  # untouched features are bit-identical
        if n == "W_dec":
            assert torch.equal(p[~dead], before[n][~dead])
        elif n == "b_dec":
            assert torch.equal(p, before[n])
        else:
            assert torch.equal(p[..., ~dead], before[n][..., ~dead])


def test_13_resampled_inputs_are_drawn_with_probability_proportional_to_the_loss_squared():
    """Bricken et al.'s resampling (arXiv 2404.16014 App. D.1.1; trainer/resample.py) draws inputs with
    probability proportional to loss^2: an input with twice another's loss is drawn 4x as often (2x would be
    proportional to the loss)."""
    n_dead = 4000  # more dead features than inputs with a loss: draws with replacement, one per feature
    sae = BaselineSAE(2, n_dead, dtype=F64)
    init_sae_(sae, [0])
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    sq_err = torch.tensor([1.5, 3.0, 0.0], dtype=F64)  # row 1: twice row 0's loss; row 2: no loss, never drawn
    res = resample_features_(sae, None, torch.ones(n_dead, dtype=torch.bool), inputs, sq_err,
                             torch.Generator().manual_seed(0))
    counts = torch.bincount(res.rows, minlength=3)
    assert res.n_resampled == n_dead and counts[2] == 0
    share = counts[1].item() / n_dead  # loss^2: 4/5; loss: 2/3; loss^3: 8/9. Binomial sd here: 0.006
    assert abs(share - 0.8) < 0.03, share


@pytest.mark.parametrize("kw", [{}, {"tie_weights": False}])
def test_14_decoder_norm_folding_keeps_forward_and_r_mag(kw, x):
    sae = random_gated(**kw)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1, dtype=F64) * 3 + 0.1)
    y = sae(x)
    r_mag = sae.r_mag.clone() if hasattr(sae, "r_mag") else None
    fold_decoder_norms_(sae)
    assert torch.allclose(sae(x), y, rtol=1e-6, atol=1e-12)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=F64))
    if r_mag is not None:
        assert torch.equal(sae.r_mag, r_mag)
    base = BaselineSAE(D_IN, D_SAE, dtype=F64)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_()
    y = base(x)
    fold_decoder_norms_(base)
    assert torch.allclose(base(x), y, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("stack", [None, 3])
def test_centered_matmul_is_x_minus_b_dec_times_W_in_value_and_gradient(stack):
    from saeforge.trainer.sae import centered_matmul

    g = torch.Generator().manual_seed(0)
    lead = () if stack is None else (stack,)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(*lead, *((1,) if stack else ()), 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(*lead, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    fast, ref = centered_matmul(x, b, W), (x - b) @ W
    assert torch.equal(fast, ref)  # the extra term is an exact zero
    w = torch.randn(fast.shape, generator=g, dtype=torch.float64)
    grads_fast = torch.autograd.grad((fast * w).sum(), [b, W])
    grads_ref = torch.autograd.grad((ref * w).sum(), [b, W])
    for a, r in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
