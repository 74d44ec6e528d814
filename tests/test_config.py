"""One config path for every stage (`trainer/options.py`): the file layout, type checks, suggestions, precedence
(defaults < file < flags), and the dataclass fields read from source, all through the real commands."""
import dataclasses
import importlib
import json
import typing

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from saeforge.pipeline.cli import main
from saeforge.stores import open_store
from saeforge.trainer.fields import MISSING, Mismatch, check, config_fields
from saeforge.trainer.options import GRID_AXES, TABLES, ConfigError, read_config
from tests.trainer.test_run import BATCH, HOOK, HOOK_SMALL, write_store


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(res) -> str:
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


# ------------------------------------------------------------------ fields read from source


@pytest.mark.parametrize("table", sorted(TABLES))
def test_fields_read_from_source_are_the_dataclass_fields(table):
    t = TABLES[table]
    cls = getattr(importlib.import_module(t.module), t.cls)
    hints = typing.get_type_hints(cls)
    specs = config_fields(t.module, t.cls)
    assert [s.name for s in specs] == [f.name for f in dataclasses.fields(cls)]
    for spec, f in zip(specs, dataclasses.fields(cls)):
        assert spec.type == hints[f.name], f.name
        assert spec.default == f.default or spec.default is f.default is MISSING, f.name
        assert spec.doc, f"{t.cls}.{f.name} has no docstring"


def test_grid_axes_are_the_sweeps():
    from saeforge.trainer.grid import GRID_LISTS

    assert GRID_AXES == GRID_LISTS


@pytest.mark.parametrize("value, tp, expected", [
    (3, float, 3.0), (3, int, 3), ("a", typing.Literal["a", "b"], "a"), ([0, 0.9], tuple[float, float], (0.0, 0.9)),
    ([1, 2], tuple[int, ...], (1, 2)), (True, bool, True), ("x", typing.Optional[str], "x"), (None, int | None, None),
])
def test_check_accepts_and_converts(value, tp, expected):
    got = check(value, tp)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, tp, message", [
    ("abc", float, 'expected a number, got "abc"'), (True, int, "expected an integer, got true"),
    (1, bool, "expected true or false, got 1"), ("c", typing.Literal["a", "b"], 'one of "a", "b", got "c"'),
    ([0, 1, 2], tuple[float, float], "a list of 2 numbers, got [0, 1, 2]"), ("0,1", tuple[int, ...], "a list of"),
    (1.5, int | None, "expected an integer, got 1.5"),
])
def test_check_rejects_with_the_expected_type(value, tp, message):
    with pytest.raises(Mismatch, match=message.replace("[", r"\[").replace("]", r"\]")):
        check(value, tp)


# ------------------------------------------------------------------ the file layout


