"""open_store: a complete store, read-only, with its typed attributes, statistics and convenience reads.

The attributes are read once, when the store is opened, and kept typed (``Store.attrs``, a ``StoreAttrs``).
Opening runs the cheap consistency check (``integrity.check_store``) and removes what a writer killed after
its completion record left behind (``tidy.tidy_complete``). Reads decode on demand: ``read``/``read_numpy``
(float32 rows), ``to_dask`` (a lazy float array, bf16 included), ``array`` (the raw zarr array, in the
storage dtype). A chunk that is not there is an error, never a block of fill values (``strict.StrictStore``).

A store at a URL is opened with the ``storage_options`` of its fsspec filesystem (credentials, endpoint); what
its filesystem fails with (a missing bucket, refused credentials, an endpoint out of reach) is a one-line
StoreError naming the URL (``remote.py``).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from saeforge.stores import schema
from saeforge.stores.attrs import FORMAT_KEY, HookStats, StoreAttrs, parse_attrs, read_group_attrs
from saeforge.stores.errors import (ChecksumError, HookNotInStore, SchemaMismatch, StoreDamaged, StoreError,
                                    StoreIncomplete, StoreNotFound)
from saeforge.stores.files import read_json
from saeforge.stores.integrity import check_store, damaged
from saeforge.stores.remote import check_remote, remote_error, remote_errors
from saeforge.stores.tidy import tidy_complete


def read_attrs(path_or_url, *, require_complete: bool = True,
               storage_options: dict | None = None) -> tuple[schema.Location, StoreAttrs]:
    """Locate a store and return its typed attributes, raising the domain error that says what is wrong.
    ``storage_options``: of the fsspec filesystem of a store at a URL (``schema.locate``)."""
    loc = schema.locate(path_or_url, storage_options)
    with remote_errors(loc):
        return loc, _read_attrs(loc, require_complete)


def _read_attrs(loc: schema.Location, require_complete: bool) -> StoreAttrs:
    try:
        exists = loc.fs.exists(loc.root)
    except OSError:  # s3fs asks HEAD of the folder's own key first: a 403 there says little
        exists = check_remote(loc)  # a listing names the cause (refused key), or finds the folder readable
    if not exists:
        check_remote(loc)  # a missing bucket: say so rather than "no store"
        raise StoreNotFound(f"no store at {loc.url}: the path does not exist")
    try:
        raw = read_group_attrs(loc)
    except (ValueError, OSError) as e:
        raise remote_error(loc, e) or StoreNotFound(f"{loc.url} is not a saeforge store: unreadable zarr.json "
                                                    f"({e})") from e
    if raw is None and loc.fs.exists(loc.sub(schema.STATE_DIR)):
        raise StoreNotFound(f"{loc.url} holds no store yet: its writer stopped before writing the group's "
                            "zarr.json (only writer state is there); rerun the same harvest command to write it")
    if raw is None or FORMAT_KEY not in raw:
        what = "no zarr.json" if raw is None else "a zarr group without saeforge attributes"
        raise StoreNotFound(f"{loc.url} is not a saeforge store ({what})")
    attrs = parse_attrs(loc, raw)
    if attrs.complete is not None and attrs.complete.format_version != schema.FORMAT_VERSION:
        raise SchemaMismatch(f"{loc.url}: its completion record has store format version "
                             f"{attrs.complete.format_version!r}, its attributes {attrs.format_version!r}; this "
                             f"saeforge reads version {schema.FORMAT_VERSION} only (an edited or foreign store: "
                             "re-harvest it)")
    if require_complete and not attrs.is_complete:
        raise StoreIncomplete(_incomplete_message(loc))
    return attrs


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

        from saeforge.stores.strict import StrictStore

        self.loc, self.attrs = loc, attrs
        self.path = loc.url
        # zarr_format=3: the store's format; without it zarr also asks for v2 files (.zgroup, .zattrs), two more
        # requests per open on an object store, each refused where a policy grants only the store's own keys
        self.group = zarr.open_group(StrictStore(loc.zarr_store(read_only=True), loc.url), mode="r", zarr_format=3)
        self.n_rows: int = int(attrs.n_rows)
        self.hooks: list[str] = list(attrs.hooks)
        self.dtype: str = attrs.dtype
        self.provenance: dict = attrs.provenance or {}
        self.chunk_rows: int = int(attrs.layout.chunk_rows)
        self.shard_rows: int = int(attrs.layout.shard_rows)
        self._readers: dict = {}  # hook -> ChunkReader, whose shard indexes say which chunks are there

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
        with remote_errors(self.loc):  # its metadata is read here
            return self.group[name]

    def read_numpy(self, hook: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a hook as float32 numpy (rows, d)."""
        raw = self.read_raw(hook, start, stop)
        return schema.bf16_bits_to_fp32(raw) if self.dtype == "bfloat16" else raw.astype(np.float32, copy=False)

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of any array in its storage dtype, through zarr: every chunk checked to be there
        (never fill values) and its crc32c; a StoreError naming the rows otherwise."""
        arr = self.array(name)
        lo, hi, _ = slice(start, stop).indices(arr.shape[0])
        with self._reading(name, lo, hi):
            self.check_present(name, lo, hi)
            return arr[lo:hi]

    def check_present(self, name: str, lo: int, hi: int) -> None:
        """StoreDamaged when a chunk of rows [lo, hi) of a hook is absent from its shard's index (missing files
        are caught by ``StrictStore`` and on open)."""
        if name not in self.attrs.hooks or hi <= lo:
            return
        from saeforge.stores.chunkread import ChunkReader

        reader = self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = ChunkReader(self, name)
        for shard in range(lo // self.shard_rows, (hi - 1) // self.shard_rows + 1):
            reader.check_present(shard, lo, hi)

    @contextmanager
    def _reading(self, name: str, lo: int, hi: int):
        try:
            yield
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - zarr's decode errors, named by array and rows
            raise read_error(self, name, lo, hi, e) from e

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
        return self.read_raw("token_ids", start, stop)

    def seq_idx(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.read_raw("seq_idx", start, stop)

    def pos(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.read_raw("pos", start, stop)

    def nbytes_stored(self) -> int:
        """Bytes on disk of every array (excluding metadata)."""
        return sum(int(self.group[n].nbytes_stored()) for n in [*self.hooks, *schema.META_ARRAYS])


def open_store(path_or_url, storage_options: dict | None = None) -> Store:
    """Open a complete store for reading: StoreNotFound / SchemaMismatch / StoreIncomplete otherwise, and
    StoreDamaged when the cheap consistency check (``integrity.check_store``) finds anything wrong.

    ``storage_options``: keyword arguments of the fsspec filesystem of a store at a URL, e.g. for S3
    ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``; a missing bucket is a StoreNotFound,
    an unreachable endpoint or refused credentials a ``remote.RemoteStoreError``."""
    if isinstance(path_or_url, Store):
        return path_or_url
    loc, attrs = read_attrs(path_or_url, storage_options=storage_options)
    with remote_errors(loc):
        tidy_complete(loc)
        problems = check_store(loc, attrs)
        if problems:
            raise damaged(loc, problems)
        return Store(loc, attrs)


def read_error(store: Store, name: str, lo: int, hi: int, e: Exception) -> StoreError:
    """A failed read of rows [lo, hi) of an array, as the StoreError that names it (a remote filesystem's failure
    as what it is: the store is not damaged when its endpoint is out of reach)."""
    remote = remote_error(store.loc, e)
    if remote is not None:
        return remote
    shard = f"{name}/c/{lo // store.shard_rows}" + ("/0" if name in store.attrs.hooks else "")
    where = f"{store.path}: {name} rows {lo}:{hi} (file {shard})"
    if "checksum" in str(e).lower():
        return ChecksumError(f"{where}: crc32c checksum mismatch, the data on disk is corrupt "
                             f"(run `saeforge store verify {store.path}`)")
    return StoreDamaged(f"{where} could not be read ({type(e).__name__}: {e}); the store is damaged "
                        f"(run `saeforge store verify {store.path}`)")
