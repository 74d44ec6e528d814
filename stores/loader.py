"""StoreLoader: fixed-size batches of aligned hooks, streamed from whole chunks decoded in background threads.

Pipeline: a thread pool decodes read units (runs of whole chunks, never single rows) in the epoch's
seeded order, ``threads`` at a time and ahead of need; an assembler thread cuts them (and, with a
mixing buffer, permutes windows of ``buffer_rows`` rows) into batches and queues a few; the consumer
takes batches from the queue. A batch that lies inside one unit is a view, not a copy; bfloat16 rows
reach torch through a numpy view of their bit pattern. The state (epoch, rows emitted in the epoch)
after each batch is what ``state_dict`` returns, so a resumed run continues exactly.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple

import numpy as np
import torch

from saeforge.stores import schema
from saeforge.stores.chunkread import ChunkReader
from saeforge.stores.errors import InvalidInput, StoreDamaged, StoreError
from saeforge.stores.plan import epoch_plan, interleaved_plan, skip_segments, window_order
from saeforge.stores.reader import Store, open_store, read_error

READ_TARGET_BYTES = 8 << 20
"""Default read unit: whole chunks adding up to ~8 MiB decoded (over all requested hooks)."""

_DONE = object()


class LoaderCounters(NamedTuple):
    rows: int
    """Rows yielded to the consumer."""
    bytes_read: int
    """Decoded bytes read from the store (storage dtype, all requested hooks)."""
    decode_s: float
    """Seconds spent reading + decoding in the background threads (summed over threads)."""
    wait_s: float
    """Seconds the consumer waited for a batch."""


class StoreLoader:
    """Iterate fixed-size batches ``{hook: Tensor (batch_rows, d)}`` over a store, epoch after epoch.

    Every row appears exactly once per epoch across all ranks (for any seed and split); the unit order
    differs per epoch. ``epochs=None`` cycles forever (batches run across epoch boundaries); with a
    finite count the last batch may be short unless ``drop_last``. ``buffer_rows`` > 0 permutes rows
    inside consecutive windows of that many rows (cost per row independent of the window size).
    ``interleave`` (data-parallel training): instead of a contiguous slice of each epoch, rank r takes the blocks
    of ``batch_rows`` rows of the one-process stream whose index is r modulo ``world_size``, so the ranks' j-th
    batches, concatenated in rank order, are the j-th batch of ``batch_rows * world_size`` rows that one process
    with the same seed reads; each rank decodes only the chunks its blocks touch (no mixing buffer).
    ``storage_options``: of the fsspec filesystem of a store at a URL (``open_store``). ``read_ahead``: read
    units in flight (default ``2 * threads + 1``).

    A store at a URL is read a whole shard at a time (~64-75 MiB decoded per hook at the default layout, one
    request each, its index included: ``chunkread.py``), and each read in flight waits on the network in a thread
    of its own: an object store serves a few large GETs far better than many small ones, each of which pays the
    request's latency (scripts/bench_remote.py, moto's S3 server on the same 2 cores: 0.17x of local disk's rows/s
    in the local 4096-row units, 0.42x in whole shards). Memory in flight: read_ahead units.
    """

    def __init__(self, store_or_path, hooks=None, batch_rows: int = 4096, seed: int = 0, threads: int = 2,
                 buffer_rows: int = 0, rank: int = 0, world_size: int = 1, out_dtype=torch.float32,
                 device=None, pin_memory: bool = False, epochs: int | None = None, drop_last: bool = False,
                 read_chunks: int | None = None, prefetch_batches: int = 4, fast_path: bool = True,
                 storage_options: dict | None = None, read_ahead: int | None = None, interleave: bool = False):
        self.store: Store = open_store(store_or_path, storage_options)
        self.hooks = list(self.store.hooks if hooks is None else ([hooks] if isinstance(hooks, str) else hooks))
        self.store.check_hooks(self.hooks)
        problems = []
        if batch_rows < 1:
            problems.append(f"batch_rows must be >= 1, got {batch_rows}")
        if threads < 1:
            problems.append(f"threads must be >= 1, got {threads}")
        if read_ahead is not None and read_ahead < 1:
            problems.append(f"read_ahead must be >= 1 (or None: the default), got {read_ahead}")
        if not (world_size >= 1 and 0 <= rank < world_size):
            problems.append(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if buffer_rows < 0 or (epochs is not None and epochs < 1):
            problems.append(f"buffer_rows must be >= 0 and epochs None or >= 1 (got {buffer_rows}, {epochs})")
        if interleave and (buffer_rows or batch_rows * world_size > self.store.n_rows):
            problems.append(f"interleave needs buffer_rows 0 and batch_rows * world_size <= the store's "
                            f"{self.store.n_rows} rows (got {buffer_rows}, {batch_rows} * {world_size})")
        if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            problems.append(f"out_dtype must be torch.float32, bfloat16 or float16, got {out_dtype}")
        if problems:
            raise InvalidInput("; ".join(problems))
        self.batch_rows, self.seed, self.threads, self.buffer_rows = batch_rows, seed, threads, buffer_rows
        self.rank, self.world_size, self.epochs, self.drop_last = rank, world_size, epochs, drop_last
        self.interleave = interleave
        self.out_dtype, self.device, self.prefetch_batches = out_dtype, device, max(1, prefetch_batches)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.read_ahead = read_ahead or 2 * threads + 1
        self.unit_rows = self.store.chunk_rows * (read_chunks or self._default_read_chunks())
        self._fast = {h: ChunkReader(self.store, h) for h in self.hooks
                      if fast_path and ChunkReader.supports(self.store, h)}
        self._state = (0, 0)
        self._lock = threading.Lock()
        self._rows = self._bytes = 0
        self._decode_s = self._wait_s = 0.0

    def _default_read_chunks(self) -> int:
        itemsize = np.dtype(schema.STORAGE_DTYPE[self.store.dtype]).itemsize
        row_bytes = itemsize * sum(self.store.d(h) for h in self.hooks)
        per_shard = self.store.shard_rows // self.store.chunk_rows
        if not self.store.loc.is_local:
            return per_shard  # whole shards: one request each, index included
        n = max(1, READ_TARGET_BYTES // max(1, row_bytes * self.store.chunk_rows))
        n = 1 << (int(n).bit_length() - 1)  # a power of two, so units never straddle shards
        while per_shard % n:
            n //= 2
        return max(1, min(n, per_shard))

    # --- state and counters --------------------------------------------------------------------------
    @property
    def counters(self) -> LoaderCounters:
        with self._lock:
            return LoaderCounters(self._rows, self._bytes, self._decode_s, self._wait_s)

    def state_dict(self) -> dict:
        """Where the next batch starts: the epoch and the rows already emitted in it (this rank)."""
        return {"epoch": self._state[0], "position": self._state[1], "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "buffer_rows": self.buffer_rows,
                "n_rows": self.store.n_rows, "interleave": self.interleave}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "buffer_rows", "n_rows", "interleave"):
            if key in state and state[key] != mine[key]:
                raise InvalidInput(f"loader state was saved with {key}={state[key]}, this loader has "
                                 f"{key}={mine[key]}; resume with the same settings")
        self._state = (int(state["epoch"]), int(state["position"]))

    def __len__(self) -> int:
        """Batches per epoch on this rank (finite epochs only)."""
        n = self._plan(0).n_rows
        return n // self.batch_rows if self.drop_last else -(-n // self.batch_rows)

    def _plan(self, epoch: int):
        if self.interleave:
            return interleaved_plan(self.store.n_rows, self.unit_rows, self.seed, epoch, self.rank, self.world_size,
                                    self.batch_rows)
        return epoch_plan(self.store.n_rows, self.unit_rows, self.seed, epoch, self.rank, self.world_size)

    # --- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        worker = threading.Thread(target=self._assemble, args=(q, stop, self._state), daemon=True,
                                  name="saeforge-loader")
        worker.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                with self._lock:
                    self._wait_s += time.perf_counter() - t0
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, state = item
                if self.device is not None:
                    batch = {h: t.to(self.device, non_blocking=self.pin_memory) for h, t in batch.items()}
                self._state = state
                with self._lock:
                    self._rows += len(next(iter(batch.values())))
                yield batch
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass

    def _assemble(self, q: queue.Queue, stop: threading.Event, start) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            # a remote read waits on the network in its thread: one thread per read in flight
            workers = self.threads if self.store.loc.is_local else max(self.threads, self.read_ahead)
            with ThreadPoolExecutor(workers, thread_name_prefix="saeforge-decode") as pool:
                for batch, state in self._batches(self._pieces(pool, stop, *start)):
                    if self.pin_memory:
                        batch = {h: t.pin_memory() for h, t in batch.items()}
                    if not put((batch, state)):
                        return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - hand every failure to the consumer thread
            put(e)

    def _batches(self, pieces):
        """Cut pieces into batches; a batch inside one piece is a view (no copy)."""
        B, pending, n_pending = self.batch_rows, [], 0
        state = None
        for data, epoch, end_pos, n_epoch in pieces:
            n = len(next(iter(data.values())))
            off = 0
            while off < n:
                take = min(B - n_pending, n - off)
                part = {h: t[off : off + take] for h, t in data.items()}
                off += take
                state = (epoch + 1, 0) if end_pos - n + off == n_epoch else (epoch, end_pos - n + off)
                if n_pending == 0 and take == B:
                    yield part, state
                    continue
                pending.append(part)
                n_pending += take
                if n_pending == B:
                    yield {h: torch.cat([p[h] for p in pending]) for h in self.hooks}, state
                    pending, n_pending = [], 0
        if pending and not self.drop_last:
            yield {h: torch.cat([p[h] for p in pending]) for h in self.hooks}, state

    def _segments(self, epoch: int, pos: int):
        """(epoch, position of the segment's first row, rows in the epoch, segment), lazily, epoch after epoch."""
        W = self.buffer_rows
        while self.epochs is None or epoch < self.epochs:
            plan = self._plan(epoch)
            at = (pos // W) * W if W else pos
            for seg in skip_segments(plan.segments, at):
                yield epoch, at, plan.n_rows, seg
                at += seg.hi - seg.lo
            epoch, pos = epoch + 1, 0

    def _pieces(self, pool, stop, epoch0: int, pos0: int):
        """Decoded rows in emission order: (tensors, epoch, position after them, rows in the epoch)."""
        W = self.buffer_rows
        window = []
        for epoch, at, n_epoch, seg, data in self._read_ahead(pool, stop, self._segments(epoch0, pos0)):
            if not W:
                yield data, epoch, at + seg.hi - seg.lo, n_epoch
                continue
            n, off = seg.hi - seg.lo, 0
            while off < n:  # split at window boundaries
                w_start = (at + off) // W * W
                w_end = min(w_start + W, n_epoch)
                take = min(n - off, w_end - (at + off))
                window.append({h: t[off : off + take] for h, t in data.items()})
                off += take
                if at + off == w_end:
                    skip = pos0 - w_start if (epoch == epoch0 and w_start <= pos0 < w_end) else 0
                    yield self._mix(window, epoch, w_start, w_end, skip), epoch, w_end, n_epoch
                    window = []

    def _mix(self, window, epoch, w_start, w_end, skip):
        perm = window_order(self.seed, epoch, self.rank, w_start // self.buffer_rows, w_end - w_start)
        idx = torch.from_numpy(perm[skip:])
        return {h: torch.cat([p[h] for p in window])[idx] for h in self.hooks}

    def _read_ahead(self, pool, stop, segments):
        """Submit unit reads ``read_ahead`` ahead; yield them in order with the segment's rows cut out."""
        depth, pending = self.read_ahead, []
        it = iter(segments)
        exhausted = False
        while True:
            while not exhausted and len(pending) < depth:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    break
                pending.append((nxt, pool.submit(self._read_unit, nxt[3])))
            if not pending or stop.is_set():
                return
            (epoch, at, n_epoch, seg), fut = pending.pop(0)
            data, off = fut.result()
            yield epoch, at, n_epoch, seg, {h: t[off : off + seg.hi - seg.lo] for h, t in data.items()}

    def _read_unit(self, seg) -> tuple[dict, int]:
        """The whole chunks of read unit `seg.unit` that hold the segment's rows, and where the segment starts in
        them."""
        base, c = seg.unit * self.unit_rows, self.store.chunk_rows
        lo = base + seg.lo // c * c
        hi = min(base + -(-seg.hi // c) * c, self.store.n_rows)
        t0 = time.perf_counter()
        out, nbytes = {}, 0
        for h in self.hooks:
            try:
                if h in self._fast:
                    raw, stored = self._fast[h].read(lo, hi)
                else:
                    raw = self.store.read_raw(h, lo, hi)
            except StoreError:  # checksum mismatches, absent chunks: already named
                raise
            except Exception as e:  # noqa: BLE001 - name the chunk; checksum failures get their own type
                raise read_error(self.store, h, lo, hi, e) from e
            if schema.any_nonfinite(raw, self.store.dtype):  # the writer stores finite rows only
                raise _nonfinite_error(self.store, h, lo, raw)
            nbytes += raw.nbytes  # decoded bytes (what the consumer gets)
            out[h] = self._to_torch(raw)
        with self._lock:
            self._bytes += nbytes
            self._decode_s += time.perf_counter() - t0
        return out, base + seg.lo - lo

    def _to_torch(self, raw: np.ndarray) -> torch.Tensor:
        if self.store.dtype == "bfloat16":
            t = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)  # the bit pattern, no conversion
        else:
            t = torch.from_numpy(raw)
        return t if t.dtype == self.out_dtype else t.to(self.out_dtype)



def _nonfinite_error(store: Store, hook: str, lo: int, raw: np.ndarray) -> StoreDamaged:
    rows = (lo + np.nonzero(schema.nonfinite_rows(raw, store.dtype))[0]).tolist()
    shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
    return StoreDamaged(f"{store.path}: {hook} rows {shown} hold NaN or inf; the writer stores finite rows only, so "
                        f"the store was altered after it was written (run `saeforge store verify {store.path}`)")
