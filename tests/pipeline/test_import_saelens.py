"""`saeforge store import-saelens`: a cache in SAELens's format (built here with `datasets`, the features
SAELens 6.54's CacheActivationsRunner declares) becomes a store holding exactly its rows, shuffled, verified,
resumable; bad input is one line."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from saeforge.pipeline import import_saelens as imp
from saeforge.pipeline.cli import main
from saeforge.stores import open_store
from tests.pipeline.helpers import one_error_line

HOOK, OTHER = "blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"
N_SEQ, CTX, D = 90, 12, 16


def write_cache(path, *, n_seq=N_SEQ, ctx=CTX, hooks=(HOOK, OTHER), token_ids=True, num_shards=2, seed=0):
    """A cache as CacheActivationsRunner writes it: one row per window, an Array2D (ctx, d_in) column per hook,
    token_ids as Sequence(int32, length=ctx), saved with save_to_disk (several data-*.arrow files)."""
    import datasets

    rng = np.random.default_rng(seed)
    features = {h: datasets.Array2D(shape=(ctx, D), dtype="float32") for h in hooks}
    data = {h: rng.standard_normal((n_seq, ctx, D)).astype(np.float32) * (1 + i) for i, h in enumerate(hooks)}
    if token_ids:
        features["token_ids"] = datasets.Sequence(datasets.Value(dtype="int32"), length=ctx)
        data["token_ids"] = rng.integers(0, 50, (n_seq, ctx)).astype(np.int32)
    datasets.Dataset.from_dict(data, features=datasets.Features(features)).save_to_disk(str(path),
                                                                                       num_shards=num_shards)
    return data


def run(*args):
    return CliRunner().invoke(main, ["store", "import-saelens", "--quiet", *map(str, args)])


def rows_by_seq_pos(path, hooks):
    """The store's rows sorted by (seq_idx, pos): (seq, pos, token_ids, {hook: acts})."""
    s = open_store(str(path))
    seq, pos = s.seq_idx(), s.pos()
    order = np.lexsort((pos, seq))
    return seq[order], pos[order], s.token_ids()[order], {h: s.read(h).numpy()[order] for h in hooks}


def test_the_store_holds_exactly_the_cache_rows_shuffled_and_verifies(tmp_path):
    data = write_cache(tmp_path / "cache")
    res = run(tmp_path / "cache", tmp_path / "store", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    seq, pos, tok, acts = rows_by_seq_pos(tmp_path / "store", (HOOK, OTHER))
    assert np.array_equal(seq, np.repeat(np.arange(N_SEQ), CTX)) and np.array_equal(pos, np.tile(np.arange(CTX), N_SEQ))
    assert np.array_equal(tok, data["token_ids"].reshape(-1))
    for h in (HOOK, OTHER):  # every (window, position) once, its activations bit for bit
        assert np.array_equal(acts[h], data[h].reshape(-1, D))
    s = open_store(str(tmp_path / "store"))
    assert not np.array_equal(s.seq_idx(), np.sort(s.seq_idx()))  # stored globally shuffled, not in cache order
    prov = s.provenance
    assert prov["imported_from"] == imp.SOURCE and prov["dataset"]["rows"] == N_SEQ
    assert [f["name"] for f in prov["dataset"]["files"]] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    verify = CliRunner().invoke(main, ["store", "verify", str(tmp_path / "store")])
    assert verify.exit_code == 0 and verify.output.startswith("ok:"), verify.output


def test_rerun_does_nothing_and_another_import_into_it_is_refused(tmp_path):
    write_cache(tmp_path / "cache")
    assert run(tmp_path / "cache", tmp_path / "store").exit_code == 0
    before = (tmp_path / "store" / "zarr.json").read_bytes()
    again = run(tmp_path / "cache", tmp_path / "store")
    assert again.exit_code == 0 and "nothing to do" in again.output
    other = run(tmp_path / "cache", tmp_path / "store", "--hook", HOOK)
    one_error_line(other, "holds another store", "hooks")
    assert (tmp_path / "store" / "zarr.json").read_bytes() == before


def test_an_interrupted_import_resumes_to_the_same_store(tmp_path, monkeypatch):
    data = write_cache(tmp_path / "cache")
    # a writer that commits staged rows every ~500 rows, so a kill leaves some committed
    cfg = imp.ImportConfig(cache=str(tmp_path / "cache"), out=str(tmp_path / "whole"), batch_rows=10,
                           store_dtype="float32", writer_memory_bytes=1 << 17)
    imp.import_saelens(cfg, progress=False)
    seq, _, _, acts = rows_by_seq_pos(tmp_path / "whole", (HOOK,))  # read in 9 batches: still every row once
    assert np.array_equal(seq, np.repeat(np.arange(N_SEQ), CTX))
    assert np.array_equal(acts[HOOK], data[HOOK].reshape(-1, D))
    real = imp.cache_rows

    def interrupted(*args, **kwargs):  # the run dies after 6 of 9 batches (the writer staged some of them)
        for i, rows in enumerate(real(*args, **kwargs)):
            if i == 6:
                raise KeyboardInterrupt
            yield rows

    monkeypatch.setattr(imp, "cache_rows", interrupted)
    cut = imp.ImportConfig(**{**cfg.__dict__, "out": str(tmp_path / "cut")})
    with pytest.raises(KeyboardInterrupt):
        imp.import_saelens(cut, progress=False)
    monkeypatch.setattr(imp, "cache_rows", real)
    res = imp.import_saelens(imp.ImportConfig(**{**cut.__dict__, "batch_rows": 7}), progress=False)  # the staged
    # rows end inside a batch of 7: its first rows are skipped, not appended twice
    assert 0 < res.rows_resumed < N_SEQ * CTX and res.rows == N_SEQ * CTX
    a, b = open_store(str(tmp_path / "whole")), open_store(str(tmp_path / "cut"))
    assert np.array_equal(a.seq_idx(), b.seq_idx()) and np.array_equal(a.pos(), b.pos())
    assert all(np.array_equal(a.read(h).numpy(), b.read(h).numpy()) for h in a.hooks)


def test_runner_config_gives_positions_and_provenance_and_skipped_token_ids_are_not_imported(tmp_path):
    data = write_cache(tmp_path / "cache", hooks=(HOOK,))
    cfg = {"model_name": "gpt2", "hook_name": HOOK, "context_size": CTX + 4, "seqpos_slice": [2, -2],
           "prepend_bos": True, "dataset_path": "org/text", "dtype": "float32"}
    (tmp_path / "cache" / imp.CFG_FILE).write_text(json.dumps(cfg))
    assert run(tmp_path / "cache", tmp_path / "store", "--skip-token-id", 7, "--skip-token-id", 9).exit_code == 0
    seq, pos, tok, _ = rows_by_seq_pos(tmp_path / "store", (HOOK,))
    keep = ~np.isin(data["token_ids"], [7, 9]).reshape(-1)
    assert np.array_equal(tok, data["token_ids"].reshape(-1)[keep]) and not np.isin(tok, [7, 9]).any()
    assert np.array_equal(pos, np.tile(np.arange(2, CTX + 2), N_SEQ)[keep])  # positions in the model's context
    prov = open_store(str(tmp_path / "store")).provenance
    assert prov["model"] == "gpt2" and prov["saelens_cfg"] == cfg and prov["context_size"] == CTX + 4
    assert (prov["special_token_rule"], prov["special_token_ids"]) == ("exclude", [7, 9])


def test_an_imported_store_says_why_it_cannot_be_evaluated(tmp_path):
    from saeforge.pipeline.errors import ProvenanceError
    from saeforge.pipeline.provenance import Provenance

    write_cache(tmp_path / "cache", hooks=(HOOK,))
    assert run(tmp_path / "cache", tmp_path / "store").exit_code == 0
    with pytest.raises(ProvenanceError, match="imported from a SAELens activation cache: it has no held-out text"):
        Provenance.from_json(open_store(str(tmp_path / "store")).provenance, where="store s")


def _not_a_cache(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("x")
    return [tmp_path / "cache", tmp_path / "store"], "is not a SAELens activation cache: no state.json"


def _no_activations(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4]]}).save_to_disk(str(tmp_path / "cache"))
    return [tmp_path / "cache", tmp_path / "store"], "without activation columns"


