"""Harvest: run the LM once over packed text windows and send every requested hook's rows to a store.

One forward pass per batch captures every hook and stops after the deepest requested block
(``stop_at_layer``). The rows of a batch, (window, position) in row-major order with special-token
positions dropped, go to ``StoreWriter.append`` in ONE call, from a background thread behind a bounded
queue, so compression and staging overlap the next forward pass. On CUDA, rows are gathered on the
device, cast to the store dtype there, and copied into pinned host buffers with ``non_blocking=True``;
the writer thread waits on the copy's event, never the main thread (that hand-off is
:mod:`saeforge.pipeline.sink`).

The stream is deterministic (dataset order, tokenizer, context size, held-out rule), so resuming an
interrupted store only needs ``StoreWriter.rows_staged``: the batches before it are regenerated from the
text alone and skipped without running the LM (:mod:`saeforge.pipeline.batches`). ``HarvestConfig.tokens``
is the number of rows to store per hook.
"""
from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal

from saeforge.pipeline.batches import Batch, check_rows_available, window_batches
from saeforge.pipeline.data import check_hf_name, describe_dataset
from saeforge.pipeline.errors import ConfigError, HarvestError
from saeforge.pipeline.harvest_record import HarvestResult, check_resumable, completed_result, record_result
from saeforge.pipeline.paths import check_output_dir
from saeforge.pipeline.provenance import Provenance, TextProvenance
from saeforge.pipeline.sink import AsyncSink
from saeforge.pipeline.windows import WindowRules, context_size_problem, heldout_every_problem
from saeforge.stores.background import Prefetcher
from saeforge.stores.progress import progress_bar

__all__ = ["HarvestConfig", "HarvestError", "HarvestResult", "harvest", "harvest_provenance"]


@dataclass(frozen=True, kw_only=True)
class HarvestConfig:
    """Everything ``saeforge harvest`` needs; every artifact it writes records it."""

    out: str
    """Store path or fsspec URL. Rerunning with the same config resumes an interrupted store there."""

    storage_options: dict | None = None
    """Options of the fsspec filesystem when ``out`` is a URL (credentials, endpoint): one JSON object on the
    command line, the top-level ``storage_options`` table in a config file. Never recorded in the store."""

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

    data_files: tuple[str, ...] | None = None
    """Files of an HF datasets name, passed to ``datasets.load_dataset(..., data_files=)``: paths, globs or URLs
    (e.g. dataset ``parquet`` with local parquet files). Recorded in the store's provenance."""

    token_column: str | None = None
    """Column of pre-tokenised token ids, used as stored with no tokenizer pass (the ids must fit the model's
    vocabulary); unset: ``input_ids``, then ``tokens``, when the dataset has one and no ``text_column``."""

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

    workers: int = 0
    """Harvest on a local dask cluster of this many worker processes, each loading the LM once (0: in this
    process). On a machine with several GPUs give one worker per GPU (``pipeline/distributed.py``)."""

    scheduler: str = ""
    """Address of a running dask scheduler (``tcp://host:8786``) whose workers harvest (instead of ``workers``)."""

    task_batches: int = 16
    """Distributed harvest: forward-pass batches per dask task (the unit a worker stages, commits and retries).
    A resumed harvest keeps the value it started with."""

    finalize_workers: int = 0
    """Workers of the second shuffle pass, which writes the store's shards in parallel (0: the machine's cores;
    a distributed harvest runs it on the dask workers)."""

    def __post_init__(self):
        problems = [p for p in (context_size_problem(self.context_size), heldout_every_problem(self.heldout_every))
                    if p[1]]
        problems += [(name, "must not be empty") for name in ("out", "model", "dataset", "split", "text_column",
                                                              "device") if getattr(self, name) == ""]
        problems += [(name, f"must be >= 1, got {getattr(self, name)!r}")
                     for name in ("tokens", "batch_size", "queue_batches", "writer_memory_bytes", "task_batches")
                     if getattr(self, name) < 1]
        problems += [(name, f"must be >= 0, got {getattr(self, name)!r}")
                     for name in ("workers", "finalize_workers") if getattr(self, name) < 0]
        if self.workers and self.scheduler:
            problems.append(("workers", "give workers (a local cluster) or scheduler (an existing one), not both"))
        if not 0 <= self.seed < 1 << 63:
            problems.append(("seed", f"must be in [0, 2**63), got {self.seed!r}"))
        if not isinstance(self.storage_options, (dict, type(None))):
            problems.append(("storage_options", f"must be a dict of fsspec options, got {self.storage_options!r}"))
        if any(layer < 0 for layer in self.layers):
            problems.append(("layers", f"must be >= 0, got {list(self.layers)}"))
        choices = {"lm_dtype": ("auto", "float32", "bfloat16", "float16"), "store_dtype": ("float32", "float16",
                   "bfloat16"), "special_token_rule": ("exclude", "keep")}
        problems += [(name, f"must be one of {', '.join(ok)}, got {getattr(self, name)!r}")
                     for name, ok in choices.items() if getattr(self, name) not in ok]
        if not self.hooks and not (self.layers and self.sites):
            problems.append((None, "no hooks: give hooks, or layers together with sites"))
        if problems:
            raise ConfigError.of(problems)

    @property
    def rules(self) -> WindowRules:
        return WindowRules(context_size=self.context_size, prepend_bos=self.prepend_bos,
                                heldout_every=self.heldout_every)


