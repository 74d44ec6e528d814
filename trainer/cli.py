"""`saeforge train` and `saeforge sweep`. Options come from flags or a TOML file: defaults < file < flags.

Only click is imported at module level, so `--help` stays instant.
"""
from __future__ import annotations

import json

import click

TRAIN_FLAGS = [
    click.option("--steps", type=int, help="Optimiser steps [300000]."),
    click.option("--batch-rows", type=int, help="Activations per step [4096]."),
    click.option("--lr-warmup-steps", type=int, help="Linear LR warm-up [1000]."),
    click.option("--l1-warmup-steps", type=int, help="Linear lambda warm-up [0: off]."),
    click.option("--loss-scaling", type=click.Choice(["paper", "per_dim", "sum"]),
                 help="Reconstruction-term scaling [paper: /n, baselines also /E||x||^2]."),
    click.option("--resample-every", type=int, help="Resample dead features every N steps [25000; 0: off]."),
    click.option("--resample-rows", type=int, help="Inputs scored for resampling [819200]."),
    click.option("--autocast", type=click.Choice(["auto", "none", "bf16"]),
                 help="Mixed precision [auto: bf16 where the device runs it natively and faster, else none]."),
    click.option("--device", help="auto, cpu, cuda, cuda:N [auto]."),
    click.option("--compile/--no-compile", "compile", default=None, help="torch.compile the loss [off]."),
    click.option("--stack-mib", type=int, help="Max MiB of one stacked (K, rows, d_sae) activation [0: auto]."),
    click.option("--log-every", type=int, help="Steps between metrics lines [100]."),
    click.option("--checkpoint-every", type=int, help="Steps between checkpoints [5000]."),
    click.option("--data-seed", type=int, help="Loader chunk-order seed [0]."),
    click.option("--store", "store", help="Activation store (path or URL)."),
    click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                 help="TOML file with any of these options (flags win)."),
    click.option("--resume", is_flag=True,
                 help="Insist on continuing a run (rerunning a command resumes a partial run and skips a complete one "
                      "anyway)."),
    click.option("--quiet", is_flag=True, help="No progress bar."),
]


def _options(decorators):
    def apply(fn):
        for deco in reversed(decorators):
            fn = deco(fn)
        return fn
    return apply


def _split_flags(kwargs: dict) -> tuple[dict, dict]:
    """(train-config flags, other flags) with unset (None) flags dropped."""
    from saeforge.trainer.config import TRAIN_FIELDS

    train = {k: v for k, v in kwargs.items() if k in TRAIN_FIELDS and v is not None}
    rest = {k: v for k, v in kwargs.items() if k not in TRAIN_FIELDS}
    return train, rest


def _fail(exc: Exception) -> click.ClickException:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return click.ClickException(msg)


def _run(store, saes, train, out, *, sweep, resume, quiet):
    from saeforge.stores.errors import StoreError
    from saeforge.trainer.errors import TrainerError
    from saeforge.trainer.run import train_from_store

    if not store:
        raise click.ClickException("no store given: pass --store PATH or set `store` in the config file")
    if not out:
        raise click.ClickException("no output directory given: pass --out DIR or set `out` in the config file")
    try:
        summary = train_from_store(store, saes, train, out, sweep=sweep, resume=resume, progress=not quiet)
    except (StoreError, TrainerError, ValueError) as exc:
        raise _fail(exc) from None
    click.echo(json.dumps(summary if sweep else summary[0], indent=2))


@click.command()
@_options(TRAIN_FLAGS)
@click.option("--hook", help="Hook point (store array) to train on.")
@click.option("--out", help="Run directory (rerun the same command to resume it; a complete run is left as is).")
@click.option("--arch", type=click.Choice(["baseline", "gated"]), help="Architecture [gated].")
@click.option("--d-sae", type=int, help="Dictionary width [4608].")
@click.option("--l1", "l1_coefficient", type=float, help="Sparsity coefficient lambda [1e-3].")
@click.option("--lr", type=float, help="Peak learning rate [3e-4].")
@click.option("--seed", type=int, help="Initialisation and resampling seed [0].")
@click.option("--regime", type=click.Choice(["paper", "anthropic"]), help="Loss/constraint regime [paper].")
def train(config_file, out, resume, quiet, store, **flags):
    """Train one SAE on a store's activations; writes a run directory (cfg.json, sae_weights.safetensors,
    metrics.jsonl, checkpoint.pt) and prints a JSON summary.

    Example: saeforge train --store acts.zarr --hook blocks.1.hook_resid_post --arch gated --l1 1e-3
    --out runs/g1"""
    from saeforge.trainer.config import SAEConfig, TrainConfig, build, read_toml, split_fields

    file = read_toml(config_file) if config_file else {}
    file_store, file_out = file.pop("store", None), file.pop("out", None)
    store, out = store or file_store, out or file_out
    train_flags, rest = _split_flags(flags)
    try:
        file_sae, file_train = split_fields(file)
        sae = build(SAEConfig, file_sae, {k: v for k, v in rest.items() if v is not None}, where="SAE options")
        cfg = build(TrainConfig, file_train, train_flags, where=config_file or "options")
    except ValueError as exc:
        raise _fail(exc) from None
    _run(store, [sae], cfg, out, sweep=False, resume=resume, quiet=quiet)


