"""Every command against bad input: missing paths, a file where a directory is expected, a directory that is not
a store or run, wrong types, a bogus device, empty strings, a URL where only local paths work. Each must exit
non-zero with one `Error:` line (click's usage lines may come before it) and no traceback, before any model is
loaded or any SAE trained: loading and training are replaced by a sentinel that would escape as an exception.
"""
import os

import pytest
import torch
from click.testing import CliRunner

from saeforge.pipeline.cli import main
from saeforge.stores.progress import QUIET_ENV, is_quiet
from saeforge.trainer.sae import make_sae
from saeforge.trainer.saelens_files import save_sae


class Loaded(Exception):
    """Raised where a model would load or training would start: bad input must be refused before."""


@pytest.fixture(autouse=True)
def nothing_loads_or_trains(monkeypatch):
    import transformers

    import saeforge.trainer.run as run

    def sentinel(*args, **kwargs):
        raise Loaded("reached a model load or training")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", sentinel)
    monkeypatch.setattr(run, "fit", sentinel)


@pytest.fixture
def paths(tmp_path, monkeypatch):
    """Placeholders of the cases -> real paths: a file, an empty directory, a missing path, a text, a run
    directory that records no store, a config file with a value of the wrong type."""
    monkeypatch.chdir(tmp_path)  # commands with a default output (demo) or a URL taken for a path write here
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "doc.txt").write_text("to be or not to be " * 50)
    save_sae(make_sae("baseline", 4, 8), tmp_path / "run", hook_name="blocks.0.hook_resid_post")
    (tmp_path / "wrong_type.toml").write_text('[eval]\ntokens = "many"\n')
    return {"FILE": str(tmp_path / "a_file"), "DIR": str(tmp_path / "plain_dir"), "MISSING": str(tmp_path / "gone"),
            "TEXT": str(tmp_path / "text"), "RUN": str(tmp_path / "run"), "TOML": str(tmp_path / "wrong_type.toml"),
            "UNDER_FILE": str(tmp_path / "a_file" / "x")}


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
HARVEST = ["harvest", "--quiet", "--layers", "0", "--sites", "resid_post", "--dataset", "TEXT", "--out", "DIR/s"]
TRAIN = ["--quiet", "--hook", "blocks.0.hook_resid_post"]
COMMON = [  # (command line, a needle of its error line or None); later flags override earlier ones
    *[(HARVEST + extra, needle) for extra, needle in [
        (["--out", "FILE"], "is not a directory"), (["--out", "UNDER_FILE"], "is a file"),
        (["--out", ""], "--out must not be empty"), (["--model", "MISSING"], "not a model directory"),
        (["--model", "DIR"], "without config.json"), (["--model", "FILE"], "not a model directory"),
        (["--model", ""], "--model must not be empty"), (["--dataset", "MISSING"], "no .txt/.jsonl/.parquet"),
        (["--dataset", "DIR"], "no .txt/.jsonl/.parquet"), (["--dataset", ""], "--dataset must not be empty"),
        (["--device", "bogus"], "unknown device"), (["--device", ""], "--device must not be empty"),
        (["--tokens", "abc"], "'abc' is not a valid integer"), (["--tokens", "0"], "--tokens must be >= 1"),
        (["--layers", "x"], "--layers"), (["--config", "MISSING"], "does not exist"),
        (["--config", "DIR"], "is a directory"), (["--config", "FILE"], "not valid TOML"),
        (["--config", "TOML"], "eval.tokens"), (["--seed", "-1"], "--seed")]],
    *[(["store", sub, path], None) for sub in ("info", "verify")
      for path in ("MISSING", "FILE", "DIR", "RUN", "", "memory://nothing")],
    *[([cmd, *TRAIN, *extra], None) for cmd in ("train", "sweep") for extra in [
        ["--store", "MISSING", "--out", "DIR/r"], ["--store", "FILE", "--out", "DIR/r"],
        ["--store", "DIR", "--out", "DIR/r"], ["--store", "", "--out", "DIR/r"],
        ["--store", "memory://nothing", "--out", "DIR/r"], ["--store", "DIR", "--out", "FILE"],
        ["--store", "DIR", "--out", ""], ["--store", "DIR", "--out", "memory://r"],
        ["--store", "DIR", "--out", "DIR/r", "--device", "bogus"],
        ["--store", "DIR", "--out", "DIR/r", "--steps", "abc"], ["--store", "DIR", "--out", "DIR/r", "--steps", "0"],
        ["--store", "DIR", "--out", "DIR/r", "--config", "TOML"]]],
    *[(["eval", "--quiet", *extra], needle) for extra, needle in [
        (["MISSING"], "cfg.json"), (["FILE"], "is a file"), (["DIR"], "cfg.json"), ([""], "empty"),
        (["RUN"], "records no training store"), (["RUN", "--store", "MISSING"], "no store at"),
        (["RUN", "--store", "FILE"], "not a saeforge store"), (["RUN", "--store", "DIR"], "not a saeforge store"),
        (["RUN", "--store", ""], "--store is empty"),
        (["RUN", "--device", "bogus"], "unknown device"), (["RUN", "--device", ""], "--device must not be empty"),
        (["RUN", "--cache-dir", "FILE"], "not a directory"), (["RUN", "--cache-dir", "memory://c"], "a URL"),
        (["RUN", "--tokens", "abc"], "not a valid integer"), (["RUN", "--config", "TOML"], "eval.tokens"),
        ([], "no runs given")]],
    *[(["plot", *extra], needle) for extra, needle in [
        (["MISSING"], "is not a directory"), (["FILE"], "is a file"), (["DIR"], "saeforge eval"), ([""], "empty"),
        (["DIR", "--out", "FILE"], "not a directory"), (["DIR", "--out", ""], "--out is empty"),
        (["DIR", "--out", "memory://x"], "a URL")]],
    *[(["store", "import-saelens", "--quiet", *extra], needle) for extra, needle in [
        (["MISSING", "DIR/s"], "not a SAELens activation cache"), (["FILE", "DIR/s"], "not a SAELens activation cache"),
        (["DIR", "DIR/s"], "no state.json"), (["TEXT", "DIR/s"], "not a SAELens activation cache"),
        (["", "DIR/s"], "cache must not be empty"), (["DIR", ""], "out must not be empty"),
        (["DIR", "DIR/s", "--dtype", "float64"], "'float64' is not one of"),
        (["DIR", "DIR/s", "--writer-memory-mb", "0"], "--writer-memory-mb must be >= 1"),
        (["DIR", "DIR/s", "--skip-token-id", "x"], "--skip-token-id"),
        (["DIR", "DIR/s", "--storage-options", "[1]"], "--storage-options is a JSON list"),
        (["DIR", "DIR/s", "--threads", "0"], "--threads must be")]],
    *[(["demo", "--quiet", *extra], needle) for extra, needle in [
        (["FILE"], "is a file"), ([""], "OUT is empty"), (["memory://x"], "a URL"), (["UNDER_FILE"], "is a file"),
        (["--device", "bogus"], "unknown device"), (["--preset", "bogus"], "'bogus' is not one of"),
        (["--model", ""], "--model must not be empty"), (["--dataset", ""], "--dataset must not be empty"),
        (["--config", "TOML"], "eval.tokens")]],
]
CUDA = [(HARVEST + ["--device", "cuda"], "not available"), (["eval", "RUN", "--device", "cuda"], "not available"),
        (["demo", "--device", "cuda"], "not available"), (["train", *TRAIN, "--store", "DIR", "--out", "DIR/r",
                                                            "--device", "cuda"], "not available")]
