"""Run directories on a real store of the tiny Llama: eval.json against direct computations (arXiv 2404.16014
eq. 5 with zero and mean ablation, eq. 10 γ), paired bootstrap intervals, the compute dtype, idempotent reruns,
and `saeforge eval` / `saeforge plot` through CliRunner.

The SAEs are hand-set so their reconstruction is known exactly: x_hat = c (x - b_dec) + b_dec.
"""
import json
import shutil
from dataclasses import replace
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saeforge.pipeline import bootstrap as B
from saeforge.pipeline import metrics as M
from tests.pipeline.helpers import one_error_line, read_only_dir

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
D_IN, D_SAE = 64, 128
TOKENS, BATCH = 256, 4  # 16 held-out windows of 16 tokens, 4 batches
RUNS = [("baseline", HOOKS[0], 0.5, False), ("gated", HOOKS[0], 0.75, True), ("baseline", HOOKS[1], 0.5, False)]
"""(architecture, hook, c, b_dec = the store mean (else 0)) of each hand-set run."""


def _random_text(directory, seed=0, n_docs=6, n_words=400):
    import random

    rng = random.Random(seed)
    words = "the a sea of troubles mind slings arrows fortune sleep die nobler suffer arms question".split()
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(n_words)))
    return directory


def build_store(root, model_dir, *, context_size=16, heldout_every=4, lm_dtype="float32", name="store", text_seed=0,
                max_windows=None):
    """A real store of the tiny Llama's activations at HOOKS, built the way harvest does (train windows only);
    `lm_dtype` is what its provenance records as the harvest dtype; `text_seed` picks the text (0: the text of
    every other store), `max_windows` keeps only the first train windows (same text and rules, other rows)."""
    from saeforge.pipeline.data import describe_dataset
    from saeforge.pipeline.lm import capture, load_lm
    from saeforge.pipeline.provenance import Provenance, TextProvenance
    from saeforge.pipeline.windows import WindowRules, train_windows
    from saeforge.stores import StoreWriter

    lm = load_lm(str(model_dir), device="cpu")
    rules = WindowRules(context_size=context_size, heldout_every=heldout_every)
    record = describe_dataset(str(_random_text(root / ("text" if text_seed == 0 else f"text{text_seed}"), text_seed)))
    text = TextProvenance.build(record, lm.tokenizer, rules)
    prov = Provenance(model=str(model_dir), model_info=lm.info, hooks=tuple(HOOKS), seed=0, lm_dtype=lm_dtype,
                      text=text)
    windows = list(train_windows(record, lm.tokenizer, rules))[:max_windows]
    idx = torch.tensor([i for i, _ in windows])
    token_ids = torch.as_tensor(np.stack([w for _, w in windows]))
    kept = text.kept_positions(token_ids)
    acts = capture(lm, token_ids, HOOKS)
    path = root / name
    with StoreWriter(str(path), hooks={h: int(acts[h].shape[-1]) for h in HOOKS}, dtype="float32",
                     provenance=prov.to_json()) as w:
        pos = torch.arange(context_size).expand_as(token_ids)
        w.append({h: acts[h][kept] for h in HOOKS}, token_ids=token_ids[kept],
                 seq_idx=idx[:, None].expand_as(token_ids)[kept], pos=pos[kept])
    return path, lm


def hand_set_sae(arch, c, b_dec):
    """x_hat = c (x - b_dec) + b_dec exactly: features relu(x - b_dec) and relu(b_dec - x) (encoder [I, -I]),
    decoder c [I; -I]. Every coordinate is on one side, so L0 = d_in; γ = c when b_dec = 0."""
    from saeforge.trainer.sae import make_sae

    sae = make_sae(arch, D_IN, D_SAE)
    eye = torch.eye(D_IN)
    with torch.no_grad():
        (sae.W_enc if arch == "baseline" else sae.W_gate).copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(c * torch.cat([eye, -eye], 0))
        sae.b_dec.copy_(torch.as_tensor(b_dec, dtype=torch.float32))
    return sae


