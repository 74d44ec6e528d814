"""Run directories keep the layout SAELens v6 loads, checked without SAELens installed.

What SAELens 6.54 does in `SAE.load_from_disk(run_dir)` (read from its source and confirmed against real runs
with scripts/check_saelens.py): json-loads cfg.json; a config whose `metadata.sae_lens_version` (or top-level
`sae_lens_version`) is missing or < 6 goes through a pre-6 converter; `architecture` picks the class
("standard" -> StandardSAE, "gated" -> GatedSAE); `d_in`, `d_sae`, `dtype`, `apply_b_dec_to_input`,
`normalize_activations`, `reshape_activations` fill the config dataclass (unknown keys such as `saeforge` are
dropped) and `metadata` becomes SAEMetadata (hook_name, model_name, ...); every tensor is cast to `dtype`; a
`scaling_factor` tensor is treated as a finetuning scale; a metadata `sae_lens_training_version` that is
absent is filled with SAELens's own version (so ours is an explicit null); then `load_state_dict(...,
assign=True)` is strict, so the tensor names and shapes must be exactly the module's. The forward pass it then
runs is reimplemented in `saelens_forward` below; tests/test_saelens_real.py runs SAELens itself.
"""
import importlib.metadata
import json

import pytest
import torch
from safetensors.torch import load_file

from saeforge.trainer.normaliser import Normaliser
from saeforge.trainer.saelens_files import load_sae, save_sae
from saeforge.trainer.sae import init_sae_, make_sae

HOOK = "blocks.3.hook_resid_post"
D_IN, D_SAE, SCALE = 12, 40, 0.05

# Exact parameter sets of SAELens v6's StandardSAE and GatedSAE (strict load_state_dict).
SAELENS_TENSORS = {
    "standard": {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)},
    "gated": {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,), "b_gate": (D_SAE,),
              "b_mag": (D_SAE,), "r_mag": (D_SAE,)},
}
SAELENS_DTYPES = {"float32", "float64", "float16", "bfloat16"}
SAELENS_NORMALIZE = {"none", "expected_average_only_in", "constant_norm_rescale", "layer_norm",
                     "covariance_whitening"}


def saved_run(tmp_path, arch, n_stack=None, **kw):
    """A trained-looking SAE (random weights, non-zero biases) saved with a non-trivial input scale:
    (run_dir, cfg.json, tensors, the training-scale module)."""
    sae = make_sae(arch, D_IN, D_SAE, n_stack=n_stack, **kw)
    init_sae_(sae, [0] * (n_stack or 1))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    run = save_sae(sae, tmp_path / arch, hook_name=HOOK, normaliser=Normaliser(SCALE), model_name="tiny-llama",
                   store="/data/acts.zarr", provenance={"context_size": 32, "prepend_bos": True})
    return run, json.loads((run / "cfg.json").read_text()), load_file(str(run / "sae_weights.safetensors")), sae


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(part) for part in v.split("-")[0].split(".")[:3])


def saelens_forward(cfg, w, x):
    """SAELens v6's StandardSAE / GatedSAE encode and decode, from cfg.json and the tensors alone."""
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    if cfg["architecture"] == "standard":
        f = torch.relu(sae_in @ w["W_enc"] + w["b_enc"])
    else:
        active = (sae_in @ w["W_enc"] + w["b_gate"] > 0).to(x.dtype)
        f = active * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    return f, f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("arch,n_stack", [("baseline", None), ("gated", None), ("gated", 1)])
def test_cfg_json_has_what_saelens_v6_reads(tmp_path, arch, n_stack):
    _, cfg, _, _ = saved_run(tmp_path, arch, n_stack)
    assert cfg["architecture"] == {"baseline": "standard", "gated": "gated"}[arch]
    assert type(cfg["d_in"]) is int and type(cfg["d_sae"]) is int and (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    assert cfg["dtype"] in SAELENS_DTYPES
    # Weights are saved in the original scale: SAELens must neither renormalise inputs nor skip b_dec.
    assert cfg["normalize_activations"] == "none" and cfg["normalize_activations"] in SAELENS_NORMALIZE
    assert cfg["apply_b_dec_to_input"] is True and cfg["reshape_activations"] == "none"
    meta = cfg["metadata"]
    assert version_tuple(meta["sae_lens_version"]) >= (6, 0, 0)
    assert "sae_lens_version" not in cfg or version_tuple(cfg["sae_lens_version"]) >= (6, 0, 0)
    assert meta["hook_name"] == HOOK and meta["model_name"] == "tiny-llama" and meta["hook_layer"] == 3
    assert meta["context_size"] == 32 and meta["prepend_bos"] is True
    assert cfg["saeforge"]["store"] == "/data/acts.zarr" and cfg["saeforge"]["input_scale"] == SCALE
    # saeforge trained it, not SAELens: null, not absent (SAELens fills an absent key with its own version)
    assert "sae_lens_training_version" in meta and meta["sae_lens_training_version"] is None
    assert cfg["saeforge"]["saeforge_version"] == importlib.metadata.version("saeforge")


@pytest.mark.parametrize("arch,n_stack", [("baseline", None), ("gated", None), ("gated", 1)])
def test_safetensors_names_shapes_and_dtype_match_saelens_v6(tmp_path, arch, n_stack):
    _, cfg, weights, _ = saved_run(tmp_path, arch, n_stack)
    expected = SAELENS_TENSORS[cfg["architecture"]]
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    assert all(v.dtype == getattr(torch, cfg["dtype"]) for v in weights.values())
    assert "scaling_factor" not in weights  # SAELens would treat it as a finetuning scale


@pytest.mark.parametrize("arch", ["baseline", "gated"])
def test_saelens_arithmetic_on_the_saved_files_equals_load_sae(tmp_path, arch):
    run, cfg, weights, trained = saved_run(tmp_path, arch)
    sae, _ = load_sae(run)
    x = 20.0 * torch.randn(256, D_IN, generator=torch.Generator().manual_seed(2))  # original-scale inputs
    f_ref, x_hat_ref = saelens_forward(cfg, weights, x)
    with torch.no_grad():
        f, x_hat, x_hat_trained = sae.encode(x), sae(x), trained(x * SCALE) / SCALE
    assert 0.05 < (f > 0).float().mean() < 0.95  # the gate / ReLU is exercised, not all on or all off
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x_hat, x_hat_ref, rtol=1e-5, atol=1e-4)
    # normalize_activations "none" is only right because the input scale is folded into the saved weights
    torch.testing.assert_close(x_hat_ref, x_hat_trained, rtol=1e-5, atol=1e-4)


def test_untied_gated_ablation_is_not_labelled_as_a_saelens_architecture(tmp_path):
    run, cfg, weights, _ = saved_run(tmp_path, "gated", tie_weights=False)
    assert cfg["architecture"] not in SAELENS_TENSORS and "W_mag" in weights
    assert load_sae(run)[1].architecture == "gated"
