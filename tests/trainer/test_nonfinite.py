"""Nothing non-finite is trained on or saved: a NaN row in a store, NaN statistics, a diverging loss or weights
stop training (or refuse it) with one line naming the step and the rows, and the run directory keeps its last
good checkpoint and weights."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saeforge.trainer.rundir import read_metrics
from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.errors import NonFinite
from saeforge.trainer.fit import FitEvents, fit
from saeforge.trainer.loop import SweepTrainer
from saeforge.trainer.run import train_from_store
from tests.trainer.test_bad_input import invoke, one_error_line
from tests.trainer.test_run import BATCH, HOOK, train_cfg, write_store

BAD_ROWS = (2900, 3077)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("stores") / "acts.zarr")


def damaged_copy(store, tmp_path, *, rows=(), stats=None):
    """A copy of `store` with NaN / inf written into `rows` of HOOK through zarr (valid checksums), or with the
    HOOK statistics' entries replaced by `stats`."""
    import zarr

    bad = tmp_path / "damaged.zarr"
    shutil.copytree(store, bad)
    if rows:
        arr = zarr.open_group(str(bad), mode="r+")[HOOK]
        arr[rows[0]] = np.nan
        for r in rows[1:]:
            arr[r, 3] = np.inf
    if stats:
        meta = json.loads((bad / "zarr.json").read_text())
        meta["attributes"]["stats"][HOOK].update(stats)
        (bad / "zarr.json").write_text(json.dumps(meta))  # NaN as JSON's NaN token, as a hand edit would
    return bad


def train(store, out, *extra):
    return invoke("train", "--store", store, "--hook", HOOK, "--steps", 40, "--batch-rows", BATCH, "--log-every", 10,
                  "--checkpoint-every", 5, "--resample-every", 0, "--d-sae", 16, "--device", "cpu", "--quiet",
                  "--out", out, *extra)


def all_finite(run) -> bool:
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    tensors = [*load_file(str(run / "sae_weights.safetensors")).values(), *ckpt["weights"].values()]
    rows = read_metrics(run, events=True)
    return all(torch.isfinite(t).all() for t in tensors) and all(
        math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_a_nan_row_stops_training_naming_the_step_and_the_store_rows(store, tmp_path):
    bad = damaged_copy(store, tmp_path, rows=BAD_ROWS)
    run = tmp_path / "run"
    line = one_error_line(train(bad, run))
    assert "stopped before step" in line and f"rows {BAD_ROWS[0]}" in line and str(bad) in line
    assert "keeps its checkpoint and weights of step" in line and "store verify" in line
    assert all_finite(run)
    again = one_error_line(train(bad, run))  # the same command: resumes, and stops at the same place
    assert again == line and all_finite(run)


def test_nan_statistics_are_refused_before_anything_is_written(store, tmp_path):
    bad = damaged_copy(store, tmp_path, stats={"scale": float("nan")})
    line = one_error_line(train(bad, tmp_path / "run"))
    assert "scale=nan" in line and HOOK in line
    assert not (tmp_path / "run").exists()


class Recorder(FitEvents):
    def __init__(self, trainer):
        self.trainer, self.logs, self.checkpoints = trainer, [], []

    def on_log(self, rows):
        self.logs.append(self.trainer.step)

    def on_checkpoint(self):
        self.checkpoints.append(self.trainer.step)


def test_fit_stops_at_the_first_non_finite_loss_before_logging_or_checkpointing_it():
    cfg = TrainConfig(steps=20, batch_rows=32, log_every=5, checkpoint_every=5, resample_every=0, lr_warmup_steps=0,
                      device="cpu")
    trainer = SweepTrainer([SAEConfig(d_sae=8, seed=0), SAEConfig(arch="baseline", d_sae=8, seed=1)], cfg, 4)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            x = torch.randn(32, 4, generator=g)
            if trainer.step == 6:  # the batch of step 7
                x[3, 1] = float("nan")
            yield trainer.prepare(x)

    events = Recorder(trainer)
    with pytest.raises(NonFinite, match=r"^step 7: the loss of gated_d8_l1-0.001_s0, baseline_d8_l1-0.001_s1 is nan"):
        fit(trainer, batches(), steps=cfg.steps, events=events)
    assert events.logs == [5] and events.checkpoints == [5]


def test_non_finite_weights_are_never_saved(store, tmp_path, monkeypatch):
    train_step = SweepTrainer.train_step

    def overflowing(self, x):  # step 10 leaves an infinite weight while its loss (computed before) is finite
        stats = train_step(self, x)
        if self.step == 10:
            self.groups[0].sae.W_dec.data[0, 0, 0] = float("inf")
        return stats

    monkeypatch.setattr(SweepTrainer, "train_step", overflowing)
    run = tmp_path / "run"
    with pytest.raises(NonFinite, match=r"^step 10: the weights of run are not finite .* keeps its checkpoint and "
                                        r"weights of step 5$"):
        train_from_store(store, [SAEConfig(d_sae=16)], train_cfg(steps=20, checkpoint_every=5), run, progress=False)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 5
    assert json.loads((run / "cfg.json").read_text())["saeforge"]["steps_done"] == 5
    assert all_finite(run)