def _save_runs(root, store, model_dir, runs=RUNS):
    from saeforge.stores import open_store
    from saeforge.trainer.saelens_files import save_sae

    s = open_store(str(store))
    out = []
    for i, (arch, hook, c, centred) in enumerate(runs):
        b_dec = s.stats(hook).mean if centred else np.zeros(D_IN)
        out.append(save_sae(hand_set_sae(arch, c, b_dec), root / f"run{i}", hook_name=hook,
                            model_name=str(model_dir), store=str(store)))
    return out


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval_store")
    store, lm = build_store(root, tiny_model_dir)
    return SimpleNamespace(store=store, runs=_save_runs(root, store, tiny_model_dir), lm=lm, root=root)


def _copy_runs(runs, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for r in runs:
        shutil.copytree(r, dest / r.name)
    (dest / "sweep.json").write_text(json.dumps({"runs": [r.name for r in runs]}))
    return [dest / r.name for r in runs]


# ------------------------------------------------------------------ direct computations (full forwards, no engine)


def _eval_tokens(store, lm, n_windows=TOKENS // 16):
    from saeforge.pipeline.provenance import Provenance
    from saeforge.stores import open_store

    text = Provenance.from_json(open_store(str(store)).provenance).text
    token_ids = torch.as_tensor(np.stack(list(islice(text.heldout_windows(lm.tokenizer), n_windows))))
    return token_ids, text.kept_positions(token_ids)


def _spliced(bridge, tokens, kept, hook, fn=None):
    """(per-window CE sums, logits) of one full forward, the hook's kept positions replaced by fn(x)."""
    def hook_fn(act, hook):
        act = act.clone()
        act[kept] = fn(act[kept]).to(act.dtype)
        return act

    with torch.inference_mode():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(hook, hook_fn)] if fn else [])
    scored = torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
    ce_w = np.array([M.next_token_ce_sum(logits[i:i + 1], tokens[i:i + 1], scored[i:i + 1])
                     for i in range(len(tokens))])
    return ce_w, logits


@pytest.fixture(scope="module")
def direct(store_runs):
    """Per hook: clean/zero/mean per-window CE; per run: spliced CE, KL and reconstruction metrics."""
    from saeforge.pipeline.lm import capture
    from saeforge.stores import open_store

    s, lm = open_store(str(store_runs.store)), store_runs.lm
    tokens, kept = _eval_tokens(store_runs.store, lm)
    acts = capture(lm, tokens, HOOKS)
    clean_w, clean_logits = _spliced(lm.bridge, tokens, kept, HOOKS[0])
    scored = torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
    out = {"clean_w": clean_w, "n_w": np.full(len(tokens), tokens.shape[1] - 1), "hooks": {}, "runs": []}
    for h in HOOKS:
        mean = torch.as_tensor(s.stats(h).mean, dtype=torch.float32)
        out["hooks"][h] = {"zero_w": _spliced(lm.bridge, tokens, kept, h, torch.zeros_like)[0],
                           "mean_w": _spliced(lm.bridge, tokens, kept, h, lambda x, m=mean: m.expand_as(x))[0]}
    for _, h, c, centred in RUNS:
        b = torch.as_tensor(s.stats(h).mean, dtype=torch.float32) if centred else torch.zeros(D_IN)
        ce_w, logits = _spliced(lm.bridge, tokens, kept, h, lambda x, c=c, b=b: c * (x - b) + b)
        x = acts[h][kept].double()
        x_hat = c * (x - b.double()) + b.double()
        on = torch.cat([x > b.double(), x < b.double()], 1)
        out["runs"].append({
            "ce_w": ce_w, "kl": M.kl_sum(M.log_probs(clean_logits), logits, scored) / scored.sum().item(),
            "gamma": float((x_hat ** 2).sum() / (x_hat * x).sum()),
            "explained_variance": float(1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()),
            "n_dead": int((on.sum(0) == 0).sum()), "n_dense": int((on.double().mean(0) > 0.1).sum())})
    return out


def _lr(ablated, spliced, clean):
    return (ablated.sum() - spliced.sum()) / (ablated.sum() - clean.sum())


