"""``saeforge store``: inspect and verify activation stores; and what every command line shares, defined once:
``--storage-options`` (a store's fsspec options, :class:`JsonObject`), paths with ``~`` expanded
(:class:`UserPath`), ``--json``, ``--quiet`` and ``--threads`` (:func:`common_options`)."""
from __future__ import annotations

import functools
import json
import os

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


class UserPath(click.Path):
    """A path on the command line, ``~`` expanded before click's checks (``stores.files.expand_path``); a URL is
    passed on untouched and unchecked (``url_ok``) or refused by the checks like any missing path."""

    def __init__(self, *, url_ok: bool = False, metavar: str = "PATH", **checks):
        super().__init__(**checks)
        self.url_ok, self.name = url_ok, metavar.lower()  # TEXT where a name is as good as a path (--model)

    def convert(self, value, param, ctx):
        from saeforge.stores.files import expand_path, is_url

        if self.url_ok and isinstance(value, str) and is_url(value):
            return value
        return super().convert(expand_path(value) if isinstance(value, (str, os.PathLike)) else value, param, ctx)


class Threads(click.ParamType):
    """A count of CPU threads for torch (>= 1); anything else is one ``Error:`` line naming where it came from."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        source = ctx.get_parameter_source(param.name) if ctx is not None and param is not None else None
        where = THREADS_ENV if source is click.core.ParameterSource.ENVIRONMENT else "--threads"
        try:
            n = int(str(value).strip())
        except ValueError:
            n = 0
        if n < 1:
            raise click.ClickException(f"{where} must be a whole number of threads >= 1, got {value!r}")
        return n


THREADS_ENV = "SAEFORGE_THREADS"
THREADS_HELP = (f"CPU threads torch may use (also ${THREADS_ENV}; before or after the command) [torch's default]; "
                "fewer is faster when other jobs share the cores.")


def set_threads(ctx, param, value):
    """--threads' callback: cap torch's CPU threads (torch imported only when asked)."""
    if value is not None:
        import torch

        torch.set_num_threads(value)
    return value


def threads_option(envvar: str | None = None):
    return click.option("--threads", type=Threads(), default=None, envvar=envvar, callback=set_threads,
                        expose_value=False, help=THREADS_HELP)


def _run_quiet(fn):
    """The command body runs inside ``stores.progress.quiet`` when it is given ``--quiet``: entered when the
    command is invoked, not while its options are parsed, so a later option that fails to parse leaves nothing
    silenced behind (a process that goes on, a notebook or a test runner, keeps its own settings)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        from saeforge.stores.progress import quiet

        with quiet(bool(kwargs.get("quiet"))):
            return fn(*args, **kwargs)
    return run


QUIET_HELP = ("No progress bars, and no log lines or bars from transformers, datasets, huggingface_hub or wandb; "
              "errors still show.")


def common_options(*, as_json: bool = True):
    """The options every command takes: ``--json`` (``as_json``: stdout is one JSON document instead of a short
    summary), ``--quiet`` (the command receives it, and runs silenced) and ``--threads`` (handled here)."""
    decos = [click.option("--json", "as_json", is_flag=True,
                          help="Print the result as one JSON document instead of a summary.")] if as_json else []
    decos += [click.option("--quiet", is_flag=True, help=QUIET_HELP), threads_option()]

    def apply(fn):
        fn = _run_quiet(fn)
        for deco in reversed(decos):
            fn = deco(fn)
        return fn
    return apply


def echo_json(obj) -> None:
    """The command's result as its one JSON document on stdout."""
    click.echo(json.dumps(obj, indent=1, default=str))


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


STORE_PATH = UserPath(url_ok=True)
"""A store's PATH argument: a local path (``~`` expanded) or an fsspec URL."""


@store.command()
@click.argument("path", type=STORE_PATH)
@storage_options_option()
@common_options()
def info(path, as_json, quiet, storage_options):
    """Summarise the store at PATH (a local path or an fsspec URL): rows, hooks, dtype, layout, statistics,
    provenance (--json: every attribute)."""
    s = _open(path, storage_options)
    if as_json:
        echo_json({"path": s.path, "nbytes_stored": s.nbytes_stored(), **s.attrs.to_json()})
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
@click.argument("path", type=STORE_PATH)
@storage_options_option()
@common_options()
def verify(path, as_json, quiet, storage_options):
    """Read every chunk of the store at PATH (a local path or an fsspec URL) and check checksums, row counts and
    statistics.

    Exits non-zero naming the first bad chunk (with --json, after printing the whole report).
    """
    from saeforge.stores import StoreError, verify_store

    try:
        report = verify_store(path, storage_options=storage_options, progress=not quiet)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        echo_json({**report._asdict(), "first_bad_chunk": report.first_bad_chunk})
    if not report.ok:
        first = report.problems[0]
        more = f" (+{len(report.problems) - 1} more problem(s))" if len(report.problems) > 1 else ""
        raise click.ClickException(f"{report.path} is damaged: {first}{more}")
    if not as_json:
        click.echo(f"ok: {report.path}: {report.n_rows:,} rows, {report.chunks_checked} chunks checked "
                   f"in {report.seconds:.1f} s")
