"""The hand-off from the LM thread to the store writer: :class:`AsyncSink`.

:class:`AsyncSink` calls ``StoreWriter.append`` once per batch from a background thread behind a bounded
queue, so compression and staging overlap the next forward pass; on CUDA it stages rows through a small
ring of reusable pinned host buffers. (The tokenisation and packing of the next batches run in another
thread too: ``saeforge.stores.background.Prefetcher``, in ``harvest``.)
"""
from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

import torch

from saeforge.pipeline.lm import DTYPES

if TYPE_CHECKING:
    from saeforge.pipeline.batches import Batch


class AsyncSink:
    """Feeds ``StoreWriter.append`` from a background thread behind a bounded queue (one call per batch).

    On CUDA: kept rows are gathered and cast on the device and copied with ``non_blocking=True`` into one
    of a small ring of reusable pinned host buffers (``depth + 1`` slots, allocated once, not per batch);
    an event is recorded and the writer thread waits on it, copies the rows out (the writer may keep
    references to what it is given) and only then returns the slot to the ring. The main thread only
    enqueues work and the GPU never waits for compression or disk. On CPU the rows go to the writer as
    they are (a view when every position is kept), without extra copies.
    """

    def __init__(self, writer, device: str, store_dtype: str, depth: int, bar=None):
        self.writer, self.device, self.bar = writer, torch.device(device), bar
        self.cuda = self.device.type == "cuda"
        self.dtype = DTYPES[store_dtype]
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.free: queue.Queue = queue.Queue()
        self.slots: list[dict[str, torch.Tensor]] = [{} for _ in range(depth + 1)]
        for i in range(len(self.slots)):
            self.free.put(i)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="saeforge-writer", daemon=True)
        self.thread.start()

    def to_device(self, windows: torch.Tensor) -> torch.Tensor:
        """A batch's (batch, pos) token ids on the LM's device (through pinned memory on CUDA)."""
        if not self.cuda:
            return windows
        return (windows if windows.is_pinned() else windows.pin_memory()).to(self.device, non_blocking=True)

    def put(self, acts: dict[str, torch.Tensor], b: Batch) -> None:
        """Queue the kept rows of ``acts[hook]`` (batch, pos, d); blocks only when ``depth`` batches wait."""
        if self.error is not None:
            raise self.error
        n = len(b.kept_idx)
        if n == 0:
            return
        meta = {"token_ids": b.row_token_ids, "seq_idx": b.row_seq, "pos": b.row_pos}
        rows = batch_rows(acts, b, self.dtype)
        if not self.cuda:
            self.queue.put((None, None, rows, meta, n))
            return
        slot = self.free.get()
        bufs = self.slots[slot]
        for h, rows_ND in rows.items():
            buf = bufs.get(h)
            if buf is None or buf.shape[0] < n or buf.shape[1:] != rows_ND.shape[1:]:
                buf = bufs[h] = torch.empty((b.windows.numel(), *rows_ND.shape[1:]), dtype=self.dtype,
                                            pin_memory=True)
            buf[:n].copy_(rows_ND, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.queue.put((event, slot, {h: bufs[h][:n] for h in acts}, meta, n))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            event, slot, rows, meta, n = item
            try:
                if self.error is None:
                    if event is not None:
                        event.synchronize()
                        rows = {h: r.clone() for h, r in rows.items()}  # the slot is reused
                    if slot is not None:
                        self.free.put(slot)
                        slot = None
                    self.writer.append(rows, **meta)
                    if self.bar is not None:
                        self.bar.update(n)
            except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
                self.error = e
            finally:
                if slot is not None:
                    self.free.put(slot)  # after a failure: keep draining, never starve put()

    def close(self) -> None:
        """Wait for every queued batch to be appended; re-raise a writer failure."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def batch_rows(acts: dict[str, torch.Tensor], b: Batch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{hook: (rows, d)}: the rows ``b`` keeps of each hook's (batch, pos, d) activations, in ``dtype``, on the
    activations' device (a view, before the cast, when every position is kept)."""
    every = len(b.kept_idx) == b.windows.numel()  # kept_idx is ascending: all of them means the identity
    idx = None if every else b.kept_idx.to(next(iter(acts.values())).device, non_blocking=True)  # once, not per hook
    return {h: _kept_rows(a, idx).to(dtype) for h, a in acts.items()}


def _kept_rows(acts_BPD: torch.Tensor, kept_idx: torch.Tensor | None) -> torch.Tensor:
    """(rows, d): the rows at ``kept_idx`` of the flattened (batch·pos) positions (None: every position, a view)."""
    acts_ND = acts_BPD.flatten(0, 1)
    return acts_ND if kept_idx is None else acts_ND.index_select(0, kept_idx)
