"""The main job end to end on a tiny Llama: harvest (two sites, one pass) -> one multi-hook sweep -> eval ->
plots -> report.md; a second run finds every stage complete and changes nothing."""
import json
from pathlib import Path

import pytest

from saeforge.pipeline.demo import Preset, run_demo
from tests.pipeline.helpers import word_docs

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
TINY = Preset(tokens=1200, layer=1, sites=("resid_post", "mlp_out"), heldout_every=4, context_size=24,
              harvest_batch=4, d_sae=16, gated_l1=(1e-2, 1e-1), baseline_l1=(1e-3, 1e-2), steps=16, batch_rows=64,
              lr_warmup_steps=2, l1_warmup_steps=2, resample_rows=128, eval_tokens=192, eval_batch=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_docs(tmp_path_factory.mktemp("demo_corpus"), 60, 60, seed=1, words=WORDS)


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
                      dataset=str(corpus), progress=False, plot_format="svg")
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # nothing recomputed or rewritten
    assert second["stage_seconds"]["sweep"] < first["stage_seconds"]["sweep"]
    svgs = [p for p in second["plots"]["plots"] if p.endswith(".svg")]  # plots (cheap) are redrawn as asked
    assert svgs and all(Path(p).read_text().lstrip().startswith(("<?xml", "<svg")) for p in svgs)
    assert any(f"]({Path(p).relative_to(out)})" in (out / "report.md").read_text() for p in svgs)


NO_CUDA = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("args, message", [
    (["OUT", "--device", "bogus"], "unknown device 'bogus'"),
    pytest.param(["OUT", "--device", "cuda"], "device 'cuda' (--device) is not available", marks=NO_CUDA),
    ([""], "OUT is empty"),
    (["memory://demo"], "OUT memory://demo: a URL, but only a local directory works here"),
    (["A_FILE/demo"], "a_file is a file, not a directory"),
    (["OUT", "--model", ""], "--model must not be empty"),
    (["OUT", "--dataset", ""], "--dataset must not be empty"),
    (["--config", "empty_out.toml"], "OUT is empty"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_demo_bad_input_is_one_line_and_makes_no_folder(args, message, tmp_path, monkeypatch):
    """Refused before the first stage: no model is loaded and no folder made (demo's OUT is created only after
    its checks; a URL is never turned into a local folder such as `memory:`)."""
    from click.testing import CliRunner

    from saeforge.pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty_out.toml").write_text('out = ""\n')  # the file's `out` is OUT's default
    args = [{"OUT": "out", "A_FILE/demo": "a_file/demo"}.get(a, a) for a in args]
    r = CliRunner().invoke(main, ["demo", *args, "--quiet"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty_out.toml"]
