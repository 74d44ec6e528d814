"""Sweep reports (table + PNGs) and the `saeforge eval` / `saeforge plot` commands through CliRunner."""
import csv
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from saeforge.pipeline.cli import main
from saeforge.pipeline.plots import PlotError, plot_sweep


HOOK = "blocks.1.hook_resid_post"


def _fake_eval(run_dir, arch, l0, lr, gamma, hook=HOOK, lam=None, ci=None):
    run_dir.mkdir(parents=True)
    edges = [-8 + 0.25 * i for i in range(33)]
    counts = [0] * 32
    counts[20] = 90
    ev = {"architecture": arch, "hook": hook, "lm_dtype": "float32",
          "metrics": {"l0": l0, "loss_recovered": lr, "gamma": gamma, "n_dense": 1, "kl": 0.1,
                      "loss_recovered_ci95": ci, "delta_ce_ci95": [0.01, 0.02] if ci else None},
          "density_histogram": {"log10_edges": edges, "counts": counts, "n_dead": 6, "threshold": 0.1}}
    (run_dir / "eval.json").write_text(json.dumps(ev))
    lam = l0 / 1000 if lam is None else lam
    (run_dir / "cfg.json").write_text(json.dumps({"saeforge": {"sae": {"l1_coefficient": lam}}}))


def _fake_sweep(root):
    names = []
    for i, (arch, l0, lr, g) in enumerate([("baseline", 20, 0.90, 0.8), ("baseline", 80, 0.95, 0.9),
                                            ("gated", 10, 0.93, 1.0), ("gated", 40, 0.97, 1.0)]):
        names.append(f"r{i}")
        _fake_eval(root / f"r{i}", arch, l0, lr, g)
    (root / "sweep.json").write_text(json.dumps({"runs": names + ["not_evaluated"], "store": "x"}))
    (root / "not_evaluated").mkdir()
    return root


MULTI = [  # (name, hook, arch, λ, L0, loss recovered, [lo, hi], γ); listed out of order on purpose
    ("g2", "blocks.3.hook_mlp_out", "gated", 3e-3, 12.0, 0.90, [0.85, 0.93], 0.99),
    ("b1", "blocks.1.hook_resid_post", "baseline", 6e-6, 30.0, 0.80, [0.75, 0.84], 0.90),
    ("g1", "blocks.1.hook_resid_post", "gated", 1e-3, 50.0, 0.97, [0.96, 0.98], 1.00),
    ("b2", "blocks.3.hook_mlp_out", "baseline", 2e-6, 90.0, 0.94, [0.92, 0.95], 0.93),
    ("g0", "blocks.1.hook_resid_post", "gated", 3e-3, 15.0, 0.91, [0.89, 0.95], 1.01),
    ("b0", "blocks.1.hook_resid_post", "baseline", 2e-6, 70.0, 0.93, [0.90, 0.95], 0.94),
]


def _multi_hook_sweep(root):
    for name, hook, arch, lam, l0, lr, ci, g in MULTI:
        _fake_eval(root / name, arch, l0, lr, g, hook=hook, lam=lam, ci=ci)
    (root / "sweep.json").write_text(json.dumps({"runs": [m[0] for m in MULTI]}))
    return root


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_sweep_writes_table_and_pngs(tmp_path):
    out = plot_sweep(_fake_sweep(tmp_path / "sweep"))
    assert len(out["plots"]) == 2 + 4 and all(_is_png(p) for p in out["plots"])
    csv_path, md_path = out["table"]
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["run"] for r in rows] == ["r0", "r1", "r2", "r3"]  # by architecture, then L0
    assert rows[2]["architecture"] == "gated" and float(rows[2]["loss_recovered"]) == 0.93
    assert float(rows[0]["l1_coefficient"]) == 0.02
    assert open(md_path).read().count("\n") == 2 + 4


