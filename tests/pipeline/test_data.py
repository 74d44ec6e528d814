"""pipeline.data, .tokenization, .windows: sources, tokenisation, packing, the held-out split and the kept-position
rule of a store's text provenance."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from saeforge.pipeline.data import ROW_RULE, DatasetError, dataset_identity, describe_dataset, iter_documents
from saeforge.pipeline.provenance import TextProvenance
from saeforge.pipeline.tokenization import token_stream
from saeforge.pipeline.windows import WindowRules, all_windows, pack_windows, train_windows

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings and arrows".split()
_rng = np.random.default_rng(0)
LINES = [" ".join(_rng.choice(WORDS, 12)) for _ in range(60)]  # no repeated runs: overlap means a leak


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(LINES[:30]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(LINES[30:])))
    return tmp_path


def test_pack_windows_prepends_bos_and_keeps_the_stream_in_order():
    chunks = [np.arange(10, 17), np.arange(17, 40)]
    wins = list(pack_windows(iter(chunks), WindowRules(context_size=8), bos_id=1))
    assert len(wins) == 30 // 7 and all(w.shape == (8,) and w.dtype == np.int64 for w in wins)
    assert all(w[0] == 1 for w in wins)
    assert np.array_equal(np.concatenate([w[1:] for w in wins]), np.arange(10, 10 + 7 * len(wins)))
    nobos = list(pack_windows(iter(chunks), WindowRules(context_size=8, prepend_bos=False), bos_id=1))
    assert np.array_equal(np.concatenate(nobos), np.arange(10, 10 + 8 * len(nobos)))


def test_token_stream_separates_documents_with_eos(tok):
    docs = list(token_stream(iter(["to be", "or not"]), tok))
    assert [d[-1] for d in docs] == [tok.eos_token_id] * 2
    assert docs[0][:-1].tolist() == tok("to be", add_special_tokens=False).input_ids


def test_local_sources_read_txt_jsonl_parquet_and_globs(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": LINES[:5]}), tmp_path / "c.parquet")
    rec = describe_dataset(str(corpus / "*.txt"))
    assert rec["kind"] == "local" and len(rec["files"]) == 1 and len(rec["files"][0]["sha256"]) == 64
    assert list(iter_documents(describe_dataset(str(corpus / "b.jsonl")))) == LINES[30:]
    assert list(iter_documents(describe_dataset(str(tmp_path / "c.parquet"), text_column="body"))) == LINES[:5]
    assert len(describe_dataset(str(corpus))["files"]) == 3  # a directory: every supported file, sorted


@pytest.mark.parametrize("spec, match", [("/nowhere/*.txt", "no .txt/.jsonl/.parquet files"),
                                         ("/nowhere/x.jsonl", "no .txt/.jsonl/.parquet files")])
def test_missing_local_sources_are_rejected(spec, match):
    with pytest.raises(DatasetError, match=match):
        describe_dataset(spec)


def test_missing_column_is_named(corpus):
    with pytest.raises(DatasetError, match="no column 'body' \\(has text, id\\)"):
        list(iter_documents(describe_dataset(str(corpus / "b.jsonl"), text_column="body")))


@pytest.mark.parametrize("name, content, match", [
    ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "bad.jsonl:2: not a JSON line"),
    ("list.jsonl", b'["a", "b"]\n', "list.jsonl:1: not a JSON object \\(a list\\)"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "latin1.jsonl: not UTF-8 text"),
    ("bad.parquet", b"PAR1 not really", "bad.parquet: not a readable parquet file")])
def test_unreadable_local_files_are_dataset_errors(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DatasetError, match=match):
        list(iter_documents(describe_dataset(str(tmp_path / name))))


def test_hf_names_with_a_token_column_are_described_not_opened():
    rec = describe_dataset("org/corpus:en@abc123", split="validation", token_column="tokens")
    assert rec == {"spec": "org/corpus:en@abc123", "kind": "hf", "name": "org/corpus", "config": "en",
                   "revision": "abc123", "split": "validation", "token_column": "tokens", "pretokenized": True,
                   "row_rule": ROW_RULE}


def test_heldout_windows_are_disjoint_from_train_windows_and_regenerate_from_provenance(corpus, tok):
    rules = WindowRules(context_size=16, heldout_every=4)
    rec = describe_dataset(str(corpus))
    everything = list(all_windows(rec, tok, rules))
    train = list(train_windows(rec, tok, rules))
    prov = json.loads(json.dumps(TextProvenance.build(rec, tok, rules).to_json()))  # as stored: plain JSON
    held = list(TextProvenance.from_json(prov).heldout_windows(tok))
    assert len(everything) >= 20 and len(held) == len(everything) // 4
    assert {i for i, _ in train}.isdisjoint(i for i, _ in everything if i % 4 == 3)
    assert len(train) + len(held) == len(everything)
    assert all(np.array_equal(h, everything[4 * k + 3][1]) for k, h in enumerate(held))
    # no held-out token run (a window body) occurs inside any harvested window
    train_text = {tuple(w[1:].tolist()) for _, w in train}
    assert not any(tuple(h[1:].tolist()) in train_text for h in held)


def test_kept_positions_excludes_special_tokens_by_default(tok, corpus):
    text = TextProvenance.build(describe_dataset(str(corpus)), tok, WindowRules(context_size=4))
    assert text.special_token_rule == "exclude" and tok.bos_token_id in text.special_token_ids
    token_ids = torch.tensor([[tok.bos_token_id, 40, tok.eos_token_id, 41]])
    assert text.kept_positions(token_ids).tolist() == [[False, True, False, True]]
    assert replace(text, special_token_rule="keep").kept_positions(token_ids).all()


def test_window_rules_validate_all_fields():
    with pytest.raises(ValueError, match="context_size must be >= 2.*heldout_every must be >= 2"):
        WindowRules(context_size=1, heldout_every=1)


def test_long_documents_are_split_at_line_boundaries_without_changing_the_ids(tok):
    from saeforge.pipeline.tokenization import can_split, split_document

    rng = np.random.default_rng(1)
    text = "\n".join(" ".join(rng.choice(WORDS, 30)) + rng.choice(["", ".", "  ", "\n", "\n\n  x"])
                     for _ in range(3000))
    pieces = split_document(text, size=4096)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert can_split(tok)
    whole = tok(text, add_special_tokens=False).input_ids
    parts = [i for p in tok(pieces, add_special_tokens=False).input_ids for i in p]
    assert parts == whole  # identical ids: the split is only a way to parallelise
    (doc,) = token_stream(iter([text]), tok)
    assert doc[:-1].tolist() == whole


def test_token_cache_tokenises_once_and_gives_the_streamed_windows(corpus, tok, tmp_path, monkeypatch):
    from saeforge.pipeline import tokenization

    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path / "cache"))
    rules = WindowRules(context_size=16, heldout_every=4)
    rec = describe_dataset(str(corpus))
    streamed = list(pack_windows(token_stream(iter_documents(rec), tok), rules, tok.bos_token_id))
    cached = [w for _, w in all_windows(rec, tok, rules)]
    assert len(cached) == len(streamed) and all(np.array_equal(a, b) for a, b in zip(cached, streamed))
    (npy,) = (tmp_path / "cache" / "tokens").glob("*.full.npy")
    stream = np.load(npy)
    assert stream.dtype == np.int32
    assert stream.tolist() == np.concatenate(list(token_stream(iter_documents(rec), tok))).tolist()
    calls = []
    monkeypatch.setattr(tokenization, "token_stream", lambda *a: calls.append(a) or iter(()))
    again = list(TextProvenance.build(rec, tok, rules).heldout_windows(tok))
    assert not calls and len(again) == len(cached) // 4  # read from the cache, not re-tokenised


def test_token_cache_grows_on_demand(tmp_path, tok, monkeypatch):
    from saeforge.pipeline import tokenization

    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tokenization, "MIN_EXTEND_TOKENS", 50)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in LINES))
    rec = describe_dataset(str(tmp_path / "d.jsonl"))
    cache = tokenization.TokenCache.open(rec, tok)
    assert cache.ensure(60) and not cache.complete and 0 < cache.n_docs < len(LINES)
    assert not cache.ensure(10**9) and cache.complete and cache.n_docs == len(LINES)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1  # the partial file was replaced
    full = np.concatenate(list(token_stream(iter(LINES), tok)))
    assert np.array_equal(tokenization.TokenCache.open(rec, tok).ids, full)


GROW_THEN_STALL = """
import sys, time
import numpy as np
from transformers import AutoTokenizer
from saeforge.pipeline import tokenization
from saeforge.pipeline.data import describe_dataset

