"""`saeforge eval FOLDER --store STORE` on folders in SAELens 6's own layout (no saeforge record).

The folders are written here by hand, key for key as SAELens 6.54's `SAE.save_model` writes them (cfg.json:
`d_in`, `d_sae`, `dtype`, `device`, `apply_b_dec_to_input`, `normalize_activations`, `reshape_activations`,
`metadata` with `hook_name` and `model_name`, `architecture`; sae_weights.safetensors: `W_enc (d_in, d_sae)`,
`W_dec (d_sae, d_in)`, `b_dec`, and `b_enc` or `b_gate`, `b_mag`, `r_mag`), with hand-set weights. eval.json's L0
and explained variance must equal SAELens's arithmetic (sae_lens/saes/standard_sae.py, gated_sae.py) done here
directly on the store's held-out text; what saeforge cannot compute is one line naming the key.
"""
from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from saeforge.pipeline.cli import main
from tests.pipeline.helpers import one_error_line, text_docs

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")
D_IN, D_SAE = 64, 96
TOKENS, BATCH, CTX = 128, 4, 16  # 8 held-out windows of 16 tokens, in 2 batches
WORDS = "the a sea of troubles mind slings arrows fortune sleep die nobler suffer arms question".split()


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("saelens_eval")
    text_docs(root, WORDS)
    res = cli("harvest", "--quiet", "--model", tiny_model_dir, "--dataset", root, "--hooks", ",".join(HOOKS),
              "--tokens", 600, "--context-size", CTX, "--heldout-every", 4, "--device", "cpu", "--lm-dtype", "float32",
              "--store-dtype", "float32", "--out", root / "store")
    assert res.exit_code == 0, res.output
    return root / "store"


def saelens_folder(path, architecture, hook, *, apply_b_dec_to_input=True, dtype="float32", seed=0, overrides=None):
    """A folder as SAELens 6 saves one, with seeded hand-set weights (biases that switch some features off);
    ``overrides`` replace cfg.json keys."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return scale * torch.randn(*shape, generator=gen)

    w = {"W_enc": randn(D_IN, D_SAE, scale=0.3), "W_dec": randn(D_SAE, D_IN, scale=0.2),
         "b_dec": randn(D_IN, scale=0.1)}
    if architecture == "gated":
        w.update(b_gate=randn(D_SAE, scale=0.5), b_mag=randn(D_SAE, scale=0.5), r_mag=randn(D_SAE, scale=0.3))
    else:
        w["b_enc"] = randn(D_SAE, scale=0.5)
    path.mkdir(parents=True)
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in w.items()},
              str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "dtype": dtype, "device": "cpu", "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "model_name": "tiny-llama",
                     "hook_name": hook},
        "architecture": architecture, **(overrides or {})}))
    return path


def saelens_encode_decode(folder, x):
    """SAELens 6's StandardSAE / GatedSAE encode and decode, from the folder's files alone (in float32)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.float() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    if cfg["architecture"] == "standard":
        f = torch.relu(sae_in @ w["W_enc"] + w["b_enc"])
    else:
        active = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
        f = active * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    return f, f @ w["W_dec"] + w["b_dec"]