def test_eval_json_matches_direct_computation(store_runs, direct, tmp_path):
    """Every number in eval.json against full forwards with the splice done by hand (zero vs mean ablation
    distinguished: they differ here by far more than the tolerance)."""
    from saeforge.pipeline.evaluate import EvalConfig, evaluate_runs

    runs = _copy_runs(store_runs.runs, tmp_path / "sweep")
    cfg = EvalConfig(tokens=TOKENS, batch_size=BATCH, cache_dir=str(tmp_path / "cache"), device="cpu")
    recs = evaluate_runs(runs, cfg, progress=False)
    assert [r["run_dir"] for r in recs] == [str(r) for r in runs]
    on_disk = [json.loads((r / "eval.json").read_text()) for r in runs]
    assert [r["metrics"] for r in recs] == [r["metrics"] for r in on_disk]
    n, clean_w = direct["n_w"].sum(), direct["clean_w"]
    for rec, (arch, hook, c, _), d in zip(on_disk, RUNS, direct["runs"]):
        m, h = rec["metrics"], direct["hooks"][hook]
        assert rec["architecture"] == arch and rec["hook"] == hook and rec["strategy"] == "shared_prefix"
        assert m["ce_clean"] == pytest.approx(clean_w.sum() / n, rel=1e-6)
        assert m["ce_zero_ablation"] == pytest.approx(h["zero_w"].sum() / n, rel=1e-6)
        assert m["ce_mean_ablation"] == pytest.approx(h["mean_w"].sum() / n, rel=1e-6)
        assert m["ce_sae"] == pytest.approx(d["ce_w"].sum() / n, rel=1e-6)
        lr_zero, lr_mean = _lr(h["zero_w"], d["ce_w"], clean_w), _lr(h["mean_w"], d["ce_w"], clean_w)
        assert abs(lr_zero - lr_mean) > 0.05  # the two ablations give clearly different loss recovered
        assert m["loss_recovered"] == pytest.approx(lr_zero, abs=2e-3)
        assert m["loss_recovered_mean"] == pytest.approx(lr_mean, abs=2e-3)
        assert m["delta_ce"] == pytest.approx((d["ce_w"].sum() - clean_w.sum()) / n, abs=1e-5)
        assert m["kl"] > 1e-6 and m["kl"] == pytest.approx(d["kl"], rel=1e-3)
        assert m["gamma"] == pytest.approx(d["gamma"], rel=1e-6)
        assert m["explained_variance"] == pytest.approx(d["explained_variance"], rel=1e-6)
        assert m["l0"] == D_IN and m["n_dead"] == d["n_dead"] and m["n_dense"] == d["n_dense"]
        hist = rec["density_histogram"]
        assert sum(hist["counts"]) + hist["n_dead"] == D_SAE
        ci = B.splice_intervals(clean_w, d["ce_w"], direct["n_w"], zero=h["zero_w"], mean=h["mean_w"])
        for key in ("loss_recovered_ci95", "loss_recovered_mean_ci95", "delta_ce_ci95"):
            assert m[key] == pytest.approx(ci[key], abs=2e-3) and m[key][0] < m[key][1]
        assert m["n_windows"] == 16 and m["bootstrap_resamples"] == 1000 and m["bootstrap_seed"] == 0
        assert rec["lm_dtype"] == rec["store_lm_dtype"] == "float32" and rec["config"]["dtype"] == "float32"
        assert rec["tokens"]["n_tokens"] == TOKENS and rec["tokens"]["n_scored"] == n
    assert on_disk[0]["metrics"]["gamma"] == 0.5  # x_hat = x / 2 exactly
    assert on_disk[1]["metrics"]["gamma"] != pytest.approx(0.75, abs=1e-3)  # centred on the mean: not c
    assert {r["ablation_cache"][HOOKS[0]] for r in recs} == {"computed"}
    # forced again: the clean/ablation CEs come from the cache, per window, and agree exactly
    again = evaluate_runs(runs[:1], cfg, progress=False, force=True)[0]
    assert again["ablation_cache"][HOOKS[0]] == "hit"
    assert again["metrics"] == recs[0]["metrics"]


