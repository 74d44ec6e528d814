"""The run directory's readers (trainer/rundir.py), what cfg.json records about the store, the normaliser, and
the trainer's one error base."""
import shutil

import numpy as np
import pytest
import torch

from saeforge.stores import open_store
from saeforge.trainer import rundir
from saeforge.trainer.config import SAEConfig
from saeforge.trainer.errors import ConfigError, TrainerError
from saeforge.trainer.grid import expand_sweep
from saeforge.trainer.normaliser import Normaliser
from saeforge.trainer.run import run_dirs_for, train_from_store
from saeforge.trainer.sae import init_sae_, make_sae
from tests.trainer.test_run import HOOK, HOOK_SMALL, train_cfg, write_store


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(store path, sweep directory) of a 2-hook sweep of 10 steps."""
    root = tmp_path_factory.mktemp("rundir")
    store = write_store(root / "acts.zarr")
    saes = [SAEConfig(hook=h, arch=a, d_sae=16, l1_coefficient=0.1) for h in (HOOK, HOOK_SMALL)
            for a in ("gated", "baseline")]
    train_from_store(store, saes, train_cfg(steps=10, log_every=5, resample_every=0), root / "sw", sweep=True,
                     progress=False)
    return store, root / "sw"


def test_readers_find_every_file_of_a_sweep(sweep):
    _, out = sweep
    runs = rundir.sweep_run_dirs(out)
    assert len(runs) == 4 and rundir.read_sweep(out)["hooks"] == [HOOK, HOOK_SMALL]
    for d in runs:
        names = {p.name for p in d.iterdir()}
        assert {rundir.CFG_FILE, rundir.WEIGHTS_FILE, rundir.METRICS_FILE, rundir.CHECKPOINT_FILE,
                rundir.PREV_CHECKPOINT_FILE} == names
        assert rundir.read_record(d)["steps_done"] == 10 and rundir.read_cfg(d)["saeforge"]["steps_done"] == 10
        rows = rundir.read_metrics(d)
        assert [r["step"] for r in rows] == [5, 10] and rundir.last_metrics(d) == rows[-1]
        assert "explained_variance_window" in rows[-1] and "explained_variance" not in rows[-1]
        assert rundir.eval_path(d) == d / rundir.EVAL_FILE
    assert rundir.sweep_run_dirs(runs[0]) is None and rundir.read_record(out) == {}


def test_cfg_json_carries_what_eval_needs_from_the_store(sweep, tmp_path):
    store, out = sweep
    st = open_store(store)
    for d in rundir.sweep_run_dirs(out):
        hook = rundir.read_cfg(d)["metadata"]["hook_name"]
        moved = tmp_path / d.name  # the store is not consulted: the run reads the same anywhere
        shutil.copytree(d, moved)
        info = rundir.read_store_info(moved)
        assert (info.hook, info.d_in, info.model, info.path) == (hook, st.d(hook), "tiny-llama", str(st.path))
        assert info.provenance == st.provenance and info.provenance["context_size"] == 32
        assert np.array_equal(info.stats.mean, st.stats(hook).mean) and info.stats.scale == st.stats(hook).scale
        assert info.stats.mean_sq_norm == st.stats(hook).mean_sq_norm
        assert rundir.read_record(d)["input_scale"] == info.stats.scale


def test_metrics_written_before_the_rename_read_under_the_new_name(tmp_path):
    rows = [{"step": 1, "explained_variance": 0.5}, {"step": 1, "event": "resample", "features": 2},
            {"step": 2, "explained_variance_window": 0.7}]
    rundir.append_metrics(tmp_path, rows)
    assert rundir.read_metrics(tmp_path) == [{"step": 1, "explained_variance_window": 0.5},
                                             {"step": 2, "explained_variance_window": 0.7}]
    assert len(rundir.read_metrics(tmp_path, events=True)) == 3
    rundir.truncate_metrics(tmp_path, 1)
    assert [r["step"] for r in rundir.read_metrics(tmp_path, events=True)] == [1, 1]
    rundir.clear_metrics(tmp_path)
    assert rundir.read_metrics(tmp_path) == [] and rundir.last_metrics(tmp_path) == {}


def test_normaliser_applies_scale_mean_and_fold_once():
    mean = np.array([1.0, -2.0, 0.5])
    norm = Normaliser(0.25, mean, 12.0)
    x = torch.tensor([[4.0, 8.0, -4.0]])
    assert torch.equal(norm.to_training(x), x * 0.25)
    assert torch.equal(norm.b_dec_init(), torch.tensor([0.25, -0.5, 0.125]))
    assert norm.training_mean_sq_norm(3) == 12.0 * 0.25 ** 2 and Normaliser().training_mean_sq_norm(3) == 3.0
    assert norm.original_mse(8.0, rows=2, d_in=4) == 8.0 / (2 * 4 * 0.0625)
    assert Normaliser().to_training(x) is x and Normaliser().b_dec_init() is None
    trained = make_sae("gated", 3, 5)
    init_sae_(trained, [0], norm.b_dec_init())
    raw = make_sae("gated", 3, 5)
    raw.load_state_dict(trained.state_dict())
    assert norm.to_original_(raw) is raw  # now acts on raw x: raw(x) == trained(s x) / s
    z = torch.randn(7, 3)
    with torch.no_grad():
        torch.testing.assert_close(raw(z), trained(z * 0.25) / 0.25)


def test_deliberate_errors_share_one_base_and_stay_value_errors(tmp_path):
    same = [SAEConfig(name="a"), SAEConfig(name="a")]
    for call in (lambda: run_dirs_for(tmp_path, same, sweep=True), lambda: run_dirs_for(tmp_path, same, sweep=False),
                 lambda: expand_sweep({"lamda": [1]}, {}, [])):
        with pytest.raises(ConfigError) as err:
            call()
        assert isinstance(err.value, TrainerError) and isinstance(err.value, ValueError)
    with pytest.raises(TrainerError, match="no cfg.json"):
        rundir.read_cfg(tmp_path)
