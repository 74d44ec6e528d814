"""Format version 1 of the store: layout, dtypes, codecs, hook names, and where the store lives.

Layout of a store (one Zarr v3 group)::

    <store>/zarr.json                 group attributes (``attrs.StoreAttrs``), completion record last
    <store>/<hook>/                   (rows, d) array per hook point; bfloat16 stored as its uint16 bit pattern
    <store>/token_ids, seq_idx, pos   (rows,) arrays aligned with the hooks row for row
    <store>/records/                  run records (a group whose attributes they are; ``records.py``)
    <store>/.saeforge/                writer state while incomplete (lock, progress, staged buckets)

Every chunk is written, even one equal to the fill value, so an absent chunk is damage, never zeros.

Codecs (measured by ``scripts/bench_codecs.py`` on SmolLM2 residual activations): blosc (byte-shuffle +
zstd(1), 1 MiB blocks), crc32c, inside a sharding codec so a 10^9-row store is ~10^4 files per hook.
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple

import numpy as np

FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")
STORAGE_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
META_ARRAYS = {"token_ids": np.int32, "seq_idx": np.int64, "pos": np.int32}
"""1-D arrays aligned with the hooks: token id, index of the source sequence, position inside it."""
STATE_DIR = ".saeforge"
CHUNK_TARGET_BYTES = 2 << 20
"""~2 MiB of uncompressed data per chunk: large sequential reads, ~1-3 ms to decode on one core."""
SHARD_CHUNKS = 32
"""Chunks per shard file: 65k rows x 576 bf16 = 75 MiB per file, ~15k files per hook for 10^9 rows."""
ATTRS_DOC = (
    "saeforge activation store. Arrays: one (rows, d) array per hook point plus token_ids/seq_idx/pos "
    "aligned row for row; rows are a uniform random permutation of the harvested tokens. Arrays whose "
    "logical_dtype is bfloat16 hold the uint16 bit pattern: fp32 = (uint32(x) << 16).view(float32)."
)


_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.")


def hook_layer(name: str) -> int | None:
    """Layer of a hook point inside a block: ``blocks.10.hook_resid_post`` -> 10; None outside blocks
    (``hook_embed``, ``ln_final.hook_normalized``)."""
    m = _BLOCK_HOOK.match(name)
    return int(m.group(1)) if m else None


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (what torch does); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Logical float rows -> the array's storage representation."""
    if dtype == "bfloat16":
        return x if x.dtype == np.uint16 else fp32_to_bf16_bits(x)
    with np.errstate(over="ignore"):  # overflow to inf is checked (and refused) by the writer
        return np.ascontiguousarray(x, dtype=STORAGE_DTYPE[dtype])


def to_float64(x: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_bits_to_fp32(x).astype(np.float64) if dtype == "bfloat16" else x.astype(np.float64)


_BITS = {"bfloat16": (np.uint16, np.int16, 0x7F80), "float16": (np.uint16, np.int16, 0x7C00),
         "float32": (np.uint32, np.int32, 0x7F800000)}
"""Per logical dtype: its bits as unsigned and as signed integers, and +inf's bits (exponent all ones)."""


def any_nonfinite(x: np.ndarray, dtype: str) -> bool:
    """Whether stored values hold a NaN or an inf, from their bits, with two allocation-free reductions: as
    signed integers +inf and +NaN are the largest values, as unsigned ones -inf and -NaN are (the loader checks
    every chunk so: about an eighth of the chunk's decode time on one core)."""
    if x.size == 0:
        return False
    unsigned, signed, inf = _BITS[dtype]
    sign = 1 << (8 * np.dtype(unsigned).itemsize - 1)
    return int(x.view(signed).max()) >= inf or int(x.view(unsigned).max()) >= sign | inf


def nonfinite_rows(x: np.ndarray, dtype: str) -> np.ndarray:
    """(rows,) bool: which stored rows hold a NaN or an inf (for bfloat16 bits: exponent all ones)."""
    if dtype == "bfloat16":
        return ((x & np.uint16(0x7F80)) == 0x7F80).any(axis=1)
    return ~np.isfinite(x).all(axis=1)


def chunk_rows_for(d_max: int, itemsize: int) -> int:
    """Rows per chunk: the power of two whose widest-hook chunk is closest to CHUNK_TARGET_BYTES."""
    rows = CHUNK_TARGET_BYTES / max(1, d_max * itemsize)
    return int(min(1 << 16, max(256, 2 ** round(np.log2(rows)))))


BLOSC_BLOCK_BYTES = 1 << 20
"""Blosc compresses blocks independently: at its default (small) block size zstd(1) on bf16 reaches 1.25x,
with 1 MiB blocks 1.44x, the same as a separate shuffle + zstd(1) (scripts/bench_codecs.py)."""


def _blosc_zstd(itemsize: int, level: int) -> dict:
    from zarr.codecs import BloscCodec, Crc32cCodec

    return {"compressors": [BloscCodec(cname="zstd", clevel=level, shuffle="shuffle", typesize=itemsize,
                                       blocksize=BLOSC_BLOCK_BYTES), Crc32cCodec()]}


def codecs_for(dtype: str) -> dict:
    """zarr.create_array keyword arguments for a hook array of this logical dtype.

    Byte-shuffle + zstd(1) inside blosc (a codec of the Zarr v3 spec, so any v3 reader can decode it), then
    crc32c. Measured on SmolLM2-135M layer-15 residual activations (scripts/bench_codecs.py): bf16 1.44x
    (2.88x smaller than raw fp32), fp32 1.18x, fp16 1.15x; zstd without shuffle: 1.26x / 1.08x / 1.07x.
    """
    return _blosc_zstd(np.dtype(STORAGE_DTYPE[dtype]).itemsize, level=1)


def meta_codecs(np_dtype) -> dict:
    return _blosc_zstd(np.dtype(np_dtype).itemsize, level=3)


class Location(NamedTuple):
    """Where a store lives: an fsspec filesystem and the group's root path inside it.

    ``storage_options`` are the keyword arguments of the fsspec filesystem (credentials, ``endpoint_url``,
    ...): every reader and writer of a store at a URL opens it with them."""

    url: str
    fs: object
    root: str
    is_local: bool
    storage_options: dict | None = None

    def zarr_store(self, read_only: bool = False):
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.root, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)

    def sub(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])


def locate(path_or_url, storage_options: dict | None = None) -> Location:
    """Local path (str or PathLike) or fsspec URL (``memory://``, ``s3://``, ...) -> Location.

    ``storage_options``: keyword arguments of the URL's fsspec filesystem (for s3fs: ``key``, ``secret``,
    ``client_kwargs={"endpoint_url": ...}``, ...); ignored for local paths. The filesystem caches no listings: a
    store's files are also written through zarr's own filesystem instance, and a cached listing would hide them
    (s3fs answers ``exists`` from its parent's listing). A Location passed in is returned as is.
    """
    import fsspec

    from saeforge.stores.files import is_url

    if isinstance(path_or_url, Location):
        return path_or_url
    text = os.fspath(path_or_url)
    if is_url(text):
        opts = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(text, **opts)
        if getattr(fs, "dircache", None) is not None:  # fsspec's DirCache; the instance is shared, caching off
            fs.dircache.use_listings_cache = False
            fs.dircache.clear()
        return Location(text.rstrip("/"), fs, root.rstrip("/"), False, opts or None)
    local = os.path.abspath(os.path.expanduser(text.removeprefix("file://")))  # `~` as the user means it
    return Location(local, fsspec.filesystem("file"), local, True)
