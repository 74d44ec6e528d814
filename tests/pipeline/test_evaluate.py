"""Splicing engine on the tiny Llama bridge: exact invariants (PAPER.md §8 check 15) and shared prefix == full."""
import shutil

import numpy as np
import pytest
import torch

from saeforge.pipeline import metrics as M
from saeforge.pipeline.evaluate import EvalError, evaluate_hooks, plan_splice, skip_blocks


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
    from saeforge.pipeline import evaluate as E

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


# ------------------------------------------------------------------ run directories on a real store

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def _random_text(directory, seed=0, n_docs=6, n_words=400):
    import random

    rng = random.Random(seed)
    words = "the a sea of troubles mind slings arrows fortune sleep die nobler suffer arms question".split()
    directory.mkdir()
    for i in range(n_docs):
        (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(n_words)))
    return directory


def build_store(root, model_dir, *, context_size=16, heldout_every=4):
    """A real store of the tiny Llama's activations at HOOKS, built the way harvest does (train windows only)."""
    from saeforge.pipeline import data
    from saeforge.pipeline.lm import capture, load_lm
    from saeforge.stores import StoreWriter

    lm = load_lm(str(model_dir), device="cpu")
    rules = data.WindowRules(context_size=context_size, heldout_every=heldout_every)
    record = data.describe_dataset(str(_random_text(root / "text")))
    prov = {"model": str(model_dir), "model_info": lm.info, "hooks": HOOKS, "seed": 0, "lm_dtype": "float32",
            **data.text_provenance(record, lm.tokenizer, rules)}
    windows = list(data.train_windows(record, lm.tokenizer, rules))
    idx = torch.tensor([i for i, _ in windows])
    tokens = torch.as_tensor(np.stack([w for _, w in windows]))
    kept = data.kept_positions(tokens, prov)
    acts = capture(lm, tokens, HOOKS)
    path = root / "store"
    with StoreWriter(str(path), hooks={h: int(acts[h].shape[-1]) for h in HOOKS}, dtype="float32",
                     provenance=prov) as w:
        pos = torch.arange(context_size).expand_as(tokens)
        w.append({h: acts[h][kept] for h in HOOKS}, token_ids=tokens[kept],
                 seq_idx=idx[:, None].expand_as(tokens)[kept], pos=pos[kept])
    return path, lm


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory, tiny_model_dir):
    from saeforge.trainer.io import save_sae
    from saeforge.trainer.sae import make_sae

    root = tmp_path_factory.mktemp("eval_store")
    store, lm = build_store(root, tiny_model_dir)
    runs = []
    for i, (arch, hook) in enumerate([("baseline", HOOKS[0]), ("gated", HOOKS[0]), ("baseline", HOOKS[1])]):
        torch.manual_seed(i)
        sae = make_sae(arch, 64, 96)
        runs.append(save_sae(sae, root / f"run{i}", hook_name=hook, model_name=str(tiny_model_dir), store=str(store)))
    return store, runs, lm


def test_evaluate_runs_writes_eval_json(store_runs, tmp_path):
    import json

    from saeforge.pipeline.eval_runs import EvalConfig, evaluate_runs

    store, runs, _ = store_runs
    cfg = EvalConfig(tokens=64, batch_size=2, cache_dir=str(tmp_path / "cache"), device="cpu")
    recs = evaluate_runs(runs, cfg, progress=False)
    assert [r["run_dir"] for r in recs] == [str(r) for r in runs]
    on_disk = json.loads((runs[1] / "eval.json").read_text())
    assert on_disk["architecture"] == "gated" and on_disk["strategy"] == "shared_prefix"
    m = on_disk["metrics"]
    for k in ("loss_recovered", "loss_recovered_mean", "delta_ce", "kl", "l0", "mse", "explained_variance",
              "gamma", "l2_ratio", "n_dead", "n_dense"):
        assert k in m
    assert m["ce_zero_ablation"] > m["ce_clean"] and m["kl"] >= 0
    assert on_disk["tokens"]["n_tokens"] == 64 and on_disk["config"]["tokens"] == 64
    assert sum(on_disk["density_histogram"]["counts"]) + on_disk["density_histogram"]["n_dead"] == 96
    assert {r["ablation_cache"][HOOKS[0]] for r in recs} == {"computed"}
    # second call: the clean/ablation CEs come from the cache and agree exactly
    again = evaluate_runs(runs[:1], cfg, progress=False)[0]
    assert again["ablation_cache"][HOOKS[0]] == "hit"
    assert again["metrics"] == recs[0]["metrics"]


