"""Sweep reports from eval.json files: a table (CSV + markdown) and plots (PNG, SVG or PDF: `FORMATS`).

Plots: the Pareto plot (L0 on a log axis vs loss recovered, one series per architecture with its paired
bootstrap 95% interval as error bars, arXiv 2404.16014 Fig. 1), γ vs L0 (Fig. 6), training curves from each
run's metrics.jsonl, and a log10 feature-density histogram per SAE. A sweep may hold SAEs of several hooks
(sites) of one store: the Pareto and γ plots then get one panel per hook, and the table a hook column (rows
sorted by hook, architecture, λ). Figures are built with matplotlib's object API (`matplotlib.figure.Figure`,
saved through its own canvas), so neither pyplot nor the process's backend (a notebook's) is touched.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from saeforge.pipeline.errors import PipelineError
from saeforge.pipeline.paths import check_output_dir
from saeforge.trainer.rundir import EVAL_FILE, METRICS_FILE, eval_path, read_metrics, read_record, sweep_run_dirs

CI_COLUMNS = {"loss recovered [95% CI]": "loss_recovered_ci95",
              "loss recovered, mean abl. [95% CI]": "loss_recovered_mean_ci95", "ΔCE [95% CI]": "delta_ce_ci95"}
"""Table column -> eval.json metric holding a [lo, hi] interval."""
COLUMNS = ["hook", "run", "architecture", "d_sae", "l1_coefficient", "l0", "loss_recovered",
           "loss recovered [95% CI]", "loss_recovered_mean", "loss recovered, mean abl. [95% CI]", "delta_ce",
           "ΔCE [95% CI]", "kl", "ce_clean", "ce_sae", "ce_zero_ablation", "ce_mean_ablation", "mse",
           "explained_variance", "gamma", "l2_ratio", "n_dead", "n_dense", "frac_alive", "n_windows", "lm_dtype"]
ARCH_STYLE = {"baseline": ("tab:blue", "o"), "gated": ("tab:red", "s")}
FORMATS = ("png", "svg", "pdf")
"""File formats of the plots (`saeforge plot --format`, `saeforge demo --format`)."""
PANELS_PER_ROW = 3


class PlotError(PipelineError):
    """The sweep directory holds nothing to plot; the message says what is missing and what to run."""


def _run_dirs(sweep_dir: Path) -> list[Path]:
    listed = sweep_run_dirs(sweep_dir)
    return listed if listed is not None else sorted(p for p in sweep_dir.iterdir() if eval_path(p).is_file())


def load_sweep(sweep_dir: str | Path) -> list[dict]:
    """One row per evaluated run of the sweep (eval.json metrics, hook, architecture, λ, plus `eval`: the whole
    eval.json), sorted by hook, architecture and λ."""
    if not str(sweep_dir).strip():
        raise PlotError("the sweep directory given is empty ('')")
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise PlotError(f"{sweep_dir} is not a directory")
    dirs = _run_dirs(sweep_dir)
    rows, missing = [], []
    for d in dirs:
        if not eval_path(d).is_file():
            missing.append(d.name)
            continue
        ev = read_eval(d)
        sae_cfg = read_record(d).get("sae", {})
        rows.append({"run": d.name, "architecture": ev["architecture"], "hook": ev["hook"],
                     "l1_coefficient": sae_cfg.get("l1_coefficient"), "lm_dtype": ev.get("lm_dtype"),
                     **ev["metrics"], "eval": ev})
    if not rows:
        raise PlotError(f"no run in {sweep_dir} has {EVAL_FILE}; run `saeforge eval {sweep_dir}/*` first")
    if missing:
        print(f"saeforge plot: skipping runs without {EVAL_FILE}: {', '.join(missing)}", file=sys.stderr)
    return sorted(rows, key=_order)


def read_eval(run_dir: Path) -> dict:
    """A run's eval.json, with what the plots read from it; PlotError naming the file when it is not that."""
    path = eval_path(run_dir)
    try:
        ev = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PlotError(f"{path} cannot be read as JSON ({str(e).splitlines()[0]}); rerun `saeforge eval "
                        f"{run_dir}` to rewrite it") from None
    needed = ("architecture", "hook", "metrics", "density_histogram")
    lacking = [k for k in needed if k not in ev] if isinstance(ev, dict) else list(needed)
    if not lacking and not isinstance(ev["metrics"], dict):
        lacking = ["metrics object"]
    if lacking:
        raise PlotError(f"{path} is not an eval.json of saeforge eval (no {', '.join(lacking)}); rerun `saeforge "
                        f"eval {run_dir}` to rewrite it")
    return ev


def _order(r: dict):
    """Hook, architecture, λ (runs without one last), then L0."""
    lam = r.get("l1_coefficient")
    return (r["hook"], r["architecture"], math.inf if lam is None else lam, r.get("l0") or 0)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _cell(r: dict, column: str) -> str:
    if column in CI_COLUMNS:
        ci = r.get(CI_COLUMNS[column])
        return f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
    return _fmt(r.get(column))


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """sweep_table.csv and sweep_table.md (loss recovered, γ and explained variance as plain fractions;
    intervals as `[lo, hi]`), in the rows' order."""
    csv_path, md_path = out_dir / "sweep_table.csv", out_dir / "sweep_table.md"
    cells = [[_cell(r, c) for c in COLUMNS] for r in rows]
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(cells)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _figure(n_panels: int = 1, panel=(6.0, 4.5)):
    """(Figure, list of n_panels axes), PANELS_PER_ROW panels per row, unused cells removed."""
    from matplotlib.figure import Figure

    ncols = min(n_panels, PANELS_PER_ROW)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


