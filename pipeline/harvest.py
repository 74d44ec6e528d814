"""Harvest: run the LM once over packed text windows and send every requested hook's rows to a store.

One forward pass per batch captures every hook and stops after the deepest requested block
(``stop_at_layer``). The rows of a batch, (window, position) in row-major order with special-token
positions dropped, go to ``StoreWriter.append`` in ONE call, from a background thread behind a bounded
queue, so compression and staging overlap the next forward pass. On CUDA, rows are gathered on the
device, cast to the store dtype there, and copied into pinned host buffers with ``non_blocking=True``;
the writer thread waits on the copy's event, never the main thread.

The stream is deterministic (dataset order, tokenizer, context size, held-out rule), so resuming an
interrupted store only needs ``StoreWriter.rows_staged``: the batches before it are regenerated from
tokens alone and skipped without running the LM.
"""
from __future__ import annotations

import importlib.metadata
import json
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Literal, NamedTuple

import numpy as np
import torch

from saeforge.pipeline import data


class HarvestError(ValueError):
    """A harvest that cannot run as asked (the message says what to change)."""


@dataclass(frozen=True, kw_only=True)
class HarvestConfig:
    """Everything ``saeforge harvest`` needs; every artifact it writes records it."""

    out: str
    """Store path or fsspec URL. Rerunning with the same config resumes an interrupted store there."""

    model: str = "smollm2-135m"
    """Model spec for ``load_lm``: ``smollm2-135m`` (offline), HF name, local HF directory or .gguf path."""

    device: str = "auto"
    """Torch device for the LM (``auto``: cuda when present, else cpu)."""

    lm_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the LM compute (bf16 is ~3x faster than fp32 on a modern CPU)."""

    hooks: tuple[str, ...] = ()
    """Full hook names, e.g. ``blocks.10.hook_resid_post``."""

    layers: tuple[int, ...] = ()
    """With ``sites``: capture ``blocks.{layer}.{site}`` for every pair."""

    sites: tuple[str, ...] = ()
    """Short site names: resid_pre, resid_mid, resid_post, mlp_out, attn_out, attn.hook_z."""

    dataset: str = "shakespeare"
    """``shakespeare`` (offline), local txt/jsonl/parquet files, a directory or glob, or an HF datasets name."""

    split: str = "train"
    """Split of an HF dataset."""

    text_column: str = "text"
    """Column holding the text (jsonl, parquet, HF datasets)."""

    context_size: int = 128
    """Tokens per window (BOS included); at most the model's n_ctx."""

    prepend_bos: bool = True
    """Start every window with BOS."""

    special_token_rule: Literal["exclude", "keep"] = "exclude"
    """``exclude``: rows at special-token positions (BOS, EOS separators, pad) are not stored."""

    heldout_every: int = 20
    """Window i of the stream is held out (never stored) when i % heldout_every == heldout_every - 1."""

    tokens: int = 100_000
    """Rows (token positions) to store per hook."""

    batch_size: int = 8
    """Windows per forward pass."""

    store_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    """dtype of the stored activations."""

    seed: int = 0
    """Seed of the store's shuffle."""

    writer_memory_bytes: int = 1 << 30
    """Memory bound of the shuffling writer, in bytes."""

    queue_batches: int = 4
    """Batches in flight between the LM and the writer thread (bounds host memory)."""

    def __post_init__(self):
        problems = []
        for name in ("context_size", "tokens", "batch_size", "queue_batches", "heldout_every"):
            if getattr(self, name) < (2 if name in ("context_size", "heldout_every") else 1):
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.lm_dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"lm_dtype must be float32, bfloat16 or float16, got {self.lm_dtype!r}")
        if self.store_dtype not in ("float32", "float16", "bfloat16"):
            problems.append(f"store_dtype must be float32, float16 or bfloat16, got {self.store_dtype!r}")
        if self.special_token_rule not in ("exclude", "keep"):
            problems.append(f"special_token_rule must be exclude or keep, got {self.special_token_rule!r}")
        if not self.hooks and not (self.layers and self.sites):
            problems.append("no hooks: give hooks, or layers together with sites")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def rules(self) -> data.WindowRules:
        return data.WindowRules(context_size=self.context_size, prepend_bos=self.prepend_bos,
                                heldout_every=self.heldout_every)


