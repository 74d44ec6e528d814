"""The ``saeforge`` command: one click group, one command per stage.

Heavy imports (torch, zarr, transformer_lens) live inside command bodies so ``--help`` is instant. What every
command shares (``--json``, ``--quiet``, ``--threads``, list options, dtype names, ``~`` in paths) is defined once,
in ``stores/cli.py`` and ``trainer/options.py``.
"""
import click

from saeforge.stores.cli import THREADS_ENV, threads_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saeforge")
@threads_option(envvar=THREADS_ENV)
def main():
    """saeforge: harvest LM activations into Zarr stores, train baseline and Gated SAEs, evaluate them.

    Every command takes --json (stdout: one JSON document), --quiet (no progress bars or library chatter on
    stderr) and --threads N (here or after the command; or $SAEFORGE_THREADS). A list option takes a comma list,
    repeated flags, or both: --sites resid_post,mlp_out is --sites resid_post --sites mlp_out.
    """

from saeforge.trainer.cli import train, sweep  # noqa: E402
main.add_command(train); main.add_command(sweep)
from saeforge.pipeline.cli_harvest import harvest  # noqa: E402
main.add_command(harvest)

from saeforge.stores.cli import store  # noqa: E402
from saeforge.pipeline.import_saelens import import_saelens_command  # noqa: E402

store.add_command(import_saelens_command)  # `saeforge store import-saelens`: pipeline reads the cache (datasets)
main.add_command(store)
from saeforge.pipeline.cli_eval import eval_cmd, plot  # noqa: E402
main.add_command(eval_cmd, name="eval"); main.add_command(plot)
from saeforge.pipeline.cli_demo import demo  # noqa: E402
main.add_command(demo)