def test_training_curves_come_from_each_runs_metrics(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep")
    for name in ["r0", "r2"]:
        lines = [{"step": s, "l0": 100 / s, "explained_variance": 1 - 1 / s, "gamma": 1.0, "dead_fraction": 0.0}
                 for s in (10, 20, 30)]
        (sweep / name / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    out = plot_sweep(sweep)
    curves = [p for p in out["plots"] if p.endswith("training_curves.png")]
    assert len(curves) == 1 and _is_png(curves[0]) and len(out["plots"]) == 3 + 4


MAGIC = {"png": lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"), "pdf": lambda b: b.startswith(b"%PDF"),
         "svg": lambda b: b"<svg" in b[:2000] and b.rstrip().endswith(b"</svg>")}


@pytest.mark.parametrize("fmt", sorted(MAGIC))
def test_every_format_writes_valid_files_through_the_cli(tmp_path, fmt):
    r = CliRunner().invoke(main, ["plot", str(_fake_sweep(tmp_path / "s")), "--format", fmt, "--json"])
    assert r.exit_code == 0, r.output
    plots = json.loads(r.stdout)["plots"]
    assert len(plots) == 2 + 4 and all(p.endswith(f".{fmt}") and MAGIC[fmt](open(p, "rb").read()) for p in plots)
    listed = CliRunner().invoke(main, ["plot", str(tmp_path / "s"), "--format", fmt]).stdout.split()
    assert listed == json.loads(r.stdout)["table"] + plots  # without --json: the files, one per line


def test_plotting_leaves_the_backend_and_pyplot_alone(tmp_path):
    """A notebook's backend (here `template`, set as a notebook would) is the same after plotting in every format,
    and pyplot is never imported."""
    sweep = _fake_sweep(tmp_path / "s")
    code = ("import sys, matplotlib\nmatplotlib.use('template')\nfrom saeforge.pipeline.plots import plot_sweep\n"
            f"for fmt in ('png', 'svg', 'pdf'):\n    plot_sweep({str(sweep)!r}, fmt=fmt)\n"
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["template", "False"]
    assert sorted(p.name for p in (sweep / "report").glob("pareto.*")) == ["pareto.pdf", "pareto.png", "pareto.svg"]


def test_plot_errors_name_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match="saeforge eval"):
        plot_sweep(tmp_path / "empty")
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "empty")])
    assert r.exit_code != 0 and "no run in" in r.output and "Traceback" not in r.output


