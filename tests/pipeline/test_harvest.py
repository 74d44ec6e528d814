"""Harvest end to end on the tiny Llama: exact rows, one pass, held-out text, resume, CLI errors."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saeforge.pipeline import windows
from saeforge.pipeline.cli import main
from saeforge.pipeline.harvest import HarvestConfig, HarvestError, harvest
from saeforge.pipeline.lm import load_lm
from saeforge.pipeline.provenance import Provenance
from saeforge.stores import StoreIncomplete, open_store, read_run_record
from tests.pipeline.helpers import word_docs

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Forty short documents of random words (no repeated runs, so a leak would show)."""
    return word_docs(tmp_path_factory.mktemp("corpus"), 40, 40, seed=0)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_lm(str(tiny_model_dir), device="cpu")


@pytest.fixture
def cfg(tmp_path, tiny_model_dir, corpus):
    return HarvestConfig(out=str(tmp_path / "store"), model=str(tiny_model_dir), device="cpu",
                         dataset=str(corpus), hooks=HOOKS, tokens=600, context_size=24, batch_size=4,
                         store_dtype="float32", heldout_every=5)


def stored(path):
    s = open_store(path)
    return s, {h: s.read(h).numpy() for h in s.hooks}, s.seq_idx(), s.pos(), s.token_ids()


def test_stored_rows_equal_run_with_cache_exactly_and_skip_special_tokens(cfg, lm):
    result = harvest(cfg, lm=lm, progress=False)
    s, acts, seq, pos, tok = stored(cfg.out)
    assert s.n_rows == result.rows == 600 and sorted(s.hooks) == sorted(HOOKS)
    by_index = dict(windows.all_windows(s.provenance["dataset"], lm.tokenizer, cfg.rules))
    assert (pos > 0).all()  # BOS rows are not stored
    assert not np.isin(tok, s.provenance["special_token_ids"]).any()
    for i in np.unique(seq):
        w = torch.from_numpy(by_index[i])[None]
        _, cache = lm.bridge.run_with_cache(w, names_filter=list(HOOKS))
        rows = np.flatnonzero(seq == i)
        assert np.array_equal(tok[rows], by_index[i][pos[rows]])
        for h in HOOKS:
            assert np.array_equal(acts[h][rows], cache[h][0].flatten(1).numpy()[pos[rows]]), (h, i)