real = np.lib.format.open_memmap
def stalled(*args, **kwargs):  # the temporary file exists; the kill comes before the rename
    out = real(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(120)
    return out
np.lib.format.open_memmap = stalled
tokenization.TokenCache.open(describe_dataset(sys.argv[2]), AutoTokenizer.from_pretrained(sys.argv[1])).ensure(10**9)
"""


def test_token_cache_after_kill_9_reads_past_and_removes_the_leftover(corpus, tok, tmp_path, tiny_model_dir,
                                                                      monkeypatch):
    """A kill between writing the cache file and renaming it leaves its temporary file: readers never take it
    for the cache, and the next write removes it (and a legacy `<file>.tmp<pid>` of a dead writer), keeping a
    live writer's."""
    import os
    import signal
    import subprocess
    import sys

    from saeforge.pipeline import tokenization

    cache_root = tmp_path / "cache"
    monkeypatch.setenv("SAEFORGE_CACHE", str(cache_root))
    proc = subprocess.Popen([sys.executable, "-c", GROW_THEN_STALL, str(tiny_model_dir), str(corpus)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    tokens = cache_root / "tokens"
    (left,) = [p.name for p in tokens.iterdir()]
    assert left.startswith(".") and left.endswith(".tmp") and str(proc.pid) in left  # what the kill leaves
    key = left.lstrip(".").split(".")[0]
    legacy_dead, legacy_live = f"{key}.3.part.npy.tmp{proc.pid}", f"{key}.4.part.npy.tmp{os.getpid()}"
    for name in (legacy_dead, legacy_live):
        (tokens / name).write_bytes(b"\x93NUMPY half")
    rec = describe_dataset(str(corpus))
    cache = tokenization.TokenCache.open(rec, tok)
    assert cache.n_docs == 0 and len(cache.ids) == 0  # the leftovers are not a cache
    assert not cache.ensure(10**9) and cache.complete
    assert cache.ids.tolist() == np.concatenate(list(token_stream(iter_documents(rec), tok))).tolist()
    assert sorted(p.name for p in tokens.iterdir()) == sorted([f"{key}.{cache.n_docs}.full.npy", legacy_live])


# ---------------------------------------------------------------- pre-tokenised sources, data_files


def id_rows(tok, n, length, *, bos=True, seed=0) -> list[list[int]]:
    """Rows of random non-special token ids, BOS first (SAELens's pretokenised layout) when ``bos``."""
    rng = np.random.default_rng(seed)
    body = rng.integers(4, len(tok), (n, length - bos)).tolist()
    return [[tok.bos_token_id] * bos + r for r in body]


def write_parquet(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_pretokenised_rows_in_saelens_layout_are_the_windows(tok, tmp_path, prepend_bos):
    rows = id_rows(tok, 40, 16)
    rec = describe_dataset(str(write_parquet(tmp_path / "ids.parquet", input_ids=rows)))
    assert (rec["token_column"], rec["pretokenized"]) == ("input_ids", True) and "text_column" not in rec
    windows = [w.tolist() for _, w in all_windows(rec, tok, WindowRules(context_size=16, prepend_bos=prepend_bos))]
    assert windows == rows  # the row's own BOS, or ours in its place: the same ids either way
    text = TextProvenance.build(rec, tok, WindowRules(context_size=16))
    assert text.doc_separator is None and text.to_json()["dataset"]["token_column"] == "input_ids"


def test_pretokenised_rows_of_any_length_are_packed_as_stored(tok, tmp_path):
    rows = [r[: 3 + i % 17] for i, r in enumerate(id_rows(tok, 60, 20, bos=False))]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"id": i, "tokens": r}) for i, r in enumerate(rows)))
    rec = describe_dataset(str(tmp_path / "t.jsonl"))
    assert rec["token_column"] == "tokens"
    windows = [w for _, w in all_windows(rec, tok, WindowRules(context_size=8))]
    assert all(w[0] == tok.bos_token_id for w in windows)
    stream = np.concatenate([w[1:] for w in windows]).tolist()
    assert stream == [i for r in rows for i in r][: len(stream)] and len(stream) > 0.9 * sum(map(len, rows))