class Batch(NamedTuple):
    """One forward pass worth of windows, with the rows it contributes to the stream."""

    seq_idx: np.ndarray
    """(batch,) window index in the packed stream."""
    tokens: torch.Tensor
    """(batch, pos) int64."""
    kept: torch.Tensor
    """(batch, pos) bool: the positions whose rows are appended (after budget and resume trimming)."""
    row_start: int
    """Stream row index of this batch's first row."""
    n_rows: int
    """Rows this batch contributes to the stream (before resume trimming)."""


class HarvestResult(NamedTuple):
    store: str
    rows: int
    """Rows in the finished store (per hook)."""
    rows_resumed: int
    """Rows an earlier interrupted run had already staged (skipped without running the LM)."""
    forward_passes: int
    tokens_forwarded: int
    """Token positions the LM ran over in this run (special positions included)."""
    lm_s: float
    """Seconds of the streaming phase (LM + staging, overlapped)."""
    write_s: float
    """Seconds of the writer's shuffle + final write (``close``)."""
    wall_s: float
    bytes_per_hook: dict
    hooks: list
    config: dict

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_forwarded / self.lm_s if self.lm_s > 0 else 0.0

    def to_json(self) -> dict:
        return {**self._asdict(), "tokens_per_s": round(self.tokens_per_s, 1)}


def provenance(cfg: HarvestConfig, lm, hooks: list[str], record: dict) -> dict:
    """What the store records about where its rows came from (Contract 3 keys)."""
    tok = lm.tokenizer
    return {
        "model": lm.name, "model_info": lm.info, "lm_dtype": cfg.lm_dtype, "hooks": list(hooks),
        "tokenizer": {"class": type(tok).__name__, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                      "eos_token_id": tok.eos_token_id, "name_or_path_of_model": lm.info.get("hf_name", lm.name)},
        **data.text_provenance(record, tok, cfg.rules, cfg.special_token_rule),
        "tokens": cfg.tokens, "seed": cfg.seed, "row_order": "window-major, then position; kept positions only",
        "saeforge_version": importlib.metadata.version("saeforge"),
    }


def window_batches(prov: dict, tokenizer, batch_size: int, n_rows: int) -> Iterator[Batch]:
    """Batches of training windows up to exactly ``n_rows`` kept rows (the last batch trimmed)."""
    windows = data.train_windows(prov["dataset"], tokenizer, data.rules_from_provenance(prov))
    row = 0
    while row < n_rows:
        chunk = [w for _, w in zip(range(batch_size), windows)]
        if not chunk:
            raise data.DatasetError(f"dataset {prov['dataset']['spec']!r} ran out after {row} rows; "
                                    f"{n_rows} were asked for (lower --tokens or add text)")
        idx = np.asarray([i for i, _ in chunk], dtype=np.int64)
        tokens = torch.from_numpy(np.stack([w for _, w in chunk]))
        kept = data.kept_positions(tokens, prov)
        _trim_after_(kept, n_rows - row)
        n = int(kept.sum())
        yield Batch(idx, tokens, kept, row, n)
        row += n


def _trim_after_(kept: torch.Tensor, limit: int) -> None:
    """Keep only the first ``limit`` True positions (row-major) of ``kept``."""
    flat = kept.view(-1)
    over = torch.cumsum(flat, 0) > limit
    flat[over] = False


def _trim_before_(kept: torch.Tensor, skip: int) -> None:
    """Drop the first ``skip`` True positions (row-major) of ``kept``."""
    flat = kept.view(-1)
    flat[torch.cumsum(flat, 0) <= skip] = False


