"""saeforge.stores: the on-disk activation store (Zarr v3), its writer, reader, loader and verifier.

Dimension key used across saeforge: ``batch``, ``pos``, ``rows`` (flattened batch×pos),
``d_in``, ``d_sae``, ``d_vocab``.

    from saeforge.stores import StoreWriter, open_store, StoreLoader, verify_store

torch is imported only by the loader and by ``Store.read``. The lowest layer also holds the small helpers
trainer and pipeline share: ``stores.files`` (atomic writes, JSON, sha256), ``stores.progress`` (the
progress bar), ``stores.background`` (the prefetching thread) and ``schema.hook_layer``.

Modules: schema (format, dtypes, codecs) · attrs (typed group attributes) · errors · spec (writer settings)
· writer · staging · hashing · shuffle · finalize (the second pass as shard tasks) · tasks (rows staged by the
tasks of a distributed harvest) · lock · tidy (what a killed writer leaves) · stats · reader · strict (no fill
values for absent chunks) · integrity (the check on open) · records (run records) · remote (failures of stores
at URLs) · plan · chunkread · loader · verify · cli · files · progress · background.
"""
from saeforge.stores.attrs import ChunkLayout, Completion, HookStats, ShuffleParams, StoreAttrs
from saeforge.stores.errors import (ChecksumError, DiskFull, HookNotInStore, InvalidInput, SchemaMismatch,
                                    StoreDamaged, StoreError, StoreIncomplete, StoreLocked, StoreNotFound)
from saeforge.stores.reader import Store, open_store
from saeforge.stores.records import read_run_record, write_run_record
from saeforge.stores.schema import hook_layer
from saeforge.stores.verify import VerifyReport, verify_store
from saeforge.stores.writer import StoreWriter


def __getattr__(name):  # the loader imports torch: load it only when asked for
    if name in ("StoreLoader", "LoaderCounters"):
        from saeforge.stores import loader

        return getattr(loader, name)
    raise AttributeError(name)


__all__ = ["StoreWriter", "open_store", "Store", "StoreLoader", "LoaderCounters", "verify_store", "VerifyReport",
           "HookStats", "StoreError", "StoreNotFound", "SchemaMismatch", "StoreIncomplete", "ChecksumError",
           "StoreLocked", "HookNotInStore", "InvalidInput", "StoreAttrs", "ShuffleParams", "ChunkLayout",
           "Completion", "hook_layer", "StoreDamaged", "DiskFull", "write_run_record", "read_run_record"]
