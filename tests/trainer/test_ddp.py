"""Data-parallel training under the real torchrun (gloo, 2 CPU processes): the ranks' batches together are one
process's batch, 2 ranks train what 1 process trains (float64, a resample inside the run), a rank killed after a
checkpoint resumes to the weights of an uninterrupted 2-rank run, and bad input stops every rank with one line.

Run as `torchrun ... -m tests.trainer.test_ddp MODE ARGS` this file is also the entry point of the runs that need
something the CLI cannot say (float64 weights, a rank killing itself, a rank given another store); see `_entry`.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saeforge.stores import StoreLoader, StoreWriter
from saeforge.trainer import rundir
from saeforge.trainer.config import SAEConfig, TrainConfig
from tests.trainer.test_run import D_IN, HOOK, store_acts

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SAES = [SAEConfig(arch="gated", d_sae=64, l1_coefficient=10.0, lr=0.1),  # so strong that features die and are
        SAEConfig(arch="baseline", d_sae=64, l1_coefficient=5.0, lr=0.1)]  # resampled at step 16
TRAIN = TrainConfig(hook=HOOK, steps=24, batch_rows=128, log_every=6, checkpoint_every=8, resample_every=8,
                    dead_window=4, resample_rows=256, resample_until=16, lr_warmup_steps=3, device="cpu")
FLAGS = ["--hook", HOOK, "--arch", "gated", "--arch", "baseline", "--d-sae", 64, "--l1", 10.0, "--l1-baseline", 5.0,
         "--lr", 0.1, "--steps", 24, "--batch-rows", 128, "--log-every", 6, "--checkpoint-every", 8,
         "--resample-every", 8, "--dead-window", 4, "--resample-rows", 256, "--resample-until", 16,
         "--lr-warmup-steps", 3, "--device", "cpu", "--quiet"]
TIMING = ("steps_per_s", "data_wait_fraction")


def write_store(path, n_rows=4096, chunk_rows=256):
    acts = store_acts(n_rows)
    with StoreWriter(str(path), hooks={HOOK: D_IN}, dtype="float32", seed=0, expected_rows=n_rows,
                     chunk_rows=chunk_rows, shard_chunks=4, provenance={"model": "tiny-llama", "context_size": 32}) as w:
        w.append({HOOK: acts}, token_ids=np.zeros(n_rows, dtype=np.int64), seq_idx=np.arange(n_rows) // 32,
                 pos=np.arange(n_rows) % 32)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("ddp") / "acts.zarr")  # 16 chunks of 256 rows


def torchrun(*args, ranks=2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def error_lines(res) -> list[str]:
    return sorted(line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error:"))


def run_names(sweep_dir: Path) -> list[str]:
    return json.loads((sweep_dir / "sweep.json").read_text())["runs"]


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=False)


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rundir.read_metrics(run, events=True)]


def files(directory: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ the rows each rank reads


@pytest.mark.parametrize("world,block,read_chunks", [(2, 64, 1), (2, 384, 4), (3, 100, 2)])
def test_the_ranks_batches_together_are_the_one_process_batch(store, world, block, read_chunks):
    """Across epoch boundaries (4096 rows = 32 global batches of 128), and after a resume."""
    one = iter(StoreLoader(store, batch_rows=block * world, seed=3, read_chunks=read_chunks))
    kw = dict(batch_rows=block, seed=3, world_size=world, interleave=True, read_chunks=read_chunks)
    ranks = [StoreLoader(store, rank=r, **kw) for r in range(world)]
    streams = [iter(loader) for loader in ranks]
    steps = 2 * 4096 // (block * world) + 3
    for _ in range(steps):
        together = torch.cat([next(s)[HOOK] for s in streams])
        assert torch.equal(together, next(one)[HOOK])
    resumed = StoreLoader(store, rank=world - 1, **kw)
    resumed.load_state_dict(ranks[-1].state_dict())
    assert torch.equal(next(iter(resumed))[HOOK], next(streams[-1])[HOOK])


# ------------------------------------------------------------------ 2 ranks train what 1 process trains


def test_two_ranks_train_what_one_process_trains(store, tmp_path):
    """float64, so that the comparison is exact up to rounding: in float32, Adam (beta1 = 0) turns rounding noise on
    near-zero gradients into lr-sized steps and the two runs drift apart."""
    from saeforge.trainer.run import train_from_store

    one, two = tmp_path / "one", tmp_path / "two"
    train_from_store(store, SAES, TRAIN, one, sweep=True, progress=False, dtype=torch.float64)
    res = torchrun("-m", "tests.trainer.test_ddp", "float64", store, two)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)  # rank 0 alone prints
    assert [s["run_dir"] for s in summary] == [str(two / n) for n in run_names(one)]
    for name in run_names(one):
        a, b = checkpoint(one / name), checkpoint(two / name)
        assert a["world_size"] == 1 and b["world_size"] == 2 and len(b["loader_ranks"]) == 2
        for key, w in a["weights"].items():
            torch.testing.assert_close(b["weights"][key], w, rtol=1e-10, atol=1e-12, msg=key)
        ma, mb = metrics(one / name), metrics(two / name)
        events = [r for r in ma if "event" in r]
        assert events == [r for r in mb if "event" in r] and events[0]["event"] == "resample"
        for ra, rb in zip(*([r for r in m if "event" not in r] for m in (ma, mb))):
            # losses, L0, MSE, explained variance: the global batch's, not rank 0's (gamma's sums are float32)
            assert rb == pytest.approx(ra, rel=1e-6, abs=1e-12)


# ------------------------------------------------------------------ a killed rank, resumed


def test_a_killed_rank_resumes_to_the_uninterrupted_weights(store, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = torchrun("-m", "saeforge", "sweep", "--store", store, *FLAGS, "--out", full)
    assert res.returncode == 0, res.stderr[-3000:]
    killed = torchrun("-m", "tests.trainer.test_ddp", "kill", "sweep", "--store", store, *FLAGS, "--out", cut)
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr
    names = run_names(full)
    assert [checkpoint(cut / n)["step"] for n in names] == [8, 8]  # the resample at step 16 is still to come

    before = files(cut)
    one = CliRunner().invoke(_cli(), ["sweep", "--store", str(store), *map(str, FLAGS), "--out", str(cut), "--resume"])
    assert one.exit_code != 0 and len(one.output.strip().splitlines()) == 1
    assert "checkpointed by 2 process(es), not 1" in one.output and "--nproc-per-node 2" in one.output
    assert files(cut) == before

    res = torchrun("-m", "saeforge", "sweep", "--store", store, *FLAGS, "--out", cut, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in names:
        a, b = checkpoint(full / name), checkpoint(cut / name)
        assert a["step"] == b["step"] == 24
        assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
        assert metrics(full / name) == metrics(cut / name)
        assert (full / name / "sae_weights.safetensors").read_bytes() == (cut / name / "sae_weights.safetensors").read_bytes()


def _cli():
    from saeforge.pipeline.cli import main

    return main


# ------------------------------------------------------------------ bad input: every rank stops, with one line


def test_more_ranks_than_chunks_is_one_line_from_each_rank(tmp_path):
    small = write_store(tmp_path / "small.zarr", n_rows=256)  # one chunk
    saeforge = Path(sys.executable).with_name("saeforge")  # torchrun ... $(which saeforge) train ...
    res = torchrun(saeforge, "train", "--store", small, "--hook", HOOK, "--d-sae", 8, "--batch-rows", 64, "--steps", 2,
                   "--device", "cpu", "--out", tmp_path / "run")
    assert res.returncode != 0
    lines = error_lines(res)
    assert [line.split(":")[1].strip() for line in lines] == ["rank 0 of 2", "rank 1 of 2"]
    assert all("1 chunk(s) of 256 rows" in line and "use at most 1 rank(s)" in line for line in lines)
    assert not (tmp_path / "run").exists()


def test_a_rank_that_cannot_open_the_store_stops_every_rank(store, tmp_path):
    res = torchrun("-m", "tests.trainer.test_ddp", "rank1-store", "train", "--store", store, "--hook", HOOK,
                   "--d-sae", 8, "--batch-rows", 64, "--steps", 2, "--device", "cpu", "--out", tmp_path / "run")
    assert res.returncode != 0
    own, other = error_lines(res)
    assert own.startswith("Error: rank 0 of 2 stopped because rank 1 failed:") and "missing.zarr" in own
    assert other.startswith("Error: rank 1 of 2:") and "missing.zarr" in other
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the entry point of the runs above


def _entry(mode: str, argv: list[str]) -> None:
    """`float64 STORE OUT`: train_from_store(SAES, TRAIN) in float64 and print the summary (rank 0);
    `kill ARGS`: the CLI, rank 1 SIGKILLs itself once the step-8 checkpoint is on disk;
    `rank1-store ARGS`: the CLI, rank 1 given a store path that does not exist."""
    from saeforge.pipeline.cli import main
    from saeforge.trainer import run as run_module

    rank = int(os.environ["RANK"])
    if mode == "float64":
        summary = run_module.train_from_store(argv[0], SAES, TRAIN, argv[1], sweep=True, progress=False,
                                              dtype=torch.float64)
        if rank == 0:
            print(json.dumps(summary, default=str))
        return
    if mode == "kill":
        save = run_module._Run.on_checkpoint

        def on_checkpoint(self):
            save(self)
            if self.trainer.step == 8:
                torch.distributed.barrier()  # rank 0 has written every run's checkpoint
                if rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

        run_module._Run.on_checkpoint = on_checkpoint
    if mode == "rank1-store" and rank == 1:
        argv[argv.index("--store") + 1] = str(Path(argv[argv.index("--store") + 1]).parent / "missing.zarr")
    main(argv, prog_name="saeforge")


if __name__ == "__main__":
    _entry(sys.argv[1], sys.argv[2:])
