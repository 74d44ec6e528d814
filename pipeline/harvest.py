"""Harvest: run the LM once over packed text windows and send every requested hook's rows to a store.

One forward pass per batch captures every hook and stops after the deepest requested block
(``stop_at_layer``). The rows of a batch, (window, position) in row-major order with special-token
positions dropped, go to ``StoreWriter.append`` in ONE call, from a background thread behind a bounded
queue, so compression and staging overlap the next forward pass. On CUDA, rows are gathered on the
device, cast to the store dtype there, and copied into pinned host buffers with ``non_blocking=True``;
the writer thread waits on the copy's event, never the main thread (that hand-off is
:mod:`saeforge.pipeline.sink`).

The stream is deterministic (dataset order, tokenizer, context size, held-out rule), so resuming an
interrupted store only needs ``StoreWriter.rows_staged``: the batches before it are regenerated from
tokens alone and skipped without running the LM.
"""
from __future__ import annotations

import importlib.metadata
import itertools
import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Literal, NamedTuple

import numpy as np
import torch

from saeforge.pipeline import data
from saeforge.pipeline.sink import AsyncSink, prefetch


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

    lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the LM compute; `auto`: bfloat16 where the device runs it natively and faster (CUDA with bf16,
    a CPU with AVX512-BF16 or AMX), else float32 (`trainer/device.py`). The store records the resolved one."""

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
        if self.lm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"lm_dtype must be auto, float32, bfloat16 or float16, got {self.lm_dtype!r}")
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
    """One forward pass worth of windows, with the rows it contributes, all prepared off the main thread."""

    seq_idx: np.ndarray
    """(batch,) window index in the packed stream."""
    tokens: torch.Tensor
    """(batch, pos) int64 (pinned when harvesting on CUDA)."""
    rows: torch.Tensor
    """(rows,) int64 flat (window * pos + position) indices of the rows appended (after budget and resume
    trimming), row-major (pinned on CUDA)."""
    token_ids: np.ndarray
    """(rows,) token id of each appended row."""
    row_seq: np.ndarray
    """(rows,) window index of each appended row."""
    row_pos: np.ndarray
    """(rows,) position of each appended row."""
    row_start: int
    """Stream row index of this batch's first row."""
    n_rows: int
    """Rows this batch contributes to the stream (before resume trimming)."""

    @property
    def kept(self) -> torch.Tensor:
        """(batch, pos) bool: the positions whose rows are appended."""
        mask = torch.zeros(self.tokens.numel(), dtype=torch.bool)
        mask[self.rows] = True
        return mask.view(self.tokens.shape)


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


def window_batches(prov: dict, tokenizer, batch_size: int, n_rows: int, skip: int = 0,
                   pin: bool = False) -> Iterator[Batch]:
    """Batches of training windows up to exactly ``n_rows`` kept rows (the last batch trimmed).

    Batches whose rows all lie before ``skip`` (staged by an interrupted run) are not yielded; the one
    straddling it is trimmed. Everything the main thread would otherwise compute per batch (kept
    positions, flat row indices, the row metadata, pinned host tensors) is prepared here, so
    :func:`prefetch` does it in the tokenizer thread.
    """
    rules = data.rules_from_provenance(prov)
    row, pend_idx, pend_win = 0, np.zeros(0, dtype=np.int64), None
    blocks = data.window_blocks(prov["dataset"], tokenizer, rules, block=max(256, 4 * batch_size))
    for i0, wins in itertools.chain(blocks, [(None, None)]):
        if wins is not None:
            idx = np.arange(i0, i0 + len(wins), dtype=np.int64)
            train = ~data.is_heldout(idx, rules)
            idx, wins = idx[train], wins[train]
            if len(pend_idx):
                idx, wins = np.concatenate([pend_idx, idx]), np.concatenate([pend_win, wins])
            stop = len(idx) - len(idx) % batch_size
        elif pend_win is None:  # the stream was empty
            break
        else:  # the stream ended: the last partial batch
            idx, wins, stop = pend_idx, pend_win, len(pend_idx)
        for s in range(0, stop, batch_size):
            b = _make_batch(idx[s:s + batch_size], wins[s:s + batch_size], prov, row, n_rows, skip, pin)
            row += b.n_rows if b is not None else _rows_of(wins[s:s + batch_size], prov, n_rows - row)
            if b is not None:
                yield b
            if row >= n_rows:
                return
        pend_idx, pend_win = idx[stop:], wins[stop:]
    raise data.DatasetError(f"dataset {prov['dataset']['spec']!r} ran out after {row} rows; "
                            f"{n_rows} were asked for (lower --tokens or add text)")


def _kept(wins: np.ndarray, prov: dict) -> np.ndarray:
    return data.kept_positions(torch.from_numpy(wins), prov).numpy()


def _rows_of(wins: np.ndarray, prov: dict, limit: int) -> int:
    return min(int(_kept(wins, prov).sum()), limit)


