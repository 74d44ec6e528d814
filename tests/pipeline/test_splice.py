"""Splicing engine on the tiny Llama bridge: exact invariants (arXiv 2404.16014 eq. 5: identity splice 1, zeros 0),
mean ablation with a nonzero mean, per-window CE sums, and shared prefix == full forwards.

Run directories, eval.json and the CLI are tests/pipeline/test_evaluate.py.
"""
import numpy as np
import pytest
import torch

from saeforge.pipeline import metrics as M
from saeforge.pipeline.errors import EvalError
from saeforge.pipeline.splice import evaluate_hooks, plan_splice, skip_blocks


class Identity(torch.nn.Module):
    def encode(self, x):
        return x

    def decode(self, f):
        return f


class Zeros(torch.nn.Module):
    def encode(self, x):
        return torch.zeros(x.shape[0], 8, dtype=x.dtype)

    def decode(self, f):
        return torch.zeros(f.shape[0], 64, dtype=f.dtype)


class ReluSAE(torch.nn.Module):
    """A random baseline-style SAE (original scale), enough to move CE, KL, L0 and gamma off their ends."""

    def __init__(self, d_in, d_sae, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        self.W_dec = torch.nn.Parameter(self.W_enc.detach().T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec


def _batches(n=2, batch=2, pos=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(4, 300, (batch, pos), generator=g)
        tokens[:, 0] = 1  # BOS
        kept = torch.ones(batch, pos, dtype=torch.bool)
        kept[:, 0] = False
        out.append((tokens, kept))
    return out


def _clean_ce(bridge, batches):
    total = n = 0
    with torch.inference_mode():
        for tokens, _ in batches:
            scored = torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
            total += M.next_token_ce_sum(bridge(tokens), tokens, scored)
            n += int(scored.sum())
    return total / n


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post"])
def test_identity_recovers_exactly_one_zeros_exactly_zero(tiny_bridge, hook):
    batches = _batches()
    res = evaluate_hooks(tiny_bridge, batches, {hook: [Identity(), Zeros()]},
                         means={hook: torch.zeros(64)}, strategy="shared_prefix")[hook]
    abl, (ident, zeros) = res.ablation, res.saes
    assert abl.clean == _clean_ce(tiny_bridge, batches)  # bit-identical to the unhooked model
    assert M.loss_recovered(abl.clean, ident.ce, abl.zero) == 1.0
    assert M.loss_recovered(abl.clean, zeros.ce, abl.zero) == 0.0
    assert ident.kl == 0.0 and zeros.kl > 0
    assert abl.mean == abl.zero  # mean ablation with a zero mean is zero ablation
    assert ident.recon.explained_variance == 1.0 and ident.recon.gamma == 1.0
    assert res.n_spliced == sum(int(k.sum()) for _, k in batches)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out",
                                  "blocks.2.hook_resid_post"])
def test_shared_prefix_matches_one_full_forward_per_sae(tiny_bridge, hook):
    batches = _batches(seed=1)
    saes = [ReluSAE(64, 96, s) for s in range(3)]
    mean = torch.randn(64, generator=torch.Generator().manual_seed(5))
    kw = dict(means={hook: mean})
    shared = evaluate_hooks(tiny_bridge, batches, {hook: saes}, strategy="shared_prefix", **kw)[hook]
    full = evaluate_hooks(tiny_bridge, batches, {hook: saes}, strategy="full", **kw)[hook]
    assert full.strategy == "full" and shared.strategy == "shared_prefix"
    for a, b in zip(shared.ablation, full.ablation):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    for s, f in zip(shared.saes, full.saes):
        assert s.ce == pytest.approx(f.ce, rel=1e-6) and s.kl == pytest.approx(f.kl, rel=1e-4, abs=1e-8)
        assert s.recon.l0 == f.recon.l0 and s.recon.gamma == pytest.approx(f.recon.gamma, rel=1e-9)
    assert len({s.ce for s in shared.saes}) == 3 and all(s.kl > 0 for s in shared.saes)


def test_several_hooks_share_one_prefix_and_auto_self_check(tiny_bridge):
    batches = _batches(seed=2)
    hooks = {"blocks.0.hook_resid_post": [ReluSAE(64, 32, 0)], "blocks.1.attn.hook_z": [Identity()]}
    res = evaluate_hooks(tiny_bridge, batches, hooks, strategy="auto")
    assert {r.strategy for r in res.values()} == {"shared_prefix"}
    z = res["blocks.1.attn.hook_z"]
    assert M.loss_recovered(z.ablation.clean, z.saes[0].ce, z.ablation.zero) == 1.0


def test_unkept_positions_keep_the_clean_activation(tiny_bridge):
    batches = [(t, torch.zeros_like(k)) for t, k in _batches(seed=3)]
    hook = "blocks.1.hook_resid_post"
    res = evaluate_hooks(tiny_bridge, batches, {hook: [Zeros()]}, strategy="shared_prefix")[hook]
    assert res.saes[0].ce == res.ablation.clean == res.ablation.zero and res.n_spliced == 0


def test_known_ablations_are_reused_not_recomputed(tiny_bridge):
    hook = "blocks.1.hook_resid_post"
    batches = _batches(seed=4)
    first = evaluate_hooks(tiny_bridge, batches, {hook: [Zeros()]}, strategy="shared_prefix")[hook]
    fake = first.ablation._replace(zero=123.0)
    again = evaluate_hooks(tiny_bridge, batches, {hook: [Zeros()]}, known={hook: fake})[hook]
    assert again.ablation.zero == 123.0 and again.ablation.clean == first.ablation.clean


def test_pad_targets_are_not_scored(tiny_bridge):
    hook = "blocks.0.hook_resid_post"
    tokens, kept = _batches(n=1, seed=5)[0]
    tokens[:, -3:] = 3
    res = evaluate_hooks(tiny_bridge, [(tokens, kept)], {hook: [Identity()]}, pad_id=3)[hook]
    assert res.ablation.n_scored == tokens.shape[0] * (tokens.shape[1] - 1 - 3)


def test_bad_hook_and_blocks_restored(tiny_bridge):
    with pytest.raises(EvalError, match="blocks.9.hook_resid_post"):
        evaluate_hooks(tiny_bridge, _batches(n=1), {"blocks.9.hook_resid_post": [Identity()]})
    with pytest.raises(RuntimeError):
        with skip_blocks(tiny_bridge, 2):
            assert "forward" in tiny_bridge.blocks[0].__dict__
            raise RuntimeError
    assert all("forward" not in b.__dict__ for b in tiny_bridge.blocks)
    last = plan_splice("blocks.2.hook_resid_post", 3)  # no block after it: resume at block 2, hook the site
    assert last.resume == 2 and not last.residual_splice and last.capture == "blocks.2.hook_resid_pre"
    assert plan_splice("blocks.1.hook_resid_post", 3).resume == 2


@pytest.mark.parametrize("strategy,expected", [("shared_prefix", 2 + 4 * 1), ("full", 3 + 3 * 3)])
def test_prefix_blocks_run_once_per_batch(tiny_bridge, strategy, expected):
    """1 batch, splice after block 1 of 3: clean + zero ablation + 2 SAEs."""
    calls = []
    handles = [b.original_component.register_forward_pre_hook(lambda m, a: calls.append(1))
               for b in tiny_bridge.blocks]
    try:
        evaluate_hooks(tiny_bridge, _batches(n=1), {"blocks.1.hook_resid_post": [Identity(), Zeros()]},
                       strategy=strategy)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == expected


def test_auto_checks_resuming_once_per_model_on_one_window(tiny_bridge):
    """`auto` verifies the shared prefix with one window of the first batch, and only once per model + hook."""
    from saeforge.pipeline import splice as E

    hook = "blocks.1.hook_resid_post"
    E._VERIFIED.pop(tiny_bridge, None)
    windows = []  # batch size of every block call
    handles = [b.original_component.register_forward_pre_hook(
        lambda m, a, kw: windows.append((a[0] if a else kw["hidden_states"]).shape[0]), with_kwargs=True)
        for b in tiny_bridge.blocks]
    try:
        runs = []
        for _ in range(2):
            windows.clear()
            res = evaluate_hooks(tiny_bridge, _batches(n=1), {hook: [Identity(), Zeros()]}, strategy="auto")
            runs.append(list(windows))
    finally:
        for h in handles:
            h.remove()
    assert res[hook].strategy == "shared_prefix" and E._VERIFIED[tiny_bridge][plan_splice(hook, 3)] is None
    # first call: prefix (2 blocks) + check on ONE window (full forward 3 blocks + suffix 1) + 4 suffixes
    assert sorted(runs[0]) == [1] * 4 + [2] * 6
    assert runs[1] == [2] * 6  # second call: no check at all


class Const(torch.nn.Module):
    """Reconstructs every row as one fixed vector (so splicing it IS mean ablation with that vector)."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def encode(self, x):
        return torch.ones(x.shape[0], 1, dtype=x.dtype)

    def decode(self, f):
        return self.v.to(f.dtype).expand(f.shape[0], -1)


def _direct_ce_w(bridge, batches, hook, values=None):
    """Per-window CE sums from one full forward per batch, the hook's kept positions replaced by `values(x)`."""
    out = []
    for tokens, kept in batches:
        def fn(act, hook, kept=kept):
            act = act.clone()
            act[kept] = values(act[kept]).to(act.dtype)
            return act

        with torch.inference_mode():
            logits = bridge.run_with_hooks(tokens, fwd_hooks=[(hook, fn)] if values else [])
        scored = torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
        out += [M.next_token_ce_sum(logits[i:i + 1], tokens[i:i + 1], scored[i:i + 1]) for i in range(len(tokens))]
    return np.array(out)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"])
def test_mean_ablation_splices_the_given_nonzero_mean(tiny_bridge, hook):
    """CE_mean is the CE with THIS vector at every kept position: not zero ablation, equal to a direct splice."""
    batches = _batches(seed=6)
    mean = 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(7)) + 0.25
    res = evaluate_hooks(tiny_bridge, batches, {hook: [Const(mean)]}, means={hook: mean},
                         strategy="shared_prefix")[hook]
    n = res.ablation.n_scored
    direct_mean = _direct_ce_w(tiny_bridge, batches, hook, lambda x: mean.expand_as(x))
    direct_zero = _direct_ce_w(tiny_bridge, batches, hook, torch.zeros_like)
    assert abs(direct_mean.sum() - direct_zero.sum()) / n > 1e-2  # the two ablations are far apart here
    assert res.ablation.mean == pytest.approx(direct_mean.sum() / n, rel=1e-6)
    assert res.ablation.zero == pytest.approx(direct_zero.sum() / n, rel=1e-6)
    np.testing.assert_allclose(res.ablation.mean_w, direct_mean, rtol=1e-6)
    assert res.saes[0].ce == res.ablation.mean  # splicing the constant is the same replacement


