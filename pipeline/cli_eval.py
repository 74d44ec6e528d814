"""`saeforge eval RUN... [--tokens N]` and `saeforge plot SWEEP_DIR`.

Only click and the option machinery (`trainer/options.py`, which reads `EvalConfig` from its source) are
imported at module level, so `--help` stays instant; results go to stdout (a summary, or JSON with --json),
progress to stderr.
"""
from __future__ import annotations

from pathlib import Path

import click

from saeforge.pipeline.cli_common import one_line, stage_config
from saeforge.stores.cli import UserPath, common_options, echo_json
from saeforge.pipeline.plots import FORMATS
from saeforge.trainer.options import CONFIG_OPTION, STORAGE_OPTIONS, table_options, with_options


def _summary(rec: dict) -> dict:
    keep = ("loss_recovered", "loss_recovered_ci95", "loss_recovered_mean", "delta_ce", "delta_ce_ci95", "kl",
            "l0", "explained_variance", "gamma", "n_dead", "n_dense")
    return {"run_dir": rec["run_dir"], "architecture": rec["architecture"], "hook": rec["hook"],
            "strategy": rec["strategy"], "lm_dtype": rec.get("lm_dtype"), "n_tokens": rec["tokens"]["n_tokens"],
            **{k: rec["metrics"].get(k) for k in keep}}


def _human(rec: dict) -> str:
    """One line per run: where, what, and its headline metrics with the loss-recovered interval."""
    m, ci = rec["metrics"], rec["metrics"].get("loss_recovered_ci95")
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""

    def num(key, fmt):
        return format(m[key], fmt) if isinstance(m.get(key), (int, float)) else "-"

    return (f"{rec['run_dir']}  {rec['architecture']} {rec['hook']}  loss recovered {num('loss_recovered', '.4f')}"
            f"{interval}  L0 {num('l0', '.1f')}  γ {num('gamma', '.3f')}  dead {num('n_dead', 'd')}  "
            f"({rec['tokens']['n_tokens']:,} tokens)")


@click.command("eval")
@click.argument("runs", nargs=-1, type=UserPath(url_ok=True, file_okay=False))
@with_options(table_options("eval"), [
    CONFIG_OPTION,
    click.option("--store", type=UserPath(url_ok=True), default=None,
                 help="Evaluate every run on this store's held-out text (it must hold the run's hook, harvested "
                      "from the same text and rules; a path or URL) [each run's training store, or its cfg.json "
                      "when gone]."),
    STORAGE_OPTIONS,
    click.option("--force", is_flag=True, help="Evaluate again even runs whose eval.json is up to date."),
    common_options()])
def eval_cmd(runs, config_file, store, storage_options, force, as_json, quiet, **flags):
    """Evaluate SAE run directories by splicing their reconstructions into the LM.

    On the held-out text of each run's training store (same context size and special-token rules), reports
    clean / spliced / zero- and mean-ablation cross-entropy, loss recovered (arXiv 2404.16014 eq. 5) and ΔCE
    with paired bootstrap 95% intervals over the held-out windows, KL, L0, MSE, explained variance, γ
    (eq. 10), l2 ratio, dead and dense features; writes eval.json into each run directory and prints one line
    per run (--json: a JSON list of each run's metrics). SAEs at the same hook share the forward pass up to it.
    The LM runs in the dtype the store was harvested with unless --dtype says otherwise.

    Rerunning is a no-op for a run whose eval.json was made with the same settings, weights and store: it
    is reported as up to date (its summary is read back from eval.json; no LM is loaded when every run is).

    Every option is also a key of the --config file's [eval] table. Without RUNS, eval takes the runs of the
    file's top-level `out` (every run of a sweep directory, or the one run directory). A store at a URL is read
    with --storage-options (the file's top-level `storage_options`); run directories are local.

        saeforge eval runs/sweep1/* --tokens 262144
    """
    from saeforge.pipeline.errors import domain_errors
    from saeforge.pipeline.evaluate import EvalConfig, evaluate_runs

    file, cfg = stage_config(EvalConfig, "eval", config_file, flags)
    run_dirs = _local_runs(runs, file)
    options = file.storage_options if storage_options is None else storage_options
    try:
        records = evaluate_runs(run_dirs, cfg, progress=not quiet, force=force, store=store, storage_options=options)
    except domain_errors() as e:
        raise one_line(e) from None
    if as_json:
        echo_json([_summary(r) for r in records])
    else:
        click.echo("\n".join(_human(r) for r in records))


def _local_runs(runs: tuple, file) -> list:
    """RUNS, or the runs of the config file's `out`; a URL among them is refused (eval.json is written beside each
    run's weights, in a local directory)."""
    from saeforge.stores.files import is_url, local_dir_problem

    for run, what in [(r, "RUN") for r in runs] or [(file.out, f"{file.path}: out")]:
        if run and is_url(str(run)):
            raise click.ClickException(local_dir_problem(str(run), what, "run directories (and their eval.json) are"))
    return list(runs) or _runs_in(file.out)


def _runs_in(out: str | None) -> list[Path]:
    """The run directories of a config file's `out`: a sweep's runs (sweep.json), or `out` itself."""
    from saeforge.trainer.rundir import sweep_run_dirs

    if not out:
        raise click.UsageError("no runs given: pass RUN directories, or --config with a top-level `out`")
    listed = sweep_run_dirs(out)
    return [Path(out)] if listed is None else listed


@click.command()
@click.argument("sweep_dir", type=UserPath(url_ok=True, file_okay=False))
@click.option("--out", type=UserPath(url_ok=True), default=None, help="Output directory [SWEEP_DIR/report].")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="png", show_default=True,
              help="File format of the plots.")
@common_options()
def plot(sweep_dir, out, fmt, as_json, quiet):
    """Table (CSV + markdown) and plots (PNG, or --format svg|pdf) for an evaluated sweep.

    Reads SWEEP_DIR/sweep.json (or every subdirectory with eval.json) and writes the Pareto plot (L0, log
    scale, vs loss recovered, one series per architecture, the bootstrap 95% interval as error bars), γ vs
    L0, training curves, one feature-density histogram per SAE, and sweep_table.csv / sweep_table.md (with
    the intervals). A sweep over several hooks gets one panel per hook and a hook column, rows sorted by
    hook, architecture and λ. Prints the files written (--json: {"table": [...], "plots": [...], "hooks": [...]}).
    """
    from saeforge.pipeline.errors import domain_errors
    from saeforge.pipeline.plots import plot_sweep

    try:
        paths = plot_sweep(sweep_dir, out, fmt=fmt)
    except domain_errors() as e:
        raise one_line(e) from None
    if as_json:
        echo_json(paths)
    else:
        click.echo("\n".join(paths["table"] + paths["plots"]))
