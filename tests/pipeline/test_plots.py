"""Sweep reports (table + PNGs) and the `saeforge eval` / `saeforge plot` commands through CliRunner."""
import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from saeforge.pipeline.cli import main
from saeforge.pipeline.plots import PlotError, plot_sweep


def _fake_eval(run_dir, arch, l0, lr, gamma):
    run_dir.mkdir(parents=True)
    edges = [-8 + 0.25 * i for i in range(33)]
    counts = [0] * 32
    counts[20] = 90
    ev = {"architecture": arch, "hook": "blocks.1.hook_resid_post",
          "metrics": {"l0": l0, "loss_recovered": lr, "gamma": gamma, "n_dense": 1, "kl": 0.1},
          "density_histogram": {"log10_edges": edges, "counts": counts, "n_dead": 6, "threshold": 0.1}}
    (run_dir / "eval.json").write_text(json.dumps(ev))
    (run_dir / "cfg.json").write_text(json.dumps({"saeforge": {"sae": {"l1_coefficient": l0 / 1000}}}))


def _fake_sweep(root):
    names = []
    for i, (arch, l0, lr, g) in enumerate([("baseline", 20, 0.90, 0.8), ("baseline", 80, 0.95, 0.9),
                                            ("gated", 10, 0.93, 1.0), ("gated", 40, 0.97, 1.0)]):
        names.append(f"r{i}")
        _fake_eval(root / f"r{i}", arch, l0, lr, g)
    (root / "sweep.json").write_text(json.dumps({"runs": names + ["not_evaluated"], "store": "x"}))
    (root / "not_evaluated").mkdir()
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
