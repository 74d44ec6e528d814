"""The ``saeforge`` command: one click group, one command per stage.

Heavy imports (torch, zarr, transformer_lens) live inside command bodies so ``--help`` is instant.
"""
import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saeforge")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads torch may use [torch's default]; fewer is faster when other jobs share the cores.")
def main(threads):
    """saeforge: harvest LM activations into Zarr stores, train baseline and Gated SAEs, evaluate them."""
    if threads:
        import torch

        torch.set_num_threads(threads)

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