def heldout_acts(store, model_dir, hook):
    """The (rows, d_in) activations at ``hook`` of the kept positions of the held-out windows eval reads."""
    from saeforge.pipeline.lm import capture, load_lm
    from saeforge.pipeline.provenance import Provenance
    from saeforge.stores import open_store

    lm = load_lm(str(model_dir), device="cpu")
    text = Provenance.from_json(open_store(str(store)).provenance).text
    windows = torch.as_tensor(np.stack(list(islice(text.heldout_windows(lm.tokenizer), TOKENS // CTX))))
    return capture(lm, windows, [hook])[hook][text.kept_positions(windows)].double()


FOLDERS = [  # (architecture, hook, apply_b_dec_to_input, dtype)
    ("standard", HOOKS[0], True, "float32"),
    ("standard", HOOKS[1], False, "bfloat16"),
    ("gated", HOOKS[0], True, "float32"),
    ("gated", HOOKS[1], False, "float32"),
]


def test_eval_of_saelens_folders_equals_saelens_arithmetic(store, tiny_model_dir, tmp_path):
    folders = [saelens_folder(tmp_path / f"sae{i}", a, h, apply_b_dec_to_input=c, dtype=t, seed=i)
               for i, (a, h, c, t) in enumerate(FOLDERS)]
    res = cli("eval", "--quiet", "--device", "cpu", "--tokens", TOKENS, "--batch-size", BATCH, *folders,
              "--store", store)
    assert res.exit_code == 0, res.output
    assert "written by SAELens" in res.stderr  # its metadata names the model otherwise: said, not refused
    acts = {h: heldout_acts(store, tiny_model_dir, h) for h in HOOKS}
    for folder, (architecture, hook, _, _) in zip(folders, FOLDERS):
        rec = json.loads((folder / "eval.json").read_text())
        assert rec["hook"] == hook and rec["architecture"] == {"standard": "baseline", "gated": "gated"}[architecture]
        assert rec["store"] == str(store) and rec["tokens"]["n_tokens"] == TOKENS
        x = acts[hook]
        f, x_hat = saelens_encode_decode(folder, x.float())
        l0 = float((f != 0).sum(-1).double().mean())
        ev = float(1 - ((x - x_hat.double()) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        assert 1 < l0 < D_SAE - 1, l0  # features on and off: the biases matter
        m = rec["metrics"]
        assert m["l0"] == pytest.approx(l0, rel=1e-9), folder.name
        assert m["explained_variance"] == pytest.approx(ev, rel=1e-5, abs=1e-6), folder.name
        assert np.isfinite(m["loss_recovered"]) and m["d_sae"] == D_SAE


@pytest.mark.parametrize("cfg, needle", [
    ({"architecture": "topk", "k": 8}, "architecture 'topk' is not one saeforge computes (standard, gated)"),
    ({"architecture": "jumprelu"}, "architecture 'jumprelu' is not one saeforge computes"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations 'expected_average_only_in'"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm': saeforge evaluates SAEs on raw"),
    ({"reshape_activations": "hook_q"}, "reshape_activations 'hook_q'"),
    ({"metadata": {"hook_name": HOOKS[0], "hook_head_index": 2}}, "metadata.hook_head_index 2"),
    ({"metadata": {"model_name": "tiny-llama"}}, "metadata.hook_name is missing"),
], ids=["topk", "jumprelu", "expected_average", "layer_norm", "reshape", "head_index", "no_hook"])
def test_what_saeforge_cannot_compute_is_one_line_naming_the_key(store, tmp_path, cfg, needle):
    folder = saelens_folder(tmp_path / "sae", "standard", HOOKS[0], overrides=cfg)
    before = sorted(p.name for p in folder.iterdir())
    one_error_line(cli("eval", "--quiet", "--device", "cpu", folder, "--store", store), str(folder / "cfg.json"),
                   needle)
    assert sorted(p.name for p in folder.iterdir()) == before  # no eval.json


def test_a_saelens_folder_without_store_is_told_to_pass_one(tmp_path):
    folder = saelens_folder(tmp_path / "sae", "gated", HOOKS[0])
    one_error_line(cli("eval", "--quiet", "--device", "cpu", folder), "an SAE SAELens wrote",
                   f"pass --store with a store that holds its hook {HOOKS[0]}")


def test_model_names_match_through_transformerlens_aliases_and_the_stores_record(capsys):
    """A run names its model as it was given: the store of `--model gpt2-small` records `gpt2` with the alias."""
    from types import SimpleNamespace

    from saeforge.pipeline.errors import EvalError
    from saeforge.pipeline.evaluate import _check_models

    prov = SimpleNamespace(model="gpt2", model_info={"source": "hub", "hf_name": "gpt2", "alias": "gpt2-small"})

    def run(name, saeforge=True):
        return None, SimpleNamespace(model_name=name, run_dir=f"runs/{name}", cfg={"saeforge": {}} if saeforge else {})

    _check_models([run("gpt2"), run("gpt2-small"), run("GPT2-Small"), run(None)], "gpt2", prov)
    _check_models([run("gpt2")], "gpt2-small", prov)  # --model by its alias
    with pytest.raises(EvalError, match="runs/gpt2-medium was trained on model 'gpt2-medium', not 'gpt2'"):
        _check_models([run("gpt2-medium")], "gpt2", prov)
    assert capsys.readouterr().err == ""
    _check_models([run("gpt2-medium", saeforge=False)], "gpt2", prov)  # SAELens's name: said, not refused
    assert "runs/gpt2-medium (written by SAELens) names model 'gpt2-medium'" in capsys.readouterr().err
