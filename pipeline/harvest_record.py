"""The harvest record: what a finished harvest measured, kept inside the store, and the checks that make a rerun
of harvest a no-op on a complete store of the same harvest and a resume on an incomplete one of the same text.

A store's harvest is identified twice: by its provenance (``check_resumable``: what the rows are, compared before
anything is written) and by its run record (``completed_result``: the config that made it, compared field by field
except the fields in ``NOT_CONTENT``, which change how a store is written but not what it holds).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, NamedTuple

from saeforge.pipeline.errors import HarvestError

if TYPE_CHECKING:
    from saeforge.pipeline.harvest import HarvestConfig
    from saeforge.pipeline.provenance import Provenance


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


def recorded_config(cfg: HarvestConfig) -> dict:
    """The config as the store's run record keeps it: without ``storage_options`` (they may hold credentials)."""
    return {k: v for k, v in asdict(cfg).items() if k != "storage_options"}


def record_result(cfg: HarvestConfig, hooks: list[str], t0: float, *, rows_resumed: int | None = None,
                  passes: int = 0, forwarded: int = 0, lm_s: float = 0.0, write_s: float = 0.0) -> HarvestResult:
    """Write the complete store's harvest record and return it. ``rows_resumed`` None: the store was complete
    before this run (one killed after its completion record, before this record: ``check_resumable``)."""
    from saeforge.stores import open_store, write_run_record

    store = open_store(cfg.out, cfg.storage_options)
    result = HarvestResult(store=store.path, rows=store.n_rows,
                           rows_resumed=store.n_rows if rows_resumed is None else rows_resumed, forward_passes=passes,
                           tokens_forwarded=forwarded, lm_s=lm_s, write_s=write_s, wall_s=time.perf_counter() - t0,
                           bytes_per_hook={h: int(store.group[h].nbytes_stored()) for h in store.hooks},
                           hooks=hooks, config=recorded_config(cfg))
    write_run_record(store, HARVEST_RECORD, result.to_json())
    return result


HARVEST_RECORD = "harvest"
"""The store's run record of what harvest measured (``stores.records``: inside the store, where plain zarr does
not warn about it; stores written before it keep a ``harvest.json`` beside the arrays, read the same way)."""
# Config fields that do not change what a store holds (a rerun that differs only in these is the same harvest).
NOT_CONTENT = {"out", "storage_options", "writer_memory_bytes", "queue_batches", "device", "hooks", "layers", "sites",
               "workers", "scheduler", "task_batches", "finalize_workers"}


def requested_hooks(cfg: HarvestConfig) -> list[str]:
    """The hook names a config asks for, without loading the model (sites by their short names)."""
    from saeforge.pipeline.lm import SITES

    return list(dict.fromkeys([*cfg.hooks, *(f"blocks.{layer}.{SITES.get(site, site)}"
                                             for layer in cfg.layers for site in cfg.sites)]))


def completed_result(cfg: HarvestConfig) -> HarvestResult | None:
    """The recorded result when ``cfg.out`` is a complete store of this very harvest (nothing to do); None when
    there is no complete store; HarvestError naming the difference when it is a complete store of another."""
    from saeforge.stores import InvalidInput, StoreNotFound, open_store, read_run_record
    from saeforge.stores.reader import read_attrs

    try:
        _, attrs = read_attrs(cfg.out, require_complete=False, storage_options=cfg.storage_options)
    except StoreNotFound:
        return None
    if not attrs.is_complete:
        return None

    try:
        recorded = read_run_record(open_store(cfg.out, cfg.storage_options), HARVEST_RECORD)
    except InvalidInput:  # not JSON: compared as a record of nothing
        recorded = None
    fields = set(HarvestResult._fields)
    if not (isinstance(recorded, dict) and fields <= set(recorded) and isinstance(recorded["config"], dict)):
        return None  # killed between the completion record and the harvest record: `harvest` compares provenance
    old, new = recorded["config"], asdict(cfg)
    diff = [f"{k}: store has {old.get(k)!r}, this run asks for {new[k]!r}" for k in new
            if k not in NOT_CONTENT and old.get(k) != (list(new[k]) if isinstance(new[k], tuple) else new[k])]
    if sorted(recorded["hooks"]) != sorted(requested_hooks(cfg)):
        diff.append(f"hooks: store has {sorted(recorded['hooks'])}, this run asks for {sorted(requested_hooks(cfg))}")
    if diff:
        raise HarvestError(f"{cfg.out} is already a complete store of another harvest ({'; '.join(diff[:4])}); "
                           "choose another --out")
    return HarvestResult(**{k: v for k, v in recorded.items() if k in fields})


def check_resumable(out: str, prov: Provenance, storage_options: dict | None = None) -> bool:
    """An existing store at ``out`` must hold the same provenance (HarvestError naming the difference if not);
    True when it is already complete (a harvest killed after its completion record, before its run record)."""
    from saeforge.stores import StoreNotFound
    from saeforge.stores.reader import read_attrs

    try:
        _, attrs = read_attrs(out, require_complete=False, storage_options=storage_options)
    except StoreNotFound:
        return False
    old, new = _flatten(attrs.provenance or {}), _flatten(json.loads(json.dumps(prov.to_json())))
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        detail = "; ".join(f"{k}: store has {old.get(k)!r}, this run has {new.get(k)!r}" for k in diff[:6])
        state = "a complete" if attrs.is_complete else "an incomplete"
        raise HarvestError(f"{out} is {state} store from a different harvest ({detail}); "
                           + ("choose another --out" if attrs.is_complete else
                              "rerun the same command to resume it, or write to a new --out"))
    return attrs.is_complete


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