@click.command()
@_options(TRAIN_FLAGS)
@click.option("--hook", "hooks", multiple=True,
              help="Hook point(s) to train on (repeatable: one read of each batch feeds the SAEs of every hook).")
@click.option("--out", help="Sweep directory: sweep.json plus one run directory per SAE (rerun to resume).")
@click.option("--arch", "archs", multiple=True, type=click.Choice(["baseline", "gated"]),
              help="Architectures (repeat the flag) [gated].")
@click.option("--d-sae", "d_saes", multiple=True, type=int, help="Widths (repeatable) [4608].")
@click.option("--l1", "l1s", multiple=True, type=float, help="Lambdas (repeatable).")
@click.option("--l1-baseline", "l1s_baseline", multiple=True, type=float,
              help="Lambdas for baseline SAEs only (repeatable; default: --l1).")
@click.option("--seed", "seeds", multiple=True, type=int, help="Seeds (repeatable) [0].")
@click.option("--lr", type=float, help="Peak learning rate of every SAE [3e-4].")
@click.option("--equal-compute/--no-equal-compute", default=None,
              help="Baseline SAEs get 1.5x the given width (the paper's equal-compute comparison).")
def sweep(config_file, out, resume, quiet, store, hooks, archs, d_saes, l1s, l1s_baseline, seeds, lr, equal_compute,
          **flags):
    """Train many SAEs (grid of arch x width x lambda x seed, plus [[sae]] entries of the TOML file) on the
    same batches in one pass over the store; SAEs of one shape train as one batched module.

    Lambdas are in the paper's units (arXiv 2404.16014 App. D.1: loss on raw activations, reconstruction / n,
    and / E||x||^2 for baselines), whatever the store's normalisation. Several --hook values train the grid at
    every hook (per-hook lambdas: [[sae]] entries with `hook` in the TOML file). Rerunning the same command
    resumes an interrupted sweep and leaves a complete one as it is.

    Example: saeforge sweep --store acts.zarr --hook blocks.1.hook_resid_post --arch gated --arch baseline
    --l1 1e-3 --l1 3e-3 --l1-baseline 1e-4 --d-sae 4096 --equal-compute --out runs/sweep1"""
    from saeforge.trainer.config import TrainConfig, build, read_toml
    from saeforge.trainer.sweep import expand_sweep

    file = read_toml(config_file) if config_file else {}
    store, out = store or file.get("store"), out or file.get("out")
    train_flags, _ = _split_flags(flags)
    if len(hooks) == 1:
        train_flags["hook"] = hooks[0]
    grid_flags = {"hook": list(hooks) if len(hooks) > 1 else None, "arch": list(archs) or None, "d_sae": list(d_saes) or None, "l1_coefficient": list(l1s) or None,
                  "l1_coefficient_baseline": list(l1s_baseline) or None, "seed": list(seeds) or None, "lr": lr}
    try:
        unknown = sorted(set(file) - {"store", "out", "train", "grid", "sae", "equal_compute"})
        if unknown:
            raise ValueError(f"unknown key(s) in {config_file}: {', '.join(unknown)} "
                             "(valid: store, out, equal_compute, [train], [grid], [[sae]])")
        cfg = build(TrainConfig, file.get("train", {}), train_flags, where=f"{config_file} [train]")
        eq = equal_compute if equal_compute is not None else bool(file.get("equal_compute", False))
        saes = expand_sweep(file.get("grid", {}), grid_flags, file.get("sae", []), equal_compute=eq)
    except ValueError as exc:
        raise _fail(exc) from None
    _run(store, saes, cfg, out, sweep=True, resume=resume, quiet=quiet)
