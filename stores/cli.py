"""``saeforge store``: inspect and verify activation stores."""
from __future__ import annotations

import json
import sys

import click


@click.group()
def store():
    """Inspect and verify activation stores (local paths or fsspec URLs)."""


def _open(path: str):
    from saeforge.stores import StoreError, open_store

    try:
        return open_store(path)
    except StoreError as e:
        raise click.ClickException(str(e)) from None


@store.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print every attribute as JSON instead of a summary.")
def info(path, as_json):
    """Summarise the store at PATH: rows, hooks, dtype, layout, statistics, provenance."""
    s = _open(path)
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
def verify(path):
    """Read every chunk of the store at PATH and check checksums, row counts and statistics.

    Exits non-zero naming the first bad chunk.
    """
    from saeforge.stores import StoreError, verify_store

    try:
        report = verify_store(path)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    if not report.ok:
        first = report.problems[0]
        more = f" (+{len(report.problems) - 1} more problem(s))" if len(report.problems) > 1 else ""
        raise click.ClickException(f"{report.path} is damaged: {first}{more}")
    click.echo(f"ok: {report.path}: {report.n_rows:,} rows, {report.chunks_checked} chunks checked "
               f"in {report.seconds:.1f} s", file=sys.stdout)
