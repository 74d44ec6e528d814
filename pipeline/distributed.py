"""Harvest on dask.distributed: many workers run the LM, one driver cuts the stream and finalizes the store.

The driver (the process running ``saeforge harvest --workers N`` or ``--scheduler ADDRESS``) tokenises and
packs the text exactly as the single-process harvest does (``batches.window_batches``) and cuts the batches
into tasks of ``task_batches`` consecutive batches. A task's rows are a contiguous range of the row stream,
known from the tokens alone, so each row's stream index, and with it its shuffle bucket, is the same whichever
worker runs it. Each worker process loads the LM once (``LoadLM``, a worker plugin: a worker that restarts
loads it again) and stages its tasks' rows into files of its own (``stores/tasks.py``), committed by an atomic
manifest: no locks, and a task dask retries after a worker died leaves only unreferenced files behind. When
every task is committed, the writer adopts their files in stream order and runs the second shuffle pass
(``StoreWriter.close``) on the cluster's workers. Same seed and input: the same index arrays and attributes as
the single-process store, and the same activations (bit for bit where the batches coincide, as they do).

GPUs: run one worker per GPU. With ``--workers N`` and ``device = auto`` on a machine with several GPUs,
worker ``i`` of the local cluster uses ``cuda:i mod n_gpus``; on several machines start ``dask scheduler``
and one ``dask worker ADDRESS --nworkers 1 --nthreads 1`` per GPU (with ``CUDA_VISIBLE_DEVICES`` set), then
pass ``--scheduler ADDRESS``.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, NamedTuple

from saeforge.pipeline.errors import HarvestError

_LMS: dict = {}
"""The worker process's loaded LMs, by (model, device, dtype): loaded once per process, reused by its tasks."""


class LMFacts(NamedTuple):
    """What the driver needs of the LM without loading it: asked of a worker (``describe_lm``)."""

    name: str
    info: dict
    tokenizer: object
    device: str
    dtype: str
    hooks: list
    dims: dict


def worker_lm(model: str, device: str, dtype: str):
    """This process's LM for (model, device, dtype), loaded on first use (``dtype`` may be ``auto``)."""
    from saeforge.pipeline.lm import load_lm
    from saeforge.trainer.device import resolve_dtype

    key = (model, device, dtype)
    if key not in _LMS:
        dev = _worker_device(device)
        _LMS[key] = load_lm(model, device=dev, dtype=resolve_dtype(dtype, dev))
    return _LMS[key]


def _worker_device(device: str) -> str:
    """``auto`` on a worker of a machine with several GPUs: the GPU of the worker's index (one per worker)."""
    import torch

    if device != "auto" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return device
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ValueError, TypeError):  # a worker not named by its index (one started by hand): the default GPU
        return device
    return f"cuda:{index % torch.cuda.device_count()}"


def _load_lm_plugin(model: str, device: str, dtype: str, threads: int):
    from distributed import WorkerPlugin

    class LoadLM(WorkerPlugin):
        """Loads the LM when a worker starts (and again in a worker that restarts), so no task pays for it."""

        name = "saeforge-load-lm"

        def setup(self, worker):
            import torch
            from transformers.utils import logging as hf_logging

            torch.set_num_threads(threads)
            hf_logging.disable_progress_bar()  # N workers' weight-loading bars would interleave on the driver's tty
            worker_lm(model, device, dtype)

    return LoadLM()


def describe_lm(model: str, device: str, dtype: str, hooks: list, layers: list, sites: list) -> LMFacts:
    """(on a worker) The LM's description, tokenizer, resolved hooks and their widths."""
    from saeforge.pipeline.lm import hook_dims, resolve_hooks

    lm = worker_lm(model, device, dtype)
    names = resolve_hooks(lm, hooks=hooks, layers=layers, sites=sites)
    return LMFacts(lm.name, lm.info, lm.tokenizer, lm.device, lm.dtype, names, hook_dims(lm, names))


def harvest_task(task: int, row_start: int, batches: list, hooks: list, loc, spec, lm_key: tuple) -> dict:
    """(on a worker) Run the LM over one task's batches and stage their rows; returns the committed manifest."""
    from saeforge.pipeline.lm import DTYPES, capture
    from saeforge.pipeline.sink import batch_rows
    from saeforge.stores.tasks import TaskStager

    lm = worker_lm(*lm_key)
    stager = TaskStager(loc, spec, task, row_start)
    for b in batches:
        rows = batch_rows(capture(lm, b.windows, hooks), b, DTYPES[spec.dtype])
        stager.add({h: r.cpu() for h, r in rows.items()}, token_ids=b.row_token_ids, seq_idx=b.row_seq,
                   pos=b.row_pos)
    manifest = stager.commit()
    return {**manifest.to_json(), "passes": len(batches), "tokens": int(sum(b.windows.numel() for b in batches))}


@contextmanager
def dask_client(workers: int, scheduler: str, *, threads: int) -> Iterator:
    """A ``distributed.Client``: on a fresh LocalCluster of ``workers`` processes, or on ``scheduler``."""
    try:
        import distributed
    except ModuleNotFoundError:
        raise HarvestError("--workers/--scheduler need dask.distributed: pip install 'distributed'") from None
    import logging

    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as e:
            raise HarvestError(f"cannot reach the dask scheduler at {scheduler!r} ({str(e).splitlines()[0]}); "
                               "start one with `dask scheduler`, or leave out --scheduler") from None
        with client:
            yield client
        return
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=logging.ERROR,
                                       env={"OMP_NUM_THREADS": str(threads)})
    with cluster, distributed.Client(cluster) as client:
        yield client