def _make_batch(idx, wins, prov: dict, row: int, n_rows: int, skip: int, pin: bool) -> Batch | None:
    """The Batch of windows ``wins`` whose first row is stream row ``row`` (None: all before ``skip``)."""
    flat = _kept(wins, prov).reshape(-1)
    n_total = int(flat.sum())
    n = min(n_total, n_rows - row)
    if row + n <= skip:
        return None
    if n < n_total or row < skip:
        c = np.cumsum(flat)
        flat &= (c <= n_rows - row) & (c > skip - row)
    rows = np.flatnonzero(flat)
    pos_len = wins.shape[1]
    tokens, rows_t = torch.from_numpy(np.ascontiguousarray(wins)), torch.from_numpy(rows)
    if pin:
        tokens, rows_t = tokens.pin_memory(), rows_t.pin_memory()
    return Batch(seq_idx=idx, tokens=tokens, rows=rows_t, token_ids=wins.reshape(-1)[rows],
                 row_seq=idx[rows // pos_len], row_pos=rows % pos_len, row_start=row, n_rows=n)


def check_rows_available(prov: dict, tokenizer, n_rows: int, batch_size: int) -> None:
    """Fail before any LM work if a finite local dataset yields fewer than ``n_rows`` rows.

    The windows come from the token cache, so this tokenises the needed text once (reused by the run).
    """
    if prov["dataset"]["kind"] == "hf":
        return  # streamed: a shortfall is reported when the stream ends (the store stays incomplete)
    for _ in window_batches(prov, tokenizer, batch_size, n_rows, skip=n_rows):
        pass


def run_batches(lm, hooks: list[str], batches: Iterator[Batch], sink: AsyncSink, skip: int,
                on_batch: Callable[[Batch], None] | None = None) -> tuple[int, int]:
    """The streaming loop: skip resumed rows without the LM, capture, hand rows to ``sink``."""
    from saeforge.pipeline.lm import capture

    passes = forwarded = 0
    for b in batches:
        if b.row_start + b.n_rows <= skip:
            continue  # staged by an earlier run (window_batches given ``skip`` never yields these)
        acts = capture(lm, sink.to_device(b.tokens), hooks)
        passes, forwarded = passes + 1, forwarded + b.tokens.numel()
        sink.put(acts, b)
        if on_batch is not None:
            on_batch(b)
    return passes, forwarded


def harvest(cfg: HarvestConfig, *, lm=None, progress: bool = True,
            on_batch: Callable[[Batch], None] | None = None) -> HarvestResult:
    """Harvest ``cfg.tokens`` rows of every hook into the store at ``cfg.out``: resumes an interrupted store, and
    returns the recorded result without running anything when the store is already complete for this config."""
    from saeforge.pipeline.lm import hook_dims, load_lm, resolve_hooks
    from saeforge.stores import StoreWriter, open_store
    from saeforge.trainer.device import resolve_dtype

    t0 = time.perf_counter()
    if lm is not None and cfg.lm_dtype == "auto":
        cfg = replace(cfg, lm_dtype=lm.dtype)  # a model handed in computes in its own dtype
    cfg = replace(cfg, lm_dtype=resolve_dtype(cfg.lm_dtype, lm.device if lm is not None else cfg.device))
    check_output(cfg.out)
    done = completed_result(cfg)
    if done is not None:
        return done
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
                         provenance=prov, memory_limit_bytes=cfg.writer_memory_bytes, progress=progress)
    with writer as w:
        skip = w.rows_staged
        bar = _progress_bar(cfg.tokens, skip, progress)
        sink = AsyncSink(w, lm.device, cfg.store_dtype, cfg.queue_batches, bar)
        t1 = time.perf_counter()
        try:
            batches = prefetch(window_batches(prov, lm.tokenizer, cfg.batch_size, cfg.tokens, skip=skip,
                                              pin=sink.cuda), depth=4)
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
    store.loc.fs.pipe_file(store.loc.sub(HARVEST_FILE), json.dumps(result.to_json(), indent=1).encode())
    return result


HARVEST_FILE = "harvest.json"
# Config fields that do not change what a store holds (a rerun that differs only in these is the same harvest).
NOT_CONTENT = {"out", "writer_memory_bytes", "queue_batches", "device", "hooks", "layers", "sites"}


def requested_hooks(cfg: HarvestConfig) -> list[str]:
    """The hook names a config asks for, without loading the model (sites by their short names)."""
    from saeforge.pipeline.lm import SITES

    return list(dict.fromkeys([*cfg.hooks, *(f"blocks.{layer}.{SITES.get(site, site)}"
                                             for layer in cfg.layers for site in cfg.sites)]))


def completed_result(cfg: HarvestConfig) -> HarvestResult | None:
    """The recorded result when ``cfg.out`` is a complete store of this very harvest (nothing to do); None when
    there is no complete store; HarvestError naming the difference when it is a complete store of another."""
    from saeforge.stores import StoreNotFound
    from saeforge.stores.reader import read_attrs

    try:
        _, attrs = read_attrs(cfg.out, require_complete=False)
    except StoreNotFound:
        return None
    if not attrs.get("complete"):
        return None
    from saeforge.stores import open_store

    store = open_store(cfg.out)
    try:
        recorded = json.loads(store.loc.fs.cat_file(store.loc.sub(HARVEST_FILE)))
    except (OSError, ValueError):
        recorded = {"config": {}, "hooks": []}
    old, new = recorded["config"], asdict(cfg)
    diff = [f"{k}: store has {old.get(k)!r}, this run asks for {new[k]!r}" for k in new
            if k not in NOT_CONTENT and old.get(k) != (list(new[k]) if isinstance(new[k], tuple) else new[k])]
    if sorted(recorded["hooks"]) != sorted(requested_hooks(cfg)):
        diff.append(f"hooks: store has {sorted(recorded['hooks'])}, this run asks for {sorted(requested_hooks(cfg))}")
    if diff:
        raise HarvestError(f"{cfg.out} is already a complete store of another harvest ({'; '.join(diff[:4])}); "
                           "choose another --out")
    fields = set(HarvestResult._fields)
    return HarvestResult(**{k: v for k, v in recorded.items() if k in fields})


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
    if attrs.get("complete"):  # reached only when `completed_result` found no record of this harvest
        raise HarvestError(f"{out} is already a complete store ({attrs.get('n_rows')} rows) with no "
                           f"{HARVEST_FILE} to compare with; choose another --out")
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