def _hook_missing(tmp_path):
    write_cache(tmp_path / "cache", hooks=(HOOK,))
    return [tmp_path / "cache", tmp_path / "store", "--hook", OTHER], f"hook '{OTHER}' is not in the cache"


def _skip_without_token_ids(tmp_path):
    write_cache(tmp_path / "cache", hooks=(HOOK,), token_ids=False)
    return [tmp_path / "cache", tmp_path / "store", "--skip-token-id", 1], "has no token_ids column"


def _bad_cfg(tmp_path):
    write_cache(tmp_path / "cache", hooks=(HOOK,))
    (tmp_path / "cache" / imp.CFG_FILE).write_text("{not json")
    return [tmp_path / "cache", tmp_path / "store"], "cache_activations_runner_cfg.json: not JSON"


def _out_is_not_a_store(tmp_path):
    write_cache(tmp_path / "cache", hooks=(HOOK,))
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "mine.txt").write_text("keep me")
    return [tmp_path / "cache", tmp_path / "store"], "is not a saeforge store"


@pytest.mark.parametrize("case", [_not_a_cache, _no_activations, _hook_missing, _skip_without_token_ids, _bad_cfg,
                                  _out_is_not_a_store])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    args, needle = case(tmp_path)
    before = sorted(p.name for p in (tmp_path / "store").glob("*")) if (tmp_path / "store").exists() else None
    one_error_line(run(*args), needle)
    after = sorted(p.name for p in (tmp_path / "store").glob("*")) if (tmp_path / "store").exists() else None
    assert after == before


def test_a_cache_written_by_saelens_itself_imports(tmp_path):
    """SAELens's own shard writer and consolidation (`CacheActivationsRunner._create_shard`,
    `_consolidate_shards`), when sae-lens is installed."""
    sl = pytest.importorskip("sae_lens.cache_activations_runner")
    import datasets
    import torch

    runner = sl.CacheActivationsRunner.__new__(sl.CacheActivationsRunner)
    runner.cfg = type("Cfg", (), {"hook_name": HOOK, "n_seq_in_buffer": 10, "d_in": D})()
    runner.context_size = CTX
    runner.features = datasets.Features({HOOK: datasets.Array2D(shape=(CTX, D), dtype="float32"),
                                         "token_ids": datasets.Sequence(datasets.Value(dtype="int32"), length=CTX)})
    shards, out = tmp_path / "cache" / ".tmp_shards", tmp_path / "cache"
    acts, toks = torch.randn(3, 10 * CTX, D), torch.randint(0, 50, (3, 10 * CTX))
    for i in range(3):
        runner._create_shard((acts[i], toks[i])).save_to_disk(str(shards / f"shard_{i:05d}"), num_shards=1)
    sl.CacheActivationsRunner._consolidate_shards(shards, out, copy_files=False)
    assert run(out, tmp_path / "store", "--dtype", "float32").exit_code == 0
    seq, pos, tok, got = rows_by_seq_pos(tmp_path / "store", (HOOK,))
    assert np.array_equal(got[HOOK], acts.reshape(-1, D).numpy()) and np.array_equal(tok, toks.reshape(-1).numpy())