def _connect_lm(client, cfg) -> LMFacts:
    """Register the LM-loading plugin on every worker, then ask one worker to describe the LM."""
    n_workers = max(1, len(client.scheduler_info().get("workers", {})) or cfg.workers)
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    try:
        client.register_plugin(_load_lm_plugin(cfg.model, cfg.device, cfg.lm_dtype, threads))
        return client.submit(describe_lm, cfg.model, cfg.device, cfg.lm_dtype, list(cfg.hooks), list(cfg.layers),
                             list(cfg.sites), pure=False).result()
    except HarvestError:
        raise
    except Exception as e:  # noqa: BLE001 (a worker's failure arrives as its own exception type)
        from saeforge.pipeline.errors import domain_errors

        if isinstance(e, domain_errors()):
            raise
        raise HarvestError(f"the dask workers could not load model {cfg.model!r}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from None


def task_groups(batches, per_task: int, base: int) -> Iterator[tuple[int, int, list]]:
    """(task, first row, batches) for consecutive groups of ``per_task`` batches; rows before ``base`` were
    staged by a single-process run and are trimmed from the batches already (``window_batches(skip=base)``)."""
    group, task = [], 0
    for b in batches:
        group.append(b)
        if len(group) == per_task:
            yield task, max(group[0].row_start, base), group
            group, task = [], task + 1
    if group:
        yield task, max(group[0].row_start, base), group


def run_tasks(client, writer, groups, facts: LMFacts, lm_key: tuple, bar, max_in_flight: int) -> tuple[int, int]:
    """Submit every task not committed yet (at most ``max_in_flight`` at once); adopt them all at the end."""
    from distributed import as_completed

    from saeforge.stores.tasks import committed_tasks

    done = committed_tasks(writer.loc)
    manifests, passes, tokens = [], 0, 0
    pending = as_completed()

    def collect(future):
        nonlocal passes, tokens
        out = future.result()
        passes, tokens = passes + out.pop("passes"), tokens + out.pop("tokens")
        manifests.append(out)
        bar.update(out["n_rows"])

    for task, first, batches in groups:
        rows = sum(len(b.kept_idx) for b in batches)
        old = done.get(task)
        if old is not None and old.row_start == first and old.n_rows == rows:
            manifests.append(old.to_json())
            continue
        pending.add(client.submit(harvest_task, task, first, batches, facts.hooks, writer.loc, writer.spec, lm_key,
                                  key=f"saeforge-harvest-{task:07d}-{os.getpid()}", retries=2))
        while pending.count() >= max_in_flight:
            collect(next(pending))
    for future in pending:
        collect(future)
    writer.adopt_tasks(manifests)
    return passes, tokens


def harvest_distributed(cfg, *, progress: bool = True):
    """``harvest`` on dask (``cfg.workers`` local processes, or the cluster at ``cfg.scheduler``)."""
    from saeforge.pipeline.batches import window_batches
    from saeforge.pipeline.harvest import check_text, dataset_record, harvest_provenance, open_writer
    from saeforge.pipeline.harvest_record import check_resumable, completed_result, record_result
    from saeforge.pipeline.lm import check_model
    from saeforge.stores.progress import progress_bar

    t0 = time.perf_counter()
    if cfg.out.startswith("memory://"):
        raise HarvestError(f"--out {cfg.out}: a memory:// store lives in one process, where the dask workers "
                           "cannot write; give a path or a URL every worker can reach")
    check_model(cfg.model, layers=cfg.layers, sites=cfg.sites, hooks=cfg.hooks)  # before any worker starts
    record = dataset_record(cfg)
    threads = max(1, (os.cpu_count() or 1) // max(1, cfg.workers))
    with dask_client(cfg.workers, cfg.scheduler, threads=threads) as client:
        if progress:
            print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
        facts = _connect_lm(client, cfg)
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        # the second pass runs on the cluster: as many shard tasks at once as it has workers, unless told
        cfg = replace(cfg, lm_dtype=facts.dtype, finalize_workers=cfg.finalize_workers or n_workers)
        done = completed_result(cfg)
        if done is not None:
            return done
        if cfg.context_size > facts.info["n_ctx"]:
            raise HarvestError(f"context size {cfg.context_size} exceeds the model's maximum {facts.info['n_ctx']}")
        prov = harvest_provenance(cfg, facts, facts.hooks, record)
        if check_resumable(cfg.out, prov, cfg.storage_options):
            return record_result(cfg, facts.hooks, t0)
        check_text(prov.text, facts.tokenizer, cfg, progress)  # nothing under --out until the text is known good
        with open_writer(cfg, facts.dims, prov, progress) as writer:
            plan = writer.task_plan(cfg.task_batches)
            bar = progress_bar(cfg.tokens, desc="harvest (dask)", unit="tok", enabled=progress,
                               initial=writer.rows_staged, unit_scale=True, smoothing=0.1)
            t1 = time.perf_counter()
            with bar:
                batches = window_batches(prov.text, facts.tokenizer, cfg.batch_size, cfg.tokens, skip=plan["base"])
                groups = task_groups(batches, plan["batches_per_task"], plan["base"])
                passes, forwarded = run_tasks(client, writer, groups, facts, (cfg.model, cfg.device, cfg.lm_dtype),
                                              bar, max_in_flight=2 * n_workers)
            t2 = time.perf_counter()
            writer.close(executor=client.get_executor())
        write_s = time.perf_counter() - t2
    return record_result(cfg, facts.hooks, t0, rows_resumed=plan["base"], passes=passes, forwarded=forwarded,
                         lm_s=t2 - t1, write_s=write_s)