def test_a_text_column_wins_unless_the_token_column_is_named(tok, tmp_path):
    (tmp_path / "both.jsonl").write_text(json.dumps({"text": "to be", "input_ids": [5, 6]}))
    assert describe_dataset(str(tmp_path / "both.jsonl"))["text_column"] == "text"
    rec = describe_dataset(str(tmp_path / "both.jsonl"), token_column="input_ids")
    assert rec["token_column"] == "input_ids" and dataset_identity(rec) != dataset_identity(
        describe_dataset(str(tmp_path / "both.jsonl")))
    with pytest.raises(DatasetError, match="no column 'ids' \\(has text, input_ids\\)"):
        describe_dataset(str(tmp_path / "both.jsonl"), token_column="ids")


@pytest.mark.parametrize("column, match", [
    ("input_ids", "row 2 holds token id 9999, outside the model's vocabulary \\(0\\.\\.\\d+\\)"),
    ("text", "column 'text' holds string, not lists of token ids")])
def test_ids_outside_the_vocabulary_or_not_ids_are_dataset_errors(tok, tmp_path, column, match):
    rows = id_rows(tok, 4, 8)
    rows[2][5] = 9999
    path = write_parquet(tmp_path / "bad.parquet", input_ids=rows, text=["a"] * 4)
    rec = describe_dataset(str(path), token_column=column)
    with pytest.raises(DatasetError, match=match):
        list(all_windows(rec, tok, WindowRules(context_size=8)))