def check_rows_available(prov: dict, tokenizer, n_rows: int, batch_size: int) -> None:
    """Fail before any LM work if a finite local dataset yields fewer than ``n_rows`` rows."""
    if prov["dataset"]["kind"] == "hf":
        return  # streamed: a shortfall is reported when the stream ends (the store stays incomplete)
    for _ in window_batches(prov, tokenizer, batch_size, n_rows):
        pass


def run_batches(lm, hooks: list[str], batches: Iterator[Batch], sink: AsyncSink, skip: int,
                on_batch: Callable[[Batch], None] | None = None) -> tuple[int, int]:
    """The streaming loop: skip resumed rows without the LM, capture, hand rows to ``sink``."""
    from saeforge.pipeline.lm import capture

    passes = forwarded = 0
    for b in batches:
        if b.row_start + b.n_rows <= skip:
            continue  # staged by an earlier run: tokens were regenerated, the LM is not run
        if b.row_start < skip:
            _trim_before_(b.kept, skip - b.row_start)
        acts = capture(lm, sink.to_device(b.tokens), hooks)
        passes, forwarded = passes + 1, forwarded + b.tokens.numel()
        sink.put(acts, b)
        if on_batch is not None:
            on_batch(b)
    return passes, forwarded


def harvest(cfg: HarvestConfig, *, lm=None, progress: bool = True,
            on_batch: Callable[[Batch], None] | None = None) -> HarvestResult:
    """Harvest ``cfg.tokens`` rows of every hook into the store at ``cfg.out`` (resuming if interrupted)."""
    from saeforge.pipeline.lm import hook_dims, load_lm, resolve_hooks
    from saeforge.stores import StoreWriter, open_store

    t0 = time.perf_counter()
    check_output(cfg.out)
    record = data.describe_dataset(cfg.dataset, split=cfg.split, text_column=cfg.text_column)
    lm = lm or load_lm(cfg.model, device=cfg.device, dtype=cfg.lm_dtype)
    hooks = resolve_hooks(lm, hooks=list(cfg.hooks), layers=list(cfg.layers), sites=list(cfg.sites))
    if cfg.context_size > lm.info["n_ctx"]:
        raise HarvestError(f"context size {cfg.context_size} exceeds the model's maximum {lm.info['n_ctx']}")
    prov = provenance(cfg, lm, hooks, record)
    check_resumable(cfg.out, prov)
    check_rows_available(prov, lm.tokenizer, cfg.tokens, cfg.batch_size)
    dims = hook_dims(lm, hooks)
    writer = StoreWriter(cfg.out, hooks=dims, dtype=cfg.store_dtype, seed=cfg.seed, expected_rows=cfg.tokens,
                         provenance=prov, memory_limit_bytes=cfg.writer_memory_bytes)
    with writer as w:
        skip = w.rows_staged
        bar = _progress_bar(cfg.tokens, skip, progress)
        sink = AsyncSink(w, lm.device, cfg.store_dtype, cfg.queue_batches, bar)
        t1 = time.perf_counter()
        try:
            batches = prefetch(window_batches(prov, lm.tokenizer, cfg.batch_size, cfg.tokens), depth=2)
            passes, forwarded = run_batches(lm, hooks, batches, sink, skip, on_batch)
        finally:
            sink.close()
            bar and bar.close()
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    store = open_store(cfg.out)
    sizes = {h: int(store.group[h].nbytes_stored()) for h in store.hooks}
    result = HarvestResult(store=store.path, rows=store.n_rows, rows_resumed=skip, forward_passes=passes,
                           tokens_forwarded=forwarded, lm_s=t2 - t1, write_s=t3 - t2, wall_s=t3 - t0,
                           bytes_per_hook=sizes, hooks=hooks, config=asdict(cfg))
    store.loc.fs.pipe_file(store.loc.sub("harvest.json"), json.dumps(result.to_json(), indent=1).encode())
    return result


