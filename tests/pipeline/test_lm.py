"""pipeline.lm on the tiny Llama: loading, hook resolution, and the one-pass capture."""
import pytest
import torch

from saeforge.pipeline.lm import HookError, ModelLoadError, capture, hook_dims, load_lm, resolve_hooks, stop_layer

HOOKS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out",
         "blocks.1.hook_attn_out", "blocks.1.attn.hook_z"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_lm(str(tiny_model_dir), device="cpu")


def test_load_lm_describes_the_model(lm, tiny_model_dir):
    assert lm.name == str(tiny_model_dir) and lm.device == "cpu" and lm.dtype == "float32"
    assert lm.info["source"] == "local" and len(lm.info["sha256"]) == 64
    assert (lm.info["n_layers"], lm.info["d_model"], lm.info["n_ctx"]) == (3, 64, 256)
    assert lm.info["bos_token_id"] == lm.tokenizer.bos_token_id


def test_load_lm_is_deterministic_in_its_provenance(lm, tiny_model_dir):
    assert load_lm(str(tiny_model_dir), device="cpu").info == lm.info


@pytest.mark.parametrize("spec, match", [
    ("/nonexistent/model", "not a model directory"),
    ("/nonexistent/model.gguf", "does not exist"),
])
def test_load_lm_rejects_bad_specs(spec, match):
    with pytest.raises(ModelLoadError, match=match):
        load_lm(spec, device="cpu")


def test_load_lm_rejects_a_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_lm(str(tmp_path), device="cpu")


def test_load_lm_turns_an_unreadable_config_into_a_model_load_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_lm(str(tmp_path), device="cpu")


def test_stop_layer_is_the_deepest_block_plus_one_or_none_outside_blocks():
    assert stop_layer(["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]) == 3
    assert stop_layer(["hook_embed"]) is None and stop_layer(["blocks.0.hook_resid_post", "hook_embed"]) is None


def test_resolve_hooks_expands_layers_and_sites(lm):
    got = resolve_hooks(lm, hooks=["blocks.2.hook_resid_post"], layers=[0, 1], sites=["resid_post", "attn.hook_z"])
    assert got == ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post", "blocks.0.attn.hook_z",
                   "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    assert resolve_hooks(lm, hooks=["blocks.1.hook_mlp_out"] * 2) == ["blocks.1.hook_mlp_out"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(hooks=["blocks.0.hook_resid_psot"]), "closest valid names: blocks.0.hook_resid_post"),
    (dict(layers=[3], sites=["resid_post"]), "layer 3 out of range: the model has layers 0..2"),
    (dict(layers=[1], sites=["resid_poast"]), "unknown site 'resid_poast'"),
    (dict(layers=[1]), "--layers and --sites go together"),
    (dict(), "no hooks requested"),
])
def test_resolve_hooks_rejects_bad_names(lm, kwargs, match):
    with pytest.raises(HookError, match=match):
        resolve_hooks(lm, **kwargs)


def test_capture_equals_run_with_cache_exactly(lm):
    tokens = torch.randint(4, lm.info["d_vocab"], (3, 12), generator=torch.Generator().manual_seed(0))
    acts = capture(lm, tokens, HOOKS)
    _, cache = lm.bridge.run_with_cache(tokens, names_filter=HOOKS)
    for h in HOOKS:
        assert torch.equal(acts[h], cache[h].flatten(2)), h
    assert acts["blocks.1.attn.hook_z"].shape == (3, 12, 64)  # heads flattened


def test_capture_is_one_forward_pass_stopping_after_the_deepest_layer(lm):
    counts = {"embed": 0, "block1": 0, "block2": 0}

    def counter(key):
        return lambda *_: counts.__setitem__(key, counts[key] + 1)

    handles = [lm.bridge.embed.register_forward_hook(counter("embed")),
               lm.bridge.blocks[1].register_forward_hook(counter("block1")),
               lm.bridge.blocks[2].register_forward_hook(counter("block2"))]
    try:
        capture(lm, torch.randint(4, 300, (2, 8)), HOOKS)
    finally:
        for h in handles:
            h.remove()
    assert counts == {"embed": 1, "block1": 1, "block2": 0}  # five hooks, one pass, block 2 never ran


def test_hook_dims_and_bf16_compute(tiny_model_dir):
    lm16 = load_lm(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert hook_dims(lm16, HOOKS) == {h: 64 for h in HOOKS}
    acts = capture(lm16, torch.randint(4, 300, (1, 5)), ["blocks.0.hook_resid_post"])
    assert acts["blocks.0.hook_resid_post"].dtype == torch.bfloat16