def harvest_provenance(cfg: HarvestConfig, lm, hooks: list[str], record: dict) -> Provenance:
    """What the store records about where its rows came from (:mod:`saeforge.pipeline.provenance`)."""
    tok = lm.tokenizer
    return Provenance(
        model=lm.name, model_info=lm.info, lm_dtype=cfg.lm_dtype, hooks=tuple(hooks),
        tokenizer={"class": type(tok).__name__, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                   "eos_token_id": tok.eos_token_id, "name_or_path_of_model": lm.info.get("hf_name", lm.name)},
        text=TextProvenance.build(record, tok, cfg.rules, cfg.special_token_rule),
        tokens=cfg.tokens, seed=cfg.seed, row_order="window-major, then position; kept positions only",
        saeforge_version=importlib.metadata.version("saeforge"),
    )


def run_batches(lm, hooks: list[str], batches: Iterator[Batch], sink: AsyncSink, skip: int,
                on_batch: Callable[[Batch], None] | None = None) -> tuple[int, int]:
    """The streaming loop: skip resumed rows without the LM, capture, hand rows to ``sink``."""
    from saeforge.pipeline.lm import capture

    passes = forwarded = 0
    for b in batches:
        if b.row_start + b.n_rows <= skip:
            continue  # staged by an earlier run (window_batches given ``skip`` never yields these)
        acts = capture(lm, sink.to_device(b.windows), hooks)
        passes, forwarded = passes + 1, forwarded + b.windows.numel()
        sink.put(acts, b)
        if on_batch is not None:
            on_batch(b)
    return passes, forwarded


