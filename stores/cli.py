"""``saeforge store``: inspect and verify activation stores; and ``--storage-options``, the one spelling of a
store's fsspec options on every command line (:class:`JsonObject`)."""
from __future__ import annotations

import json
import sys

import click

STORAGE_OPTIONS_EXAMPLE = '\'{"key": "...", "secret": "...", "client_kwargs": {"endpoint_url": "http://host:9000"}}\''
STORAGE_OPTIONS_HELP = ("Options of the fsspec filesystem of a store at a URL, as one JSON object (credentials, "
                        f"endpoint), e.g. for s3:// {STORAGE_OPTIONS_EXAMPLE}.")


class JsonObject(click.ParamType):
    """A dict on the command line: one JSON object (``--storage-options '{"anon": true}'``). Anything else is one
    ``Error:`` line naming the flag and what to write; the value itself is not echoed (it may hold secrets)."""

    name = "json"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        flag = param.opts[0] if param is not None and param.opts else "the value"
        try:
            parsed = json.loads(value)
        except ValueError as e:
            why = f"not valid JSON ({e.msg} at character {e.pos})" if isinstance(e, json.JSONDecodeError) else str(e)
            raise click.ClickException(f"{flag} is {why}; write one JSON object, e.g. {flag} "
                                       f"{STORAGE_OPTIONS_EXAMPLE}") from None
        if not isinstance(parsed, dict):
            raise click.ClickException(f"{flag} is a JSON {type(parsed).__name__}, not an object; write one JSON "
                                       f"object, e.g. {flag} {STORAGE_OPTIONS_EXAMPLE}")
        return parsed


def storage_options_option(help_: str = STORAGE_OPTIONS_HELP):
    return click.option("--storage-options", "storage_options", type=JsonObject(), default=None, help=help_)


@click.group()
def store():
    """Inspect and verify activation stores (local paths or fsspec URLs).

    A store at a URL is opened with --storage-options (its fsspec filesystem's options), e.g.

        saeforge store verify s3://bucket/acts --storage-options '{"endpoint_url": "http://localhost:9000"}'
    """


def _open(path: str, storage_options: dict | None):
    from saeforge.stores import StoreError, open_store

    try:
        return open_store(path, storage_options)
    except StoreError as e:
        raise click.ClickException(str(e)) from None


@store.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print every attribute as JSON instead of a summary.")
@storage_options_option()
def info(path, as_json, storage_options):
    """Summarise the store at PATH (a local path or an fsspec URL): rows, hooks, dtype, layout, statistics,
    provenance."""
    s = _open(path, storage_options)
    if as_json:
        click.echo(json.dumps({"path": s.path, "nbytes_stored": s.nbytes_stored(), **s.attrs.to_json()}, indent=1))
        return
    stored = s.nbytes_stored()
    click.echo(f"store     {s.path}")
    click.echo(f"rows      {s.n_rows:,}   dtype {s.dtype}   seed {s.attrs.seed}")
    click.echo(f"layout    chunks of {s.chunk_rows} rows, shards of {s.shard_rows} rows, "
               f"{stored / 2**20:,.1f} MiB on disk ({stored / s.n_rows:,.0f} B/row)")
    for h in s.hooks:
        st = s.stats(h)
        click.echo(f"hook      {h}  d={s.d(h)}  E|x|^2={st.mean_sq_norm:.4g}  E|x|={st.mean_norm:.4g}  "
                   f"scale={st.scale:.4g}")
    for key, value in s.provenance.items():  # what harvest recorded (model, dataset, context size, ...)
        text = json.dumps(value)
        click.echo(f"{key:<9} {text if len(text) <= 100 else text[:97] + '...'}")


@store.command()
@click.argument("path")
@storage_options_option()
def verify(path, storage_options):
    """Read every chunk of the store at PATH (a local path or an fsspec URL) and check checksums, row counts and
    statistics.

    Exits non-zero naming the first bad chunk.
    """
    from saeforge.stores import StoreError, verify_store

    try:
        report = verify_store(path, storage_options=storage_options)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    if not report.ok:
        first = report.problems[0]
        more = f" (+{len(report.problems) - 1} more problem(s))" if len(report.problems) > 1 else ""
        raise click.ClickException(f"{report.path} is damaged: {first}{more}")
    click.echo(f"ok: {report.path}: {report.n_rows:,} rows, {report.chunks_checked} chunks checked "
               f"in {report.seconds:.1f} s", file=sys.stdout)
