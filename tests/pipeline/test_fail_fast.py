"""Harvest refuses bad input before the model loads and before anything exists under --out.

Sites and layers are checked against the model's config alone (no weights); a hub name the hub cannot give is one
line at once instead of minutes of retries; the store is created only once the model, its hooks and the text's first
batch are known good, so the corrected command then runs. Everything through the real CLI (CliRunner), on the tiny
Llama of tests/conftest.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import transformers
from click.testing import CliRunner

from saeforge.pipeline import hub
from saeforge.pipeline.cli import main
from saeforge.stores import open_store
from tests.pipeline.helpers import one_error_line

WORDS = "the a sea of troubles mind slings arrows fortune sleep die nobler suffer arms question".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60))})
                              for _ in range(12)))
    return path


@pytest.fixture
def offline(monkeypatch):
    """The hub switched off as a user would (HF_HUB_OFFLINE=1), with the process's one probe forgotten."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.unreachable.cache_clear()
    yield
    hub.unreachable.cache_clear()


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any weights fails the test: what is refused must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def harvest(out, model, dataset, *extra):
    args = ["harvest", "--quiet", "--model", model, "--dataset", dataset, "--device", "cpu", "--tokens", 300,
            "--context-size", 16, "--heldout-every", 4, "--store-dtype", "float32", "--lm-dtype", "float32",
            "--out", out, *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


SITES = ["--layers", "0", "--sites", "resid_post"]


@pytest.mark.parametrize("extra, needles", [
    (["--layers", "3", "--sites", "resid_post"], ["layer 3 out of range: the model has layers 0..2"]),
    (["--layers", "0", "--sites", "resid_poast"], ["unknown site 'resid_poast'", "resid_pre, resid_mid, resid_post",
                                                  "did you mean resid_post?"]),
    (["--hooks", "blocks.7.hook_mlp_out"], ["hook 'blocks.7.hook_mlp_out' is in block 7", "layers 0..2"]),
], ids=["layer", "site", "hook_block"])
def test_sites_and_layers_are_refused_from_the_config_alone(tmp_path, tiny_model_dir, corpus, no_weights, extra,
                                                            needles):
    one_error_line(harvest(tmp_path / "store", tiny_model_dir, corpus, *extra), *needles)
    assert not (tmp_path / "store").exists()


def test_a_distributed_harvest_checks_before_any_worker_starts(tmp_path, tiny_model_dir, corpus, monkeypatch):
    distributed = pytest.importorskip("distributed")

    def refuse(*args, **kwargs):
        raise AssertionError("a dask cluster was started before the bad input was refused")

    monkeypatch.setattr(distributed, "LocalCluster", refuse)
    res = harvest(tmp_path / "store", tiny_model_dir, corpus, "--workers", "2", "--layers", "0", "--sites", "mlp")
    one_error_line(res, "unknown site 'mlp'", "did you mean mlp_out?")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("model, dataset, needles", [
    ("smollm2", "CORPUS", ["model 'smollm2' is not in the Hugging Face cache", "HF_HUB_OFFLINE=1",
                           "did you mean smollm2-135m?"]),
    ("pythia-70m", "CORPUS", ["model 'pythia-70m' (EleutherAI/pythia-70m) is not in the Hugging Face cache"]),
    ("MODEL", "shakespear", ["dataset 'shakespear' is not in the datasets cache", "did you mean shakespeare?"]),
    ("MODEL", "org/no-such-corpus", ["dataset 'org/no-such-corpus' is not in the datasets cache",
                                     "offline, use shakespeare or local files"]),
], ids=["model_typo", "tl_alias", "dataset_typo", "dataset_name"])
def test_offline_hub_names_fail_at_once_in_one_line(tmp_path, tiny_model_dir, corpus, offline, no_weights, model,
                                                    dataset, needles):
    model, dataset = (str(tiny_model_dir) if model == "MODEL" else model), (corpus if dataset == "CORPUS" else dataset)
    one_error_line(harvest(tmp_path / "store", model, dataset, *SITES), *needles)
    assert not (tmp_path / "store").exists()


def test_a_token_column_of_an_unknown_dataset_leaves_no_store(tmp_path, tiny_model_dir, offline, no_weights):
    """Described without being opened (a token column is given), the name is still checked before the store."""
    res = harvest(tmp_path / "store", tiny_model_dir, "org/no-such-corpus", "--token-column", "input_ids", *SITES)
    one_error_line(res, "dataset 'org/no-such-corpus' is not in the datasets cache")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--hooks", "blocks.0.hook_resid_psot"], ["unknown hook 'blocks.0.hook_resid_psot'", "blocks.0.hook_resid_post"]),
    (["--tokens", "100000", *SITES], ["ran out after", "100000 were asked for"]),
], ids=["hook", "text_runs_out"])
def test_a_bad_hook_or_too_little_text_leaves_nothing_and_the_corrected_command_runs(tmp_path, tiny_model_dir, corpus,
                                                                                     extra, needles):
    out = tmp_path / "store"
    one_error_line(harvest(out, tiny_model_dir, corpus, *extra), *needles)
    assert not out.exists()
    res = harvest(out, tiny_model_dir, corpus, *SITES)
    assert res.exit_code == 0, res.output
    assert open_store(str(out)).n_rows == 300


