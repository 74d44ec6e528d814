"""SAELens itself loads saeforge run directories and computes the same SAE, feature for feature.

Runs where sae-lens is installed: the second venv of `.ci/run` (sae-lens 6.54 pins transformer-lens < 4, so
saeforge runs there on transformer-lens 3). A tiny baseline and a tiny Gated SAE are trained by our trainer on a
real float32 store whose rows have a large offset and a scale s far from 1, so `b_dec` and the input scale folded
into the saved weights (`trainer/saelens_files.py`) both matter; then `sae_lens.SAE.load_from_disk` must give a
StandardSAE / GatedSAE whose `encode`, `decode` and forward on original-scale x equal those of the SAE the trainer
trained (its checkpoint, on x * s; outputs / s). The arithmetic-only twin of this test, which needs no SAELens,
is tests/trainer/test_saelens_layout.py.
"""
import json

import numpy as np
import pytest
import torch

sae_lens = pytest.importorskip(
    "sae_lens", reason="sae-lens is not installed (it needs transformer-lens < 4: the second venv of .ci/run)")

from saeforge.trainer.config import SAEConfig, TrainConfig  # noqa: E402
from saeforge.trainer.run import run_dirs_for, train_from_store  # noqa: E402
from saeforge.trainer.sae import make_sae  # noqa: E402
from saeforge.trainer.saelens_files import load_sae  # noqa: E402

HOOK = "blocks.1.hook_resid_post"
D_IN, N_ROWS, BATCH = 16, 4096, 128
OFFSET, SPREAD = 7.0, 40.0  # a mean far from 0 and an input scale s = sqrt(d / E|x|^2) far from 1


def store_rows(n_rows: int, seed: int = 0) -> np.ndarray:
    """Sparse non-negative combinations of 48 fixed random directions (codes drawn with `seed`), scaled and offset."""
    dirs = np.random.default_rng(0).standard_normal((48, D_IN)).astype(np.float32)
    g = np.random.default_rng(seed + 1)
    codes = (g.random((n_rows, 48)) < 0.08) * g.random((n_rows, 48))
    return (SPREAD * codes.astype(np.float32) @ dirs + OFFSET).astype(np.float32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{"baseline": run_dir, "gated": run_dir}: one sweep of both architectures on a real store."""
    from saeforge.stores import StoreWriter

    tmp = tmp_path_factory.mktemp("saelens_real")
    with StoreWriter(str(tmp / "acts.zarr"), hooks={HOOK: D_IN}, dtype="float32", seed=0, expected_rows=N_ROWS,
                     provenance={"model": "tiny-llama", "context_size": 32, "prepend_bos": True}) as w:
        w.append({HOOK: store_rows(N_ROWS)}, token_ids=np.zeros(N_ROWS, dtype=np.int64),
                 seq_idx=np.arange(N_ROWS) // 32, pos=np.arange(N_ROWS) % 32)
    saes = [SAEConfig(arch="gated", d_sae=32, l1_coefficient=0.3, lr=3e-3, name="gated"),
            SAEConfig(arch="baseline", d_sae=48, l1_coefficient=0.02, lr=3e-3, name="baseline")]
    train = TrainConfig(hook=HOOK, steps=60, batch_rows=BATCH, lr_warmup_steps=5, log_every=20, checkpoint_every=60,
                        resample_every=0, device="cpu")
    train_from_store(tmp / "acts.zarr", saes, train, tmp / "sweep", sweep=True, progress=False)
    return {s.arch: d for s, d in zip(saes, run_dirs_for(tmp / "sweep", saes, sweep=True))}


def inputs() -> torch.Tensor:
    """Store-like rows (not the training rows) and Gaussian rows around the offset, in the original scale."""
    g = torch.Generator().manual_seed(1)
    gauss = OFFSET + SPREAD * torch.randn(512, D_IN, generator=g)
    return torch.cat([torch.from_numpy(store_rows(1024, seed=3)), gauss])


def trained_module(run, arch: str, d_sae: int):
    """The SAE as the trainer left it, in the training scale (inputs x * s), from the run's checkpoint."""
    state = torch.load(run / "checkpoint.pt", weights_only=False)["weights"]
    sae = make_sae(arch, D_IN, d_sae)
    sae.load_state_dict({k: v.reshape(getattr(sae, k).shape) for k, v in state.items()})
    return sae.eval()


@pytest.mark.parametrize("arch,cls", [("baseline", "StandardSAE"), ("gated", "GatedSAE")])
def test_saelens_computes_the_sae_our_trainer_trained(runs, arch, cls):
    run = runs[arch]
    ours, info = load_sae(run)
    theirs = sae_lens.SAE.load_from_disk(str(run), device="cpu")
    assert type(theirs).__name__ == cls and (theirs.cfg.d_in, theirs.cfg.d_sae) == (info.d_in, info.d_sae)
    assert theirs.cfg.metadata.hook_name == HOOK and theirs.cfg.metadata.model_name == "tiny-llama"
    s = info.cfg["saeforge"]["input_scale"]
    assert s < 0.1  # the scale folded into the saved weights is far from 1
    trained = trained_module(run, arch, info.d_sae)
    x = inputs()
    with torch.no_grad():
        f_trained, f_theirs = trained.encode(x * s), theirs.encode(x)
        active = f_trained > 0
        assert 0.02 < active.float().mean() < 0.9  # the gate / ReLU is exercised, not all on or all off
        assert torch.equal(f_theirs > 0, active)  # the same features fire on every row
        f_tol = dict(rtol=1e-5, atol=1e-5 * float(f_trained.abs().max()))
        torch.testing.assert_close(f_theirs, f_trained, **f_tol)
        x_tol = dict(rtol=1e-5, atol=1e-5 * float(x.abs().max()))
        torch.testing.assert_close(theirs.decode(f_trained), trained.decode(f_trained) / s, **x_tol)
        torch.testing.assert_close(theirs(x), trained(x * s) / s, **x_tol)
        # and our own loader agrees with SAELens on the same files
        torch.testing.assert_close(ours.encode(x), f_theirs, **f_tol)
        torch.testing.assert_close(ours(x), theirs(x), **x_tol)


def test_saelens_does_not_record_itself_as_the_trainer(runs):
    for run in runs.values():
        meta = json.loads((run / "cfg.json").read_text())["metadata"]
        assert "sae_lens_training_version" in meta and meta["sae_lens_training_version"] is None
        theirs = sae_lens.SAE.load_from_disk(str(run), device="cpu")
        # an absent key would make SAELens fill in its own version: null keeps "not trained by SAELens"
        assert theirs.cfg.metadata.sae_lens_training_version is None
