"""Experiment trackers (trainer/loggers.py): wandb (offline, read back from its run files) and TensorBoard (read back
with TensorBoard's own EventAccumulator) get exactly metrics.jsonl's rows and steps, one run per SAE with the run's
config; a resumed run continues the same tracker runs without logging a step twice; a tracker that is missing or
misspelt is one line before anything is written."""
import json
import struct
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

from saeforge.trainer import run as run_module
from saeforge.trainer.config import SAEConfig
from saeforge.trainer.loggers import TENSORBOARD_DIR, WANDB_FILE, WandbSink, read_wandb_file, scalars
from saeforge.trainer.rundir import read_metrics, read_record
from saeforge.trainer.run import train_from_store
from tests.trainer.test_bad_input import common, invoke, one_error_line
from tests.trainer.test_run import Killed, train_cfg, write_store

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")

TIMING = ("steps_per_s", "data_wait_fraction")
SAES = [SAEConfig(arch="gated", d_sae=64, l1_coefficient=10.0, lr=0.1, seed=1),  # so strong that features die:
        SAEConfig(arch="baseline", d_sae=64, l1_coefficient=5.0, lr=0.1, seed=3)]  # resample event lines


def cfg(**kw):
    """30 steps; lines every 5 steps; resampling at 10, 20 and 30 (event lines at the steps of metrics lines)."""
    base = dict(steps=30, log_every=5, checkpoint_every=10, resample_every=10, dead_window=5, resample_until=30,
                log_to=("wandb", "tensorboard"))
    return train_cfg(**{**base, **kw})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("stores") / "acts.zarr")


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """wandb without a network or an account, every file it writes under tmp_path/wandb_files."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_files"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "wandb_files").mkdir()
    return tmp_path / "wandb_files"


# ------------------------------------------------------------------ reading the trackers back


def wandb_records(path):
    """The protobuf records of an offline run file (`run-<id>.wandb`: a LevelDB-style log of 32 KiB blocks, each
    record a 7-byte header crc32/length/type and its bytes; type 1 whole, 2-4 first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


def wandb_runs(files):
    """{run id: {"name", "group", "config", "sessions", "history": [(step, {key: value}), ...]}} of every offline
    run under `files`, sessions in the order they ran."""
    import wandb

    wandb.teardown()  # a finished run's file may still be written by wandb's service process: wait for it
    runs = {}
    for path in sorted((files / "wandb").glob("offline-run-*/run-*.wandb")):
        run = runs.setdefault(path.stem.removeprefix("run-"), {"config": {}, "history": [], "sessions": 0})
        run["sessions"] += 1
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(name=r.run.display_name, group=r.run.run_group)
            updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
            run["config"].update({u.key: json.loads(u.value_json) for u in updates if u.key != "_wandb"})
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                run["history"].append((items.pop("_step"), {k: v for k, v in items.items() if k[0] != "_"}))
    return runs


def tensorboard_run(folder):
    """({tag: [(step, value), ...]}, the last config text as a dict) of one TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    text = acc.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    return tags, json.loads(text.removeprefix("```json\n").removesuffix("\n```"))


# ------------------------------------------------------------------ what metrics.jsonl says


def expected_by_step(run_dir, drop=()):
    """metrics.jsonl (metrics and event lines) as the trackers log it: [(step, {name: value})], one entry per step."""
    steps = defaultdict(dict)
    for row in read_metrics(run_dir, events=True):
        step, values = scalars(row)
        steps[step].update({k: v for k, v in values.items() if k not in drop})
    return sorted(steps.items())


def expected_by_tag(run_dir):
    tags = defaultdict(list)
    for row in read_metrics(run_dir, events=True):
        step, values = scalars(row)
        for k, v in values.items():
            tags[k].append((step, v))
    return tags


def run_record(run_dir):
    """The run record the trackers get: what identifies the run, as its checkpoint (and cfg.json) records it."""
    record = torch.load(run_dir / "checkpoint.pt", weights_only=False)["record"]
    assert record.items() <= read_record(run_dir).items()
    return record


def assert_tensorboard_matches(run_dir, folder):
    tags, config = tensorboard_run(folder)
    want = expected_by_tag(run_dir)
    assert sorted(tags) == sorted(want)
    for tag, points in want.items():  # TensorBoard scalars are float32
        assert [s for s, _ in tags[tag]] == [s for s, _ in points], tag
        np.testing.assert_array_equal(np.float32([v for _, v in tags[tag]]), np.float32([v for _, v in points]))
    assert config == run_record(run_dir)


# ------------------------------------------------------------------ tests


def test_each_sae_of_a_sweep_gets_one_wandb_and_one_tensorboard_run_with_its_metrics_rows(store, tmp_path,
                                                                                        wandb_offline):
    sweep = tmp_path / "sw"
    train_from_store(store, SAES, cfg(), sweep, sweep=True, progress=False)
    run_dirs = [sweep / s.run_name for s in SAES]
    assert any("resample/features" in v for d in run_dirs for _, v in expected_by_step(d))  # events are covered
    runs = wandb_runs(wandb_offline)
    assert len(runs) == 2
    for run_dir in run_dirs:
        run = runs[json.loads((run_dir / WANDB_FILE).read_text().splitlines()[0])["id"]]
        assert (run["name"], run["group"], run["sessions"]) == (run_dir.name, "sw", 1)
        assert run["config"] == run_record(run_dir) and run["config"]["sae"]["seed"] in (1, 3)
        np.testing.assert_equal(run["history"], expected_by_step(run_dir))  # exact float64, NaN equal to NaN
        assert_tensorboard_matches(run_dir, run_dir / TENSORBOARD_DIR)


def test_a_resumed_run_continues_its_tracker_runs_without_logging_a_step_twice(store, tmp_path, wandb_offline,
                                                                             monkeypatch):
    log = run_module._Run.on_log

    def on_log(self, rows):  # killed after the step-25 line: wandb has steps 21-25 the checkpoint (20) has not
        log(self, rows)
        if self.trainer.step == 25:
            monkeypatch.undo()
            raise Killed

    monkeypatch.setattr(run_module._Run, "on_log", on_log)
    out, logs = tmp_path / "run", tmp_path / "logs"
    with pytest.raises(Killed):
        train_from_store(store, SAES[:1], cfg(steps=40, log_dir=str(logs)), out, progress=False)
    train_from_store(store, SAES[:1], cfg(steps=40, log_dir=str(logs)), out, progress=False)
    assert [r["step"] for r in read_metrics(out)] == [5, 10, 15, 20, 25, 30, 35, 40]
    (run,) = wandb_runs(logs).values()  # log_dir holds wandb's files too
    assert run["sessions"] == 2 and [s for s, _ in run["history"]] == [5, 10, 15, 20, 25, 30, 35, 40]
    got = [(s, {k: v for k, v in values.items() if k not in TIMING}) for s, values in run["history"]]
    np.testing.assert_equal(got, expected_by_step(out, drop=TIMING))  # step 25 as first sent: same values on CPU
    assert_tensorboard_matches(out, logs / "run")  # the killed session's step 25 is purged and logged again
    assert not (out / TENSORBOARD_DIR).exists()


def test_a_wandb_file_cut_short_by_a_kill_resends_only_the_row_it_lost(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / WANDB_FILE).write_text('{"id": "abc12345"}\n{"step": 5, "row": "metrics"}\n'
                                      '{"step": 10, "row": "resample"}\n{"step": 10, "ro')
    assert read_wandb_file(run_dir / WANDB_FILE) == ("abc12345", 10, {"resample"})
    sink = WandbSink(run_dir, {"a": 1}, project="p", group=None, log_dir=None, system_metrics=False)
    for row in ({"step": 5, "loss": 1.0}, {"step": 10, "event": "resample", "features": 3}, {"step": 10, "loss": 2.0}):
        sink.log(row)
    sink.close()
    assert read_wandb_file(run_dir / WANDB_FILE) == ("abc12345", 10, {"resample", "metrics"})  # on a line of its own
    (run,) = wandb_runs(wandb_offline).values()
    assert run["history"] == [(10, {"loss": 2.0})] and run["config"] == {"a": 1}


def test_a_missing_tracker_package_is_one_line_naming_the_extra_before_anything_is_written(store, tmp_path,
                                                                                        monkeypatch):
    for name, module in (("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # what an environment without the package imports
            out = tmp_path / name
            line = one_error_line(invoke("train", *common(store), "--device", "cpu", "--out", out, "--log-to",
                                         f"tensorboard,{name}"))
            assert f"pip install 'saeforge[{name}]'" in line and f"log_to {name!r}" in line
            assert not out.exists()


@pytest.mark.parametrize("how", ["flag", "toml"])
def test_an_unknown_tracker_is_one_line_naming_the_field_and_the_choices(store, tmp_path, how):
    out = tmp_path / "run"
    if how == "flag":
        res = invoke("train", *common(store), "--device", "cpu", "--out", out, "--log-to", "wandb,comet")
    else:
        (tmp_path / "exp.toml").write_text('[train]\nlog_to = ["comet"]\n')
        res = invoke("train", *common(store), "--device", "cpu", "--out", out, "--config", tmp_path / "exp.toml")
    line = one_error_line(res)
    assert ("--log-to" if how == "flag" else "log_to") in line and "'comet'" in line and "wandb" in line
    assert not out.exists()


def test_a_run_trained_without_trackers_resumes_with_them(store, tmp_path):
    out = tmp_path / "run"
    args = [*common(store), "--device", "cpu", "--out", out]
    assert invoke("train", *args, "--steps", 4).exit_code == 0
    res = invoke("train", *args, "--steps", 8, "--log-to", "tensorboard")
    assert res.exit_code == 0, res.output
    tags, _ = tensorboard_run(out / TENSORBOARD_DIR)
    assert [s for s, _ in tags["loss"]] == [s for s in (r["step"] for r in read_metrics(out)) if s > 4]
