"""``saeforge harvest``: text -> LM (one pass, every hook) -> a shuffled activation store."""
from __future__ import annotations

import click

from saeforge.pipeline.cli_common import config_failure, one_line, read_config_or_fail
from saeforge.stores.cli import common_options, echo_json
from saeforge.trainer.options import CONFIG_OPTION, build_config, fields_of, given, table_options, with_options

HARVEST_OPTIONS = table_options("harvest")


@click.command()
@with_options(HARVEST_OPTIONS, [
    click.option("--writer-memory-mb", type=int, help="writer_memory_bytes in MiB (wins over it)."
                 f"  [default: {fields_of('harvest')['writer_memory_bytes'].default >> 20}]"),
    CONFIG_OPTION, common_options()])
def harvest(config_file, writer_memory_mb, as_json, quiet, **flags):
    """Run the LM over text once and store the activations of every requested hook.

    All hooks come from ONE forward pass per batch that stops after the deepest requested layer. Rows at
    special-token positions are dropped by default; every --heldout-every-th window is never stored, so
    evaluation can draw unseen text. The store is globally shuffled, compressed and self-describing
    (provenance: model and hash, tokenizer, hooks, dataset and files, rules, seed). Interrupted? Rerun
    the same command: it resumes without recomputing what was staged; on a complete store it does nothing.

    Every option is also a key of the --config file's [harvest] table, lists as TOML lists (`layers = [10]`),
    except --out and --storage-options: the file's top-level `store` is the store harvest writes, its top-level
    `storage_options` table that store's fsspec options. The store may live at a URL (its bucket must exist).
    Examples:

    \b
        saeforge harvest --layers 10 --sites resid_post,mlp_out --tokens 1000000 --out stores/l10
        saeforge harvest --layers 10 --sites resid_post --out s3://bucket/l10 --storage-options '{"profile": "lab"}'
    """
    from saeforge.pipeline.errors import ConfigError, domain_errors
    from saeforge.pipeline.harvest import HarvestConfig
    from saeforge.pipeline.harvest import harvest as run_harvest

    file = read_config_or_fail(config_file)
    flags = given(flags, "harvest")
    values = {**file.get("harvest"), **flags}
    out = values.setdefault("out", file.store)
    if file.storage_options is not None:
        values.setdefault("storage_options", file.storage_options)
    if out is None:
        raise click.ClickException("no store path given: pass --out PATH or set the top-level `store` in the config "
                                   "file")
    if writer_memory_mb is not None:
        if writer_memory_mb < 1:
            raise click.ClickException(f"--writer-memory-mb must be >= 1, got {writer_memory_mb}")
        values["writer_memory_bytes"] = writer_memory_mb << 20
    try:
        cfg = build_config(HarvestConfig, values)
    except ConfigError as e:
        named = {"out": "--out" if "out" in flags else f"{file.path}: store"}
        raise config_failure(e, table="harvest", flags=flags, file=file, renamed=named) from None
    try:
        result = run_harvest(cfg, progress=not quiet)
    except domain_errors() as e:
        raise one_line(e) from None
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted: {out} is incomplete; rerun the same command to resume") from None
    except Exception as e:  # noqa: BLE001 - a store at a URL whose filesystem failed (endpoint, access): one line
        raise one_line(_remote_failure(out, e)) from None
    if as_json:
        echo_json(result.to_json())
    else:
        click.echo(summary(result))


def _remote_failure(out: str, exc: Exception):
    """The store's remote filesystem failing while harvest wrote it, as the StoreError that says what to do (what
    was committed stays: rerunning resumes); anything else is raised again, a bug with its traceback."""
    from saeforge.stores.files import is_url
    from saeforge.stores.remote import remote_error

    err = remote_error(out, exc, writing=True) if is_url(out) else None
    if err is None:
        raise exc
    return err


def summary(r) -> str:
    """A human summary of a HarvestResult."""
    lines = [f"store       {r.store}",
             f"rows        {r.rows:,} per hook ({r.rows_resumed:,} resumed from an earlier run)",
             f"LM          {r.forward_passes} forward passes, {r.tokens_forwarded:,} tokens, "
             f"{r.tokens_per_s:,.0f} tok/s",
             f"wall time   {r.wall_s:.1f} s (stream {r.lm_s:.1f} s, shuffle+write {r.write_s:.1f} s)",
             "bytes on disk per hook:"]
    lines += [f"  {h:<36} {n / 2**20:9.2f} MiB  ({n / max(r.rows, 1):.1f} B/row)"
              for h, n in sorted(r.bytes_per_hook.items())]
    return "\n".join(lines)
