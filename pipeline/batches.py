"""Harvest batches: training windows grouped for one forward pass, with the store rows each one contributes.

A *row* of the store is the activation at one kept position of one window. A batch holds ``batch`` windows of
``pos`` token ids; its kept positions, in row-major (window, position) order, are its rows. They are given as
``kept_idx``, indices into the flattened (batch·pos) positions, which is what ``acts_BPD.flatten(0, 1)``
is indexed with. Rows are numbered along the whole stream (``row_start`` is the stream index of a batch's first
row), which is what lets an interrupted harvest resume: every batch is regenerated from the text alone and the
rows before ``StoreWriter.rows_staged`` are skipped.

Everything here is prepared off the main thread (``sink.prefetch``), so the LM thread only runs the model.
"""
from __future__ import annotations

import itertools
from typing import Iterator, NamedTuple

import numpy as np
import torch

from saeforge.pipeline.errors import DatasetError
from saeforge.pipeline.provenance import TextProvenance
from saeforge.pipeline.windows import is_heldout, window_blocks


class Batch(NamedTuple):
    """One forward pass worth of windows, with the rows it contributes, all prepared off the main thread."""

    window_idx: np.ndarray
    """(batch,) window index in the packed stream."""
    windows: torch.Tensor
    """(batch, pos) int64 token ids (pinned when harvesting on CUDA)."""
    kept_idx: torch.Tensor
    """(rows,) int64 indices into the flattened (batch·pos) positions of the rows appended (after budget and
    resume trimming), ascending (pinned on CUDA)."""
    row_token_ids: np.ndarray
    """(rows,) token id of each appended row (the store's ``token_ids``)."""
    row_seq: np.ndarray
    """(rows,) window index of each appended row (the store's ``seq_idx``)."""
    row_pos: np.ndarray
    """(rows,) position of each appended row (the store's ``pos``)."""
    row_start: int
    """Stream row index of this batch's first row."""
    n_rows: int
    """Rows this batch contributes to the stream (before resume trimming)."""

    @property
    def kept(self) -> torch.Tensor:
        """(batch, pos) bool: the positions whose rows are appended."""
        kept_N = torch.zeros(self.windows.numel(), dtype=torch.bool)
        kept_N[self.kept_idx] = True
        return kept_N.view(self.windows.shape)


def window_batches(text: TextProvenance, tokenizer, batch_size: int, n_rows: int, skip: int = 0,
                   pin: bool = False, progress: bool = True) -> Iterator[Batch]:
    """Batches of training windows up to exactly ``n_rows`` kept rows (the last batch trimmed).

    Batches whose rows all lie before ``skip`` (staged by an interrupted run) are not yielded; the one
    straddling it is trimmed. Everything the main thread would otherwise compute per batch (kept
    positions, flat row indices, the row metadata, pinned host tensors) is prepared here, so
    ``sink.prefetch`` does it in the tokenizer thread.
    """
    rules, row, pend_idx, pend_win = text.rules, 0, np.zeros(0, dtype=np.int64), None
    blocks = window_blocks(text.dataset, tokenizer, rules, block=max(256, 4 * batch_size), progress=progress)
    for i0, wins in itertools.chain(blocks, [(None, None)]):
        if wins is not None:
            idx = np.arange(i0, i0 + len(wins), dtype=np.int64)
            train = ~is_heldout(idx, rules)
            idx, wins = idx[train], wins[train]
            if len(pend_idx):
                idx, wins = np.concatenate([pend_idx, idx]), np.concatenate([pend_win, wins])
            stop = len(idx) - len(idx) % batch_size
        elif pend_win is None:  # the stream was empty
            break
        else:  # the stream ended: the last partial batch
            idx, wins, stop = pend_idx, pend_win, len(pend_idx)
        for s in range(0, stop, batch_size):
            b = _make_batch(idx[s:s + batch_size], wins[s:s + batch_size], text, row, n_rows, skip, pin)
            row += b.n_rows if b is not None else _rows_of(wins[s:s + batch_size], text, n_rows - row)
            if b is not None:
                yield b
            if row >= n_rows:
                return
        pend_idx, pend_win = idx[stop:], wins[stop:]
    raise DatasetError(f"dataset {text.dataset['spec']!r} ran out after {row} rows; "
                       f"{n_rows} were asked for (lower --tokens or add text)")


def _kept(windows_BP: np.ndarray, text: TextProvenance) -> np.ndarray:
    return text.kept_positions(torch.from_numpy(windows_BP)).numpy()


def _rows_of(windows_BP: np.ndarray, text: TextProvenance, limit: int) -> int:
    return min(int(_kept(windows_BP, text).sum()), limit)


def _make_batch(idx, windows_BP, text: TextProvenance, row: int, n_rows: int, skip: int,
                pin: bool) -> Batch | None:
    """The Batch of ``windows_BP`` whose first row is stream row ``row`` (None: all before ``skip``)."""
    kept_N = _kept(windows_BP, text).reshape(-1)
    n_total = int(kept_N.sum())
    n = min(n_total, n_rows - row)
    if row + n <= skip:
        return None
    if n < n_total or row < skip:
        c = np.cumsum(kept_N)
        kept_N &= (c <= n_rows - row) & (c > skip - row)
    kept_idx = np.flatnonzero(kept_N)
    pos_len = windows_BP.shape[1]
    windows, kept_idx_t = torch.from_numpy(np.ascontiguousarray(windows_BP)), torch.from_numpy(kept_idx)
    if pin:
        windows, kept_idx_t = windows.pin_memory(), kept_idx_t.pin_memory()
    return Batch(window_idx=idx, windows=windows, kept_idx=kept_idx_t,
                 row_token_ids=windows_BP.reshape(-1)[kept_idx], row_seq=idx[kept_idx // pos_len],
                 row_pos=kept_idx % pos_len, row_start=row, n_rows=n)


def check_rows_available(text: TextProvenance, tokenizer, n_rows: int, batch_size: int, progress: bool = True
                         ) -> None:
    """Fail before any LM work if a finite local dataset yields fewer than ``n_rows`` rows.

    The windows come from the token cache, so this tokenises the needed text once (reused by the run).
    """
    if text.dataset["kind"] == "hf":
        return  # streamed: a shortfall is reported when the stream ends (the store stays incomplete)
    for _ in window_batches(text, tokenizer, batch_size, n_rows, skip=n_rows, progress=progress):
        pass
