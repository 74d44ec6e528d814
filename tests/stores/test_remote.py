"""Stores at s3:// URLs against a real S3 API (moto's server, over HTTP through s3fs): written, opened, verified
and loaded with storage options, the same rows as on local disk; a missing bucket, an endpoint out of reach,
refused credentials and a failure mid-read are each one StoreError naming the URL and the fix."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saeforge.stores import StoreLoader, StoreNotFound, StoreWriter, open_store, verify_store
from saeforge.stores.remote import BucketNotFound, RemoteStoreError, check_remote
from saeforge.stores.schema import locate
from tests.stores.helpers import HOOKS, write_store
from tests.stores.s3 import (SECRET, checks_on, closed_port_options, iam_user, options, s3,  # noqa: F401
                             s3_auth, s3_server)

HOOK = "blocks.0.hook_resid_post"


def batches(loader) -> list[dict]:
    return [{h: t.clone() for h, t in b.items()} for b in loader]


def test_a_store_written_to_s3_is_the_local_store_bit_for_bit_and_loads_the_same_batches(s3, tmp_path):
    local = tmp_path / "store"
    appended = write_store(str(local), dtype="bfloat16")
    write_store(s3.url("store"), dtype="bfloat16", storage_options=s3.options)
    remote, here = open_store(s3.url("store"), s3.options), open_store(local)
    assert remote.n_rows == here.n_rows == len(appended[HOOK]) and remote.attrs.to_json() == here.attrs.to_json()
    for name in [*HOOKS, "token_ids", "seq_idx", "pos"]:
        assert np.array_equal(remote.read_raw(name), here.read_raw(name)), name
    kw = dict(hooks=list(HOOKS), batch_rows=96, seed=3, epochs=2, buffer_rows=256)
    from_s3 = batches(StoreLoader(s3.url("store"), storage_options=s3.options, **kw))
    from_disk = batches(StoreLoader(str(local), **kw))
    assert len(from_s3) == len(from_disk) > 0
    for a, b in zip(from_s3, from_disk):
        assert all(torch.equal(a[h], b[h]) for h in HOOKS)
    assert verify_store(s3.url("store"), storage_options=s3.options).ok


def test_a_store_copied_to_s3_reads_the_rows_of_its_local_copy(s3, tmp_path):
    """A store is plain files: uploaded as they are, the loader (fast path, ranged reads) gives the same rows."""
    local = tmp_path / "store"
    write_store(str(local), dtype="float32")
    s3.fs().put(str(local), f"{s3.bucket}/copy", recursive=True)
    loader = StoreLoader(s3.url("copy"), hooks=[HOOK], batch_rows=500, epochs=1, storage_options=s3.options)
    assert loader._fast, "the loader must take its fast path on S3 too"
    rows = torch.cat([b[HOOK] for b in loader]).numpy()
    expected = open_store(local).read_numpy(HOOK)
    assert sorted(map(bytes, rows)) == sorted(map(bytes, expected))  # every row once, in the loader's order


def test_the_loader_reads_each_shard_file_of_a_remote_store_in_one_request(s3, caplog):
    """At a URL the loader reads whole shards, each in one GET that brings its index along (not HEAD + index GET +
    rows GET): requests are what an object store charges latency for. Counted in the S3 server's access log."""
    write_store(s3.url("store"), storage_options=s3.options)  # 2,000 rows in shards of 128: 16 files per hook
    loader = StoreLoader(s3.url("store"), hooks=[HOOK], batch_rows=100, epochs=1, storage_options=s3.options)
    assert loader.unit_rows == loader.store.shard_rows
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        rows = sum(len(b[HOOK]) for b in loader)
    requests = [r.getMessage() for r in caplog.records if f"/{s3.bucket}/store/{HOOK}/c/" in r.getMessage()]
    assert rows == 2000 and len(requests) == 16 and all("GET /" in r for r in requests), requests


def test_the_store_cli_takes_storage_options(s3):
    write_store(s3.url("cli"), storage_options=s3.options)
    from saeforge.pipeline.cli import main

    opts = json.dumps(s3.options)
    res = CliRunner().invoke(main, ["store", "verify", s3.url("cli"), "--storage-options", opts])
    assert res.exit_code == 0 and res.stdout.startswith(f"ok: {s3.url('cli')}: 2,000 rows"), res.output
    res = CliRunner().invoke(main, ["store", "info", s3.url("cli"), "--json", "--storage-options", opts])
    assert res.exit_code == 0 and json.loads(res.output)["n_rows"] == 2000, res.output
    assert SECRET not in res.output
    res = CliRunner().invoke(main, ["store", "info", s3.url("cli")])  # no options: s3fs's own lookup, which fails
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_a_missing_bucket_is_named_and_never_created(s3):
    url = "s3://no-such-bucket-saeforge/store"
    with pytest.raises(BucketNotFound, match="no-such-bucket-saeforge does not exist.*create it first"):
        open_store(url, s3.options)
    with pytest.raises(StoreNotFound, match="no-such-bucket-saeforge"):  # a BucketNotFound is a StoreNotFound
        check_remote(url, s3.options, writing=True)
    with pytest.raises(BucketNotFound, match="no-such-bucket-saeforge"):  # a writer used directly, not via harvest
        StoreWriter(url, hooks={HOOK: 4}, storage_options=s3.options)
    assert "no-such-bucket-saeforge" not in [b["Name"] for b in _buckets(s3)]
    with pytest.raises(StoreNotFound, match=f"no store at {s3.url('nothing')}"):  # the bucket is there
        open_store(s3.url("nothing"), s3.options)


