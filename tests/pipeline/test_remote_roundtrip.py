"""harvest -> store verify -> train -> eval with the store at an s3:// URL of a real S3 API (moto's server), through
the real CLI: storage options as --storage-options JSON and as the config file's top-level table, never written
anywhere; run directories stay local; bad buckets, endpoints, credentials and options are one `Error:` line that
leaves what was written as it was."""
from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from saeforge.pipeline.cli import main
from saeforge.stores import open_store
from tests.pipeline.helpers import one_error_line
from tests.stores.s3 import (SECRET, checks_on, closed_port_options, read_only_user, s3,  # noqa: F401 (fixtures)
                             s3_server)

HOOK = "blocks.0.hook_resid_post"
WORDS = "the a sea of troubles mind slings arrows fortune sleep die nobler suffer arms question".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    for i in range(4):
        (d / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(300)))
    return d


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def harvest_args(model_dir, corpus):
    return ["harvest", "--quiet", "--model", model_dir, "--dataset", corpus, "--device", "cpu", "--layers", "0",
            "--sites", "resid_post", "--tokens", 600, "--context-size", 16, "--heldout-every", 4, "--store-dtype",
            "float32"]


TRAIN = ["--hook", HOOK, "--steps", 4, "--batch-rows", 64, "--d-sae", 32, "--log-every", 2, "--resample-every", 0,
         "--device", "cpu", "--quiet"]