def test_all_hooks_come_from_one_forward_pass_per_batch_that_stops_early(cfg, lm):
    counts = {"embed": 0, "block2": 0}
    handles = [lm.bridge.embed.register_forward_hook(lambda *_: counts.__setitem__("embed", counts["embed"] + 1)),
               lm.bridge.blocks[2].register_forward_hook(lambda *_: counts.__setitem__("block2", counts["block2"] + 1))]
    try:
        result = harvest(cfg, lm=lm, progress=False)
    finally:
        for h in handles:
            h.remove()
    per_batch = cfg.batch_size * (cfg.context_size - 1)  # BOS dropped; EOS separators drop a few more
    assert result.forward_passes >= -(-cfg.tokens // per_batch)
    assert counts == {"embed": result.forward_passes + 1, "block2": 0}  # +1: the width probe
    assert result.tokens_forwarded == result.forward_passes * cfg.batch_size * cfg.context_size


def test_heldout_windows_never_reach_the_store(cfg, lm):
    harvest(replace(cfg, tokens=1500), lm=lm, progress=False)
    s, _, seq, pos, tok = stored(cfg.out)
    held = list(Provenance.from_json(s.provenance).text.heldout_windows(lm.tokenizer))
    assert held and not np.isin(seq, [i for i in np.unique(seq) if i % 5 == 4]).any()
    stored_runs = {tuple(tok[seq == i][:8]) for i in np.unique(seq)}
    assert not any(tuple(h[1:9]) in stored_runs for h in held)


def test_bf16_lm_compute_and_bf16_store(cfg, tiny_model_dir, tmp_path):
    result = harvest(replace(cfg, lm_dtype="bfloat16", store_dtype="bfloat16", tokens=200), progress=False)
    s = open_store(cfg.out)
    assert s.dtype == "bfloat16" and s.provenance["lm_dtype"] == "bfloat16" and result.rows == 200
    assert read_run_record(cfg.out, "harvest")["rows"] == 200 and not (tmp_path / "store" / "harvest.json").exists()


def test_a_different_config_on_an_incomplete_store_is_refused_by_name(cfg, lm):
    with pytest.raises(RuntimeError):
        harvest(cfg, lm=lm, progress=False, on_batch=lambda b: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(StoreIncomplete):
        open_store(cfg.out)
    with pytest.raises(HarvestError, match="context_size: store has 24, this run has 16"):
        harvest(replace(cfg, context_size=16), lm=lm, progress=False)
    first = harvest(cfg, lm=lm, progress=False)  # the same config resumes
    zarr_json = (Path(cfg.out) / "zarr.json").read_bytes()
    again = harvest(replace(cfg, lm_dtype="float32"), progress=False)  # complete: a no-op that loads no model and writes nothing
    assert again.rows == first.rows and again.forward_passes == first.forward_passes
    assert (Path(cfg.out) / "zarr.json").read_bytes() == zarr_json
    with pytest.raises(HarvestError, match="already a complete store of another harvest.*tokens: store has 600"):
        harvest(replace(cfg, tokens=700), lm=lm, progress=False)


def test_killed_after_completion_before_its_record_the_same_command_only_writes_the_record(cfg, lm):
    import shutil

    first = harvest(cfg, lm=lm, progress=False)
    shutil.rmtree(Path(cfg.out) / "records")  # as if killed between the completion record and the run record
    zarr_json = (Path(cfg.out) / "zarr.json").read_bytes()
    again = harvest(cfg, lm=lm, progress=False)
    assert again.forward_passes == 0 and again.rows == first.rows == again.rows_resumed
    assert (Path(cfg.out) / "zarr.json").read_bytes() == zarr_json
    assert harvest(cfg, lm=lm, progress=False).forward_passes == 0  # and from now on the record says so
    shutil.rmtree(Path(cfg.out) / "records")
    with pytest.raises(HarvestError, match="a complete store from a different harvest.*context_size"):
        harvest(replace(cfg, context_size=16), lm=lm, progress=False)


def test_the_harvest_record_lives_inside_the_store_and_plain_zarr_reads_it_without_warnings(cfg, lm):
    """harvest.json beside the arrays made zarr warn; the record is now a run record (stores.records). A store
    written before keeps its harvest.json, and a rerun still finds it complete."""
    import shutil
    import warnings

    import zarr

    first = harvest(replace(cfg, tokens=200), lm=lm, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group = zarr.open_group(cfg.out, mode="r")
        assert sorted(name for name, _ in group.arrays()) == sorted([*HOOKS, "pos", "seq_idx", "token_ids"])
    assert [str(w.message) for w in caught] == []
    legacy = read_run_record(cfg.out, "harvest")
    shutil.rmtree(Path(cfg.out) / "records")  # as an earlier saeforge left it
    (Path(cfg.out) / "harvest.json").write_text(json.dumps(legacy, indent=1))
    again = harvest(replace(cfg, tokens=200, lm_dtype="float32"), progress=False)  # complete: loads no model
    assert again.to_json() == legacy and legacy == json.loads(json.dumps(first.to_json()))
    assert not (Path(cfg.out) / "records").exists()


def test_a_failing_consumer_leaves_no_tokenizer_thread_behind(cfg, lm):
    """The thread that tokenises ahead stops when the LM loop dies (it used to block forever on a full queue)."""
    def alive():
        return [t for t in threading.enumerate() if t.name == "saeforge-tokenize" and t.is_alive()]

    assert not alive()
    with pytest.raises(RuntimeError, match="stop"):
        harvest(replace(cfg, tokens=1500), lm=lm, progress=False,
                on_batch=lambda b: (_ for _ in ()).throw(RuntimeError("stop")))
    deadline = time.time() + 10
    while alive() and time.time() < deadline:
        time.sleep(0.05)
    assert not alive()


KILLABLE = textwrap.dedent("""
    import sys, time
    from saeforge.pipeline.harvest import HarvestConfig, harvest
    out, model, dataset = sys.argv[1:4]
    cfg = HarvestConfig(out=out, model=model, device="cpu", lm_dtype="float32", dataset=dataset, hooks=%r, tokens=1500,
                        context_size=24, batch_size=4, store_dtype="float32", heldout_every=5,
                        writer_memory_bytes=%d)
    harvest(cfg, progress=False, on_batch=lambda b: time.sleep(0.1))
""")


def test_resume_after_kill_9_gives_the_uninterrupted_store(cfg, lm, tmp_path, tiny_model_dir, corpus):
    memory = 1 << 18  # small: the writer commits every ~160 rows
    full = replace(cfg, out=str(tmp_path / "full"), tokens=1500, writer_memory_bytes=memory)
    cut = replace(full, out=str(tmp_path / "cut"))
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE % (HOOKS, memory), cut.out, str(tiny_model_dir),
                             str(corpus)])
    progress = tmp_path / "cut" / ".saeforge" / "progress.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text()).get("rows_staged", 0) > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the harvest finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(StoreIncomplete):
        open_store(cut.out)
    resumed = harvest(cut, lm=lm, progress=False)
    reference = harvest(full, lm=lm, progress=False)
    assert 0 < resumed.rows_resumed < 1500 and resumed.forward_passes < reference.forward_passes
    a, b = stored(cut.out), stored(full.out)
    for x, y in zip(a[2:], b[2:]):
        assert np.array_equal(x, y)
    for h in HOOKS:
        assert np.array_equal(a[1][h], b[1][h])
    assert a[0].attrs["stats"] == b[0].attrs["stats"]


# ---------------------------------------------------------------- the CLI


def run_cli(*args):
    return CliRunner().invoke(main, ["harvest", "--quiet", *args])


def test_cli_harvests_and_prints_json(tmp_path, tiny_model_dir, corpus):
    res = run_cli("--model", str(tiny_model_dir), "--dataset", str(corpus), "--layers", "0,2", "--sites",
                  "resid_post,attn_out", "--tokens", "300", "--context-size", "32", "--out", str(tmp_path / "s"),
                  "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["rows"] == 300 and set(out["bytes_per_hook"]) == {"blocks.0.hook_resid_post",
                                                                 "blocks.0.hook_attn_out",
                                                                 "blocks.2.hook_resid_post",
                                                                 "blocks.2.hook_attn_out"}
    prov = open_store(tmp_path / "s").provenance
    assert prov["model"] == str(tiny_model_dir) and len(prov["model_info"]["sha256"]) == 64
    assert prov["dataset"]["files"][0]["sha256"] and prov["special_token_rule"] == "exclude"


@pytest.mark.parametrize("args, message", [
    (["--hooks", "blocks.0.hook_resid_psot"], "closest valid names: blocks.0.hook_resid_post"),
    (["--layers", "7", "--sites", "resid_post"], "layer 7 out of range"),
    (["--layers", "0"], "no hooks"),
    (["--layers", "0", "--sites", "resid_post", "--context-size", "512"], "exceeds the model's maximum 256"),
    (["--layers", "0", "--sites", "resid_post", "--tokens", "100000"], "ran out after"),
    (["--layers", "0", "--sites", "resid_post", "--dataset", "/nowhere/*.txt"], "no .txt/.jsonl/.parquet"),
    (["--layers", "0", "--sites", "resid_post", "--model", "/nowhere/model"], "not a model directory"),
])
def test_cli_bad_input_is_one_clear_line_and_no_complete_store(args, message, tmp_path, tiny_model_dir, corpus):
    base = ["--model", str(tiny_model_dir), "--dataset", str(corpus), "--device", "cpu",
            "--out", str(tmp_path / "s")]
    res = run_cli(*base, *args)
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists() or open_store_fails(tmp_path / "s")


@pytest.fixture(scope="module")
def unknown_model_type(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with a `model_type` transformers does not know (it logs a warning, then raises)."""
    import shutil

    d = tmp_path_factory.mktemp("unknown_type") / "model"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "nonesuch"}))
    return d


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
    (["--writer-memory-mb", "0"], "--writer-memory-mb must be >= 1, got 0"),
    (["--writer-memory-bytes", "1000"], "too small for rows of blocks.0.hook_resid_post (d=64)"),
    (["--out", ""], "--out must not be empty"),
    (["--dataset", ""], "--dataset must not be empty"),
    (["--model", ""], "--model must not be empty"),
    (["--heldout-every", "1"], "--heldout-every must be >= 2: every N-th window is held out"),
    (["--context-size", "1"], "--context-size must be >= 2: a window needs two tokens for one next-token"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    pytest.param(["--device", "cuda"], "device 'cuda' (--device) is not available", marks=NO_CUDA),
    (["--config", "SEED_FILE"], "seed.toml: harvest.seed must be in [0, 2**63), got -3"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_refuses_bad_settings_in_one_line_naming_the_option_and_writes_nothing(
        args, message, tmp_path, tiny_model_dir, corpus):
    (tmp_path / "seed.toml").write_text("[harvest]\nseed = -3\n")
    args = [str(tmp_path / "seed.toml") if a == "SEED_FILE" else a for a in args]
    base = ["--model", str(tiny_model_dir), "--dataset", str(corpus), "--device", "cpu", "--layers", "0",
            "--sites", "resid_post", "--tokens", "300", "--out", str(tmp_path / "s")]
    res = run_cli(*base, *args)
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert res.stdout == "" and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr  # alone
    assert res.stderr.startswith("Error: ") and message in res.stderr, res.stderr
    assert not (tmp_path / "s").exists()


def test_unknown_model_type_is_one_line_before_anything_transformers_logs(tmp_path, unknown_model_type, corpus):
    """transformers logs a warning about the unknown `model_type` and then raises: the error line is all the
    process prints (a subprocess, so transformers' own handler writes to the stderr this test reads)."""
    cmd = [sys.executable, "-c", "from saeforge.pipeline.cli import main; main()", "harvest", "--quiet",
           "--model", str(unknown_model_type), "--dataset", str(corpus), "--device", "cpu", "--layers", "0",
           "--sites", "resid_post", "--out", str(tmp_path / "s")]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 1 and res.stdout == ""
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("Error: model ") and "model type `nonesuch`" in line
    assert not (tmp_path / "s").exists()


def open_store_fails(path):
    try:
        open_store(path)
    except Exception:  # noqa: BLE001
        return True
    return False


def test_cli_rejects_empty_dataset_and_unwritable_output(tmp_path, tiny_model_dir):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "file").write_text("x")
    base = ["--model", str(tiny_model_dir), "--layers", "0", "--sites", "resid_post", "--device", "cpu"]
    res = run_cli(*base, "--dataset", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "s"))
    assert res.exit_code != 0 and "ran out after 0 rows" in res.output
    res = run_cli(*base, "--dataset", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "file" / "s"))
    assert res.exit_code != 0 and "is a file, not a directory" in res.output