def check_output(out: str) -> None:
    """Fail early when a local output path cannot be created or written."""
    import os
    from pathlib import Path

    if "://" in out:
        return
    p = Path(out).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise HarvestError(f"output {out} exists and is not a directory; choose a new path")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise HarvestError(f"output {out} is not writable ({parent} is not a writable directory)")


def check_resumable(out: str, prov: dict) -> None:
    """An existing store at ``out`` must be an incomplete one with the same provenance (named if not)."""
    from saeforge.stores import StoreNotFound
    from saeforge.stores.reader import read_attrs

    try:
        _, attrs = read_attrs(out, require_complete=False)
    except StoreNotFound:
        return
    if attrs.get("complete"):
        raise HarvestError(f"{out} is already a complete store ({attrs.get('n_rows')} rows); "
                           "delete it or choose another --out")
    old, new = _flatten(attrs.get("provenance") or {}), _flatten(json.loads(json.dumps(prov)))
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        detail = "; ".join(f"{k}: store has {old.get(k)!r}, this run has {new.get(k)!r}" for k in diff[:6])
        raise HarvestError(f"{out} is an incomplete store from a different harvest ({detail}); rerun the same "
                           "command to resume it, or write to a new --out")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="harvest", file=sys.stderr,
                smoothing=0.1)


# ---------------------------------------------------------------- the hand-off to the writer thread


class AsyncSink:
    """Feeds ``StoreWriter.append`` from a background thread behind a bounded queue (one call per batch).

    On CUDA: kept rows are gathered and cast on the device, copied into pinned host memory with
    ``non_blocking=True`` and an event recorded; the writer thread waits on that event, so the main
    thread only enqueues work and the GPU never waits for compression or disk.
    """

    def __init__(self, writer, device: str, store_dtype: str, depth: int, bar=None):
        self.writer, self.device, self.bar = writer, torch.device(device), bar
        self.cuda = self.device.type == "cuda"
        self.dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[store_dtype]
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="saeforge-writer", daemon=True)
        self.thread.start()

    def to_device(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.pin_memory().to(self.device, non_blocking=True) if self.cuda else tokens

    def put(self, acts: dict[str, torch.Tensor], b: Batch) -> None:
        """Queue the kept rows of ``acts[hook]`` (batch, pos, d); blocks only when ``depth`` batches wait."""
        if self.error is not None:
            raise self.error
        idx = b.kept.view(-1).nonzero().squeeze(1)  # (rows,) on the host: no device sync needed
        if len(idx) == 0:
            return
        pos_len = b.tokens.shape[1]
        meta = {"token_ids": b.tokens.view(-1)[idx].numpy(), "seq_idx": b.seq_idx[(idx // pos_len).numpy()],
                "pos": (idx % pos_len).numpy()}
        event = None
        if self.cuda:
            idx_dev = idx.pin_memory().to(self.device, non_blocking=True)
            rows = {}
            for h, a in acts.items():
                sel = a.flatten(0, 1).index_select(0, idx_dev).to(self.dtype)
                rows[h] = torch.empty(sel.shape, dtype=self.dtype, pin_memory=True).copy_(sel, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            rows = {h: a.flatten(0, 1).index_select(0, idx).to(self.dtype) for h, a in acts.items()}
        self.queue.put((event, rows, meta, len(idx)))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure; put() re-raises it in the main thread
            event, rows, meta, n = item
            try:
                if event is not None:
                    event.synchronize()
                self.writer.append(rows, **meta)
                if self.bar is not None:
                    self.bar.update(n)
            except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
                self.error = e

    def close(self) -> None:
        """Wait for every queued batch to be appended; re-raise a writer failure."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` (tokenisation, packing) in a thread, ``depth`` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in iterator:
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
            q.put(e)

    threading.Thread(target=produce, name="saeforge-tokenize", daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