def test_save_to_disk_folders_are_sources(tok, tmp_path):
    import datasets

    rows = id_rows(tok, 30, 12)
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "ds"))
    rec = describe_dataset(str(tmp_path / "ds"))
    assert (rec["kind"], rec["token_column"], len(rec["files"][0]["sha256"])) == ("disk", "input_ids", 64)
    assert [w.tolist() for _, w in all_windows(rec, tok, WindowRules(context_size=12))] == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": LINES[:3]})}).save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents(describe_dataset(str(tmp_path / "dd")))) == LINES[:3]
    with pytest.raises(DatasetError, match="no split 'test' \\(has train\\)"):
        describe_dataset(str(tmp_path / "dd"), split="test")


def test_data_files_go_to_load_dataset_and_into_the_record(tok, tmp_path):
    rows = id_rows(tok, 30, 12)
    files = [str(write_parquet(tmp_path / f"{i}.parquet", input_ids=rows[15 * i:15 * (i + 1)])) for i in range(2)]
    rec = describe_dataset("parquet", data_files=files)  # the datasets builder, offline: opened for its columns
    assert (rec["kind"], rec["data_files"], rec["token_column"]) == ("hf", files, "input_ids")
    assert [w.tolist() for _, w in all_windows(rec, tok, WindowRules(context_size=12))] == rows
    assert dataset_identity(rec) != dataset_identity(describe_dataset("parquet", data_files=files[:1]))
    with pytest.raises(DatasetError, match="data_files only applies to an HF datasets name"):
        describe_dataset(files[0], data_files=files)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from saeforge.pipeline.lm import load_lm

    return load_lm(str(tiny_model_dir), device="cpu")