@pytest.mark.parametrize("text, message", [
    ('[sae]\nl1_coefficient = "abc"\n', 'sae.l1_coefficient: expected a number, got "abc"'),
    ("[sae\nl1 = 3\n", "not valid TOML: "),
    ("[sae]\nlamda = 3\n", "unknown key sae.lamda (did you mean l1_coefficient?)"),
    ("[sae]\nl1_coeficient = 3\n", "unknown key sae.l1_coeficient (did you mean l1_coefficient?)"),
    ("[train]\nlamda = 3\n", "unknown key train.lamda (did you mean sae.l1_coefficient?)"),
    ("[harvest]\ndtype = 'float32'\n", "unknown key harvest.dtype (did you mean lm_dtype?)"),
    ('[[saes]]\narch = "gatd"\n', 'saes[0].arch: expected one of "baseline", "gated", got "gatd"'),
    ("steps = 3\n", "unknown top-level key steps (it belongs in [train])"),
    ("[trian]\nsteps = 3\n", "unknown top-level key trian (did you mean train?)"),
    ("[[sae]]\nd_sae = 3\n", "[[sae]] entries of a sweep are now [[saes]]"),
    ("[grid]\nlr = [1e-3]\n", "grid.lr is not a grid axis"),
    ("[grid]\nd_sae = [1.5]\n", "grid.d_sae: expected a list of integers, got [1.5]"),
    ('[harvest]\nout = "x"\n', "the top-level `store`"),
    ("[train]\nadam_betas = [0.9]\n", "train.adam_betas: expected a list of 2 numbers, got [0.9]"),
])
def test_read_config_errors_name_file_key_type_and_value(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_read_config_checks_and_converts_every_table(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('store = "s"\nout = "o"\n[harvest]\nlayers = [10]\nsites = ["resid_post"]\n'
                    "[train]\nadam_betas = [0, 0.99]\n[sae]\nl1_coefficient = 1\n[grid]\nd_sae = 32\n"
                    'arch = ["gated", "baseline"]\nequal_compute = true\n[[saes]]\nhook = "h"\n[eval]\ntokens = 64\n'
                    '[demo]\npreset = "study"\n')
    cfg = read_config(path)
    assert (cfg.store, cfg.out, cfg.saes) == ("s", "o", [{"hook": "h"}])
    assert cfg.get("harvest") == {"layers": (10,), "sites": ("resid_post",)}
    assert cfg.get("train") == {"adam_betas": (0.0, 0.99)} and cfg.get("sae") == {"l1_coefficient": 1.0}
    assert cfg.get("grid") == {"d_sae": [32], "arch": ["gated", "baseline"], "equal_compute": True}
    assert cfg.get("eval") == {"tokens": 64} and cfg.get("demo") == {"preset": "study"}


@pytest.mark.parametrize("command", ["harvest", "train", "sweep", "eval", "demo"])
@pytest.mark.parametrize("text, message", [
    ('[sae]\nl1_coefficient = "abc"\n', 'sae.l1_coefficient: expected a number, got "abc"'),
    ("[train]\nsteps = \n", "not valid TOML"),
    ("[sae]\nlamda = 3\n", "did you mean l1_coefficient?"),
])
def test_every_command_reports_a_bad_file_in_one_line_and_writes_nothing(tmp_path, command, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = tmp_path / "out"
    args = {"harvest": ["--out", out], "train": ["--out", out], "sweep": ["--out", out], "eval": [], "demo": [out]}
    line = one_error_line(invoke(command, "--config", path, *args[command]))
    assert str(path) in line and message in line
    assert not out.exists()


# One bad file per command and kind of mistake, in the tables that command reads: a syntax error (the line and
# column), a value of the wrong type (what was expected), an unknown key (the closest one), a value the config
# refuses (its bound). Each is one `Error:` line naming the file, the key and the fix; nothing is written.
BAD_FILES = {
    "harvest": [("[harvest]\ntokens = 10\nlayers = [1,,2]\n", "line 3 is 'layers = [1,,2]'", "fix its syntax"),
                ('[harvest]\ntokens = "many"\n', "harvest.tokens", 'expected an integer, got "many"'),
                ("[harvest]\ntokenz = 10\n", "harvest.tokenz", "did you mean tokens?"),
                ("[harvest]\ntokens = 0\n", "harvest.tokens", "must be >= 1, got 0"),
                ("store = 3\n", "store", "expected a string, got 3")],
    "train": [('[train]\nsteps = "x"\n', "train.steps", 'expected an integer, got "x"'),
              ("[train]\nstepz = 3\n", "train.stepz", "did you mean steps?"),
              ("[train]\nsteps = 0\n", "train.steps", "must be a positive integer, got 0"),
              ("[sae]\nd_sae = 0\n", "sae.d_sae", "must be an integer in [1, 16777216], got 0"),
              ('[train]\nlog_to = "wandb"\n', "train.log_to", 'expected a list of strings, got "wandb"'),
              ("[train]\nadam_betas = [0, 2]\n", "train.adam_betas", "must lie in [0, 1)"),
              ("storage_options = 3\n", "storage_options", "expected a table, got 3")],
    "sweep": [('[grid]\narch = ["gatd"]\n', "grid.arch", 'values among "baseline", "gated", got ["gatd"]'),
              ("[grid]\nl1 = [1e-3]\n", "grid.l1", "did you mean l1_coefficient?"),
              ("[grid]\nd_sae = [0]\n", "grid.d_sae", "must be an integer in [1, 16777216], got 0"),
              ("[[saes]]\nlr = 2.0\n", "saes[0].lr", "must be in (0, 1], got 2.0"),
              ("[train]\nlog_every = 0\n", "train.log_every", "must be a positive integer, got 0")],
    "eval": [("[eval]\ntokens = 1_\n", "line 2 is 'tokens = 1_'", "fix its syntax"),
             ("[eval]\nbatch_size = 1.5\n", "eval.batch_size", "expected an integer, got 1.5"),
             ("[eval]\nbootstrap_resample = 10\n", "eval.bootstrap_resample", "did you mean bootstrap_resamples?"),
             ("[eval]\ntokens = 0\n", "eval.tokens", "must be >= 1, got 0"),
             ('[eval]\ndtype = "float64"\n', "eval.dtype", 'expected one of "store", "auto"')],
    "demo": [("[demo]\npreset = 3\n", "demo.preset", 'expected one of "demo", "study", "paper", got 3'),
             ('[demo]\npreseet = "demo"\n', "demo.preseet", "did you mean preset?"),
             ('[demo]\nformat = "gif"\n', "demo.format", "did you mean plot_format?"),
             ('[demo]\nplot_format = "gif"\n', "demo.plot_format", 'expected one of "png", "svg", "pdf"'),
             ('[demo]\ndevice = ""\n', "demo.device", "must not be empty")],
}


@pytest.mark.parametrize("command, text, key, fix", [(c, *case) for c, cases in BAD_FILES.items() for case in cases],
                         ids=[f"{c}-{case[1]}-{i}" for c, cases in BAD_FILES.items() for i, case in enumerate(cases)])
def test_a_bad_file_is_one_line_naming_the_file_the_key_and_the_fix(tmp_path, command, text, key, fix):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = tmp_path / "out"
    args = {"harvest": ["--out", out], "train": ["--store", tmp_path, "--out", out],
            "sweep": ["--store", tmp_path, "--out", out], "eval": [tmp_path], "demo": [out]}
    line = one_error_line(invoke(command, "--config", path, *args[command], "--quiet"))
    assert line.startswith(f"Error: {path}: ") and key in line and fix in line, line
    assert not out.exists()


def test_dtype_short_names_in_a_file_are_read_as_the_long_ones(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[harvest]\nlm_dtype = "bf16"\nstore_dtype = "fp16"\n[eval]\ndtype = "fp32"\n'
                    '[train]\nautocast = "bfloat16"\n[demo]\ndtype = "bf16"\n')
    cfg = read_config(path)
    assert cfg.get("harvest") == {"lm_dtype": "bfloat16", "store_dtype": "float16"}
    assert cfg.get("eval") == {"dtype": "float32"} and cfg.get("demo") == {"dtype": "bfloat16"}
    assert cfg.get("train") == {"autocast": "bf16"}  # TrainConfig's own spelling of bfloat16 autocast


# ------------------------------------------------------------------ train, sweep


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("stores") / "acts.zarr")


def train_file(path, store, sae_lines="", extra=""):
    path.write_text(f'store = "{store}"\n[train]\nhook = "{HOOK}"\nsteps = 6\nbatch_rows = {BATCH}\nlog_every = 3\n'
                    f'resample_every = 0\ndevice = "cpu"\n[sae]\narch = "gated"\nd_sae = 16\nl1_coefficient = 0.2\n'
                    f"lr = 3e-3\n{sae_lines}{extra}")
    return path


def test_a_train_file_seeds_a_sweep_unchanged(store, tmp_path):
    toml = train_file(tmp_path / "run.toml", store)
    res = invoke("train", "--config", toml, "--out", tmp_path / "run", "--quiet")
    assert res.exit_code == 0, res.output
    res = invoke("sweep", "--config", toml, "--out", tmp_path / "sweep", "--quiet")
    assert res.exit_code == 0, res.output
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(sweep["runs"]) == 1
    alone = json.loads((tmp_path / "run" / "cfg.json").read_text())["saeforge"]
    swept = json.loads((tmp_path / "sweep" / sweep["runs"][0] / "cfg.json").read_text())["saeforge"]
    assert swept["sae"] == alone["sae"] and swept["train"] == alone["train"]
    a = load_file(str(tmp_path / "run" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "sweep" / sweep["runs"][0] / "sae_weights.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_sweep_file_grid_and_entries_start_from_sae_and_flags_win(store, tmp_path):
    grid = ('[grid]\narch = ["gated", "baseline"]\nl1_coefficient = [0.1, 0.2]\nl1_coefficient_baseline = [0.02]\n'
            'equal_compute = true\nhook = ["%s", "%s"]\n[[saes]]\narch = "baseline"\nl1_coefficient = 0.05\n'
            'name = "extra"\n' % (HOOK, HOOK_SMALL))
    toml = train_file(tmp_path / "sweep.toml", store, extra=grid)
    res = invoke("sweep", "--config", toml, "--l1", 0.3, "--hook", HOOK_SMALL, "--hook", HOOK, "--steps", 2,
                 "--regime", "paper", "--out", tmp_path / "sw", "--quiet")
    assert res.exit_code == 0, res.output
    saes = json.loads((tmp_path / "sw" / "sweep.json").read_text())["saes"]
    got = [(s["hook"], s["arch"], s["d_sae"], s["l1_coefficient"], s["lr"], s["name"]) for s in saes]
    assert got == [(h, *sae, 3e-3, None) for h in (HOOK_SMALL, HOOK) for sae in (("gated", 16, 0.3),
                                                                                ("baseline", 24, 0.02))] + [
        (None, "baseline", 16, 0.05, 3e-3, "extra")]  # flags replace the file's lists, the rest comes from [sae]
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["train"]["steps"] == 2

    named = train_file(tmp_path / "named.toml", store, sae_lines='name = "one"\n', extra="[grid]\nseed = [0, 1]\n")
    line = one_error_line(invoke("sweep", "--config", named, "--out", tmp_path / "named"))
    assert "sae.name" in line and not (tmp_path / "named").exists()


def test_train_flags_override_the_file_and_unset_flags_do_not(store, tmp_path):
    toml = train_file(tmp_path / "run.toml", store)
    res = invoke("train", "--config", toml, "--steps", 3, "--l1", 0.5, "--no-normalize-inputs",
                 "--adam-betas", "0.5,0.9", "--out", tmp_path / "run", "--quiet")
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "run" / "cfg.json").read_text())["saeforge"]
    assert saved["train"]["steps"] == 3 and saved["train"]["log_every"] == 3  # flag; file
    assert saved["train"]["normalize_inputs"] is False and saved["train"]["adam_betas"] == [0.5, 0.9]
    assert saved["sae"]["l1_coefficient"] == 0.5 and saved["sae"]["lr"] == 3e-3 and saved["sae"]["seed"] == 0
    res = invoke("train", "--config", toml, "--adam-betas", "0.5", "--out", tmp_path / "bad")
    assert res.exit_code != 0 and "a list of 2 numbers" in res.output and not (tmp_path / "bad").exists()


# ------------------------------------------------------------------ harvest, eval, demo

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()


def test_a_harvest_config_run_equals_the_flag_run(tmp_path, tiny_model_dir):
    corpus = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS, 40))}) for _ in range(30)))
    flags = ["--model", tiny_model_dir, "--dataset", corpus, "--hooks", f"{HOOK},{HOOK_SMALL}", "--tokens", 200,
             "--context-size", 24, "--batch-size", 4, "--store-dtype", "float32", "--heldout-every", 5,
             "--no-bos", "--writer-memory-mb", 1]
    res = invoke("harvest", "--quiet", "--json", *flags, "--device", "cpu", "--out", tmp_path / "by_flags")
    assert res.exit_code == 0, res.output
    toml = tmp_path / "harvest.toml"
    toml.write_text(f'store = "{tmp_path / "by_file"}"\n[harvest]\nmodel = "{tiny_model_dir}"\ndataset = "{corpus}"\n'
                    f'hooks = ["{HOOK}", "{HOOK_SMALL}"]\ntokens = 200\ncontext_size = 24\nbatch_size = 4\n'
                    'store_dtype = "float32"\nheldout_every = 5\nprepend_bos = false\n'
                    f'writer_memory_bytes = {1 << 20}\ndevice = "cuda:7"\n')
    res = invoke("harvest", "--quiet", "--json", "--config", toml, "--device", "cpu")  # the flag wins over the file
    assert res.exit_code == 0, res.output
    a, b = open_store(tmp_path / "by_flags"), open_store(tmp_path / "by_file")
    assert a.provenance == b.provenance and a.provenance["prepend_bos"] is False and a.n_rows == b.n_rows == 200
    for h in (HOOK, HOOK_SMALL):
        assert np.array_equal(a.read(h).numpy(), b.read(h).numpy())
    assert np.array_equal(a.token_ids(), b.token_ids()) and np.array_equal(a.seq_idx(), b.seq_idx())


