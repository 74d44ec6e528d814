"""StoreLoader invariants: every row exactly once per epoch on any split, exact resume, fixed batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from saeforge.stores import StoreLoader, StoreWriter

N = 3000


@pytest.fixture(scope="module")
def id_store(tmp_path_factory):
    """Hook "id" holds each row's stream index (exact in fp32); hook "x" is aligned: x[:, 0] = 2 * id."""
    path = str(tmp_path_factory.mktemp("loader") / "store")
    idx = np.arange(N, dtype=np.float32)
    x = np.stack([2 * idx, -idx, np.ones(N, np.float32)], axis=1)
    with StoreWriter(path, {"id": 1, "x": 3}, dtype="float32", seed=5, expected_rows=N,
                     memory_limit_bytes=256 << 10, chunk_rows=64, shard_chunks=4) as w:
        for lo in range(0, N, 700):
            w.append({"id": idx[lo : lo + 700, None], "x": x[lo : lo + 700]}, token_ids=np.arange(lo, min(N, lo + 700)))
    return path


def ids(loader, limit=None):
    out = []
    for b in loader:
        assert torch.equal(b["x"][:, 0], 2 * b["id"][:, 0]), "hooks must stay aligned row for row"
        out.append(b["id"][:, 0].to(torch.int64))
        if limit and sum(len(o) for o in out) >= limit:
            break
    return torch.cat(out).numpy()


@pytest.mark.parametrize("seed", [0, 1, 17])
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
@pytest.mark.parametrize("buffer_rows", [0, 500])
def test_every_row_exactly_once_per_epoch_across_ranks(id_store, seed, world_size, buffer_rows):
    per_rank = [ids(StoreLoader(id_store, hooks=["id", "x"], batch_rows=128, seed=seed, rank=r,
                                world_size=world_size, epochs=1, buffer_rows=buffer_rows, read_chunks=1))
                for r in range(world_size)]
    assert np.array_equal(np.sort(np.concatenate(per_rank)), np.arange(N))
    sizes = [len(p) for p in per_rank]
    assert max(sizes) - min(sizes) <= 1


def test_epochs_differ_and_each_is_complete(id_store):
    stream = ids(StoreLoader(id_store, hooks=["id", "x"], batch_rows=100, seed=3, epochs=3, read_chunks=1))
    epochs = stream.reshape(3, N)
    for e in epochs:
        assert np.array_equal(np.sort(e), np.arange(N))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_batches_have_fixed_size_and_cycle_forever(id_store):
    loader = StoreLoader(id_store, hooks=["id"], batch_rows=256, epochs=None, read_chunks=2)
    it = iter(loader)
    sizes = [next(it)["id"].shape for _ in range(30)]  # 30 * 256 > 2 epochs
    assert set(sizes) == {(256, 1)}
    assert loader.state_dict()["epoch"] == 2
    finite = [b["id"].shape[0] for b in StoreLoader(id_store, hooks=["id"], batch_rows=256, epochs=1)]
    assert finite[:-1] == [256] * (len(finite) - 1) and sum(finite) == N
    dropped = [b["id"].shape[0] for b in StoreLoader(id_store, hooks=["id"], batch_rows=256, epochs=1, drop_last=True)]
    assert set(dropped) == {256} and len(dropped) == N // 256


@pytest.mark.parametrize("buffer_rows,world_size", [(0, 1), (700, 1), (300, 3)])
def test_resume_from_state_continues_exactly(id_store, buffer_rows, world_size):
    kw = dict(hooks=["id", "x"], batch_rows=96, seed=11, buffer_rows=buffer_rows, rank=world_size - 1,
              world_size=world_size, epochs=None, read_chunks=1)
    full = ids(StoreLoader(id_store, **kw), limit=2 * N)
    for stop_after in (1, 13, 50):
        loader = StoreLoader(id_store, **kw)
        it = iter(loader)
        head = [next(it)["id"][:, 0].to(torch.int64) for _ in range(stop_after)]
        state = loader.state_dict()
        del it
        resumed = StoreLoader(id_store, **kw)
        resumed.load_state_dict(state)
        tail = ids(resumed, limit=len(full) - 96 * stop_after)
        got = np.concatenate([torch.cat(head).numpy(), tail])[: len(full)]
        assert np.array_equal(got, full), f"resume after {stop_after} batches diverged"


def test_threads_do_not_change_the_stream_and_counters_count(id_store):
    a = StoreLoader(id_store, hooks=["id", "x"], batch_rows=200, seed=2, threads=1, epochs=1)
    b = StoreLoader(id_store, hooks=["id", "x"], batch_rows=200, seed=2, threads=4, epochs=1)
    assert np.array_equal(ids(a), ids(b))
    c = b.counters
    assert c.rows == N and c.bytes_read == N * 4 * 4 and c.decode_s > 0 and c.wait_s >= 0


def test_mixing_buffer_mixes_across_chunks(id_store):
    plain = ids(StoreLoader(id_store, hooks=["id", "x"], batch_rows=N, seed=0, epochs=1, read_chunks=1))
    mixed = ids(StoreLoader(id_store, hooks=["id", "x"], batch_rows=N, seed=0, epochs=1, read_chunks=1,
                            buffer_rows=1024))
    assert np.array_equal(np.sort(plain), np.sort(mixed)) and not np.array_equal(plain, mixed)
    # rows of one 64-row read unit end up spread over the 1024-row window
    where = np.argsort(mixed)[plain[:64]]
    assert where.max() - where.min() > 512


def test_bad_settings_name_every_problem(id_store):
    with pytest.raises(ValueError, match="batch_rows must be >= 1.*threads must be >= 1.*rank < world_size"):
        StoreLoader(id_store, batch_rows=0, threads=0, rank=2, world_size=2)
    loader = StoreLoader(id_store, seed=1)
    with pytest.raises(ValueError, match="seed=2"):
        loader.load_state_dict({**loader.state_dict(), "seed": 2})


def test_fast_chunk_reader_matches_zarr(id_store):
    """Oracle: the direct shard reader and zarr's own read path give the same batches."""
    fast = ids(StoreLoader(id_store, hooks=["id", "x"], batch_rows=100, seed=4, epochs=1))
    slow = ids(StoreLoader(id_store, hooks=["id", "x"], batch_rows=100, seed=4, epochs=1, fast_path=False))
    assert np.array_equal(fast, slow)
