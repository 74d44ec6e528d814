"""The ``saeforge`` command: one click group, one command per stage.

Heavy imports (torch, zarr, transformer_lens) live inside command bodies so ``--help`` is instant.
"""
import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saeforge")
def main():
    """saeforge: harvest LM activations into Zarr stores, train baseline and Gated SAEs, evaluate them."""
