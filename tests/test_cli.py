"""The root `saeforge` group: every command answers --help (instantly, listing every config field), and --threads
reaches torch."""
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from saeforge.pipeline.cli import main

COMMANDS = [["harvest"], ["store"], ["store", "info"], ["store", "verify"], ["store", "import-saelens"], ["train"],
            ["sweep"], ["eval"], ["plot"], ["demo"]]
# The config tables each command's options come from, minus the fields spelled otherwise there (train: `--hook`
# is the run's hook; sweep: `--hook` is repeatable and grid SAEs are named from their settings).
TABLES_OF = {"harvest": {"harvest": ()}, "train": {"sae": ("hook",), "train": ()},
             "sweep": {"sae": ("hook", "name"), "train": ()}, "eval": {"eval": ()}, "demo": {"demo": ()}}


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help(cmd):
    r = CliRunner().invoke(main, [*cmd, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output


@pytest.mark.parametrize("command", sorted(TABLES_OF))
def test_help_lists_every_config_field_with_its_docstring(command):
    from saeforge.trainer.options import fields_of

    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0 and "--config" in r.output
    squeezed = "".join(r.output.split())  # click rewraps the docstrings
    for table, skip in TABLES_OF[command].items():
        for f in fields_of(table).values():
            if f.name not in skip:
                assert f"--{f.name.replace('_', '-')}" in r.output and "".join(f.doc.split()) in squeezed, f.name


def test_help_is_instant_no_torch_or_transformers_imported():
    code = ("import sys\nfrom saeforge.pipeline.cli import main\n"
            f"for c in {sorted(TABLES_OF) + ['plot', 'store']!r}:\n"
            "    try:\n        main([c, '--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'transformer_lens', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


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
