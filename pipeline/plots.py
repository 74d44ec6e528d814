"""Sweep reports from eval.json files: a table (CSV + markdown) and PNG plots.

Plots: the Pareto plot (L0 on a log axis vs loss recovered, one series per architecture, arXiv 2404.16014
Fig. 1), γ vs L0 (Fig. 6), training curves from each run's metrics.jsonl, and a log10 feature-density
histogram per SAE. matplotlib runs on the Agg backend.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

SWEEP_FILE = "sweep.json"
EVAL_FILE = "eval.json"
COLUMNS = ["run", "architecture", "hook", "d_sae", "l1_coefficient", "l0", "loss_recovered",
           "loss_recovered_mean", "delta_ce", "kl", "ce_clean", "ce_sae", "ce_zero_ablation", "mse",
           "explained_variance", "gamma", "l2_ratio", "n_dead", "n_dense", "frac_alive"]
ARCH_STYLE = {"baseline": ("tab:blue", "o"), "gated": ("tab:red", "s")}


class PlotError(ValueError):
    """The sweep directory holds nothing to plot; the message says what is missing and what to run."""


def _run_dirs(sweep_dir: Path) -> list[Path]:
    listing = sweep_dir / SWEEP_FILE
    if listing.is_file():
        return [sweep_dir / name for name in json.loads(listing.read_text()).get("runs", [])]
    return sorted(p for p in sweep_dir.iterdir() if (p / EVAL_FILE).is_file())


def load_sweep(sweep_dir: str | Path) -> list[dict]:
    """One row per evaluated run of the sweep: COLUMNS plus `eval` (the whole eval.json)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise PlotError(f"{sweep_dir} is not a directory")
    dirs = _run_dirs(sweep_dir)
    rows, missing = [], []
    for d in dirs:
        if not (d / EVAL_FILE).is_file():
            missing.append(d.name)
            continue
        ev = json.loads((d / EVAL_FILE).read_text())
        cfg_path = d / "cfg.json"
        sae_cfg = json.loads(cfg_path.read_text()).get("saeforge", {}).get("sae", {}) if cfg_path.is_file() else {}
        rows.append({"run": d.name, "architecture": ev["architecture"], "hook": ev["hook"],
                     "l1_coefficient": sae_cfg.get("l1_coefficient"), **ev["metrics"], "eval": ev})
    if not rows:
        raise PlotError(f"no run in {sweep_dir} has {EVAL_FILE}; run `saeforge eval {sweep_dir}/*` first")
    if missing:
        print(f"saeforge plot: skipping runs without {EVAL_FILE}: {', '.join(missing)}", file=sys.stderr)
    return sorted(rows, key=lambda r: (r["architecture"], r["l0"]))


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """sweep_table.csv and sweep_table.md (loss recovered, γ and explained variance as plain fractions)."""
    csv_path, md_path = out_dir / "sweep_table.csv", out_dir / "sweep_table.md"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows([[_fmt(r.get(c)) for c in COLUMNS] for r in rows])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_arch(rows, y: str):
    out: dict[str, list] = {}
    for r in rows:
        if r.get("l0") and r.get(y) is not None:
            out.setdefault(r["architecture"], []).append((r["l0"], r[y]))
    return {a: sorted(v) for a, v in out.items()}


def _scatter(rows, y: str, ylabel: str, title: str, path: Path, hline: float | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arch, pts in _by_arch(rows, y).items():
        color, marker = ARCH_STYLE.get(arch, ("tab:gray", "^"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=arch)
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_density(row: dict, path: Path) -> Path:
    """Histogram of log10 feature density for one SAE; dead features reported in the title."""
    plt = _plt()
    h = row["eval"]["density_histogram"]
    edges, counts = h["log10_edges"], h["counts"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.axvline(math.log10(h["threshold"]), color="k", ls="--", lw=0.8)
    ax.set_xlabel("log10 feature density (fraction of tokens active)")
    ax.set_ylabel("features")
    ax.set_title(f"{row['run']} ({row['architecture']}): {h['n_dead']} dead, {row.get('n_dense')} dense")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CURVES = [("l0", "L0", True), ("explained_variance", "explained variance", False), ("gamma", "γ", False),
          ("dead_fraction", "dead fraction", False)]


def plot_training_curves(rows: list[dict], sweep_dir: Path, path: Path) -> Path | None:
    """L0, explained variance, γ and dead fraction against step for every run with a metrics.jsonl."""
    runs = []
    for r in rows:
        f = sweep_dir / r["run"] / "metrics.jsonl"
        if f.is_file():
            runs.append((r, [json.loads(line) for line in f.read_text().splitlines() if line.strip()]))
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.6))
    for ax, (key, label, log) in zip(axes, CURVES):
        for r, lines in runs:
            pts = [(m["step"], m[key]) for m in lines if m.get(key) is not None]
            color, _ = ARCH_STYLE.get(r["architecture"], ("tab:gray", "^"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.8, lw=1.2,
                    label=f"{r['architecture']} λ={_fmt(r.get('l1_coefficient'))}")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, list[str]]:
    """Write the table and plots for a sweep; returns {"table": [...], "plots": [...]} paths."""
    sweep_dir = Path(sweep_dir)
    rows = load_sweep(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    hooks = sorted({r["hook"] for r in rows})
    site = hooks[0] if len(hooks) == 1 else f"{len(hooks)} hooks"
    plots = [
        _scatter(rows, "loss_recovered", "loss recovered (eq. 5, zero ablation)",
                 f"Pareto: loss recovered vs L0 — {site}", out / "pareto.png", hline=1.0),
        _scatter(rows, "gamma", "γ (relative reconstruction bias, eq. 10)", f"Shrinkage: γ vs L0 — {site}",
                 out / "gamma_vs_l0.png", hline=1.0),
    ]
    curves = plot_training_curves(rows, sweep_dir, out / "training_curves.png")
    plots += [curves] if curves else []
    plots += [plot_density(r, out / f"density_{r['run']}.png") for r in rows]
    return {"table": [str(p) for p in write_table(rows, out)], "plots": [str(p) for p in plots]}