def _buckets(s3):
    import boto3

    return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing", aws_secret_access_key=SECRET,
                        region_name="us-east-1").list_buckets()["Buckets"]


def test_an_unreachable_endpoint_is_one_error_naming_it():
    url = "s3://bucket/store"
    with pytest.raises(RemoteStoreError, match=r"s3://bucket/store: cannot reach its storage endpoint.*endpoint_url"):
        open_store(url, closed_port_options())
    with pytest.raises(RemoteStoreError, match="cannot reach"):
        check_remote(url, closed_port_options(), writing=True)


def test_refused_credentials_and_denied_access_say_which(s3_auth):
    s3 = s3_auth.s3
    with pytest.raises(RemoteStoreError, match="credentials were refused.*--storage-options"):
        open_store(s3.url("store"), s3.options)  # the plain `testing` key is unknown once IAM checks are on
    with pytest.raises(RemoteStoreError, match="credentials were refused"):
        check_remote(s3.url("store"), s3.options, writing=True)
    with pytest.raises(StoreNotFound, match="no store at"):  # the reader may look: there is nothing there
        open_store(s3.url("store"), s3_auth.reader)


def test_a_remote_failure_while_reading_is_not_called_damage(s3, monkeypatch):
    """The store is fine; its endpoint stopped accepting the credentials after it was opened. The read fails as
    a RemoteStoreError, never as StoreDamaged ('the store is damaged, run verify')."""
    write_store(s3.url("store"), storage_options=s3.options)
    store = open_store(s3.url("store"), s3.options)
    loader = StoreLoader(store, hooks=[HOOK], batch_rows=100, epochs=1)
    checks_on(monkeypatch)
    with pytest.raises(RemoteStoreError, match=f"{s3.url('store')}: (the credentials were refused|access denied)"):
        store.read_raw(HOOK, 0, 64)
    with pytest.raises(RemoteStoreError, match="credentials were refused|access denied"):
        next(iter(loader))


def test_verify_reports_a_denied_read_as_such_not_as_bad_chunks(s3, monkeypatch):
    """A user who may read the metadata and the hooks' chunks, but not the token ids': verify raises the refusal,
    naming the URL, instead of reporting chunks as corrupt."""
    write_store(s3.url("store"), storage_options=s3.options)
    hooks_only = iam_user(s3, readable=("*zarr.json", "*/blocks.*"))
    checks_on(monkeypatch)
    store = open_store(s3.url("store"), hooks_only)
    assert store.read_numpy(HOOK).shape == (2000, 12)
    with pytest.raises(RemoteStoreError, match=f"{s3.url('store')}: access denied"):
        verify_store(s3.url("store"), storage_options=hooks_only)


def test_storage_options_reach_both_filesystems(tmp_path):
    """A URL's Location carries its options: its own filesystem and zarr's (``Location.zarr_store``) are made with
    them; a local path carries none."""
    pytest.importorskip("s3fs")
    loc = locate("s3://bucket/x", options("http://127.0.0.1:9", key="k1"))
    for fs in (loc.fs, loc.zarr_store(read_only=True).fs):
        fs = getattr(fs, "fs", fs)  # zarr may wrap a sync filesystem
        assert fs.key == "k1" and fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
    assert locate(tmp_path, {"key": "k1"}).storage_options is None


def test_a_location_sees_what_zarrs_own_filesystem_wrote_after_it_listed(s3):
    """zarr writes a store through its own (async) filesystem instance; a listing cached by the Location's instance
    would hide those files (s3fs answers `exists` from a cached listing of the parent)."""
    import zarr

    loc = locate(s3.url("g"), s3.options)
    loc.fs.pipe_file(loc.sub("first"), b"1")
    assert loc.fs.ls(loc.root, detail=False) == [loc.sub("first")]
    zarr.create_array(loc.zarr_store(), name="arr", shape=(4,), dtype="i4")
    assert loc.fs.exists(loc.sub("arr")) and locate(s3.url("g"), s3.options).fs.exists(loc.sub("arr"))


def test_a_denied_read_of_an_arrays_metadata_is_a_refusal_not_damage(s3, monkeypatch):
    """A user who may read the group's zarr.json but not the arrays' metadata: opening the store says access
    denied (the check open_store runs would otherwise call the store damaged and send the user to re-harvest)."""
    write_store(s3.url("store"), storage_options=s3.options)
    group_only = iam_user(s3, readable=("store/zarr.json",))
    checks_on(monkeypatch)
    with pytest.raises(RemoteStoreError, match=f"{s3.url('store')}: access denied"):
        open_store(s3.url("store"), group_only)