def test_eval_takes_its_runs_and_settings_from_the_file(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(f"{TABLES['eval'].module}.evaluate_runs",
                        lambda runs, cfg, **kw: seen.update(runs=[str(r) for r in runs], cfg=cfg) or [])
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps({"runs": ["a", "b"]}))
    toml = tmp_path / "exp.toml"
    toml.write_text(f'out = "{tmp_path / "sw"}"\n[eval]\ntokens = 64\nstrategy = "full"\nbatch_size = 2\n')
    res = invoke("eval", "--config", toml, "--batch-size", 4, "--quiet")
    assert res.exit_code == 0, res.output
    assert seen["runs"] == [str(tmp_path / "sw" / "a"), str(tmp_path / "sw" / "b")]
    assert (seen["cfg"].tokens, seen["cfg"].strategy, seen["cfg"].batch_size, seen["cfg"].dtype) == (64, "full", 4,
                                                                                                      "store")
    assert invoke("eval", "--config", toml, tmp_path / "r", "--quiet").exit_code == 0  # RUNS win over `out`
    assert seen["runs"] == [str(tmp_path / "r")]
    res = invoke("eval", "--quiet")
    assert res.exit_code == 2 and "no runs given" in res.output


def test_demo_takes_out_and_its_table_from_the_file(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("saeforge.pipeline.demo.run_demo",
                        lambda out, **kw: seen.update(out=str(out), **kw) or {"stage_seconds": {}})
    toml = tmp_path / "exp.toml"
    toml.write_text(f'out = "{tmp_path / "d"}"\n[demo]\npreset = "study"\ndevice = "cuda:3"\ndtype = "float32"\n')
    res = invoke("demo", "--config", toml, "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    assert seen == {"out": str(tmp_path / "d"), "preset": "study", "dtype": "float32", "device": "cpu",
                    "model": "smollm2-135m", "dataset": "shakespeare", "progress": False, "plot_format": "png"}
    res = invoke("demo", "--config", toml, "--format", "svg", "--dtype", "fp16", "--quiet")
    assert res.exit_code == 0 and (seen["plot_format"], seen["dtype"]) == ("svg", "float16"), res.output
