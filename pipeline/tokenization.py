"""Tokenisation of a text stream, and the on-disk token cache of a finite dataset.

Each document is tokenised without special tokens and followed by the tokenizer's EOS (the document
separator); a long document is tokenised as pieces cut at line boundaries where that leaves the ids
unchanged (:func:`split_document`, :func:`can_split`), in batches, so a fast tokenizer works in parallel
even on a one-file corpus. :class:`TokenCache` keeps the concatenated stream of a finite dataset on disk,
so it is tokenised once; :mod:`saeforge.pipeline.windows` cuts windows from it. A pre-tokenised source skips
all of this: :func:`pretokenized_stream` checks its ids against the vocabulary and passes them on. Documents come from
:mod:`saeforge.pipeline.data` (this module imports it, never the other way round).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from saeforge.pipeline.data import cache_dir, dataset_identity, iter_documents
from saeforge.pipeline.errors import DatasetError
from saeforge.stores.files import atomic_path, temp_file_pid
from saeforge.stores.lock import pid_alive
from saeforge.stores.progress import progress_bar

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
_LEGACY_TEMP = re.compile(r".+\.npy\.tmp(\d+)")
"""The temporary name of a cache file before atomic_path wrote it: ``<file>.tmp<pid>``."""
_BOUNDARY = re.compile(r"(?<=\S\n)(?=\S)")
_SPLIT_PROBE = ("First line, with words.\nSecond: 12 345 don't stop\n  indented line\n\nAfter a blank\n"
                "\u00c9t\u00e9 \u00fcn\u00efcode \u6771\u4eac\nTHE END.\n'Tis\n\"quoted\"\n-- dash\nend")



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


def pretokenized_stream(rows: Iterator[np.ndarray], tokenizer, *, drop_bos: int | None, where: str
                        ) -> Iterator[np.ndarray]:
    """The stream of a pre-tokenised source (``data.ROW_RULE``): each non-empty row as stored, minus a leading
    ``drop_bos`` (the BOS every window gets anyway), int64. No tokenizer pass; every id must lie in the
    tokenizer's vocabulary (DatasetError naming the row and the id otherwise: ids made by another tokenizer)."""
    vocab = len(tokenizer)
    for n, ids in enumerate(rows):
        if drop_bos is not None and len(ids) and ids[0] == drop_bos:
            ids = ids[1:]
        if not len(ids):
            continue
        bad = ids[(ids < 0) | (ids >= vocab)]
        if len(bad):
            raise DatasetError(f"dataset {where!r}: row {n} holds token id {int(bad[0])}, outside the model's "
                               f"vocabulary (0..{vocab - 1}): were these ids made by another tokenizer?")
        yield ids


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


class TokenCache:
    """The concatenated token stream (documents + EOS separators) of a finite dataset, cached on disk.

    One flat int32 ``.npy`` per (dataset files' sha256, tokenizer definition) under
    ``cache_dir()/tokens``, named ``{key}.{n_docs}.{full|part}.npy``: the stream of the first ``n_docs``
    documents. It is grown on demand (:meth:`ensure`) by tokenising the following documents, so a small
    budget on a huge corpus tokenises only what it needs; every file is written to a temporary name and
    renamed (atomic), and readers memory-map it. ``progress``: tokenising shows a bar on stderr once it takes
    more than a second (``--quiet`` silences it).
    """

    def __init__(self, record: dict, tokenizer, key: str, *, progress: bool = True):
        self.record, self.tokenizer, self.key, self.progress = record, tokenizer, key, progress
        self.dir = cache_dir() / "tokens"
        self.ids: np.ndarray = np.zeros(0, dtype=np.int32)  # (n,) int32 token ids, memory-mapped from disk
        self.n_docs, self.complete = 0, False
        self._load()

    @classmethod
    def open(cls, record: dict, tokenizer, *, progress: bool = True) -> "TokenCache | None":
        """The cache of a finite text dataset (None for a streamed one, a pre-tokenised one, whose ids are read as
        stored, or a tokenizer without a digest)."""
        streamed_or_ids = record["kind"] == "hf" or record.get("pretokenized")
        ident = None if streamed_or_ids else dataset_identity(record)
        digest = tokenizer_digest(tokenizer)
        if ident is None or digest is None:
            return None
        key = hashlib.sha256(json.dumps([ident, digest]).encode()).hexdigest()[:40]
        return cls(record, tokenizer, key, progress=progress)

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
            self.ids = np.load(path, mmap_mode="r")

    def ensure(self, n_ids: int) -> bool:
        """Grow the cache until it holds ``n_ids`` token ids or the whole dataset; True when it has them."""
        while len(self.ids) < n_ids and not self.complete:
            self._load()  # another process may have grown it meanwhile
            if len(self.ids) < n_ids and not self.complete:
                self._extend(max(n_ids - len(self.ids), len(self.ids), MIN_EXTEND_TOKENS))
        return len(self.ids) >= n_ids

    def _extend(self, want: int) -> None:
        docs = (d for d in iter_documents(self.record) if d)  # token_stream skips empty documents too
        for _ in itertools.islice(docs, self.n_docs):
            pass  # already cached: read past, not tokenised
        new, got, n_docs, complete = [], 0, self.n_docs, True
        with progress_bar(want, desc="tokenise", unit="tok", enabled=self.progress, unit_scale=True, quick=True,
                          leave=False) as bar:
            for ids in token_stream(docs, self.tokenizer):
                new.append(ids.astype(np.int32))
                got, n_docs = got + len(ids), n_docs + 1
                bar.update(min(len(ids), want - bar.n))
                if got >= want:
                    complete = False  # maybe more documents: a later _extend that finds none marks it full
                    break
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"{self.key}.{n_docs}.{'full' if complete else 'part'}.npy"
        with atomic_path(final) as tmp:  # renamed over `final` once complete: readers never see a partial file
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(len(self.ids) + got,))
            out[:len(self.ids)] = self.ids
            pos = len(self.ids)
            for ids in new:
                out[pos:pos + len(ids)] = ids
                pos += len(ids)
            out.flush()
            del out
        for _, _, old in self._files():
            if old != final:
                old.unlink(missing_ok=True)
        self._remove_stale_temps()
        self.ids, self.n_docs, self.complete = np.load(final, mmap_mode="r"), n_docs, complete

    def _remove_stale_temps(self) -> None:
        """Remove what a kill during an earlier :meth:`_extend` left: the temporary file of its atomic write
        (``stores.files.atomic_path``'s name, or ``<file>.tmp<pid>`` of earlier versions) when its writer is
        gone. Readers never see these (:meth:`_files` takes only final names)."""
        for p in self.dir.iterdir():
            if p.name.lstrip(".").startswith(f"{self.key}."):
                pid = temp_file_pid(p.name)
                legacy = _LEGACY_TEMP.fullmatch(p.name)
                pid = int(legacy[1]) if pid is None and legacy else pid
                if pid is not None and not pid_alive(pid):
                    p.unlink(missing_ok=True)
