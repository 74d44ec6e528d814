"""The root `saeforge` group: every command answers --help, and --threads reaches torch."""
import pytest
import torch
from click.testing import CliRunner

from saeforge.pipeline.cli import main

COMMANDS = [["harvest"], ["store"], ["store", "info"], ["store", "verify"], ["train"], ["sweep"], ["eval"], ["plot"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help(cmd):
    r = CliRunner().invoke(main, [*cmd, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output


def test_threads_option_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(main, ["--threads", "1", "store", "info", str(tmp_path / "missing")])
        assert r.exit_code != 0 and "does not exist" in r.output  # the command ran, with one thread
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive():
    r = CliRunner().invoke(main, ["--threads", "0", "store", "--help"])
    assert r.exit_code != 0 and "--threads" in r.output
