"""Windows: the token stream cut into ``context_size`` pieces, and the held-out split.

The stream: documents in a fixed order (:func:`saeforge.pipeline.data.iter_documents`), each tokenised
without special tokens and followed by the tokenizer's EOS (the document separator,
:func:`saeforge.pipeline.tokenization.token_stream`), concatenated and cut into windows of ``context_size``
token ids, each starting with BOS when ``prepend_bos``. A pre-tokenised source's rows are the stream as stored
(:func:`token_chunks`: no tokenizer, no EOS; a row's leading BOS is dropped when windows start with BOS, so rows
of ``context_size`` ids that begin with BOS, SAELens's pretokenised layout, are exactly the windows).
Window ``i`` is HELD OUT when ``i % heldout_every == heldout_every - 1``: harvest never stores it, evaluation
draws from it (:func:`heldout_windows`). Every rule is recorded in the store's provenance
(:class:`saeforge.pipeline.provenance.TextProvenance`), so evaluation regenerates exactly the same windows
from the provenance alone.

A window is an int64 array of token ids, shape (pos,) with pos = ``context_size``; a block of them is
(k, pos).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from saeforge.pipeline import tokenization
from saeforge.pipeline.data import iter_documents, iter_token_rows
from saeforge.pipeline.errors import ConfigError, DatasetError


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
        problems = [(name, text) for name, text in (context_size_problem(self.context_size),
                                                    heldout_every_problem(self.heldout_every)) if text]
        if problems:
            raise ConfigError.of(problems)

    @property
    def body(self) -> int:
        """Token ids of the stream per window (``context_size`` less the BOS that is prepended)."""
        return self.context_size - 1 if self.prepend_bos else self.context_size

    def heldout_record(self) -> dict:
        """The held-out rule as stored in provenance ``heldout``."""
        return {"rule": "window_index % every == every - 1", "every": self.heldout_every,
                "unit": "window of the packed token stream"}


def context_size_problem(value: int) -> tuple[str, str | None]:
    """("context_size", what is wrong with ``value``) (None when nothing is)."""
    ok = isinstance(value, int) and value >= 2
    return "context_size", None if ok else (f"must be >= 2: a window needs two tokens for one next-token "
                                            f"prediction (BOS counts as one), got {value!r}")


def heldout_every_problem(value: int) -> tuple[str, str | None]:
    """("heldout_every", what is wrong with ``value``) (None when nothing is)."""
    ok = isinstance(value, int) and value >= 2
    return "heldout_every", None if ok else (f"must be >= 2: every N-th window is held out from the store for "
                                             f"evaluation, and N = 1 would hold out every window, got {value!r}")


def _check_bos(rules: WindowRules, bos_id: int | None) -> None:
    if rules.prepend_bos and bos_id is None:
        raise DatasetError("prepend_bos is set but the tokenizer has no BOS token")


def pack_windows(chunks: Iterator[np.ndarray], rules: WindowRules, bos_id: int | None) -> Iterator[np.ndarray]:
    """Cut the concatenated stream into (context_size,) windows, BOS first when ``rules.prepend_bos``."""
    _check_bos(rules, bos_id)
    body = rules.body
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


def token_chunks(record: dict, tokenizer, rules: WindowRules) -> Iterator[np.ndarray]:
    """The stream of a source, one int64 array per document (text: tokenised, EOS after each) or per row
    (pre-tokenised: as stored, a leading BOS dropped when ``rules.prepend_bos`` puts one first anyway)."""
    if record.get("pretokenized"):
        drop = tokenizer.bos_token_id if rules.prepend_bos else None
        return tokenization.pretokenized_stream(iter_token_rows(record), tokenizer, drop_bos=drop,
                                                where=record["spec"])
    return tokenization.token_stream(iter_documents(record), tokenizer)


def window_blocks(record: dict, tokenizer, rules: WindowRules, block: int = 512, *, progress: bool = True
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """(first_window_index, windows int64 (k, context_size)) over the whole stream, held-out windows included.

    A finite dataset reads its windows from the on-disk token cache (:class:`tokenization.TokenCache`,
    tokenised once); a streamed one tokenises as it goes. Both give the windows :func:`pack_windows` cuts.
    """
    bos = tokenizer.bos_token_id
    _check_bos(rules, bos)
    cache = tokenization.TokenCache.open(record, tokenizer, progress=progress)
    if cache is None:
        windows = pack_windows(token_chunks(record, tokenizer, rules), rules, bos)
        i = 0
        while chunk := list(itertools.islice(windows, block)):
            yield i, np.stack(chunk)
            i += len(chunk)
        return
    body, i = rules.body, 0
    while True:
        cache.ensure((i + block) * body)
        k = min(block, len(cache.ids) // body - i)
        if k <= 0:
            return
        windows_KP = np.asarray(cache.ids[i * body:(i + k) * body], dtype=np.int64).reshape(k, body)
        if rules.prepend_bos:
            windows_KP = np.concatenate([np.full((k, 1), bos, dtype=np.int64), windows_KP], axis=1)
        yield i, windows_KP
        i += k


def all_windows(record: dict, tokenizer, rules: WindowRules) -> Iterator[tuple[int, np.ndarray]]:
    """(window_index, window) over the whole stream, held-out windows included."""
    for i0, windows in window_blocks(record, tokenizer, rules):
        yield from enumerate(windows, i0)


def is_heldout(index, rules: WindowRules):
    """Whether window ``index`` (an int, or elementwise over an integer array) is held out."""
    return index % rules.heldout_every == rules.heldout_every - 1


def train_windows(record: dict, tokenizer, rules: WindowRules) -> Iterator[tuple[int, np.ndarray]]:
    """(window_index, window) of the windows harvest may store: every window that is not held out."""
    return ((i, w) for i, w in all_windows(record, tokenizer, rules) if not is_heldout(i, rules))


def heldout_windows(record: dict, tokenizer, rules: WindowRules) -> Iterator[np.ndarray]:
    """Held-out windows, int64 (context_size,): the same stream as :func:`train_windows`, the complementary
    window indices, so disjoint from every window harvest stored."""
    return (w for i, w in all_windows(record, tokenizer, rules) if is_heldout(i, rules))