def harvest_ids(tmp_path, files, lm, out, on_batch=None):
    """Harvest 450 rows of ``files`` (dataset ``parquet`` with data_files) into ``tmp_path / out``; a writer that
    commits staged rows every few batches."""
    from saeforge.pipeline.harvest import HarvestConfig, harvest

    cfg = HarvestConfig(out=str(tmp_path / out), model="tiny", dataset="parquet", data_files=tuple(files),
                        hooks=("blocks.0.hook_resid_post",), tokens=450, context_size=16, heldout_every=4,
                        batch_size=4, store_dtype="float32", writer_memory_bytes=1 << 17)
    return harvest(cfg, lm=lm, progress=False, on_batch=on_batch)


def test_harvest_stores_the_given_ids_and_records_them(tok, tmp_path, lm, tiny_model_dir):
    from click.testing import CliRunner

    from saeforge.pipeline.cli import main
    from saeforge.stores import open_store

    rows = np.array(id_rows(tok, 60, 16))
    files = [str(write_parquet(tmp_path / "ids.parquet", input_ids=rows.tolist()))]
    args = ["harvest", "--quiet", "--model", str(tiny_model_dir), "--device", "cpu", "--dataset", "parquet",
            "--data-files", files[0], "--token-column", "input_ids", "--hooks", "blocks.0.hook_resid_post",
            "--tokens", "450", "--context-size", "16", "--heldout-every", "4", "--batch-size", "4",
            "--store-dtype", "float32", "--out", str(tmp_path / "store")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    s = open_store(str(tmp_path / "store"))
    seq, pos = s.seq_idx(), s.pos()
    assert s.n_rows == 450 and not (seq % 4 == 3).any()  # held-out windows never stored
    assert np.array_equal(s.token_ids(), rows[seq, pos]) and (pos > 0).all()  # BOS positions not stored
    stored = {(int(a), int(b)) for a, b in zip(seq, pos)}
    first = [(i, p) for i in range(60) if i % 4 != 3 for p in range(1, 16)][:450]
    assert stored == set(first)  # the first 450 kept positions of the stream, each once
    rec = s.provenance["dataset"]
    assert (rec["data_files"], rec["token_column"], rec["pretokenized"]) == (files, "input_ids", True)
    assert s.provenance["doc_separator"] is None
    again = CliRunner().invoke(main, args)  # the same command on the complete store: nothing to do
    assert again.exit_code == 0 and open_store(str(tmp_path / "store")).attrs == s.attrs


def test_an_interrupted_pretokenised_harvest_resumes_to_the_same_store(tok, tmp_path, lm):
    from saeforge.stores import open_store

    files = [str(write_parquet(tmp_path / "ids.parquet", input_ids=id_rows(tok, 60, 16)))]
    harvest_ids(tmp_path, files, lm, "whole")
    seen = []

    def stop(batch):
        seen.append(batch)
        if len(seen) == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest_ids(tmp_path, files, lm, "cut", on_batch=stop)
    res = harvest_ids(tmp_path, files, lm, "cut")
    assert 0 < res.rows_resumed < 450
    a, b = open_store(str(tmp_path / "whole")), open_store(str(tmp_path / "cut"))
    assert np.array_equal(a.token_ids(), b.token_ids()) and np.array_equal(a.read(a.hooks[0]), b.read(b.hooks[0]))


def test_ids_outside_the_vocabulary_stop_harvest_before_a_store_is_written(tok, tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from saeforge.pipeline.cli import main
    from tests.pipeline.helpers import one_error_line

    rows = id_rows(tok, 40, 16)
    rows[30][3] = len(tok) + 5
    path = write_parquet(tmp_path / "ids.parquet", input_ids=rows)
    res = CliRunner().invoke(main, ["harvest", "--quiet", "--model", str(tiny_model_dir), "--device", "cpu",
                                    "--dataset", str(path), "--layers", "0", "--sites", "resid_post", "--tokens",
                                    "400", "--context-size", "16", "--out", str(tmp_path / "store")])
    one_error_line(res, f"row 30 holds token id {len(tok) + 5}, outside the model's vocabulary")
    assert not (tmp_path / "store").exists()
