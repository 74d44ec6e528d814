"""The store contract, run over a local directory and an in-memory fsspec filesystem (memory://)."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from saeforge.stores import (HookNotInStore, SchemaMismatch, StoreError, StoreIncomplete, StoreLoader,
                             StoreLocked, StoreNotFound, StoreWriter, open_store, verify_store)

HOOKS = {"blocks.0.hook_resid_post": 12, "blocks.1.hook_mlp_out": 8}


def logical(x: np.ndarray, dtype: str) -> np.ndarray:
    """What a store of ``dtype`` should give back for float32 input (torch as the rounding oracle)."""
    return torch.from_numpy(x).to(getattr(torch, dtype)).float().numpy()


class StoreContract:
    """Every backend must pass these. Subclasses provide the ``url`` fixture."""

    @pytest.fixture
    def url(self):
        raise NotImplementedError

    @pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
    def test_round_trip(self, url, store_factory, dtype):
        data = store_factory(url, n=1500, hooks=HOOKS, dtype=dtype)
        s = open_store(url)
        assert (s.n_rows, s.hooks, s.dtype) == (1500, sorted(HOOKS), dtype)
        tid = s.token_ids()
        assert np.array_equal(np.sort(tid), np.arange(1500)), "rows must be a permutation of the input"
        assert np.array_equal(s.seq_idx(), tid // 32) and np.array_equal(s.pos(), tid % 32)
        for h, d in HOOKS.items():
            assert s.d(h) == d
            got = s.read(h)
            assert got.dtype == torch.float32 and got.shape == (1500, d)
            np.testing.assert_array_equal(got.numpy(), logical(data[h], dtype)[tid])
            np.testing.assert_array_equal(s.read(h, 100, 300).numpy(), got[100:300].numpy())
            st = s.stats(h)
            x64 = logical(data[h], dtype).astype(np.float64)
            np.testing.assert_allclose(st.mean, x64.mean(0), rtol=1e-10, atol=1e-12)
            msq = (x64**2).sum(1).mean()
            assert st.mean_sq_norm == pytest.approx(msq, rel=1e-12)
            assert st.mean_norm == pytest.approx(np.sqrt((x64**2).sum(1)).mean(), rel=1e-12)
            assert st.scale == pytest.approx(np.sqrt(d / msq), rel=1e-12)
        assert s.provenance == {"test": True}
        assert verify_store(url).ok

    @pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
    def test_to_dask_gives_float_values(self, url, store_factory, dtype):
        store_factory(url, n=700, hooks=HOOKS, dtype=dtype)
        s = open_store(url)
        for h in HOOKS:
            x = s.to_dask(h)
            want = s.read_numpy(h)  # the reader's own decode (bf16 bits widened to float32)
            assert x.dtype == {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}[dtype]
            assert x.shape == want.shape and x.chunks[0][0] == s.shard_rows
            np.testing.assert_array_equal(x.compute().astype(np.float32), want)
            np.testing.assert_allclose(x.astype(np.float64).mean(axis=0).compute(), s.stats(h).mean, rtol=1e-12,
                                       atol=1e-12)
        assert np.array_equal(s.to_dask("token_ids").compute(), s.token_ids())
        with pytest.raises(HookNotInStore):
            s.to_dask("blocks.9.hook_resid_post")

    def test_loader_bf16_bits_reach_torch_unconverted(self, url, store_factory):
        data = store_factory(url, n=700, hooks={"h": 6}, dtype="bfloat16")
        s = open_store(url)
        (b16,) = [b["h"] for b in StoreLoader(url, hooks=["h"], batch_rows=700, epochs=1, out_dtype=torch.bfloat16)]
        (b32,) = [b["h"] for b in StoreLoader(url, hooks=["h"], batch_rows=700, epochs=1)]
        assert b16.dtype == torch.bfloat16 and b32.dtype == torch.float32
        assert torch.equal(b16.float(), b32)
        assert torch.equal(torch.sort(b32[:, 0]).values, torch.sort(s.read("h")[:, 0]).values)
        assert data["h"].shape == (700, 6)

    def test_same_seed_same_store_other_seed_other_order(self, url, store_factory):
        store_factory(url, n=800, hooks={"h": 4}, seed=3)
        store_factory(url + "_b", n=800, hooks={"h": 4}, seed=3, batch=97)  # other batching, same stream
        store_factory(url + "_c", n=800, hooks={"h": 4}, seed=4)
        a, b, c = (open_store(u) for u in (url, url + "_b", url + "_c"))
        assert np.array_equal(a.token_ids(), b.token_ids())
        assert torch.equal(a.read("h"), b.read("h"))
        assert a.attrs == b.attrs
        assert not np.array_equal(a.token_ids(), c.token_ids())

    def test_incomplete_store_says_how_to_resume_and_resumes(self, url, store_factory):
        w = StoreWriter(url, {"h": 4}, dtype="float32", seed=0, expected_rows=900, memory_limit_bytes=32 << 10,
                        chunk_rows=32, shard_chunks=1)
        acts = np.arange(900 * 4, dtype=np.float32).reshape(900, 4)
        w.append({"h": acts[:600]}, token_ids=np.arange(600))
        w.abort()
        with pytest.raises(StoreIncomplete, match="rerun the same harvest command"):
            open_store(url)
        w = StoreWriter(url, {"h": 4}, dtype="float32", seed=0, expected_rows=900, memory_limit_bytes=32 << 10,
                        chunk_rows=32, shard_chunks=1)
        assert 0 < w.rows_staged <= 600
        k = w.rows_staged
        w.append({"h": acts[k:]}, token_ids=np.arange(k, 900))
        w.close()
        s = open_store(url)
        assert np.array_equal(s.read("h").numpy(), acts[s.token_ids()])

    def test_writer_refuses_other_config_second_writer_and_complete_store(self, url, store_factory):
        w = StoreWriter(url, {"h": 4}, dtype="float32", seed=0, expected_rows=10)
        with pytest.raises(StoreLocked, match="being written by pid"):
            StoreWriter(url, {"h": 4}, dtype="float32", seed=0, expected_rows=10)
        w.append({"h": np.ones((10, 4), np.float32)})
        w.abort()
        with pytest.raises(SchemaMismatch, match="seed: store has 0, writer has 1"):
            StoreWriter(url, {"h": 4}, dtype="float32", seed=1, expected_rows=10)
        with StoreWriter(url, {"h": 4}, dtype="float32", seed=0, expected_rows=10) as w:
            w.append({"h": np.ones((10, 4), np.float32)})
        with pytest.raises(StoreError, match="already a complete store"):
            StoreWriter(url, {"h": 4}, dtype="float32", seed=0, expected_rows=10)

    def test_exception_inside_writer_leaves_store_incomplete(self, url):
        with pytest.raises(RuntimeError):
            with StoreWriter(url, {"h": 2}, dtype="float32", expected_rows=5) as w:
                w.append({"h": np.ones((5, 2), np.float32)})
                raise RuntimeError("producer failed")
        with pytest.raises(StoreIncomplete):
            open_store(url)

    def test_bad_appends_are_refused_with_names(self, url):
        with StoreWriter(url, {"a": 3, "b": 2}, dtype="float16", expected_rows=5) as w:
            with pytest.raises(ValueError, match=r"missing \['b'\]"):
                w.append({"a": np.ones((5, 3), np.float32)})
            with pytest.raises(ValueError, match=r"a: expected rows of shape \(rows, 3\)"):
                w.append({"a": np.ones((5, 4), np.float32), "b": np.ones((5, 2), np.float32)})
            with pytest.raises(ValueError, match="NaN or inf"):
                w.append({"a": np.full((5, 3), np.nan, np.float32), "b": np.ones((5, 2), np.float32)})
            with pytest.raises(ValueError, match="overflow float16"):
                w.append({"a": np.full((5, 3), 1e6, np.float32), "b": np.ones((5, 2), np.float32)})
            w.append({"a": torch.ones(5, 3), "b": torch.ones(5, 2, dtype=torch.bfloat16)})
        assert open_store(url).n_rows == 5

    def test_missing_store_and_missing_hook(self, url, store_factory):
        with pytest.raises(StoreNotFound, match="does not exist"):
            open_store(url + "_nothing_here")
        store_factory(url, n=300, hooks={"h": 3})
        with pytest.raises(HookNotInStore, match=r"hook 'blocks.9.hook_resid_post' is not in the store .* \['h'\]"):
            StoreLoader(url, hooks=["blocks.9.hook_resid_post"])


class TestLocalStore(StoreContract):
    @pytest.fixture
    def url(self, tmp_path):
        return str(tmp_path / "store")


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def url(self):
        import fsspec

        root = f"memory://saeforge-test-{uuid.uuid4().hex}"
        yield root + "/store"
        fs = fsspec.filesystem("memory")
        for p in list(fs.store):
            if p.startswith(root.removeprefix("memory:/")):
                fs.store.pop(p, None)