def no_secret_anywhere(s3, root) -> None:
    """The storage options' secret is in no object of the bucket and no local file under ``root``."""
    fs = s3.fs()
    for key in s3.keys():
        assert SECRET.encode() not in fs.cat_file(key), key
    for path in root.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_harvest_verify_train_eval_with_the_store_on_s3(s3, tmp_path, tiny_model_dir, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would appear here as a folder `s3:`
    url, opts = s3.url("acts"), ["--storage-options", json.dumps(s3.options)]
    res = cli(*harvest_args(tiny_model_dir, corpus), "--out", url, *opts, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["store"] == url and open_store(url, s3.options).n_rows == 600
    res = cli("store", "verify", url, *opts)
    assert res.exit_code == 0 and res.stdout.startswith(f"ok: {url}: 600 rows"), res.output
    res = cli("train", "--store", url, *opts, *TRAIN, "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "cfg.json").read_text())["saeforge"]["store"] == url
    res = cli("eval", "--quiet", "--device", "cpu", "--tokens", 64, "--batch-size", 4, tmp_path / "run", "--store",
              url, *opts)
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert record["store"] == url and 0 < record["tokens"]["n_tokens"] <= 64
    before = {k: s3.fs().cat_file(k) for k in s3.keys()}
    res = cli(*harvest_args(tiny_model_dir, corpus), "--out", url, *opts, "--json")  # complete: nothing to do
    assert res.exit_code == 0 and json.loads(res.stdout)["rows"] == 600, res.output
    assert {k: s3.fs().cat_file(k) for k in s3.keys()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    no_secret_anywhere(s3, tmp_path)


def test_a_config_file_carries_the_storage_options_to_every_stage(s3, tmp_path, tiny_model_dir, corpus):
    client = f'{{endpoint_url = "{s3.endpoint}", region_name = "us-east-1"}}'
    exp = tmp_path / "exp.toml"
    exp.write_text(f'''store = "{s3.url('acts')}"
out = "{tmp_path / 'sweep'}"
storage_options = {{key = "testing", secret = "{SECRET}", client_kwargs = {client}}}

[harvest]
model = "{tiny_model_dir}"
dataset = "{corpus}"
device = "cpu"
hooks = ["{HOOK}"]
tokens = 600
context_size = 16
heldout_every = 4
store_dtype = "float32"

[train]
hook = "{HOOK}"
steps = 4
batch_rows = 64
log_every = 2
resample_every = 0
device = "cpu"

[sae]
d_sae = 32

[grid]
arch = ["gated", "baseline"]

[eval]
tokens = 64
batch_size = 4
device = "cpu"
''')
    for command in ("harvest", "sweep", "eval"):  # eval reads each run's training store, the URL in its cfg.json
        res = cli(command, "--config", exp, "--quiet", "--json")
        assert res.exit_code == 0, (command, res.output)
    assert len(json.loads(res.stdout)) == 2 and all((p / "eval.json").is_file() for p in (tmp_path / "sweep").iterdir()
                                                    if p.is_dir())
    no_secret_anywhere(s3, tmp_path / "sweep")


# ---------------------------------------------------------------- bad input: one line, nothing lost


def test_a_missing_bucket_is_one_line_and_is_not_created(s3, tmp_path, tiny_model_dir, corpus):
    url = "s3://missing-bucket-saeforge/x"
    res = cli(*harvest_args(tiny_model_dir, corpus), "--out", url, "--storage-options", json.dumps(s3.options))
    one_error_line(res, url, "the bucket missing-bucket-saeforge does not exist", "create it first")
    assert not s3.fs().exists("missing-bucket-saeforge")


def test_an_unreachable_endpoint_is_one_line(tmp_path, tiny_model_dir, corpus):
    res = cli(*harvest_args(tiny_model_dir, corpus), "--out", "s3://bucket/x", "--storage-options",
              json.dumps(closed_port_options()))
    one_error_line(res, "s3://bucket/x: cannot reach its storage endpoint", "endpoint_url")


def test_refused_credentials_and_a_read_only_user_are_one_line_and_lose_nothing(s3, tmp_path, tiny_model_dir,
                                                                                 corpus, monkeypatch):
    """A complete store is in the bucket; with the server checking credentials, harvesting with an unknown key is
    refused before the LM loads, and a user who may only read gets `access denied` when the writer starts: the
    bucket holds exactly what it held, and the reader can still verify the store."""
    done, opts = s3.url("done"), json.dumps(s3.options)
    assert cli(*harvest_args(tiny_model_dir, corpus), "--out", done, "--storage-options", opts).exit_code == 0
    reader = read_only_user(s3)
    before = {k: s3.fs().cat_file(k) for k in s3.keys()}
    checks_on(monkeypatch)
    res = cli(*harvest_args(tiny_model_dir, corpus), "--out", s3.url("new"), "--storage-options", opts)
    one_error_line(res, s3.url("new"), "credentials were refused", "--storage-options")
    res = cli(*harvest_args(tiny_model_dir, corpus), "--out", s3.url("new"), "--storage-options", json.dumps(reader))
    one_error_line(res, s3.url("new"), "access denied", "allowed to write")
    assert cli("store", "verify", done, "--storage-options", json.dumps(reader)).exit_code == 0
    fs = s3.fs()
    fs.key, fs.secret = reader["key"], reader["secret"]
    assert {k: fs.cat_file(k) for k in sorted(fs.find(s3.bucket))} == before


@pytest.mark.parametrize("command", [
    ["harvest", "--layers", "0", "--sites", "resid_post", "--out", "s3://b/x"],
    ["train", "--store", "s3://b/x", "--hook", HOOK, "--out", "run"],
    ["sweep", "--store", "s3://b/x", "--hook", HOOK, "--out", "run"],
    ["eval", "run", "--store", "s3://b/x"],
    ["store", "verify", "s3://b/x"],
    ["store", "info", "s3://b/x"],
])
@pytest.mark.parametrize("value, needle", [
    ("{not json", "--storage-options is not valid JSON"),
    ('["key", "secret"]', "--storage-options is a JSON list, not an object"),
    ("3", "--storage-options is a JSON int, not an object"),
])
def test_storage_options_that_are_not_one_json_object_are_one_line(command, value, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(cli(*command, "--storage-options", value), needle, "write one JSON object")
    assert "{not json" not in line  # the value is not echoed: it may hold a secret
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, needles", [
    ("storage_options = 3\n", ["storage_options: expected a table, got 3"]),
    ('storage_options = "key=k"\n', ["storage_options: expected a table"]),
    ("[harvest]\nstorage_options = {anon = true}\n", ["harvest.storage_options", "top-level `storage_options`"]),
    ("[train]\nstorage_options = {anon = true}\n", ["train.storage_options", "top-level key"]),
])
def test_storage_options_in_the_wrong_place_of_a_config_file_are_one_line(text, needles, tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text(text)
    for command in (["harvest"], ["train", "--store", "s3://b/x", "--out", tmp_path / "run"], ["eval", "run"]):
        one_error_line(cli(*command, "--config", exp), str(exp), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.toml"]


@pytest.mark.parametrize("command, needle", [
    (["train", "--store", "STORE", "--hook", HOOK, "--out", "memory://x"], "--out memory://x"),
    (["sweep", "--store", "STORE", "--hook", HOOK, "--out", "s3://bucket/sweep"], "--out s3://bucket/sweep"),
    (["eval", "memory://x"], "RUN memory://x"),
    (["demo", "memory://x"], "OUT memory://x"),
])
def test_local_only_outputs_refuse_urls_and_create_nothing(command, needle, tmp_path, monkeypatch):
    from tests.stores.helpers import write_store

    store = tmp_path / "store"
    write_store(str(store), hooks={HOOK: 8})
    monkeypatch.chdir(tmp_path)
    line = one_error_line(cli(*[str(store) if a == "STORE" else a for a in command]), needle,
                          "written to a local path; stores may live at URLs (--store)")
    assert "a URL, but only a local directory works here" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no ./memory: or ./s3: folder