def test_cli_plot(tmp_path):
    r = CliRunner().invoke(main, ["plot", str(_fake_sweep(tmp_path / "s")), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "pareto.png").is_file() and (tmp_path / "rep" / "gamma_vs_l0.png").is_file()


@pytest.mark.parametrize("cmd", [["eval", "--help"], ["plot", "--help"]])
def test_help(cmd):
    r = CliRunner().invoke(main, cmd)
    assert r.exit_code == 0 and "Usage" in r.output


def test_multi_hook_sweep_table_sorted_by_hook_arch_lambda_with_intervals(tmp_path):
    out = plot_sweep(_multi_hook_sweep(tmp_path / "sweep"))
    assert out["hooks"] == ["blocks.1.hook_resid_post", "blocks.3.hook_mlp_out"]
    rows = list(csv.DictReader(open(out["table"][0])))
    assert [r["run"] for r in rows] == ["b0", "b1", "g1", "g0", "b2", "g2"]
    assert [r["hook"] for r in rows] == ["blocks.1.hook_resid_post"] * 4 + ["blocks.3.hook_mlp_out"] * 2
    assert rows[0]["loss recovered [95% CI]"] == "[0.9, 0.95]" and rows[0]["ΔCE [95% CI]"] == "[0.01, 0.02]"
    md = open(out["table"][1]).read().splitlines()
    assert md[0].startswith("| hook | run |") and "loss recovered [95% CI]" in md[0]
    assert md[2].startswith("| blocks.1.hook_resid_post | b0 |") and "[0.9, 0.95]" in md[2]


def test_pareto_has_one_panel_per_hook_with_interval_error_bars():
    from saeforge.pipeline.plots import sweep_figure

    rows = [{"run": n, "hook": h, "architecture": a, "l1_coefficient": lam, "l0": l0, "loss_recovered": lr,
             "loss_recovered_ci95": ci, "gamma": g} for n, h, a, lam, l0, lr, ci, g in MULTI]
    fig = sweep_figure(rows, "loss_recovered", "loss recovered", "Pareto", ci="loss_recovered_ci95")
    assert [ax.get_title() for ax in fig.axes] == ["Pareto — blocks.1.hook_resid_post",
                                                    "Pareto — blocks.3.hook_mlp_out"]
    resid = fig.axes[0]
    assert resid.get_xscale() == "log"
    series = {c.get_label(): c for c in resid.containers}
    assert sorted(series) == ["baseline", "gated"]
    line, _, (bars,) = series["gated"].lines
    assert list(line.get_xdata()) == [15.0, 50.0] and list(line.get_ydata()) == [0.91, 0.97]
    segs = [[tuple(p) for p in seg] for seg in bars.get_segments()]
    assert segs == [[(15.0, 0.89), (15.0, 0.95)], [(50.0, 0.96), (50.0, 0.98)]]
    mlp = {c.get_label(): c.lines[0] for c in fig.axes[1].containers}
    assert list(mlp["baseline"].get_xdata()) == [90.0] and list(mlp["gated"].get_ydata()) == [0.90]
    gamma = sweep_figure(rows, "gamma", "γ", "Shrinkage")
    assert len(gamma.axes) == 2 and [ln.get_label() for ln in gamma.axes[1].lines] == ["baseline", "gated"]


def test_plots_do_not_touch_pyplot_or_the_backend():
    import ast
    import inspect

    from saeforge.pipeline import plots

    tree = ast.parse(inspect.getsource(plots))
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any("pyplot" in n for n in names)
    assert "matplotlib.use" not in inspect.getsource(plots)


BROKEN = {  # file of run r0 (or the sweep) -> what it holds instead
    "eval_not_json": ("r0/eval.json", '{"format": 2, "metrics": {'),
    "eval_a_list": ("r0/eval.json", "[1, 2]"),
    "eval_no_metrics": ("r0/eval.json", '{"architecture": "gated", "hook": "h"}'),
    "cfg_not_json": ("r0/cfg.json", '{"saeforge": ['),
    "sweep_not_json": ("sweep.json", '{"runs": ['),
}


@pytest.mark.parametrize("case, message", [
    ("eval_not_json", "r0/eval.json cannot be read as JSON"),
    ("eval_a_list", "r0/eval.json is not an eval.json of saeforge eval"),
    ("eval_no_metrics", "r0/eval.json is not an eval.json of saeforge eval (no metrics, density_histogram)"),
    ("cfg_not_json", "r0/cfg.json is not valid JSON"),
    ("sweep_not_json", "sweep.json is not valid JSON"),
    ("out_empty", "--out is empty"),
    ("out_url", "--out memory://report: a URL, but only a local directory works here"),
    ("out_a_file", "exists and is not a directory"),
    ("out_under_a_file", "is a file, not a directory"),
    ("out_read_only", "is not writable"),
    ("sweep_dir_empty", "the sweep directory given is empty"),
])
def test_cli_plot_bad_input_is_one_line_and_writes_nothing(case, message, tmp_path, monkeypatch):
    from tests.pipeline.helpers import one_error_line, read_only_dir

    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would show up here as a folder `memory:`
    sweep = _fake_sweep(tmp_path / "sweep")
    (tmp_path / "a_file").write_text("x")
    if case in BROKEN:
        name, content = BROKEN[case]
        (sweep / name).write_text(content)
    with read_only_dir(tmp_path) as read_only:
        out = {"out_empty": "", "out_url": "memory://report", "out_a_file": str(tmp_path / "a_file"),
               "out_under_a_file": str(tmp_path / "a_file" / "report"),
               "out_read_only": str(read_only / "report")}.get(case)
        args = ["plot", "" if case == "sweep_dir_empty" else str(sweep), *(["--out", out] if out is not None else [])]
        one_error_line(CliRunner().invoke(main, args), message)
        assert not (read_only / "report").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "sweep"] and not (sweep / "report").exists()