def harvest(cfg: HarvestConfig, *, lm=None, progress: bool = True,
            on_batch: Callable[[Batch], None] | None = None) -> HarvestResult:
    """Harvest ``cfg.tokens`` rows of every hook into the store at ``cfg.out``: resumes an interrupted store, and
    returns the recorded result without running anything when the store is already complete for this config."""
    from saeforge.pipeline.lm import check_model, hook_dims, load_lm, resolve_hooks
    from saeforge.trainer.device import resolve_dtype

    if cfg.workers or cfg.scheduler:
        if lm is not None:
            raise ConfigError.of([("workers", "a distributed harvest loads the model on its workers: pass no lm")])
        from saeforge.pipeline.distributed import harvest_distributed

        return harvest_distributed(cfg, progress=progress)
    t0 = time.perf_counter()
    if lm is not None and cfg.lm_dtype == "auto":
        cfg = replace(cfg, lm_dtype=lm.dtype)  # a model handed in computes in its own dtype
    cfg = replace(cfg, lm_dtype=resolve_dtype(cfg.lm_dtype, lm.device if lm is not None else cfg.device))
    check_output_dir(cfg.out, "--out", urls=True, storage_options=cfg.storage_options)  # a URL: bucket, credentials
    done = completed_result(cfg)
    if done is not None:
        return done
    # cheapest first; no store until model, hooks and first batch are good (it would refuse the corrected command)
    if lm is None:
        check_model(cfg.model, layers=cfg.layers, sites=cfg.sites, hooks=cfg.hooks)  # its config alone, no weights
    record = dataset_record(cfg)
    lm = lm or load_lm(cfg.model, device=cfg.device, dtype=cfg.lm_dtype)
    hooks = resolve_hooks(lm, hooks=list(cfg.hooks), layers=list(cfg.layers), sites=list(cfg.sites))
    if cfg.context_size > lm.info["n_ctx"]:
        raise HarvestError(f"context size {cfg.context_size} exceeds the model's maximum {lm.info['n_ctx']}")
    prov = harvest_provenance(cfg, lm, hooks, record)
    if check_resumable(cfg.out, prov, cfg.storage_options):  # complete, same provenance, no record: write it
        return record_result(cfg, hooks, t0)
    check_text(prov.text, lm.tokenizer, cfg, progress)
    dims = hook_dims(lm, hooks)
    writer = open_writer(cfg, dims, prov, progress)
    with writer as w:
        if w.task_plan_state is not None:
            raise HarvestError(f"{cfg.out} is being written by a distributed harvest; resume it with the same "
                               "--workers N or --scheduler ADDRESS")
        skip = w.rows_staged
        bar = progress_bar(cfg.tokens, desc="harvest", unit="tok", enabled=progress, initial=skip, unit_scale=True,
                           smoothing=0.1)
        sink = AsyncSink(w, lm.device, cfg.store_dtype, cfg.queue_batches, bar)
        t1 = time.perf_counter()
        try:
            # tokenisation and packing run ahead in a thread, which stops when the loop does (whatever ends it)
            with Prefetcher(window_batches(prov.text, lm.tokenizer, cfg.batch_size, cfg.tokens, skip=skip,
                                           pin=sink.cuda), depth=4, name="saeforge-tokenize") as batches:
                passes, forwarded = run_batches(lm, hooks, batches, sink, skip, on_batch)
        finally:
            sink.close()
            bar.close()
        t2 = time.perf_counter()
    return record_result(cfg, hooks, t0, rows_resumed=skip, passes=passes, forwarded=forwarded, lm_s=t2 - t1,
                         write_s=time.perf_counter() - t2)


def dataset_record(cfg: HarvestConfig) -> dict:
    """The store's record of its text source (``data.describe_dataset``); an HF name is checked even unopened."""
    record = describe_dataset(cfg.dataset, split=cfg.split, text_column=cfg.text_column, data_files=cfg.data_files,
                              token_column=cfg.token_column)
    if record["kind"] == "hf":
        check_hf_name(record)
    return record


def check_text(text, tokenizer, cfg: HarvestConfig, progress: bool = True) -> None:
    """Before the store exists: a finite source holds ``cfg.tokens`` rows (tokenising it once into the token cache,
    with a progress bar), a streamed one yields its first batch."""
    check_rows_available(text, tokenizer, cfg.tokens, cfg.batch_size, progress=progress)
    if text.dataset["kind"] == "hf":
        next(window_batches(text, tokenizer, cfg.batch_size, cfg.tokens, progress=progress), None)


def open_writer(cfg: HarvestConfig, dims: dict[str, int], prov: Provenance, progress: bool):
    """The store's writer; a memory bound too small for these hooks' rows is named as the option that sets it."""
    from saeforge.stores import InvalidInput, StoreWriter

    try:
        return StoreWriter(cfg.out, hooks=dims, dtype=cfg.store_dtype, seed=cfg.seed, expected_rows=cfg.tokens,
                           provenance=prov.to_json(), memory_limit_bytes=cfg.writer_memory_bytes, progress=progress,
                           storage_options=cfg.storage_options, finalize_workers=cfg.finalize_workers or None)
    except InvalidInput as e:
        if "memory_limit_bytes" not in str(e):
            raise
        raise HarvestError(f"the writer's memory bound ({cfg.writer_memory_bytes:,} bytes) is too small for rows "
                           f"of {', '.join(f'{h} (d={d})' for h, d in dims.items())} in {cfg.store_dtype}: it holds "
                           "a whole shard in an eighth of it; raise --writer-memory-mb") from None
