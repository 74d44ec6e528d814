"""One sweep over several hooks of one store: one read of each batch feeds the SAEs of every hook, and each SAE
ends exactly where it would have in a sweep of its hook alone. Rerunning a sweep resumes or does nothing."""
import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from saeforge.pipeline.cli import main
from tests.trainer.test_run import BATCH, HOOK, HOOK_SMALL, write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("stores") / "acts.zarr")


def sweep(store, out, *hooks, steps=12):
    args = ["sweep", "--store", store, *[a for h in hooks for a in ("--hook", h)], "--arch", "gated", "--arch",
            "baseline", "--d-sae", 16, "--l1", 0.05, "--l1-baseline", 0.01, "--steps", steps, "--batch-rows",
            BATCH, "--log-every", 4, "--resample-every", 6, "--checkpoint-every", 6, "--autocast", "none",
            "--device", "cpu", "--quiet", "--out", out]
    return CliRunner().invoke(main, [str(a) for a in args])


def weights(run_dir):
    return load_file(str(run_dir / "sae_weights.safetensors"))


def test_a_multi_hook_sweep_equals_one_sweep_per_hook(store, tmp_path):
    res = sweep(store, tmp_path / "both", HOOK, HOOK_SMALL)
    assert res.exit_code == 0, res.output
    runs = json.loads((tmp_path / "both" / "sweep.json").read_text())["runs"]
    assert len(runs) == 4 and sum(r.startswith("L0.resid_post_") for r in runs) == 2
    for hook, site in ((HOOK, "L0.resid_post"), (HOOK_SMALL, "L1.mlp_out")):
        assert sweep(store, tmp_path / site, hook).exit_code == 0
        alone = json.loads((tmp_path / site / "sweep.json").read_text())["runs"]
        for name in alone:
            a, b = weights(tmp_path / site / name), weights(tmp_path / "both" / f"{site}_{name}")
            assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
            cfg = json.loads((tmp_path / "both" / f"{site}_{name}" / "cfg.json").read_text())
            assert cfg["metadata"]["hook_name"] == hook


def test_rerunning_a_sweep_resumes_it_or_does_nothing(store, tmp_path):
    out = tmp_path / "sw"
    assert sweep(store, out, HOOK, steps=6).exit_code == 0
    first = {p.name: weights(p) for p in out.iterdir() if p.is_dir()}
    res = sweep(store, out, HOOK, steps=12)  # more steps: continues from step 6
    assert res.exit_code == 0, res.output
    full = tmp_path / "full"
    assert sweep(store, full, HOOK, steps=12).exit_code == 0
    for name in first:
        a, b = weights(out / name), weights(full / name)
        assert all((a[k] == b[k]).all() for k in a), name  # resumed == uninterrupted
    stamp = {p.name: (p / "sae_weights.safetensors").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}
    assert sweep(store, out, HOOK, steps=12).exit_code == 0  # complete: nothing rewritten
    assert stamp == {p.name: (p / "sae_weights.safetensors").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}