CASES = [pytest.param(args, needle, id=" ".join(a or "''" for a in args)) for args, needle in COMMON] + [
    pytest.param(args, needle, id=" ".join(args), marks=NO_CUDA) for args, needle in CUDA]
CLICK_PREAMBLE = ("Usage: ", "Try '")


@pytest.mark.parametrize("args, needle", CASES)
def test_bad_input_is_one_error_line(args, needle, paths, tmp_path):
    argv = [paths.get(a, a.replace("DIR/", paths["DIR"] + "/")) for a in args]
    env_before = {k: os.environ.get(k) for k in QUIET_ENV}  # what --quiet sets while a command runs
    r = CliRunner().invoke(main, argv)
    assert not isinstance(r.exception, Loaded), f"{argv}: a model loaded or training started"
    assert r.exit_code not in (0, None) and isinstance(r.exception, SystemExit), (r.exception, r.output)
    lines = [line for line in r.output.splitlines() if line.strip() and not line.startswith(CLICK_PREAMBLE)]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.output, r.output
    assert needle is None or needle in lines[0], lines[0]
    assert not any(p.name.endswith(":") for p in tmp_path.rglob("*")), "a URL became a local folder"
    env_after = {k: os.environ.get(k) for k in QUIET_ENV}
    assert not is_quiet() and env_after == env_before, f"{argv}: --quiet outlived the failed command"
