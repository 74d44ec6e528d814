"""`saeforge train` and `saeforge sweep`. Every option is a field of `SAEConfig` or `TrainConfig`, generated from
the dataclass (`trainer/options.py`); `--config FILE.toml` takes the same keys in its [sae] and [train] tables
(and a sweep's [grid] and [[saes]]): defaults < file < flags.

Only click is imported at module level (the options are read from the dataclasses' source), so `--help` stays
instant.
"""
from __future__ import annotations

import re

import click

from saeforge.stores.cli import UserPath, common_options, echo_json
from saeforge.trainer.errors import ConfigError, TrainerError
from saeforge.trainer.options import (CONFIG_OPTION, GRID_AXES, STORAGE_OPTIONS, ConfigFile, build_config, fields_of,
                                      given, list_option, read_config, table_options, with_options)

SOURCE = [
    click.option("--store", type=UserPath(url_ok=True),
                 help="Activation store (path or URL) [the config file's top-level `store`]."),
    STORAGE_OPTIONS,
    CONFIG_OPTION,
]
TAIL = [
    click.option("--resume", is_flag=True,
                 help="Insist on continuing a run (rerunning a command resumes a partial run and skips a complete one "
                      "anyway)."),
    common_options(),
]
TRAIN_OPTIONS = table_options("train", skip=("hook",))
OUT_DIR = UserPath(url_ok=True)  # a URL is refused with its own line (train_from_store: local output check)


def _fail(exc: Exception) -> click.ClickException:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return click.ClickException(msg)


_INVALID = re.compile(r"invalid (train|SAE) config: (.*)")
"""The message of `TrainConfig` / `SAEConfig`'s `__post_init__`: "field problem; field problem"."""