def test_a_streamed_source_whose_first_batch_fails_leaves_nothing(tmp_path, tiny_model_dir, corpus):
    """An HF datasets name (the json builder over a local file, streamed) is read up to its first batch before the
    store exists: here its rows have no token column, which only reading them shows."""
    out = tmp_path / "store"
    res = harvest(out, tiny_model_dir, "json", "--data-files", corpus, "--token-column", "input_ids", *SITES)
    one_error_line(res, "no column 'input_ids'")
    assert not out.exists()
    res = harvest(out, tiny_model_dir, "json", "--data-files", corpus, *SITES)  # corrected: the text column
    assert res.exit_code == 0, res.output
    assert open_store(str(out)).provenance["dataset"]["kind"] == "hf"


@pytest.mark.parametrize("args, needle", [
    (["--model", "gpt2-smalll", "--dataset", "shakespeare"], "model 'gpt2-smalll' is not in the Hugging Face cache"),
    (["--model", "MODEL", "--dataset", "org/no-such-corpus"], "dataset 'org/no-such-corpus' is not in the datasets"),
], ids=["model", "dataset"])
def test_an_unreachable_hub_is_probed_once_not_retried(tmp_path, tiny_model_dir, args, needle):
    """A hub that refuses connections (HF_ENDPOINT at a closed local port), no offline variable: transformers and
    datasets would retry each request with back-off for about a minute; the one probe fails at once."""
    env = {k: v for k, v in os.environ.items() if k not in hub.OFFLINE_VARIABLES}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    args = [str(tiny_model_dir) if a == "MODEL" else a for a in args]
    cmd = [sys.executable, "-c", "from saeforge.pipeline.cli import main; main()", "harvest", "--quiet", *args,
           "--layers", "0", "--sites", "resid_post", "--device", "cpu", "--out", str(tmp_path / "store")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=20)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and needle in lines[0], res.stderr
    assert "127.0.0.1:9 cannot be reached" in lines[0]
    assert not (tmp_path / "store").exists()


def test_a_cached_dataset_name_is_read_from_the_cache_when_the_hub_is_unreachable(tmp_path, tiny_model_dir, corpus):
    """datasets' cache holds `me/tiny` (a prepared copy, as `load_dataset` leaves one); the hub refuses connections
    and no offline variable is set: the probe says so, and the copy is read offline instead of retried for."""
    import glob
    import shutil

    import datasets

    datasets.load_dataset("json", data_files=str(corpus), cache_dir=str(tmp_path / "build"), split="train")
    built = glob.glob(str(tmp_path / "build" / "json" / "*" / "*" / "*" / "json-train.arrow"))
    if not built:
        pytest.skip("this datasets version lays out its cache differently")
    copy = tmp_path / "datasets" / "me___tiny" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(os.path.dirname(built[0]), copy)
    (copy / "json-train.arrow").rename(copy / "tiny-train.arrow")
    env = {k: v for k, v in os.environ.items() if k not in hub.OFFLINE_VARIABLES}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "from saeforge.pipeline.cli import main; main()", "harvest", "--quiet", "--model",
           str(tiny_model_dir), "--dataset", "me/tiny", "--layers", "0", "--sites", "resid_post", "--tokens", "300",
           "--context-size", "16", "--device", "cpu", "--out", str(tmp_path / "store")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=45)
    assert res.returncode == 0, res.stderr[-2000:]
    store = open_store(str(tmp_path / "store"))
    assert store.n_rows == 300 and store.provenance["dataset"]["name"] == "me/tiny"