def test_eval_tokens_disjoint_from_store_tokens(store_runs):
    from saeforge.pipeline.provenance import Provenance
    from saeforge.stores import open_store

    s = open_store(str(store_runs.store))
    text = Provenance.from_json(s.provenance).text
    seq, pos, tok = s.seq_idx(0, s.n_rows), s.pos(0, s.n_rows), s.token_ids(0, s.n_rows)
    stored: dict[int, dict[int, int]] = {}
    for q, p, t in zip(seq.tolist(), pos.tolist(), tok.tolist()):
        stored.setdefault(q, {})[p] = t
    stored_windows = {tuple(v[p] for p in sorted(v)) for v in stored.values()}
    held = list(islice(text.heldout_windows(store_runs.lm.tokenizer), 50))
    assert len(held) >= 4
    for w in held:
        kept = text.kept_positions(torch.as_tensor(w)[None])[0]
        assert tuple(torch.as_tensor(w)[kept].tolist()) not in stored_windows


# ------------------------------------------------------------------ compute dtype


def test_dtype_resolution(monkeypatch, capsys):
    from saeforge.pipeline.evaluate import EvalConfig, resolve_settings
    from saeforge.trainer import device

    cfg = EvalConfig(device="cpu")
    assert resolve_settings(cfg, "bfloat16", warn=False) == (EvalConfig(device="cpu", dtype="bfloat16"), "bfloat16")
    assert resolve_settings(cfg, None, warn=False) == (EvalConfig(device="cpu", dtype="float32"), None)
    assert resolve_settings(replace(cfg, dtype="float16"), "bfloat16", warn=False)[0].dtype == "float16"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert resolve_settings(replace(cfg, dtype="auto"), "bfloat16")[0].dtype == "float32"
    capsys.readouterr()
    resolve_settings(cfg, "bfloat16", warn=True)  # bf16 from the store on a CPU without it
    assert "warning: bfloat16" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtype must be"):
        EvalConfig(dtype="fp8")


@pytest.fixture(scope="module")
def bf16_store_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("bf16_store")
    store, _ = build_store(root, tiny_model_dir, lm_dtype="bfloat16")
    return store, _save_runs(root, store, tiny_model_dir, RUNS[:1])[0]