def _save(fig, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)
    return path


def _series(rows, y: str, ci: str | None):
    """{architecture: [(L0, y, [lo, hi] or None)]} sorted by L0; rows without L0 (or y) are left out."""
    out: dict[str, list] = {}
    for r in rows:
        if r.get("l0") and r.get(y) is not None:
            out.setdefault(r["architecture"], []).append((r["l0"], r[y], r.get(ci) if ci else None))
    return {a: sorted(v, key=lambda p: p[0]) for a, v in sorted(out.items())}


def _panel(ax, rows, y: str, ci: str | None, hline: float | None) -> None:
    for arch, pts in _series(rows, y, ci).items():
        color, marker = ARCH_STYLE.get(arch, ("tab:gray", "^"))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if any(p[2] for p in pts):  # asymmetric error bars from the interval; none where it is missing
            err = [[max(p[1] - p[2][0], 0) if p[2] else 0 for p in pts],
                   [max(p[2][1] - p[1], 0) if p[2] else 0 for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker=marker, color=color, label=arch, capsize=3)
        else:
            ax.plot(xs, ys, marker=marker, color=color, label=arch)
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def sweep_figure(rows: list[dict], y: str, ylabel: str, title: str, *, ci: str | None = None,
                 hline: float | None = None):
    """One panel per hook (sorted): `y` against L0 (log axis), one series per architecture, with the
    eval.json interval `ci` as error bars when given. Returns the matplotlib Figure."""
    hooks = sorted({r["hook"] for r in rows})
    fig, axes = _figure(len(hooks))
    for ax, hook in zip(axes, hooks):
        _panel(ax, [r for r in rows if r["hook"] == hook], y, ci, hline)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} — {hook}", fontsize=10)
    return fig


def plot_density(row: dict, path: Path) -> Path:
    """Histogram of log10 feature density for one SAE; dead features reported in the title."""
    h = row["eval"]["density_histogram"]
    edges, counts = h["log10_edges"], h["counts"]
    fig, (ax,) = _figure(1, (5.5, 3.5))
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.axvline(math.log10(h["threshold"]), color="k", ls="--", lw=0.8)
    ax.set_xlabel("log10 feature density (fraction of tokens active)")
    ax.set_ylabel("features")
    ax.set_title(f"{row['run']} ({row['architecture']}, {row['hook']}): {h['n_dead']} dead, "
                 f"{row.get('n_dense')} dense", fontsize=9)
    return _save(fig, path, 100)


CURVES = [("l0", "L0", True), ("explained_variance_window", "explained variance (per logging window)", False),
          ("gamma", "γ", False), ("dead_fraction", "dead fraction", False)]
"""metrics.jsonl key, panel title, log y axis. The training explained variance is a per-window quantity, not
eval.json's (saeforge.trainer.rundir defines both)."""


def plot_training_curves(rows: list[dict], sweep_dir: Path, path: Path) -> Path | None:
    """L0, explained variance (per logging window), γ and dead fraction against step for every run with a
    metrics.jsonl."""
    runs = [(r, read_metrics(sweep_dir / r["run"])) for r in rows if (sweep_dir / r["run"] / METRICS_FILE).is_file()]
    if not runs:
        return None
    fig, axes = _figure(len(CURVES), (4.0, 3.6))
    several = len({r["hook"] for r, _ in runs}) > 1
    for ax, (key, label, log) in zip(axes, CURVES):
        for r, lines in runs:
            pts = [(m["step"], m[key]) for m in lines if m.get(key) is not None]
            color, _ = ARCH_STYLE.get(r["architecture"], ("tab:gray", "^"))
            where = f"{r['hook']} " if several else ""
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.8, lw=1.2,
                    label=f"{where}{r['architecture']} λ={_fmt(r.get('l1_coefficient'))}")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    return _save(fig, path, 100)


def plot_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None, *, fmt: str = "png"
               ) -> dict[str, list[str]]:
    """Write the table and plots for a sweep, the plots as `fmt` files (one of `FORMATS`); returns
    {"table": [csv, md], "plots": [files...], "hooks": [...]}."""
    if fmt not in FORMATS:
        raise PlotError(f"plot format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if out_dir is not None:
        check_output_dir(out_dir, "--out")  # refused before anything is read (or said about the runs)
    rows = load_sweep(sweep_dir)  # before Path(): an empty SWEEP_DIR is refused, not read as "."
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / "report" if out_dir is None else Path(out_dir)
    if out_dir is None:
        check_output_dir(out, "the report folder (set it with --out)")
    out.mkdir(parents=True, exist_ok=True)
    pareto = sweep_figure(rows, "loss_recovered", "loss recovered (eq. 5, zero ablation)", "Pareto",
                          ci="loss_recovered_ci95", hline=1.0)
    gamma = sweep_figure(rows, "gamma", "γ (relative reconstruction bias, eq. 10)", "Shrinkage", hline=1.0)
    plots = [_save(pareto, out / f"pareto.{fmt}", 120), _save(gamma, out / f"gamma_vs_l0.{fmt}", 120)]
    curves = plot_training_curves(rows, sweep_dir, out / f"training_curves.{fmt}")
    plots += [curves] if curves else []
    plots += [plot_density(r, out / f"density_{r['run']}.{fmt}") for r in rows]
    return {"table": [str(p) for p in write_table(rows, out)], "plots": [str(p) for p in plots],
            "hooks": sorted({r["hook"] for r in rows})}
