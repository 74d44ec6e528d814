"""Harvest on dask.distributed (LocalCluster, 2 worker processes, the tiny Llama loaded by path on each):
the same store as one process, a worker killed mid-task, the whole harvest killed with -9 then rerun, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from saeforge.pipeline.cli import main
from saeforge.pipeline.harvest import HarvestConfig, HarvestError, harvest
from saeforge.stores import StoreIncomplete, open_store
from tests.pipeline.helpers import one_error_line, word_docs
from tests.stores.s3 import s3, s3_server  # noqa: F401

distributed = pytest.importorskip("distributed")

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_docs(tmp_path_factory.mktemp("corpus"), 60, 60, seed=1)


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster for the module (workers start once: each imports torch and loads the LM once)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  env={"OMP_NUM_THREADS": "1"}) as c:
        yield c


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir, corpus):
    out = tmp_path_factory.mktemp("single") / "store"
    cfg = HarvestConfig(out=str(out), model=str(tiny_model_dir), device="cpu", lm_dtype="float32",
                        dataset=str(corpus), hooks=HOOKS, tokens=1200, context_size=24, batch_size=4,
                        store_dtype="float32", heldout_every=5, writer_memory_bytes=1 << 20, task_batches=3)
    harvest(cfg, progress=False)
    return cfg


def contents(path, storage_options=None):
    s = open_store(path, storage_options)
    return s, {h: s.read(h).numpy() for h in s.hooks}, {"token_ids": s.token_ids(), "seq_idx": s.seq_idx(),
                                                          "pos": s.pos()}


def assert_same_store(a_path, b_path, b_options=None):
    """Index arrays and attributes equal exactly; activations equal to float tolerance (the workers run torch
    with another thread count, which may change the last bits of a matmul; equal bit for bit otherwise)."""
    a, a_acts, a_idx = contents(a_path)
    b, b_acts, b_idx = contents(b_path, b_options)
    for name in a_idx:
        assert np.array_equal(a_idx[name], b_idx[name]), name
    for h in HOOKS:
        np.testing.assert_allclose(a_acts[h], b_acts[h], rtol=1e-5, atol=1e-5)
    a_attrs, b_attrs = a.attrs.to_json(), b.attrs.to_json()
    for stats in (a_attrs.pop("stats"), b_attrs.pop("stats")):
        assert set(stats) == set(HOOKS)
    assert a_attrs == b_attrs
    pairs = np.stack([a_idx["seq_idx"], a_idx["pos"]], 1)
    assert len(np.unique(pairs, axis=0)) == len(pairs)  # no (seq, pos) twice


def test_two_workers_write_the_single_process_store(base, cluster, tmp_path):
    cfg = replace(base, out=str(tmp_path / "dist"), scheduler=cluster.scheduler_address)
    result = harvest(cfg, progress=False)
    assert result.rows == 1200 and result.forward_passes > 0
    assert_same_store(base.out, cfg.out)
    again = harvest(cfg, progress=False)  # a complete store of the same harvest: nothing runs
    assert again.forward_passes == result.forward_passes and again.wall_s == result.wall_s


def test_workers_stage_into_a_store_on_s3(base, cluster, s3):
    """Every worker process opens the S3 store with the storage options (they travel with the task) and stages its
    rows there; the driver finalizes on the workers: the local single-process store's rows, on S3."""
    cfg = replace(base, out=s3.url("dist"), scheduler=cluster.scheduler_address, storage_options=s3.options)
    assert harvest(cfg, progress=False).rows == 1200
    assert_same_store(base.out, cfg.out, s3.options)
    assert not [k for k in s3.keys() if "/.saeforge/" in k]  # no staged file or task manifest left behind


def test_a_worker_killed_mid_task_is_retried_and_nothing_is_lost_or_doubled(base, cluster, tmp_path):
    """A worker plugin kills its own process (os._exit, as a crash would) when it starts task 2, once."""
    marker = tmp_path / "killed"

    class KillOnce(distributed.WorkerPlugin):
        name = "test-kill-once"

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and "saeforge-harvest-0000002" in str(key) and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)

    with distributed.Client(cluster.scheduler_address) as client:
        client.register_plugin(KillOnce())
        try:
            cfg = replace(base, out=str(tmp_path / "dist"), scheduler=cluster.scheduler_address)
            harvest(cfg, progress=False)
        finally:
            client.unregister_worker_plugin("test-kill-once")
    assert marker.exists(), "no worker was killed"
    assert_same_store(base.out, cfg.out)


KILLABLE = [sys.executable, "-c", "from saeforge.pipeline.cli import main; main()", "harvest", "--quiet", "--workers", "2", "--device",
            "cpu", "--dtype", "float32", "--tokens", "1200", "--context-size", "24", "--batch-size", "4",
            "--store-dtype", "float32", "--heldout-every", "5", "--writer-memory-mb", "1", "--task-batches", "1",
            "--hooks", ",".join(HOOKS)]


def test_kill_9_of_the_whole_harvest_then_the_same_command_completes_it(base, tmp_path, tiny_model_dir, corpus):
    out = tmp_path / "cut"
    cmd = [*KILLABLE, "--model", str(tiny_model_dir), "--dataset", str(corpus), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    tasks = out / ".saeforge" / "stage" / "tasks"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list(tasks.glob("t*.json"))) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, f"the harvest ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the client, the scheduler and every worker
    proc.wait()
    with pytest.raises(StoreIncomplete):
        open_store(out)
    done = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert 0 < result["forward_passes"] < 1200 // (4 * 22)  # the committed tasks did not run again
    assert_same_store(base.out, out)


def test_a_single_process_run_on_a_distributed_store_is_refused(base, cluster, tmp_path, monkeypatch):
    """A store being staged by tasks resumes only as a distributed harvest (its rows are not a prefix)."""
    from saeforge.stores.schema import locate
    from saeforge.stores.tasks import committed_tasks
    from saeforge.stores.writer import StoreWriter

    cfg = replace(base, out=str(tmp_path / "dist"), scheduler=cluster.scheduler_address)

    def interrupt(writer, manifests):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "adopt_tasks", interrupt)
        with pytest.raises(KeyboardInterrupt):
            harvest(cfg, progress=False)
    assert len(committed_tasks(locate(cfg.out))) > 0
    with pytest.raises(HarvestError, match="distributed harvest.*--workers"):
        harvest(replace(cfg, scheduler=""), progress=False)
    assert harvest(cfg, progress=False).rows == 1200
    assert_same_store(base.out, cfg.out)


def test_an_unreachable_scheduler_is_one_line_and_no_store(tmp_path, tiny_model_dir, corpus):
    res = CliRunner().invoke(main, ["harvest", "--quiet", "--scheduler", "tcp://127.0.0.1:9", "--model",
                                    str(tiny_model_dir), "--dataset", str(corpus), "--hooks", HOOKS[0],
                                    "--out", str(tmp_path / "s")])
    one_error_line(res, "cannot reach the dask scheduler at 'tcp://127.0.0.1:9'")
    assert not (tmp_path / "s").exists()


def test_workers_that_cannot_load_the_model_are_one_line_and_no_store(cluster, tmp_path, corpus):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
    res = CliRunner().invoke(main, ["harvest", "--quiet", "--scheduler", cluster.scheduler_address, "--model",
                                    str(bad), "--dataset", str(corpus), "--hooks", HOOKS[0],
                                    "--out", str(tmp_path / "s")])
    one_error_line(res, str(bad))
    assert not (tmp_path / "s").exists()