def config_error(exc: Exception, file: ConfigFile, flags: dict[str, dict]) -> str:
    """The one line of a TrainConfig / SAEConfig error, each bad field named as the user gave it: as its flag
    (`--steps`) when one of `flags` (table -> the flags given) set it, else as `FILE: train.steps` (`sae.`,
    `grid.`, `saes[i].`) when the --config file did."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    m = _INVALID.match(text)
    if not m:
        return text
    tables = ("train",) if m[1] == "train" else ("sae", "grid")
    named = [_named(problem, tables, file, flags) for problem in m[2].split("; ")]
    return text if named == m[2].split("; ") else "; ".join(named)


def _named(problem: str, tables: tuple[str, ...], file: ConfigFile, flags: dict[str, dict]) -> str:
    field, _, rest = problem.partition(" ")
    if any(field in flags.get(t, {}) for t in tables):
        return f"--{field.replace('_', '-')} {rest}"
    homes = [f"{t}.{field}" for t in tables if field in file.get(t)]
    homes += [f"saes[{i}].{field}" for i, e in enumerate(file.saes) if field in e and "sae" in tables]
    return f"{file.path}: {homes[0]} {rest}" if homes else problem


def _human(summary: list[dict]) -> str:
    """One line per SAE: where it is, what it is, and its last logging window."""
    def num(row, key, fmt):
        return format(row[key], fmt) if isinstance(row.get(key), (int, float)) else "-"

    return "\n".join(f"{s['run_dir']}  {s['arch']} d_sae={s['d_sae']} {s['hook']}  step {s.get('step', '-')}  "
                     f"L0 {num(s, 'l0', '.1f')}  explained variance {num(s, 'explained_variance_window', '.3f')}  "
                     f"loss {num(s, 'loss', '.4g')}" for s in summary)


def _run(store, saes, train, out, *, sweep, resume, quiet, as_json, storage_options):
    from saeforge.stores.errors import StoreError
    from saeforge.trainer.ddp import env_rank
    from saeforge.trainer.run import train_from_store

    if not store:
        raise click.ClickException("no store given: pass --store PATH or set `store` in the config file")
    if out is None:
        raise click.ClickException("no output directory given: pass --out DIR or set `out` in the config file")
    try:
        rank = env_rank()
        summary = train_from_store(store, saes, train, out, sweep=sweep, resume=resume, progress=not quiet,
                                   storage_options=storage_options)
    except (StoreError, TrainerError) as exc:
        raise _fail(exc) from None  # under torchrun every rank prints its line
    if rank == 0 and as_json:  # one summary from a data-parallel run
        echo_json(summary if sweep else summary[0])
    elif rank == 0:
        click.echo(_human(summary))


@click.command()
@with_options(SOURCE, table_options("train", only=("hook",)), [
    click.option("--out", type=OUT_DIR, help="Run directory [the config file's top-level `out`] (rerun the same "
                                             "command to resume it; a complete run is left as is).")],
    table_options("sae", skip=("hook",)), TRAIN_OPTIONS, TAIL)
def train(config_file, out, resume, quiet, as_json, store, storage_options, **flags):
    """Train one SAE on a store's activations; writes a run directory (cfg.json, sae_weights.safetensors,
    metrics.jsonl, checkpoint.pt) and prints a summary of its last logging window (--json: every value).

    Every option below is also a key of the --config file: the SAE's in its [sae] table, the run's in [train]
    (`--l1` is `l1_coefficient`), `store`, `storage_options` and `out` at the top level. The same file seeds
    `saeforge sweep`. The store may live at an fsspec URL (s3://bucket/acts with --storage-options); the run
    directory is local.

    Example: saeforge train --store acts.zarr --hook blocks.1.hook_resid_post --arch gated --l1 1e-3
    --out runs/g1"""
    from saeforge.trainer.config import SAEConfig, TrainConfig

    try:
        file = read_config(config_file)
    except TrainerError as exc:
        raise _fail(exc) from None
    sae_flags, train_flags = given(flags, "sae"), given(flags, "train")
    try:
        sae = build_config(SAEConfig, file.get("sae"), sae_flags)
        cfg = build_config(TrainConfig, file.get("train"), train_flags)
    except ConfigError as exc:
        raise click.ClickException(config_error(exc, file, {"sae": sae_flags, "train": train_flags})) from None
    _run(store or file.store, [sae], cfg, file.out if out is None else out, sweep=False, resume=resume, quiet=quiet,
         as_json=as_json, storage_options=file.storage_options if storage_options is None else storage_options)


@click.command()
@with_options(SOURCE, [
    list_option("--hook", "hooks", tp=tuple[str, ...],
                help=fields_of("train")["hook"].doc + " Several: one read of each batch feeds the SAEs of every hook "
                     "(the grid's `hook` list) (a comma list, repeatable)."),
    click.option("--out", type=OUT_DIR, help="Sweep directory: sweep.json plus one run directory per SAE [the config "
                                             "file's top-level `out`] (rerun to resume).")],
    table_options("sae", only=GRID_AXES[1:], multiple=True, dest="grid"), [
    list_option("--l1-coefficient-baseline", "--l1-baseline", "grid__l1_coefficient_baseline", tp=tuple[float, ...],
                help="Lambdas for baseline SAEs only (a comma list, repeatable)  [default: the l1_coefficient list]"),
    click.option("--equal-compute/--no-equal-compute", "grid__equal_compute", default=None,
                 help="Baseline SAEs of the grid get 1.5x its width (the paper's equal-compute comparison)."
                      "  [default: false]")],
    table_options("sae", skip=(*GRID_AXES, "name")), TRAIN_OPTIONS, TAIL)
def sweep(config_file, out, resume, quiet, as_json, store, storage_options, hooks, **flags):
    """Train many SAEs (grid of hook x arch x width x lambda x seed, plus [[saes]] entries of the config file) on
    the same batches in one pass over the store; SAEs of one shape train as one batched module.

    Lambdas are in the paper's units (arXiv 2404.16014 App. D.1: loss on raw activations, reconstruction / n,
    and / E||x||^2 for baselines), whatever the store's normalisation. Several --hook values train the grid at
    every hook (per-hook lambdas: [[saes]] entries with `hook` in the config file). Rerunning the same command
    resumes an interrupted sweep and leaves a complete one as it is.

    The --config file is the one `saeforge train` reads: every SAE starts from its [sae] table (and the SAE
    flags), [grid] holds the lists the repeatable flags give (plus l1_coefficient_baseline and equal_compute),
    [[saes]] entries replace keys of [sae], [train] is the run. With no grid and no entries the sweep trains
    the file's one SAE.

    Example: saeforge sweep --store acts.zarr --hook blocks.1.hook_resid_post --arch gated,baseline
    --l1 1e-3,3e-3 --l1-baseline 1e-4 --d-sae 4096 --equal-compute --out runs/sweep1"""
    from saeforge.trainer.config import TrainConfig

    try:
        file = read_config(config_file)
    except TrainerError as exc:
        raise _fail(exc) from None
    hooks = hooks or ()
    train_flags, grid_flags, sae_flags = given(flags, "train"), given(flags, "grid"), given(flags, "sae")
    grid = {**file.get("grid"), **grid_flags}
    if len(hooks) == 1:
        train_flags["hook"] = hooks[0]
    elif hooks:
        grid["hook"] = grid_flags["hook"] = list(hooks)
    try:
        cfg = build_config(TrainConfig, file.get("train"), train_flags)
        saes = _sweep_saes({**file.get("sae"), **sae_flags}, grid, file.saes)
    except ConfigError as exc:
        raise click.ClickException(config_error(exc, file, {"sae": sae_flags, "train": train_flags,
                                                            "grid": grid_flags})) from None
    except TrainerError as exc:
        raise _fail(exc) from None
    _run(store or file.store, saes, cfg, file.out if out is None else out, sweep=True, resume=resume, quiet=quiet,
         as_json=as_json, storage_options=file.storage_options if storage_options is None else storage_options)


def _sweep_saes(base: dict, grid: dict, entries: list[dict]) -> list:
    """The sweep's SAEs: [sae] (`base`) expanded over the grid, then one per [[saes]] entry on top of `base`."""
    from saeforge.trainer.config import SAEConfig
    from saeforge.trainer.grid import expand_sweep

    equal_compute = bool(grid.pop("equal_compute", False))
    name = base.pop("name", None)
    explicit = [{**base, **entry} for entry in entries]
    if not grid and not explicit:
        return [SAEConfig(**base, name=name)]  # a train file seeds a sweep unchanged
    if name is not None:
        raise ConfigError(f"sae.name = {name!r} would name every SAE of the sweep alike; name [[saes]] entries "
                         "instead (grid SAEs are named by hook, arch, width, lambda and seed)")
    return expand_sweep({**base, **grid} if grid else {}, {}, explicit, equal_compute=equal_compute)