def test_cli_help_is_instant():
    res = CliRunner().invoke(main, ["harvest", "--help"])
    assert res.exit_code == 0 and "--heldout-every" in res.output


@pytest.mark.slow
def test_smollm2_three_sites_on_shakespeare(tmp_path):
    """The real offline default: SmolLM2-135M on Shakespeare, three sites of layer 3, a few thousand tokens."""
    cfg = HarvestConfig(out=str(tmp_path / "smol"), device="cpu", lm_dtype="bfloat16", layers=(3,),
                        sites=("resid_post", "mlp_out", "attn_out"), tokens=3000, context_size=128, batch_size=8)
    lm = load_lm("smollm2-135m", device="cpu", dtype="bfloat16")
    result = harvest(cfg, lm=lm, progress=False)
    s = open_store(cfg.out)
    assert s.n_rows == 3000 and {s.d(h) for h in s.hooks} == {576}
    assert s.provenance["model_info"]["n_layers"] == 30 and s.provenance["dataset"]["kind"] == "shakespeare"
    assert result.forward_passes == 3  # 8 windows x 127 rows per pass
    first = next(Provenance.from_json(s.provenance).text.heldout_windows(lm.tokenizer))
    assert first[0] == lm.tokenizer.bos_token_id and len(first) == 128
    for h in s.hooks:
        assert 0 < s.stats(h).mean_norm < 1e4
