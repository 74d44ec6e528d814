"""What every command shares, checked on every command the root group has (a new one is checked too): --json,
--quiet, --threads (before or after the command, or $SAEFORGE_THREADS), one list syntax, one dtype spelling, `~` in
paths, progress bars on stderr, and file modes that follow the umask."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import typing
from types import SimpleNamespace

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saeforge.pipeline.cli import main
from saeforge.trainer.fields import Mismatch, list_items
from saeforge.trainer.options import CommaList, _list_metavar
from tests.trainer.test_run import HOOK, HOOK_SMALL, write_store


def leaves(group=main, path=()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from leaves(cmd, (*path, name))
        else:
            yield (*path, name), cmd


LEAVES = list(leaves())
DTYPES = ("float32", "bfloat16", "float16")


def invoke(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def options(cmd) -> dict[str, click.Option]:
    return {opt: p for p in cmd.params if isinstance(p, click.Option) for opt in p.opts}


def test_every_command_is_checked_here():
    assert {" ".join(p) for p, _ in LEAVES} >= {"harvest", "train", "sweep", "eval", "plot", "demo", "store info",
                                                "store verify", "store import-saelens"}


@pytest.mark.parametrize("path, cmd", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_command_takes_json_quiet_and_threads(path, cmd):
    assert {"--json", "--quiet", "--threads"} <= set(options(cmd)), path


@pytest.mark.parametrize("path, cmd", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_list_option_takes_comma_lists_and_repeats_with_one_metavar(path, cmd):
    ctx = click.Context(cmd)
    for p in {id(p): p for p in options(cmd).values()}.values():
        if p.multiple or isinstance(p.type, CommaList):
            assert p.multiple and isinstance(p.type, CommaList), (path, p.opts)
            assert re.fullmatch(r"[A-Za-z0-9_|]+(,\.\.\.|(,[A-Z]+)+)", p.make_metavar(ctx)), (p.opts, p.make_metavar(ctx))


@pytest.mark.parametrize("path, cmd", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_dtype_option_lists_the_long_names_in_one_order_and_one_help_text(path, cmd):
    from saeforge.trainer.options import DTYPE_HELP

    for p in {id(p): p for p in options(cmd).values()}.values():
        choices = list(getattr(p.type, "choices", ()))
        if set(choices) & {*DTYPES, "bf16"}:
            assert not set(choices) & {"fp32", "bf16", "fp16"}, (path, p.opts, choices)
            named = [c for c in choices if c in DTYPES]
            assert named == [d for d in DTYPES if d in named] and choices[-len(named):] == named, choices
            assert DTYPE_HELP.strip(" .") in p.help, (path, p.opts)


def test_a_tuple_of_literals_has_a_metavar_and_is_typed():
    tp = tuple[typing.Literal["wandb", "tensorboard"], ...]
    assert _list_metavar(tp) == "wandb|tensorboard,..."
    assert list_items(["wandb", "tensorboard"], tp) == ("wandb", "tensorboard")
    with pytest.raises(Mismatch, match="values among"):
        list_items(["wandb", "tensorbord"], tp)
    assert _list_metavar(tuple[float, float]) == "FLOAT,FLOAT" and _list_metavar(tuple[int, ...]) == "INTEGER,..."


# ------------------------------------------------------------------ one list syntax, one dtype spelling


@pytest.fixture
def captured(monkeypatch):
    """The configs the stages would run with (harvest, train / sweep, import-saelens), none run."""
    seen = {}
    monkeypatch.setattr("saeforge.pipeline.harvest.harvest",
                        lambda cfg, **kw: seen.update(harvest=cfg) or SimpleNamespace(to_json=lambda: {"ok": 1}))
    monkeypatch.setattr("saeforge.trainer.run.train_from_store",
                        lambda store, saes, train, out, **kw: seen.update(store=store, saes=saes, train=train,
                                                                          out=out, **kw) or [])
    monkeypatch.setattr("saeforge.pipeline.import_saelens.import_saelens",
                        lambda cfg, **kw: seen.update(imported=cfg, **kw) or SimpleNamespace(_asdict=dict))
    return seen


@pytest.mark.parametrize("spellings", [
    (["--layers", "1,2", "--sites", "resid_post,mlp_out"], ["--layers", "1", "--layers", "2", "--sites", "resid_post",
                                                          "--sites", "mlp_out"],
     ["--layers", "1", "--layers", "2", "--sites", "resid_post,mlp_out"])])
def test_harvest_lists_comma_or_repeated_are_the_same(captured, spellings):
    got = []
    for args in spellings:
        assert invoke("harvest", *args, "--out", "s", "--json").exit_code == 0
        got.append((captured["harvest"].layers, captured["harvest"].sites))
    assert got == [((1, 2), ("resid_post", "mlp_out"))] * 3


def test_sweep_lists_comma_or_repeated_are_the_same(captured):
    runs = []
    for args in (["--hook", f"{HOOK},{HOOK_SMALL}", "--arch", "gated,baseline", "--l1", "1e-3,3e-3",
                  "--l1-baseline", "2e-6", "--adam-betas", "0,0.9"],
                 ["--hook", HOOK, "--hook", HOOK_SMALL, "--arch", "gated", "--arch", "baseline", "--l1", "1e-3",
                  "--l1", "3e-3", "--l1-baseline", "2e-6", "--adam-betas", "0", "--adam-betas", "0.9"]):
        res = invoke("sweep", "--store", "s", "--out", "o", *args, "--json")
        assert res.exit_code == 0, res.output
        runs.append(([(s.hook, s.arch, s.l1_coefficient) for s in captured["saes"]], captured["train"].adam_betas))
    assert runs[0] == runs[1] and len(runs[0][0]) == 6 and runs[0][1] == (0.0, 0.9)
    res = invoke("train", "--store", "s", "--out", "o", "--adam-betas", "0,0.9", "--adam-betas", "0.99")
    assert res.exit_code == 2 and "a list of 2 numbers" in res.output


def test_dtype_short_names_are_read_as_the_long_ones(captured):
    assert invoke("harvest", "--layers", "1", "--sites", "resid_post", "--out", "s", "--dtype", "bf16",
                  "--store-dtype", "fp32", "--json").exit_code == 0
    assert (captured["harvest"].lm_dtype, captured["harvest"].store_dtype) == ("bfloat16", "float32")
    assert invoke("train", "--store", "s", "--out", "o", "--autocast", "bfloat16").exit_code == 0
    assert captured["train"].autocast == "bf16"  # TrainConfig's own spelling of the same choice
    assert invoke("store", "import-saelens", "c", "o", "--dtype", "fp16", "--hook", "a,b", "--hook", "c",
                  "--skip-token-id", "0,1", "--json").exit_code == 0
    cfg = captured["imported"]
    assert (cfg.store_dtype, cfg.hooks, cfg.skip_token_ids) == ("float16", ("a", "b", "c"), (0, 1))
    res = invoke("harvest", "--out", "s", "--dtype", "bf17")
    assert res.exit_code == 2 and "auto', 'float32', 'bfloat16', 'float16'" in res.output


# ------------------------------------------------------------------ --threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("args, env", [(["--threads", "1", "store", "info", "x"], {}),
                                       (["store", "info", "x", "--threads", "1"], {}),
                                       (["store", "info", "x"], {"SAEFORGE_THREADS": "1"}),
                                       (["--threads", "2", "store", "info", "x", "--threads", "1"], {})])
def test_threads_before_or_after_the_command_or_from_the_environment(threads, args, env, tmp_path):
    res = invoke(*args, env=env)
    assert res.exit_code == 1 and "no store at" in res.output  # the command ran
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("args, env, needle", [(["--threads", "0", "store", "info", "x"], {}, "--threads"),
                                               (["store", "info", "x", "--threads", "many"], {}, "--threads"),
                                               (["store", "info", "x"], {"SAEFORGE_THREADS": "two"},
                                                "SAEFORGE_THREADS")])
def test_bad_threads_is_one_line_naming_where_it_came_from(threads, args, env, needle):
    res = invoke(*args, env=env)
    assert res.exit_code == 1 and res.output.strip().splitlines() == [res.output.strip()], res.output
    assert res.output.startswith(f"Error: {needle} must be a whole number") and torch.get_num_threads() == 3


# ------------------------------------------------------------------ ~ in paths


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_store(tmp_path / "acts", n_rows=512)
    return tmp_path


def test_tilde_is_expanded_in_arguments_options_and_config_files(home, captured):
    res = invoke("store", "info", "~/acts", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["path"] == str(home / "acts"), res.output
    assert invoke("store", "verify", "~/acts", "--quiet").exit_code == 0
    assert invoke("train", "--store", "~/acts", "--out", "~/run", "--log-dir", "~/logs").exit_code == 0
    assert (captured["store"], str(captured["out"]), captured["train"].log_dir) == (
        str(home / "acts"), str(home / "run"), str(home / "logs"))
    (home / "exp.toml").write_text('store = "~/acts"\nout = "~/sweep"\n[harvest]\nmodel = "~/tiny"\n'
                                   'data_files = ["~/a.parquet"]\nlayers = [0]\nsites = ["resid_post"]\n')
    assert invoke("sweep", "--config", "~/exp.toml").exit_code == 0
    assert (captured["store"], str(captured["out"])) == (str(home / "acts"), str(home / "sweep"))
    assert invoke("harvest", "--config", "~/exp.toml", "--dataset", "~/docs.jsonl", "--json").exit_code == 0
    h = captured["harvest"]
    assert (h.out, h.model, h.dataset, h.data_files) == (str(home / "acts"), str(home / "tiny"),
                                                         str(home / "docs.jsonl"), (str(home / "a.parquet"),))
    assert not (home / "~").exists()


def test_urls_are_left_as_they_are(home):
    from saeforge.stores.files import expand_path

    assert expand_path("memory://~/x") == "memory://~/x" and expand_path("s3://b/~x") == "s3://b/~x"
    res = invoke("store", "info", "memory://~/nothing")
    assert res.exit_code == 1 and "memory://~/nothing" in res.output and str(home) not in res.output


# ------------------------------------------------------------------ --json, and --quiet in a real process


def test_store_commands_print_one_json_document(home):
    res = invoke("store", "verify", "~/acts", "--json")
    report = json.loads(res.stdout)
    assert res.exit_code == 0 and report["ok"] and report["n_rows"] == 512 and report["chunks_checked"] > 0
    assert not invoke("store", "verify", "~/acts").stdout.lstrip().startswith("{")  # a summary without --json
    shard = home / "acts" / HOOK / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))
    res = invoke("store", "verify", "~/acts", "--json")
    report = json.loads(res.stdout)  # the whole report, then the exit code and Error line of a damaged store
    assert res.exit_code == 1 and not report["ok"] and report["first_bad_chunk"] and "damaged" in res.stderr


def saeforge(*args, tmp_path, env=None):
    return subprocess.run([sys.executable, "-m", "saeforge", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "SAEFORGE_CACHE": str(tmp_path / "c"),
                                            "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), **(env or {})})


def test_quiet_leaves_stderr_empty_and_json_is_one_document_in_a_real_process(tmp_path, tiny_model_dir):
    """harvest (a model and a tokenizer load: transformers' bars and logs), train with trackers (wandb's lines),
    eval (the LM again): with --quiet nothing reaches stderr; with --json stdout is one JSON document."""
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    rng = np.random.default_rng(0)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, 40))})
                                                for _ in range(30)))
    trackers = ",".join(t for t, m in [("wandb", "wandb"), ("tensorboard", "tensorboard")] if _importable(m))
    steps = [
        ["harvest", "--model", tiny_model_dir, "--dataset", tmp_path / "d.jsonl", "--layers", "1", "--sites",
         "resid_post", "--tokens", 300, "--context-size", 24, "--batch-size", 4, "--device", "cpu", "--dtype",
         "float32", "--out", tmp_path / "s"],
        ["train", "--store", tmp_path / "s", "--hook", "blocks.1.hook_resid_post", "--d-sae", 16, "--steps", 4,
         "--batch-rows", 32, "--log-every", 2, "--resample-every", 0, "--device", "cpu", "--out", tmp_path / "r",
         *(["--log-to", trackers] if trackers else [])],
        ["eval", tmp_path / "r", "--tokens", 96, "--batch-size", 2, "--device", "cpu", "--cache-dir", tmp_path / "e"],
    ]
    for args in steps:
        res = saeforge(*args, "--quiet", "--json", tmp_path=tmp_path)
        assert res.returncode == 0 and res.stderr == "", (args[0], res.stderr[-2000:])
        json.loads(res.stdout)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------ progress bars


@pytest.fixture
def bars_at_once(monkeypatch):
    monkeypatch.setattr("saeforge.stores.progress.QUICK_DELAY_S", 0.0)


def test_verify_draws_its_bar_on_stderr_and_quiet_silences_it(home, bars_at_once):
    res = invoke("store", "verify", "~/acts")
    assert res.exit_code == 0 and re.search(r"verify: 100%.* (\d+)/\1 ", res.stderr) and "%" not in res.stdout
    res = invoke("store", "verify", "~/acts", "--quiet")
    assert res.exit_code == 0 and res.stderr == ""


def test_tokenising_draws_a_bar_and_quiet_silences_it(tmp_path, tiny_model_dir, bars_at_once, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from saeforge.pipeline.data import describe_dataset
    from saeforge.pipeline.tokenization import TokenCache
    from saeforge.stores.progress import quiet

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    (tmp_path / "d.txt").write_text("to be or not to be\n" * 200)
    for i, silent in enumerate([False, True]):
        monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path / f"cache{i}"))
        with quiet(silent):
            assert TokenCache.open(describe_dataset(str(tmp_path / "d.txt")), tok).ensure(10**9) is False
        err = capsys.readouterr().err
        assert ("tokenise" in err) is not silent, err


def test_gguf_dequantisation_is_counted_by_our_bar_and_restored(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from saeforge.pipeline.lm import _dequantise_bar
    from saeforge.stores.progress import quiet

    theirs = gguf_utils.tqdm
    for silent in (False, True):
        with quiet(silent), _dequantise_bar():
            assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
        err = capsys.readouterr().err
        assert ("dequantise GGUF" in err and "3/3" in err) is not silent and "Converting" not in err, err
    assert gguf_utils.tqdm is theirs


def test_quiet_silences_the_hf_libraries_and_restores_them():
    import datasets
    import huggingface_hub
    from transformers.utils import logging as hf_logging

    from saeforge.stores.progress import is_quiet, quiet

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(),
              huggingface_hub.utils.are_progress_bars_disabled(), os.environ.get("WANDB_SILENT"))
    with quiet():
        assert is_quiet() and os.environ["WANDB_SILENT"] == "true"
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled() and huggingface_hub.utils.are_progress_bars_disabled()
    assert not is_quiet() and before == (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                         datasets.is_progress_bar_enabled(),
                                         huggingface_hub.utils.are_progress_bars_disabled(),
                                         os.environ.get("WANDB_SILENT"))


# ------------------------------------------------------------------ file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_run_files_are_readable_as_the_umask_says(tmp_path, umask, mode):
    from saeforge.stores.files import write_atomic
    from saeforge.trainer.checkpoint import save_checkpoint
    from saeforge.trainer.sae import make_sae
    from saeforge.trainer.saelens_files import save_sae

    old = os.umask(umask)
    try:
        save_sae(make_sae("gated", 4, 8), tmp_path / "run", hook_name=HOOK)
        save_checkpoint(tmp_path / "run", {"step": 1})
        write_atomic(tmp_path / "run" / "notes.json", "{}")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes == {"cfg.json": mode, "sae_weights.safetensors": mode, "checkpoint.pt": mode, "notes.json": mode}


# ------------------------------------------------------------------ import-saelens at a URL


def test_import_saelens_takes_storage_options_for_an_out_at_a_url(tmp_path, monkeypatch):
    """Every look at OUT (is it complete? the writer, the finished store) goes through its filesystem with the
    options given; the options are not recorded in the store."""
    from saeforge.stores import open_store, schema
    from tests.pipeline.test_import_saelens import CTX, N_SEQ, write_cache

    write_cache(tmp_path / "cache")
    url, opts, seen, locate = "memory://surface-import/store", {"skip_instance_cache": True}, [], schema.locate
    monkeypatch.setattr(schema, "locate", lambda p, o=None: seen.append((str(p), o)) or locate(p, o))
    for again in (False, True):  # the second run finds the complete store through the same options
        res = invoke("store", "import-saelens", tmp_path / "cache", url, "--storage-options", json.dumps(opts),
                     "--json", "--quiet")
        assert res.exit_code == 0 and res.stderr == "", res.output
        result = json.loads(res.stdout)
        assert (result["rows"], result["already_complete"]) == (N_SEQ * CTX, again)
    at_out = [o for p, o in seen if p.startswith(url)]
    assert len(at_out) >= 4 and all(o == opts for o in at_out), at_out
    assert "skip_instance_cache" not in json.dumps(open_store(url).attrs.to_json())


def test_train_and_sweep_print_a_summary_or_one_json_document(tmp_path):
    write_store(tmp_path / "acts", n_rows=512)
    common = ["--store", tmp_path / "acts", "--hook", HOOK, "--d-sae", 8, "--steps", 4, "--batch-rows", 64,
              "--log-every", 2, "--resample-every", 0, "--device", "cpu", "--quiet"]
    res = invoke("train", *common, "--out", tmp_path / "run")
    assert res.exit_code == 0 and res.stdout.startswith(f"{tmp_path / 'run'}  gated d_sae=8 {HOOK}  step 4  L0 ")
    res = invoke("sweep", *common, "--arch", "gated,baseline", "--out", tmp_path / "sweep", "--json")
    runs = json.loads(res.stdout)
    assert res.exit_code == 0 and [r["arch"] for r in runs] == ["gated", "baseline"] and runs[0]["step"] == 4