def test_eval_tokens_disjoint_from_store_tokens(store_runs):
    from itertools import islice

    from saeforge.pipeline.data import heldout_windows, kept_positions
    from saeforge.stores import open_store

    store_path, _, lm = store_runs
    s = open_store(str(store_path))
    seq, pos, tok = s.seq_idx(0, s.n_rows), s.pos(0, s.n_rows), s.token_ids(0, s.n_rows)
    stored: dict[int, dict[int, int]] = {}
    for q, p, t in zip(seq.tolist(), pos.tolist(), tok.tolist()):
        stored.setdefault(q, {})[p] = t
    stored_windows = {tuple(v[p] for p in sorted(v)) for v in stored.values()}
    held = list(islice(heldout_windows(s.provenance, lm.tokenizer), 50))
    assert len(held) >= 4
    for w in held:
        kept = kept_positions(torch.as_tensor(w)[None], s.provenance)[0]
        assert tuple(torch.as_tensor(w)[kept].tolist()) not in stored_windows


# ------------------------------------------------------------------ CLI


def _cli(*args):
    from click.testing import CliRunner

    from saeforge.pipeline.cli import main

    return CliRunner().invoke(main, ["eval", *map(str, args), "--quiet", "--device", "cpu"])


def test_cli_eval_then_plot(store_runs, tmp_path):
    import json

    from click.testing import CliRunner

    from saeforge.pipeline.cli import main

    _, runs, _ = store_runs
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for r in runs:
        shutil.copytree(r, sweep / r.name)
    (sweep / "sweep.json").write_text(json.dumps({"runs": [r.name for r in runs]}))
    r = _cli(*[sweep / x.name for x in runs], "--tokens", 64, "--batch-size", 2, "--cache-dir", tmp_path / "c")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out) == 3 and {o["strategy"] for o in out} == {"shared_prefix"}
    r = CliRunner().invoke(main, ["plot", str(sweep)])
    assert r.exit_code == 0, r.output
    assert (sweep / "report" / "pareto.png").is_file()


def _one_line_error(r, *needles):
    assert r.exit_code != 0
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in r.output and len(errors) == 1, r.output
    for n in needles:
        assert n in r.output, r.output


def test_cli_eval_bad_input(store_runs, tmp_path, tiny_model_dir, monkeypatch):
    from saeforge.trainer.io import save_sae
    from saeforge.trainer.sae import make_sae

    store, runs, _ = store_runs
    c = ("--cache-dir", tmp_path / "c")
    # budget smaller than one batch (8 windows x 16 tokens)
    _one_line_error(_cli(runs[0], "--tokens", 100, *c), "smaller than one batch")
    # the chosen model is not the run's model
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    _one_line_error(_cli(runs[0], "--tokens", 64, "--batch-size", 2, "--model", other, *c), "was trained on model")
    # hook that the model does not have
    bad = save_sae(make_sae("baseline", 64, 16), tmp_path / "badhook", hook_name="blocks.7.hook_resid_post",
                   model_name=str(tiny_model_dir), store=str(store))
    _one_line_error(_cli(bad, "--tokens", 64, "--batch-size", 2, *c), "blocks.7.hook_resid_post", "does not exist")
    # held-out text missing: the store's text files are gone (and no token cache holds their tokens)
    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path / "empty_cache"))
    moved = store.parent / "text_moved"
    shutil.move(store.parent / "text", moved)
    try:
        _one_line_error(_cli(runs[0], "--tokens", 64, "--batch-size", 2, *c), "held-out")
    finally:
        shutil.move(moved, store.parent / "text")
    # not a run directory
    _one_line_error(_cli(tmp_path, *c), "cfg.json")
