"""Every damage of ``damage.py``: open_store refuses it (cheaply, before anything is read) or the loader and
verify catch it when they read; ``store info`` / ``store verify`` say so in one line naming it. Never a traceback,
never a fill value read as data."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from saeforge.stores import (SchemaMismatch, StoreDamaged, StoreError, StoreLoader, StoreWriter, open_store,
                             verify_store)

from .damage import DAMAGE, DEEP_DAMAGE, HOOK, N, delete, mark_chunk_missing
from .test_verify_cli import assert_one_clear_line, cli


@pytest.fixture
def copy(store_copy):
    return store_copy


def load_all(path, **kw):
    for _ in StoreLoader(path, hooks=[HOOK], batch_rows=256, epochs=1, **kw):
        pass


def test_the_pristine_store_is_healthy(pristine):
    assert verify_store(pristine).ok
    assert open_store(pristine).n_rows == N
    load_all(pristine)


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_is_refused_on_open_and_named_in_one_line(copy, case):
    damage, words = DAMAGE[case]
    damage(copy)
    with pytest.raises(StoreError) as e:
        open_store(copy)
    assert isinstance(e.value, (StoreDamaged, SchemaMismatch)), repr(e.value)
    for word in [str(copy), *words]:
        assert word in str(e.value), f"{word!r} not in: {e.value}"
    assert "\n" not in str(e.value)
    with pytest.raises(StoreError):  # train and eval open the store the same way: refused before step 1
        StoreLoader(copy, hooks=[HOOK], batch_rows=256, epochs=1)
    assert_one_clear_line(cli("info", copy), *words)
    assert_one_clear_line(cli("verify", copy), *words)
    if isinstance(e.value, SchemaMismatch):  # an unknown format is not read at all, verify included
        with pytest.raises(SchemaMismatch):
            verify_store(copy)
        return
    report = verify_store(copy)
    assert not report.ok and all(w in report.problems[0] for w in words), report.problems


@pytest.mark.parametrize("case", sorted(DEEP_DAMAGE))
def test_damage_inside_chunks_is_found_by_verify_and_the_loader(copy, case):
    damage, words = DEEP_DAMAGE[case]
    damage(copy)
    report = verify_store(copy)
    assert not report.ok
    assert any(all(w in p for w in words) for p in report.problems), report.problems
    assert_one_clear_line(cli("verify", copy), "damaged", *words[:2])
    if HOOK in words:  # the loader reads hooks only (seq_idx is read by Store.seq_idx)
        for fast_path in (True, False):
            with pytest.raises(StoreDamaged, match=HOOK):
                load_all(copy, fast_path=fast_path)
        with pytest.raises(StoreDamaged, match=HOOK) if "NaN" not in words else nullcontext():
            open_store(copy).read_numpy(HOOK)  # Store reads return what is there (NaN included), never zeros
    else:
        with pytest.raises(StoreDamaged, match="seq_idx"):
            open_store(copy).seq_idx()


def test_nan_rows_are_named_by_index(copy):
    DEEP_DAMAGE["NaN rows injected through zarr"][0](copy)
    report = verify_store(copy)
    nan_line = [p for p in report.problems if "NaN or inf" in p]
    assert nan_line and "2 row(s)" in nan_line[0] and "rows 5, 700" in nan_line[0]
    assert any("statistics of" in p and "do not match" in p for p in report.problems)  # recomputed stats too


def test_a_chunk_deleted_after_open_is_never_read_as_zeros(copy):
    s = open_store(copy)
    delete("token_ids/c/3")(copy)
    delete(f"{HOOK}/c/4/0")(copy)
    with pytest.raises(StoreDamaged, match="token_ids/c/3"):
        s.token_ids()
    with pytest.raises(StoreDamaged, match="token_ids/c/3"):
        s.to_dask("token_ids").compute()
    with pytest.raises(StoreDamaged, match=f"{HOOK}/c/4/0"):
        s.read_numpy(HOOK, 520, 530)
    assert s.token_ids(0, 300).shape == (300,)  # chunks that are there still read
    for fast_path in (True, False):
        with pytest.raises(StoreDamaged, match=f"{HOOK}/c/4/0"):
            for _ in StoreLoader(s, hooks=[HOOK], batch_rows=256, epochs=1, fast_path=fast_path):
                pass


def test_a_chunk_absent_from_its_shard_index_is_never_read_as_zeros(copy):
    s = open_store(copy)
    mark_chunk_missing(copy, shard=1, chunk=1)
    with pytest.raises(StoreDamaged, match=r"rows 192:256 .*missing from the shard's index"):
        s.read_numpy(HOOK, 200, 210)
    assert s.read_numpy(HOOK, 0, 190).shape == (190, 16)  # the rest of the store reads


def test_the_writer_writes_chunks_of_zeros_so_none_is_ever_absent(tmp_path):
    path = tmp_path / "zeros"
    rows = np.zeros((700, 4), np.float32)
    rows[650:] = 1.0  # most chunks are all zeros (the fill value), which zarr would otherwise skip
    with StoreWriter(path, {"h": 4}, dtype="float32", seed=0, expected_rows=700, memory_limit_bytes=64 << 10,
                     chunk_rows=32, shard_chunks=2) as w:
        w.append({"h": rows}, token_ids=np.zeros(700, np.int64), seq_idx=np.zeros(700), pos=np.zeros(700))
    assert verify_store(path).ok
    s = open_store(path)
    got = torch.cat([b["h"] for b in StoreLoader(s, batch_rows=100, epochs=1)])
    assert got.shape == (700, 4) and float(got.sum()) == 200.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_nonfinite_values_are_found_from_their_bits(dtype):
    from saeforge.stores.schema import any_nonfinite, nonfinite_rows

    def stored(t: torch.Tensor) -> np.ndarray:
        t = t.to(getattr(torch, dtype))
        return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()

    finfo = torch.finfo(getattr(torch, dtype))
    rows = torch.randn(64, 8) * 100
    rows[0, 0], rows[1, 1] = finfo.max, -finfo.max  # the largest finite values are finite
    assert not any_nonfinite(stored(rows), dtype) and not nonfinite_rows(stored(rows), dtype).any()
    for bad in (float("nan"), float("inf"), -float("inf"), -float("nan")):
        damaged = rows.clone()
        damaged[5, 3] = bad
        assert any_nonfinite(stored(damaged), dtype), bad
        assert np.nonzero(nonfinite_rows(stored(damaged), dtype))[0].tolist() == [5]
