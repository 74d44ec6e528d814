"""Typed store attributes: StoreAttrs round-trips zarr.json exactly, is read once and typed, and says what is wrong."""
from __future__ import annotations

import json

import numpy as np
import pytest

from saeforge.stores import (HookStats, InvalidInput, SchemaMismatch, StoreAttrs, StoreError, StoreWriter, hook_layer,
                             open_store)
from saeforge.stores.attrs import ChunkLayout, Completion, ShuffleParams
from saeforge.stores.reader import read_attrs

from .helpers import HOOKS, write_store


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "store"
    write_store(str(path), n=600, dtype="bfloat16")
    return path


def stored_attrs(path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]


def test_to_json_gives_back_exactly_what_is_stored(store_path):
    raw = stored_attrs(store_path)
    attrs = StoreAttrs.from_json(raw)
    assert attrs.to_json() == raw
    assert json.dumps(attrs.to_json(), indent=1) == json.dumps(raw, indent=1)  # key order included
    assert list(attrs.to_json()) == list(raw)


def test_open_store_reads_typed_attributes_once(store_path):
    s = open_store(store_path)
    a = s.attrs
    assert isinstance(a, StoreAttrs) and a.is_complete and a.format_version == 1
    assert (a.n_rows, a.dtype, a.hooks, a.seed) == (600, "bfloat16", dict(sorted(HOOKS.items())), 0)
    assert a.layout == ChunkLayout(chunk_rows=64, shard_rows=128) == ChunkLayout(chunk_rows=s.chunk_rows,
                                                                               shard_rows=s.shard_rows)
    assert isinstance(a.shuffle, ShuffleParams) and a.shuffle.n_buckets >= 1
    assert a.complete == Completion(rows=600, format_version=1)
    assert a.provenance == {"test": True} == s.provenance
    assert a.meta_arrays == {"token_ids": "int32", "seq_idx": "int64", "pos": "int32"}
    assert all(isinstance(st, HookStats) and st.mean.shape == (d,) for st, d in
               ((a.stats[h], d) for h, d in HOOKS.items()))
    assert a == open_store(store_path).attrs


def test_stats_are_the_callers_to_modify(store_path):
    s = open_store(store_path)
    h = next(iter(HOOKS))
    before = s.attrs.stats[h].mean.copy()
    s.stats(h).mean[:] = 0
    np.testing.assert_array_equal(s.stats(h).mean, before)


def test_incomplete_store_attributes_are_typed_too(tmp_path):
    w = StoreWriter(tmp_path / "s", {"h": 4}, dtype="float32", expected_rows=10)
    w.append({"h": np.ones((10, 4), np.float32)})
    w.abort()
    _, a = read_attrs(tmp_path / "s", require_complete=False)
    assert not a.is_complete and a.n_rows is None and a.stats is None and a.complete is None
    assert a.writer_config["seed"] == 0 and a.hooks == {"h": 4}


def test_keyed_access_for_callers_not_yet_switched(store_path):
    a = open_store(store_path).attrs
    assert a["n_rows"] == 600 and a.get("complete") == {"rows": 600, "format_version": 1}
    assert "stats" in a and a.get("nothing", 7) == 7


def test_unknown_attributes_are_kept(store_path):
    raw = {**stored_attrs(store_path), "note_from_a_user": [1, 2]}
    a = StoreAttrs.from_json(raw)
    assert a.extra == {"note_from_a_user": [1, 2]} and a.to_json() == raw


@pytest.mark.parametrize("damage, needle", [
    (lambda a: a.pop("layout"), "lack ['layout']"),
    (lambda a: a.update(shuffle={"n_buckets": 3}), "'shuffle' should hold the keys"),
    (lambda a: a.update(stats={"h": {"mean": [0.0]}}), "malformed"),
])
def test_malformed_attributes_name_the_problem(store_path, damage, needle):
    meta = json.loads((store_path / "zarr.json").read_text())
    damage(meta["attributes"])
    (store_path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(SchemaMismatch, match=str(store_path)) as e:
        open_store(store_path)
    assert needle in str(e.value)


def test_bad_input_is_a_store_error_and_a_value_error(tmp_path):
    with pytest.raises(InvalidInput, match="dtype must be one of"):
        StoreWriter(tmp_path / "s", {"h": 2}, dtype="int8")
    with StoreWriter(tmp_path / "t", {"h": 2}, dtype="float32", expected_rows=3) as w:
        with pytest.raises(StoreError, match="expected rows of shape"):
            w.append({"h": np.ones((3, 5), np.float32)})
        with pytest.raises(ValueError, match="NaN or inf"):
            w.append({"h": np.full((3, 2), np.inf, np.float32)})
        w.append({"h": np.ones((3, 2), np.float32)})


def test_hook_layer():
    assert hook_layer("blocks.10.hook_resid_post") == 10
    assert hook_layer("blocks.0.attn.hook_z") == 0
    assert hook_layer("hook_embed") is None and hook_layer("ln_final.hook_normalized") is None
    assert hook_layer("xblocks.3.hook_resid_post") is None
