"""Store-backed training: run directories, SAELens layout, load_sae round trip, resume, and the CLI."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from saeforge.pipeline.cli import main
from saeforge.trainer import run as run_module
from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.saelens_files import load_sae
from saeforge.trainer.run import train_from_store
from saeforge.trainer.sae import make_sae

HOOK, HOOK_SMALL = "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"
D_IN, N_ROWS, BATCH = 16, 4096, 128


def store_acts(n_rows=N_ROWS):
    """The `HOOK` activations `write_store` writes: sparse combinations of 48 random directions, plus 2."""
    g = np.random.default_rng(0)
    dirs = g.standard_normal((48, D_IN)).astype(np.float32)
    return ((g.random((n_rows, 48)) < 0.08) * g.random((n_rows, 48)) * 5).astype(np.float32) @ dirs + 2.0


def write_store(path, n_rows=N_ROWS, d_small=8, close=True):
    from saeforge.stores import StoreWriter

    acts = store_acts(n_rows)
    w = StoreWriter(str(path), hooks={HOOK: D_IN, HOOK_SMALL: d_small}, dtype="float32", seed=0,
                    expected_rows=n_rows, provenance={"model": "tiny-llama", "context_size": 32, "prepend_bos": True})
    w.append({HOOK: acts, HOOK_SMALL: acts[:, :d_small]}, token_ids=np.zeros(n_rows, dtype=np.int64),
             seq_idx=np.arange(n_rows) // 32, pos=np.arange(n_rows) % 32)
    if close:
        w.close()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("stores") / "acts.zarr")


def train_cfg(**kw):
    base = dict(hook=HOOK, steps=40, batch_rows=BATCH, lr_warmup_steps=5, log_every=10, checkpoint_every=20,
                resample_every=15, dead_window=10, resample_rows=2 * BATCH, resample_until=30, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_run_directory_layout_and_load_sae_round_trip(store, tmp_path):
    sae_cfg = SAEConfig(arch="gated", d_sae=32, l1_coefficient=0.3, lr=3e-3)
    summary = train_from_store(store, [sae_cfg], train_cfg(), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert {"cfg.json", "sae_weights.safetensors", "metrics.jsonl", "checkpoint.pt"} <= {p.name for p in run.iterdir()}
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["architecture"] == "gated" and cfg["d_in"] == D_IN and cfg["d_sae"] == 32
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "tiny-llama"
    assert cfg["saeforge"]["sae"]["l1_coefficient"] == 0.3 and cfg["saeforge"]["train"]["loss_scaling"] == "paper"
    assert set(load_file(str(run / "sae_weights.safetensors"))) == {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag",
                                                                    "r_mag"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [10, 20, 30, 40]
    assert summary[0]["l0"] == lines[-1]["l0"]

    sae, info = load_sae(run)
    assert sae.info is info and sae.info.cfg["saeforge"]["sae"]["arch"] == "gated"
    with torch.no_grad():  # the last logged L0 is the saved SAE's on the store's rows, up to the window's drift
        l0 = (sae.encode(torch.from_numpy(store_acts())) > 0).sum(-1).double().mean().item()
    assert 1 < l0 < 31 and lines[-1]["l0"] == pytest.approx(l0, rel=0.1)
    assert info.architecture == "gated" and info.hook_name == HOOK and info.d_in == D_IN
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    trained = make_sae("gated", D_IN, 32)  # the training-scale module from the checkpoint
    trained.load_state_dict({k: v.reshape(getattr(trained, k).shape) for k, v in ckpt["weights"].items()})
    scale = cfg["saeforge"]["input_scale"]
    assert scale != 1.0
    x = torch.randn(50, D_IN) * 3 + 2
    torch.testing.assert_close(sae(x), trained(x * scale) / scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x), trained.encode(x * scale), rtol=1e-5, atol=1e-5)


class Killed(BaseException):
    """Stands for a kill: nothing after it runs (BaseException, so no `except Exception` handles it)."""


def kill_after_checkpoint(monkeypatch, step: int) -> None:
    """Make the next store-backed run stop right after writing its checkpoint of `step`."""
    save = run_module._Run.on_checkpoint

    def on_checkpoint(self):
        save(self)
        if self.trainer.step == step:
            monkeypatch.undo()
            raise Killed

    monkeypatch.setattr(run_module._Run, "on_checkpoint", on_checkpoint)


def test_resumed_run_ends_with_the_same_weights(store, tmp_path, monkeypatch):
    cfgs = [SAEConfig(arch="baseline", d_sae=24, l1_coefficient=0.05, lr=3e-3, seed=1)]
    full = tmp_path / "full"
    train_from_store(store, cfgs, train_cfg(), full, progress=False)
    cut = tmp_path / "cut"  # killed after the step-20 checkpoint
    kill_after_checkpoint(monkeypatch, 20)
    with pytest.raises(Killed):
        train_from_store(store, cfgs, train_cfg(), cut, progress=False)
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 20
    assert json.loads((cut / "cfg.json").read_text())["saeforge"]["steps_done"] == 20
    train_from_store(store, cfgs, train_cfg(), cut, resume=True, progress=False)
    a, b = load_file(str(full / "sae_weights.safetensors")), load_file(str(cut / "sae_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k not in ("steps_per_s", "data_wait_fraction")}
                       for line in p.read_text().splitlines()]  # noqa: E731
    assert strip(full / "metrics.jsonl") == strip(cut / "metrics.jsonl")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_train_flags_toml_and_bad_input(store, tmp_path):
    out = tmp_path / "cli_run"
    common = ["--store", store, "--hook", HOOK, "--steps", 10, "--batch-rows", BATCH, "--log-every", 5,
              "--resample-every", 0, "--device", "cpu", "--quiet"]
    res = invoke("train", *common, "--arch", "baseline", "--d-sae", 24, "--l1", 0.01, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["arch"] == "baseline"
    before = (out / "cfg.json").read_text()

    weights = (out / "sae_weights.safetensors").read_bytes()
    res = invoke("train", *common, "--arch", "baseline", "--d-sae", 24, "--l1", 0.01, "--out", out)
    assert res.exit_code == 0, res.output  # the same command again: the run is complete, nothing is redone
    assert (out / "sae_weights.safetensors").read_bytes() == weights and (out / "cfg.json").read_text() == before
    res = invoke("train", *common[:5], 5, *common[6:], "--arch", "baseline", "--d-sae", 24, "--l1", 0.01,
                 "--out", out)
    assert res.exit_code != 0 and "more than the 5 steps" in res.output
    res = invoke("train", *common, "--arch", "gated", "--d-sae", 24, "--out", out)
    assert res.exit_code != 0 and "holds a different run" in res.output
    res = invoke("train", *common[:2], "--hook", HOOK_SMALL, *common[4:], "--arch", "baseline", "--d-sae", 24,
                 "--l1", 0.01, "--out", out, "--resume")
    assert res.exit_code != 0 and "d_in=16" in res.output and "d_in=8" in res.output
    assert (out / "cfg.json").read_text() == before  # nothing overwritten

    for bad, needle in [(["--l1", -1], "--l1-coefficient"), (["--d-sae", 0], "--d-sae"), (["--lr", 10], "--lr")]:
        res = invoke("train", *common, *bad, "--out", tmp_path / "bad")
        assert res.exit_code != 0 and needle in res.output and "Traceback" not in res.output
    res = invoke("train", "--store", store, "--hook", "blocks.9.hook_resid_post", "--out", tmp_path / "bad")
    assert res.exit_code != 0 and "blocks.9.hook_resid_post" in res.output
    assert not (tmp_path / "bad").exists()

    toml = tmp_path / "run.toml"
    toml.write_text(f'store = "{store}"\n[train]\nhook = "{HOOK}"\nsteps = 5\nbatch_rows = {BATCH}\nlog_every = 5\n'
                    'resample_every = 0\ndevice = "cpu"\n[sae]\narch = "gated"\nd_sae = 16\nl1_coefficient = 0.2\n')
    res = invoke("train", "--config", toml, "--steps", 10, "--out", tmp_path / "toml_run", "--quiet")
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "toml_run" / "cfg.json").read_text())["saeforge"]
    assert saved["train"]["steps"] == 10 and saved["sae"]["d_sae"] == 16  # flags win over the file
    toml.write_text(toml.read_text() + "lamda = 3\n")
    res = invoke("train", "--config", toml, "--out", tmp_path / "typo")
    assert res.exit_code != 0 and "unknown key" in res.output and "lamda" in res.output


def test_cli_incomplete_store(tmp_path):
    path = write_store(tmp_path / "partial.zarr", n_rows=256, close=False)
    res = invoke("train", "--store", path, "--hook", HOOK, "--out", tmp_path / "r")
    assert res.exit_code != 0 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_cli_sweep_equal_compute(store, tmp_path):
    out = tmp_path / "sweep"
    res = invoke("sweep", "--store", store, "--hook", HOOK, "--arch", "gated", "--arch", "baseline", "--d-sae", 16,
                 "--l1", 0.1, "--l1", 0.3, "--l1-baseline", 0.02, "--equal-compute", "--steps", 6, "--batch-rows",
                 BATCH, "--log-every", 3, "--resample-every", 0, "--device", "cpu", "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    sweep = json.loads((out / "sweep.json").read_text())
    widths = {s["arch"]: s["d_sae"] for s in sweep["saes"]}
    assert len(sweep["runs"]) == 3 and widths == {"gated": 16, "baseline": 24}
    for name in sweep["runs"]:
        sae, info = load_sae(out / name)
        assert info.d_sae == widths[info.architecture]
    res = invoke("sweep", "--store", store, "--hook", HOOK, "--arch", "gated", "--out", out)
    assert res.exit_code != 0 and "different sweep" in res.output
