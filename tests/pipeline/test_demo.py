"""The main job end to end on a tiny Llama: harvest (two sites, one pass) -> one multi-hook sweep -> eval ->
plots -> report.md; a second run finds every stage complete and changes nothing."""
import json

import numpy as np
import pytest

from saeforge.pipeline.demo import Preset, run_demo

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
TINY = Preset(tokens=1200, layer=1, sites=("resid_post", "mlp_out"), heldout_every=4, context_size=24,
              harvest_batch=4, d_sae=16, gated_l1=(1e-2, 1e-1), baseline_l1=(1e-3, 1e-2), steps=16, batch_rows=64,
              lr_warmup_steps=2, l1_warmup_steps=2, resample_rows=128, eval_tokens=192, eval_batch=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo_corpus")
    rng = np.random.default_rng(1)
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS, 60))}) for _ in range(60)))
    return d / "docs.jsonl"


def test_demo_runs_every_stage_then_is_a_no_op(tmp_path, tiny_model_dir, corpus):
    out = tmp_path / "demo"
    first = run_demo(out, preset=TINY, dtype="float32", device="cpu", model=str(tiny_model_dir),
                     dataset=str(corpus), progress=False)
    runs = json.loads((out / "sweep" / "sweep.json").read_text())["runs"]
    assert len(runs) == 2 * 2 * 2  # 2 sites x 2 architectures x 2 lambdas
    assert all((out / "sweep" / r / "eval.json").is_file() for r in runs)
    report = (out / "report.md").read_text()
    assert "L1.mlp_out" in "".join(runs) and "blocks.1.hook_mlp_out" in report and "loss recovered" in report
    claims = json.loads((out / "claims.json").read_text())["claims"]
    assert set(claims) == {"blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"}
    assert set(first["stage_seconds"]) == {"harvest", "sweep", "eval", "plots", "report"}

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".safetensors", ".pt")
              or p.name in ("eval.json", "zarr.json")}
    second = run_demo(out, preset=TINY, dtype="float32", device="cpu", model=str(tiny_model_dir),
                      dataset=str(corpus), progress=False)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # nothing recomputed or rewritten
    assert second["stage_seconds"]["sweep"] < first["stage_seconds"]["sweep"]