def test_per_window_sums_are_each_windows_ce(tiny_bridge):
    """The (n_windows,) arrays hold each window's own CE sum and scored count, in window order."""
    hook = "blocks.0.hook_resid_post"
    batches = _batches(n=2, batch=3, seed=8)
    batches[1][0][1, -4:] = 3  # pad targets in one window
    res = evaluate_hooks(tiny_bridge, batches, {hook: [ReluSAE(64, 32, 0)]}, means={hook: torch.ones(64)},
                         pad_id=3, strategy="shared_prefix")[hook]
    a = res.ablation
    assert a.n_scored_w.tolist() == [11, 11, 11, 11, 11 - 4, 11] and a.n_scored == 62
    for got, mean in [(a.clean_w, a.clean), (a.zero_w, a.zero), (a.mean_w, a.mean), (res.saes[0].ce_w, res.saes[0].ce)]:
        assert got.shape == (6,) and got.sum() / a.n_scored == pytest.approx(mean, rel=1e-12)
    scored_ref = []
    for tokens, _ in batches:
        with torch.inference_mode():
            logits = tiny_bridge(tokens)
        scored = tokens[:, 1:] != 3
        scored_ref += [M.next_token_ce_sum(logits[i:i + 1], tokens[i:i + 1], scored[i:i + 1]) for i in range(3)]
    np.testing.assert_allclose(a.clean_w, scored_ref, rtol=1e-6)
    assert len(set(a.clean_w.round(6))) == 6  # distinct windows: a permutation would show
