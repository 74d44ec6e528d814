"""open_store: a complete store, read-only, with its typed attributes, statistics and convenience reads.

The attributes are read once, when the store is opened, and kept typed (``Store.attrs``, a ``StoreAttrs``).
Reads decode on demand: ``read``/``read_numpy`` (float32 rows), ``to_dask`` (a lazy float array, bf16
included), ``array`` (the raw zarr array, in the storage dtype).
"""
from __future__ import annotations

import numpy as np

from saeforge.stores import schema
from saeforge.stores.attrs import FORMAT_KEY, HookStats, StoreAttrs, parse_attrs, read_group_attrs
from saeforge.stores.errors import HookNotInStore, StoreIncomplete, StoreNotFound
from saeforge.stores.files import read_json


def read_attrs(path_or_url, *, require_complete: bool = True) -> tuple[schema.Location, StoreAttrs]:
    """Locate a store and return its typed attributes, raising the domain error that says what is wrong."""
    loc = schema.locate(path_or_url)
    if not loc.fs.exists(loc.root):
        raise StoreNotFound(f"no store at {loc.url}: the path does not exist")
    try:
        raw = read_group_attrs(loc)
    except (ValueError, OSError) as e:
        raise StoreNotFound(f"{loc.url} is not a saeforge store: unreadable zarr.json ({e})") from e
    if raw is None or FORMAT_KEY not in raw:
        what = "no zarr.json" if raw is None else "a zarr group without saeforge attributes"
        raise StoreNotFound(f"{loc.url} is not a saeforge store ({what})")
    attrs = parse_attrs(loc, raw)
    if require_complete and not attrs.is_complete:
        raise StoreIncomplete(_incomplete_message(loc))
    return loc, attrs


def _incomplete_message(loc: schema.Location) -> str:
    progress = read_json(loc, loc.sub(schema.STATE_DIR, "progress.json")) or {}
    if progress.get("phase") == "writing":
        where = f"it was writing shuffled rows ({progress.get('rows_written')} of {progress.get('n_rows')} done)"
    else:
        where = f"it had staged {progress.get('rows_staged', 0)} rows"
    return (f"{loc.url} is incomplete: its writer stopped or is still running ({where}). To resume, rerun "
            "the same harvest command with the same settings and output path; it continues where it stopped")


class Store:
    """A complete store opened for reading (``open_store``). Arrays are decoded on demand."""

    def __init__(self, loc: schema.Location, attrs: StoreAttrs):
        import zarr

        self.loc, self.attrs = loc, attrs
        self.path = loc.url
        self.group = zarr.open_group(loc.zarr_store(read_only=True), mode="r")
        self.n_rows: int = int(attrs.n_rows)
        self.hooks: list[str] = list(attrs.hooks)
        self.dtype: str = attrs.dtype
        self.provenance: dict = attrs.provenance or {}
        self.chunk_rows: int = int(attrs.layout.chunk_rows)
        self.shard_rows: int = int(attrs.layout.shard_rows)

    def __repr__(self):
        hooks = ", ".join(f"{h} (d={self.d(h)})" for h in self.hooks)
        return f"Store({self.path!r}, {self.n_rows} rows, {self.dtype}, hooks: {hooks})"

    def d(self, hook: str) -> int:
        self.check_hooks([hook])
        return int(self.attrs.hooks[hook])

    def check_hooks(self, hooks) -> None:
        """Raise HookNotInStore naming the first missing hook and the hooks the store has."""
        for h in hooks:
            if h not in self.attrs.hooks:
                raise HookNotInStore(f"hook {h!r} is not in the store {self.path}; it has {self.hooks}")

    def stats(self, hook: str) -> HookStats:
        self.check_hooks([hook])
        st = self.attrs.stats[hook]
        return st._replace(mean=st.mean.copy())  # the caller's to modify; the attributes stay as read

    def array(self, name: str):
        """The raw zarr array (storage dtype: bfloat16 hooks are uint16 bit patterns)."""
        if name not in self.attrs.hooks and name not in schema.META_ARRAYS:
            self.check_hooks([name])
        return self.group[name]

    def read_numpy(self, hook: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a hook as float32 numpy (rows, d)."""
        raw = self.array(hook)[start:stop]
        return schema.bf16_bits_to_fp32(raw) if self.dtype == "bfloat16" else raw.astype(np.float32, copy=False)

    def read(self, hook: str, start: int = 0, stop: int | None = None):
        """Rows [start, stop) of a hook as a float32 torch tensor (rows, d)."""
        import torch

        return torch.from_numpy(self.read_numpy(hook, start, stop))

    def to_dask(self, name: str):
        """A lazy dask array of a hook's rows as floats (bfloat16 widened exactly to float32; float32 and
        float16 as stored), or of token_ids/seq_idx/pos as stored. Blocks are whole shards (one file, one
        read per block).

        ``dask.array.from_zarr`` alone gives a bfloat16 hook's uint16 bit patterns, whose ``mean()`` is
        not the mean of the activations.
        """
        import dask.array as da

        arr = self.array(name)
        blocks = da.from_zarr(arr, chunks=(self.shard_rows, *arr.shape[1:]))
        if name in self.attrs.hooks and self.dtype == "bfloat16":
            return blocks.map_blocks(schema.bf16_bits_to_fp32, dtype=np.float32)
        return blocks

    def token_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.group["token_ids"][start:stop]

    def seq_idx(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.group["seq_idx"][start:stop]

    def pos(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.group["pos"][start:stop]

    def nbytes_stored(self) -> int:
        """Bytes on disk of every array (excluding metadata)."""
        return sum(int(self.group[n].nbytes_stored()) for n in [*self.hooks, *schema.META_ARRAYS])


def open_store(path_or_url) -> Store:
    """Open a complete store for reading: StoreNotFound / SchemaMismatch / StoreIncomplete otherwise."""
    if isinstance(path_or_url, Store):
        return path_or_url
    loc, attrs = read_attrs(path_or_url)
    return Store(loc, attrs)
