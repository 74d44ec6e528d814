"""The demo's report: the paper's Fig. 1 claims computed from evaluated rows, and the demo's lambda conversion."""
import json

import pytest

from saeforge.pipeline.demo import PRESETS, sweep_saes
from saeforge.pipeline.report import convergence, frontier_claims


def row(arch, lam, l0, lr, gamma):
    return {"architecture": arch, "l1_coefficient": lam, "hook": "h",
            "eval": {"metrics": {"l0": l0, "loss_recovered": lr, "gamma": gamma}}}


def test_claims_on_a_known_frontier():
    gated = [row("gated", 1e-3, 100, 0.99, 1.00), row("gated", 3e-3, 30, 0.97, 0.995), row("gated", 1e-2, 10, 0.90, 0.99)]
    base = [row("baseline", 2e-6, 150, 0.985, 0.96), row("baseline", 6e-6, 50, 0.95, 0.94),
            row("baseline", 2e-5, 12, 0.80, 0.90)]
    c = frontier_claims(gated + base)
    # baselines at L0 50 and 12 lie inside the Gated range [10, 100]; Gated is above at both
    assert c["compared_at"] == 2 and c["gated_above_at"] == 2
    # Gated L0 30 at 0.97: the baseline reaches 0.97 between L0 50 (0.95) and 150 (0.985), log-interpolated
    match = [m for m in c["l0_ratio_at_matched_loss_recovered"] if m["gated_l0"] == 30][0]
    assert match["baseline_l0"] == pytest.approx(50 * 3 ** (0.02 / 0.035), rel=1e-3)
    assert c["gated_gamma_in_0.98_1.02"] and c["baseline_gamma_below_1"] and c["baseline_gamma_falls_with_lambda"]
    flipped = frontier_claims([row("gated", r["l1_coefficient"], r["eval"]["metrics"]["l0"],
                                   r["eval"]["metrics"]["loss_recovered"] - 0.2, 1.1) for r in gated] + base)
    assert flipped["gated_above_at"] == 0 and not flipped["gated_gamma_in_0.98_1.02"]


def test_convergence_compares_the_last_two_tenths(tmp_path):
    lines = [{"step": s, "loss": 2.0 if s <= 90 else 1.0, "l0": 10.0} for s in range(1, 101)]
    lines.insert(50, {"step": 50, "event": "resample", "features": 3})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert convergence(tmp_path) == {"loss_change": -0.5, "l0_change": 0.0}


def test_demo_lambdas_are_converted_to_the_papers_units_per_hook():
    p = PRESETS["demo"]
    saes = sweep_saes(p, {"a": 0.5, "b": 2.0})
    gated_a = [s.l1_coefficient for s in saes if s.hook == "a" and s.arch == "gated"]
    base_b = [s for s in saes if s.hook == "b" and s.arch == "baseline"]
    assert gated_a == pytest.approx([lam / 0.5 for lam in p.gated_l1], rel=1e-3)
    assert [s.l1_coefficient for s in base_b] == pytest.approx([lam * 2.0 for lam in p.baseline_l1], rel=1e-3)
    assert all(s.d_sae == round(1.5 * p.d_sae) for s in base_b)
    assert p.resample_lr_steps < p.resample_interval  # the LR is back to full before the next resample
