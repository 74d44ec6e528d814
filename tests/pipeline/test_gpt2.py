"""A non-Llama architecture end to end: a tiny GPT-2 built from a config, through the real CLI (and GPT-NeoX's
parallel blocks, which lack one site).

harvest (resid_post, mlp_out, attn_out of both blocks, one pass) -> train a tiny SAE -> eval. The stored rows are
the bridge's activations exactly; a trained SAE evaluates to finite numbers; an identity SAE (encoder [I, -I],
decoder [I; -I]: x_hat = x exactly) spliced at every site gives loss recovered 1 and no KL (the splice replaces
exactly what it captured, on GPT-2's hook layout as on Llama's).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saeforge.pipeline.cli import main
from saeforge.stores import open_store
from tests.conftest import build_tiny_tokenizer
from tests.pipeline.helpers import one_error_line, text_docs

SITES = ("resid_post", "mlp_out", "attn_out")
HOOKS = [f"blocks.{layer}.hook_{site}" for layer in (0, 1) for site in SITES]
WORDS = "the a sea of troubles mind slings arrows fortune sleep die nobler suffer arms question".split()


def build_tiny_gpt2(directory, seed=0):
    """A random-weight GPT2LMHeadModel (2 blocks, d_model 64) saved with ``save_pretrained`` next to the tiny
    tokenizer of tests/conftest.py."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).eval().save_pretrained(str(directory))
    return directory


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, gpt2):
    root = text_docs(tmp_path_factory.mktemp("gpt2_store"), WORDS)
    res = cli("harvest", "--quiet", "--model", gpt2, "--dataset", root, "--layers", "0,1", "--sites", ",".join(SITES),
              "--tokens", 800, "--context-size", 16, "--heldout-every", 4, "--device", "cpu", "--lm-dtype", "float32",
              "--store-dtype", "float32", "--out", root / "store", "--json")
    assert res.exit_code == 0, res.output
    return root / "store"


def test_harvest_stores_the_bridges_activations_at_every_site(store, gpt2):
    from saeforge.pipeline.lm import load_lm
    from saeforge.pipeline.provenance import Provenance
    from saeforge.pipeline.windows import all_windows

    s = open_store(str(store))
    assert sorted(s.hooks) == sorted(HOOKS) and s.n_rows == 800 and all(s.d(h) == 64 for h in HOOKS)
    assert s.provenance["model_info"]["architecture"] == "GPT2LMHeadModel"
    lm = load_lm(str(gpt2), device="cpu")
    text = Provenance.from_json(s.provenance).text
    seq, pos = s.seq_idx(), s.pos()
    windows = dict(all_windows(s.provenance["dataset"], lm.tokenizer, text.rules))
    i = int(seq[0])
    _, cache = lm.bridge.run_with_cache(torch.as_tensor(windows[i])[None], names_filter=HOOKS)
    rows = np.flatnonzero(seq == i)
    for h in HOOKS:
        assert np.array_equal(s.read(h).numpy()[rows], cache[h][0].numpy()[pos[rows]]), h


def identity_run(store, hook, out):
    """An SAE whose reconstruction is its input exactly, saved as a run of ``store`` at ``hook``."""
    from saeforge.trainer.saelens_files import save_sae
    from saeforge.trainer.sae import make_sae

    sae = make_sae("baseline", 64, 128)
    eye = torch.eye(64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    s = open_store(str(store))
    return save_sae(sae, out, hook_name=hook, model_name=s.provenance["model"], store=str(store))


def test_train_then_eval_and_the_identity_splice_at_every_site(store, tmp_path):
    res = cli("train", "--store", store, "--hook", "blocks.1.hook_mlp_out", "--arch", "gated", "--steps", 20,
              "--batch-rows", 64, "--d-sae", 32, "--resample-every", 0, "--device", "cpu", "--quiet",
              "--out", tmp_path / "trained")
    assert res.exit_code == 0, res.output
    runs = [identity_run(store, h, tmp_path / f"identity_{h}") for h in HOOKS]
    res = cli("eval", "--quiet", "--device", "cpu", "--tokens", 128, "--batch-size", 4, tmp_path / "trained", *runs)
    assert res.exit_code == 0, res.output
    trained, *identities = [json.loads((r / "eval.json").read_text()) for r in [tmp_path / "trained", *runs]]
    m = trained["metrics"]
    assert trained["model_info"]["architecture"] == "GPT2LMHeadModel" and trained["tokens"]["n_tokens"] == 128
    assert all(math.isfinite(m[k]) for k in ("loss_recovered", "ce_sae", "ce_clean", "ce_zero_ablation", "kl", "l0"))
    assert m["ce_zero_ablation"] != m["ce_clean"]  # zero-ablating an MLP output changes the loss
    for rec in identities:
        im = rec["metrics"]
        assert rec["strategy"] == "shared_prefix", rec["hook"]  # resuming at a block is exact on GPT-2 too
        assert im["ce_zero_ablation"] != im["ce_clean"], rec["hook"]  # the splice point is live
        assert im["ce_sae"] == pytest.approx(im["ce_clean"], abs=1e-6), rec["hook"]
        assert im["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and im["kl"] == pytest.approx(0.0, abs=1e-7)
        assert im["explained_variance"] == pytest.approx(1.0, abs=1e-6)


def test_a_site_an_architecture_lacks_is_one_line_naming_the_sites_it_has(tmp_path):
    """GPT-NeoX (Pythia) runs attention and MLP in parallel: its blocks have no resid_mid."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = build_tiny_tokenizer(tmp_path / "neox")
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    GPTNeoXForCausalLM(cfg).eval().save_pretrained(str(tmp_path / "neox"))
    (tmp_path / "doc.txt").write_text(" ".join(WORDS * 20))
    res = cli("harvest", "--quiet", "--model", tmp_path / "neox", "--dataset", tmp_path / "doc.txt", "--layers", "0,1",
              "--sites", "resid_post,resid_mid", "--device", "cpu", "--out", tmp_path / "store")
    one_error_line(res, "site 'resid_mid' does not exist on GPTNeoXForCausalLM: its blocks have resid_pre, resid_post, "
                   "mlp_out, attn_out")
    assert not (tmp_path / "store").exists()