def test_eval_splices_in_the_stores_harvest_dtype(bf16_store_run, store_runs, direct, tmp_path, tiny_model_dir):
    from saeforge.pipeline.evaluate import EvalConfig, evaluate_runs
    from saeforge.pipeline.lm import load_lm

    store, run = bf16_store_run
    cfg = EvalConfig(tokens=TOKENS, batch_size=BATCH, cache_dir=str(tmp_path / "c"), device="cpu")
    rec = evaluate_runs([run], cfg, progress=False)[0]
    assert rec["lm_dtype"] == rec["store_lm_dtype"] == "bfloat16" and rec["dtype_requested"] == "store"
    lm16 = load_lm(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    tokens, kept = _eval_tokens(store, lm16)
    clean16 = _spliced(lm16.bridge, tokens, kept, HOOKS[0])[0].sum() / direct["n_w"].sum()
    clean32 = direct["clean_w"].sum() / direct["n_w"].sum()
    assert abs(clean16 - clean32) > 2e-5  # the two dtypes are distinguishable at rel=1e-6 here
    assert rec["metrics"]["ce_clean"] == pytest.approx(clean16, rel=1e-6)
    # an explicit dtype overrides the store's, and is a different setting (recomputed)
    rec32 = evaluate_runs([run], replace(cfg, dtype="float32"), progress=False)[0]
    assert rec32["lm_dtype"] == "float32" and rec32["store_lm_dtype"] == "bfloat16"
    assert rec32["metrics"]["ce_clean"] == pytest.approx(clean32, rel=1e-6)


# ------------------------------------------------------------------ CLI


def _cli(*args):
    from click.testing import CliRunner

    from saeforge.pipeline.cli import main

    return CliRunner().invoke(main, ["eval", "--quiet", "--json", "--device", "cpu", *map(str, args)])


def test_cli_eval_then_plot(store_runs, tmp_path):
    from click.testing import CliRunner

    from saeforge.pipeline.cli import main

    sweep = tmp_path / "sweep"
    runs = _copy_runs(store_runs.runs, sweep)
    r = _cli(*runs, "--tokens", 64, "--batch-size", 2, "--cache-dir", tmp_path / "c")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [o["run_dir"] for o in out] == [str(x) for x in runs] and {o["strategy"] for o in out} == {"shared_prefix"}
    assert all(o["loss_recovered_ci95"][0] <= o["loss_recovered_ci95"][1] for o in out)
    r = CliRunner().invoke(main, ["plot", str(sweep)])
    assert r.exit_code == 0, r.output
    assert (sweep / "report" / "pareto.png").is_file()
    assert "loss recovered [95% CI]" in (sweep / "report" / "sweep_table.md").read_text()


def test_cli_eval_rerun_is_a_no_op_until_something_changes(store_runs, tmp_path, monkeypatch):
    """Same settings, weights and store: eval.json is kept, the LM is not loaded, the summary is the same;
    another token budget, new weights, a broken eval.json or --force: evaluated again."""
    from saeforge.pipeline import evaluate, lm
    from saeforge.trainer.saelens_files import save_sae

    calls = {"lm": 0, "saes": []}
    real_hooks, real_lm = evaluate.evaluate_hooks, lm.load_lm

    def counting_hooks(bridge, batches, saes_by_hook, **kw):
        calls["saes"].append(sum(len(v) for v in saes_by_hook.values()))
        return real_hooks(bridge, batches, saes_by_hook, **kw)

    def counting_lm(*a, **kw):
        calls["lm"] += 1
        return real_lm(*a, **kw)

    monkeypatch.setattr(evaluate, "evaluate_hooks", counting_hooks)
    monkeypatch.setattr(lm, "load_lm", counting_lm)
    runs = _copy_runs(store_runs.runs, tmp_path / "sweep")
    args = ("--batch-size", 4, "--cache-dir", tmp_path / "c")
    mtimes = lambda: [(r / "eval.json").stat().st_mtime_ns for r in runs]  # noqa: E731
    first = _cli(*runs, "--tokens", 128, *args)
    assert first.exit_code == 0, first.output
    assert calls == {"lm": 1, "saes": [3]}
    before = mtimes()
    second = _cli(*runs, "--tokens", 128, *args)
    assert second.exit_code == 0, second.output
    assert calls == {"lm": 1, "saes": [3]} and mtimes() == before  # nothing loaded, nothing written
    assert second.stdout == first.stdout and second.stderr.count("up to date") == 3
    third = _cli(*runs, "--tokens", 192, *args)
    assert third.exit_code == 0 and calls == {"lm": 2, "saes": [3, 3]}
    assert [o["n_tokens"] for o in json.loads(third.stdout)] == [192] * 3
    save_sae(hand_set_sae("baseline", 0.25, np.zeros(D_IN)), runs[2], hook_name=HOOKS[1],
             model_name=store_runs.lm.name, store=str(store_runs.store))  # new weights for one run
    (runs[1] / "eval.json").write_text('{"format": 2, "metrics": {')  # an interrupted writer's leftover
    fourth = _cli(*runs, "--tokens", 192, *args)
    assert fourth.exit_code == 0 and calls["saes"] == [3, 3, 2]
    assert json.loads(fourth.stdout)[0] == json.loads(third.stdout)[0]
    assert json.loads((runs[2] / "eval.json").read_text())["metrics"]["gamma"] == 0.25
    forced = _cli(*runs, "--tokens", 192, *args, "--force")
    assert forced.exit_code == 0 and calls["saes"] == [3, 3, 2, 3]


def _one_line_error(r, *needles):
    one_error_line(r, *needles)


def test_cli_eval_bad_input(store_runs, tmp_path, tiny_model_dir, monkeypatch):
    from saeforge.trainer.saelens_files import save_sae
    from saeforge.trainer.sae import make_sae

    store, runs = store_runs.store, _copy_runs(store_runs.runs[:1], tmp_path / "runs")
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


# ------------------------------------------------------------------ where the text comes from: --store, cfg.json


def _save_recorded_runs(root, store, model_dir, runs=RUNS[:2]):
    """Hand-set runs whose cfg.json records `store_info` (provenance, hook, width, statistics), as training does."""
    from saeforge.stores import open_store
    from saeforge.trainer.rundir import store_info
    from saeforge.trainer.saelens_files import save_sae

    s = open_store(str(store))
    out = []
    for i, (arch, hook, c, centred) in enumerate(runs):
        b_dec = s.stats(hook).mean if centred else np.zeros(D_IN)
        info = store_info(s, hook)
        out.append(save_sae(hand_set_sae(arch, c, b_dec), root / f"recorded{i}", hook_name=hook,
                            model_name=str(model_dir), store=str(store), provenance=info["provenance"],
                            saeforge={"store_info": info}))
    return out


def _edit_cfg(run, fn):
    cfg = json.loads((run / "cfg.json").read_text())
    fn(cfg)
    (run / "cfg.json").write_text(json.dumps(cfg))


def test_store_gone_or_elsewhere_gives_the_numbers_of_the_training_store(store_runs, tmp_path, tiny_model_dir):
    """With the training store moved away, eval reads text rules, model and the hook's mean from cfg.json; with
    --store pointing at the moved store it reads them there. Every number is the one the training store gives."""
    from saeforge.pipeline.evaluate import EvalConfig, evaluate_runs

    store = tmp_path / "store"
    shutil.copytree(store_runs.store, store)
    runs = _save_recorded_runs(tmp_path, store, tiny_model_dir)
    cfg = EvalConfig(tokens=TOKENS, batch_size=BATCH, cache_dir=str(tmp_path / "c"), device="cpu")
    with_store = evaluate_runs(runs, cfg, progress=False)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(store, elsewhere)
    from_cfg = evaluate_runs(runs, cfg, progress=False)
    assert [r["metrics"] for r in from_cfg] == [r["metrics"] for r in with_store]
    assert [r["store"] for r in with_store] == [str(store)] * 2 and [r["store"] for r in from_cfg] == [None] * 2
    assert from_cfg[0]["ablation_cache"] == {HOOKS[0]: "hit"}  # same model, text and mean: the same cache entry
    r = _cli(*runs, "--store", elsewhere, "--tokens", TOKENS, "--batch-size", BATCH, "--cache-dir", tmp_path / "c")
    assert r.exit_code == 0, r.output
    on_disk = [json.loads((run / "eval.json").read_text()) for run in runs]
    assert [d["store"] for d in on_disk] == [str(elsewhere)] * 2
    assert [d["metrics"] for d in on_disk] == [d["metrics"] for d in with_store]
    assert [d["identity"] for d in on_disk] == [d["identity"] for d in with_store]  # the same store, moved


def test_store_option_refuses_other_text_and_a_gone_store_needs_store_info(store_runs, tmp_path, tiny_model_dir):
    (run,) = _save_recorded_runs(tmp_path, store_runs.store, tiny_model_dir, RUNS[:1])
    _edit_cfg(run, lambda c: c["saeforge"]["store_info"]["provenance"].update(context_size=32))
    c = ("--tokens", 64, "--batch-size", 2, "--cache-dir", tmp_path / "c")
    _one_line_error(_cli(run, "--store", store_runs.store, *c), "trained on other text",
                    "context_size: 32 vs 16")
    _one_line_error(_cli(run, "--store", tmp_path / "nowhere", *c), "no store at")
    (bare,) = _copy_runs(store_runs.runs[:1], tmp_path / "bare")  # saved without store_info
    _edit_cfg(bare, lambda c: c["saeforge"].update(store=str(tmp_path / "gone")))
    _one_line_error(_cli(bare, *c), "no store at", "cfg.json records no store_info")


# ------------------------------------------------------------------ another store where the training store was


@pytest.fixture(scope="module")
def other_stores(tmp_path_factory, tiny_model_dir):
    """Stores that are not the store `store_runs` trained on: another context size, another text, and the same
    text and rules with other rows (so other statistics at every hook)."""
    root = tmp_path_factory.mktemp("other_stores")
    return {"context": build_store(root / "context", tiny_model_dir, context_size=8)[0],
            "text": build_store(root / "text", tiny_model_dir, text_seed=1)[0],
            "rows": build_store(root / "rows", tiny_model_dir, max_windows=12)[0]}


@pytest.mark.parametrize("kind, difference", [
    ("context", "context_size: 16 vs 8"),
    ("text", "dataset: "),
    ("rows", f"{HOOKS[0]} statistics differ"),
])
def test_another_store_at_the_training_stores_path_is_refused_and_store_option_still_works(
        kind, difference, store_runs, other_stores, tmp_path, tiny_model_dir):
    """cfg.json's store_info (provenance and the hook's statistics) against the store found at its path: a store
    harvested anew there (another text, context size or rows) is refused in one line naming both; the training
    store given with --store is evaluated."""
    store = tmp_path / "store"
    shutil.copytree(store_runs.store, store)
    (run,) = _save_recorded_runs(tmp_path, store, tiny_model_dir, RUNS[:1])
    (run / "eval.json").write_text("KEEP")
    shutil.move(store, tmp_path / "training_store")
    shutil.copytree(other_stores[kind], store)
    c = ("--tokens", 64, "--batch-size", 2, "--cache-dir", tmp_path / "c")
    _one_line_error(_cli(run, *c), f"{run}/cfg.json records its training store at {store}",
                    f"store {store} is another store", difference)
    assert (run / "eval.json").read_text() == "KEEP"  # nothing evaluated, nothing lost
    r = _cli(run, "--store", tmp_path / "training_store", *c)
    assert r.exit_code == 0, r.output
    assert json.loads((run / "eval.json").read_text())["store"] == str(tmp_path / "training_store")


# ------------------------------------------------------------------ bad input: one line, nothing evaluated or lost


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
BAD_RUN_FILES = {  # what a run directory holds instead of a readable SAE
    "cfg_not_json": ("cfg.json", "{"),
    "cfg_a_list": ("cfg.json", "[1]"),
    "cfg_no_sae": ("cfg.json", '{"saeforge": {}}'),
    "weights_cut": ("sae_weights.safetensors", "x" * 100),
}


@pytest.mark.parametrize("args, message", [
    (["--device", "bogus"], "unknown device 'bogus'"),
    pytest.param(["--device", "cuda"], "device 'cuda' (--device) is not available", marks=NO_CUDA),
    (["--cache-dir", "A_FILE"], "--cache-dir A_FILE exists and is not a directory"),
    (["--cache-dir", "A_FILE/c"], "is a file, not a directory"),
    (["--cache-dir", "READ_ONLY/c"], "is not writable"),
    (["--cache-dir", "memory://c"], "a URL, but only a local directory works here"),
    (["--cache-dir", ""], "--cache-dir must not be empty"),
    (["--store", ""], "--store is empty"),
    (["--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["--model", ""], "--model must not be empty"),
    (["--config", "BAD_TOML"], "bad.toml: eval.bootstrap_resamples must be >= 1, got 0"),
    (["NO_RUN"], "a run directory given is empty"),
    (["cfg_not_json"], "cfg.json is not valid JSON"),
    (["cfg_a_list"], "cfg.json should hold a JSON object"),
    (["cfg_no_sae"], "cfg.json is not an SAE config saeforge can read"),
    (["weights_cut"], "sae_weights.safetensors cannot be loaded"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_eval_bad_input_is_one_line_and_loses_nothing(args, message, store_runs, tmp_path):
    (run,) = _copy_runs(store_runs.runs[:1], tmp_path / "runs")
    (run / "eval.json").write_text("KEEP")  # a real evaluation would replace it
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "bad.toml").write_text("[eval]\nbootstrap_resamples = 0\n")
    if args[0] in BAD_RUN_FILES:
        name, content = BAD_RUN_FILES[args[0]]
        (run / name).write_text(content)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with read_only_dir(tmp_path) as read_only:
        words = {"A_FILE": str(tmp_path / "a_file"), "BAD_TOML": str(tmp_path / "bad.toml"),
                 "A_FILE/c": str(tmp_path / "a_file" / "c"), "READ_ONLY/c": str(read_only / "c")}
        if args[0] == "NO_RUN":
            runs, flags = [""], []
        elif args[0] in BAD_RUN_FILES:
            runs, flags = [run], []
        else:
            runs, flags = [run], [words.get(a, a) for a in args]
        r = _cli(*runs, "--tokens", 64, "--batch-size", 2, *flags)
        one_error_line(r, message.replace("A_FILE", str(tmp_path / "a_file")))
        assert not (read_only / "c").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "bad.toml", "runs"]  # no cache, no `memory:`
