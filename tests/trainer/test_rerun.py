"""The rerun rule under damage and interruption: a run resumes only on the store it started on, what a kill
leaves behind never blocks the same command, a resumed run logs and saves what an uninterrupted one does, and a
damaged run-directory file is named in one line."""
import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from saeforge.trainer.config import SAEConfig
from saeforge.trainer.run import train_from_store
from tests.trainer.test_bad_input import common, files, invoke, one_error_line
from tests.trainer.test_run import HOOK, N_ROWS, Killed, kill_after_checkpoint, train_cfg, write_store

TIMING = ("steps_per_s", "data_wait_fraction")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores with the same hooks and widths but other rows (the second is shorter)."""
    root = tmp_path_factory.mktemp("stores")
    return write_store(root / "a.zarr"), write_store(root / "b.zarr", n_rows=N_ROWS // 2)


def cli_train(store, out, *extra):
    return invoke("train", *common(store), "--device", "cpu", "--out", out, *extra)


def weights(run):
    return load_file(str(run / "sae_weights.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ which store


def test_a_run_resumes_only_on_its_own_store(stores, tmp_path):
    a, b = stores
    run = tmp_path / "run"
    assert cli_train(a, run).exit_code == 0
    before = files(run)
    line = one_error_line(cli_train(b, run, "--steps", 8))  # same hook and width, other rows
    assert str(a) in line and str(b) in line and "different store" in line
    assert files(run) == before
    moved = tmp_path / "moved.zarr"  # the same store elsewhere: its fingerprint, so the run continues
    shutil.copytree(a, moved)
    res = cli_train(moved, run, "--steps", 8)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "cfg.json").read_text())["saeforge"]["steps_done"] == 8


def test_a_sweep_resumes_only_on_its_own_store(stores, tmp_path):
    a, b = stores
    args = ["sweep", *common(a)[2:], "--arch", "gated", "--arch", "baseline", "--device", "cpu", "--out", tmp_path]
    assert invoke(*args[:1], "--store", a, *args[1:]).exit_code == 0
    before = files(tmp_path)
    line = one_error_line(invoke(*args[:1], "--store", b, *args[1:]))
    assert "different store" in line and files(tmp_path) == before


def test_a_store_whose_row_count_disagrees_with_its_arrays_is_refused(stores, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(stores[0], bad)
    meta = json.loads((bad / "zarr.json").read_text())
    meta["attributes"]["n_rows"] = N_ROWS + 512
    meta["attributes"]["complete"]["rows"] = N_ROWS + 512
    (bad / "zarr.json").write_text(json.dumps(meta))
    one_error_line(cli_train(bad, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ interrupted runs


@pytest.mark.parametrize("sweep", [False, True])
def test_resume_at_a_step_between_log_lines_logs_the_uninterrupted_lines(stores, tmp_path, monkeypatch, sweep):
    cfgs = [SAEConfig(arch="gated", d_sae=24, l1_coefficient=0.05, lr=3e-3, seed=2)]
    if sweep:
        cfgs.append(SAEConfig(arch="baseline", d_sae=16, l1_coefficient=0.01, lr=3e-3, seed=3))
    cfg = train_cfg(steps=30, log_every=10, checkpoint_every=7)  # checkpoints at 7, 14, 21, 28 and 30
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_from_store(stores[0], cfgs, cfg, full, progress=False, sweep=sweep)
    kill_after_checkpoint(monkeypatch, 28)  # mid-window: the last line before it is step 20's
    with pytest.raises(Killed):
        train_from_store(stores[0], cfgs, cfg, cut, progress=False, sweep=sweep)
    runs = [p.relative_to(full) for p in sorted(full.rglob("cfg.json"))]
    assert len(runs) == len(cfgs) and [r["step"] for r in metrics(cut / runs[0].parent)][-1] == 20
    train_from_store(stores[0], cfgs, cfg, cut, progress=False, sweep=sweep)
    for run in (r.parent for r in runs):
        assert metrics(full / run) == metrics(cut / run) and same_weights(full / run, cut / run)


def test_leftovers_of_a_kill_never_block_the_same_command(stores, tmp_path):
    run = tmp_path / "run"  # killed while writing its first checkpoint: a temporary file and an empty log
    run.mkdir()
    stale = [run / f".checkpoint.pt.{dead_pid()}.140000.tmp", run / f".checkpoint.pt.tmp{dead_pid()}"]
    for p in stale:
        p.write_bytes(b"partial")
    (run / "metrics.jsonl").write_text("")
    line = one_error_line(cli_train(stores[0], run, "--resume"))
    assert "no checkpoint was written yet" in line and "without --resume" in line
    res = cli_train(stores[0], run)
    assert res.exit_code == 0, res.output
    assert not any(p.exists() for p in stale)

    stale = run / f".checkpoint.pt.{dead_pid()}.140000.tmp"  # killed while checkpointing later on; the log's
    stale.write_bytes(b"partial")                             # last line cut short by the same kill
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 0.')
    res = cli_train(stores[0], run, "--steps", 8)
    assert res.exit_code == 0, res.output
    assert not stale.exists() and [r["step"] for r in metrics(run)] == [2, 4, 6, 8]
    ref = tmp_path / "ref"
    assert cli_train(stores[0], ref, "--steps", 8).exit_code == 0 and same_weights(run, ref)


def test_resume_on_a_missing_directory_says_so(stores, tmp_path):
    line = one_error_line(cli_train(stores[0], tmp_path / "nothing", "--resume"))
    assert "does not exist" in line and "without --resume" in line
    assert not (tmp_path / "nothing").exists()


def test_killed_between_the_last_checkpoint_and_the_last_weights(stores, tmp_path):
    short, full = tmp_path / "short", tmp_path / "full"
    assert cli_train(stores[0], short).exit_code == 0  # 4 steps: weights and cfg.json of step 4
    assert cli_train(stores[0], full, "--steps", 8).exit_code == 0
    shutil.copy(full / "checkpoint.pt", short / "checkpoint.pt")  # step 8 saved, its weights not yet
    res = cli_train(stores[0], short, "--steps", 8)
    assert res.exit_code == 0, res.output
    assert same_weights(short, full)
    assert json.loads((short / "cfg.json").read_text())["saeforge"]["steps_done"] == 8


def test_killed_between_the_first_checkpoint_and_cfg_json(stores, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert cli_train(stores[0], ref).exit_code == 0
    assert cli_train(stores[0], run).exit_code == 0
    for name in ("cfg.json", "sae_weights.safetensors", "checkpoint.pt"):
        (run / name).unlink()
    (run / "checkpoint.prev.pt").replace(run / "checkpoint.pt")  # step 0's checkpoint only
    res = cli_train(stores[0], run)
    assert res.exit_code == 0, res.output
    assert same_weights(run, ref)


def test_a_run_that_failed_at_its_first_batch_reruns_cleanly(stores, tmp_path):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(stores[0], broken)
    shard = broken / HOOK / "c" / "0" / "0"
    good = shard.read_bytes()
    shard.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])  # a flipped bit: crc32c mismatch
    run = tmp_path / "run"
    line = one_error_line(cli_train(broken, run))
    assert "stopped before step 1" in line and str(broken) in line
    shard.write_bytes(good)  # restored from a copy: the same command resumes from step 0
    res = cli_train(broken, run)
    assert res.exit_code == 0, res.output
    ref = tmp_path / "ref"
    assert cli_train(stores[0], ref).exit_code == 0 and same_weights(run, ref) and metrics(run) == metrics(ref)


# ------------------------------------------------------------------ damaged run-directory files


@pytest.mark.parametrize("name, content, needle", [
    ("cfg.json", b'{"saeforge": ', "cfg.json is not valid JSON"),
    ("cfg.json", b"[1, 2]", "cfg.json should hold a JSON object"),
    ("checkpoint.pt", b"not a checkpoint", "checkpoint.pt cannot be read"),
    ("metrics.jsonl", b'{"step": 2}\n{"step": \n{"step": 4}\n', "metrics.jsonl: line 2 is not valid JSON"),
])
def test_a_damaged_run_file_is_named_and_left_alone(stores, tmp_path, name, content, needle):
    run = tmp_path / "run"
    assert cli_train(stores[0], run).exit_code == 0
    (run / name).write_bytes(content)
    before = files(run)
    line = one_error_line(cli_train(stores[0], run, *(["--steps", 8] if name != "metrics.jsonl" else [])))
    assert needle in line and str(run) in line
    assert files(run) == before
