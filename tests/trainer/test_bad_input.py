"""Bad input to `saeforge train` and `saeforge sweep`: one `Error:` line, no traceback, a non-zero exit, and
nothing written (no run directory, nothing in the working directory)."""
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from saeforge.pipeline.cli import main
from tests.trainer.test_run import BATCH, HOOK, N_ROWS, write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("stores") / "acts.zarr")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(res) -> str:
    assert res.exit_code != 0 and isinstance(res.exception, (SystemExit, type(None))), res.output
    assert "Traceback" not in res.output, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def common(store):
    return ["--store", store, "--hook", HOOK, "--steps", 4, "--batch-rows", BATCH, "--log-every", 2,
            "--resample-every", 0, "--d-sae", 16, "--quiet"]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
CASES = [  # (extra arguments, what the one line must name)
    pytest.param(["--device", "cuda"], ["device 'cuda' (--device)", "not available"], id="cuda-without-cuda",
                 marks=NO_CUDA),
    pytest.param(["--device", "cuda:7"], ["cuda:7", "not available"], id="cuda7-without-cuda", marks=NO_CUDA),
    pytest.param(["--device", "bogus"], ["device 'bogus' (--device)"], id="device-bogus"),
    pytest.param(["--seed", -1], ["seed must be an integer in [0, 2**63), got -1"], id="seed-negative"),
    pytest.param(["--data-seed", -1], ["--data-seed must be an integer", "got -1"], id="data-seed-negative"),
    pytest.param(["--out", ""], ["output directory is empty"], id="out-empty"),
    pytest.param(["--out", "memory://x"], ["--out memory://x", "local"], id="out-memory-url"),
    pytest.param(["--out", "s3://bucket/x"], ["--out s3://bucket/x", "local"], id="out-s3-url"),
    pytest.param(["--out", "a_file/run"], ["a_file is a file"], id="out-below-a-file"),
    pytest.param(["--out", "a_file"], ["a_file is a file"], id="out-is-a-file"),
    pytest.param(["--batch-rows", 2 * N_ROWS], [f"batch_rows {2 * N_ROWS}", f"{N_ROWS} rows", "at most"],
                 id="batch-larger-than-store"),
]


@pytest.mark.parametrize("command", ["train", "sweep"])
@pytest.mark.parametrize("extra, needles", CASES)
def test_bad_input_is_one_line_and_writes_nothing(store, tmp_path, monkeypatch, command, extra, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    before = files(tmp_path)
    out = [] if "--out" in extra else ["--out", "run"]
    line = one_error_line(invoke(command, *common(store), *out, *extra))
    assert all(n in line for n in needles), line
    assert files(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["a_file"]  # no ./memory:/x, no run


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_wrong_types_in_the_config_file_name_the_key(store, tmp_path, command):
    toml = tmp_path / "run.toml"
    toml.write_text(f'store = "{store}"\nout = "{tmp_path / "run"}"\n[train]\nhook = "{HOOK}"\nsteps = "ten"\n')
    line = one_error_line(invoke(command, "--config", toml))
    assert str(toml) in line and 'train.steps: expected an integer, got "ten"' in line
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_is_refused_before_anything_is_written(store, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # as root every directory is writable: make this one read-only for the check
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    line = one_error_line(invoke("train", *common(store), "--device", "cpu", "--out", locked / "run"))
    assert f"{locked / 'run'} cannot be created: {locked} is not writable" in line
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_refused(store, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = one_error_line(invoke("train", *common(store), "--device", "cpu", "--out", locked / "run"))
        assert "not writable" in line and list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
