"""Read whole chunks of a hook array straight from its shard files: the loader's fast path.

Valid only for the layout this package writes (checked against the array's metadata; anything else goes
through zarr): ``sharding_indexed`` with inner codecs ``bytes(little) -> blosc -> crc32c`` and an index
``bytes -> crc32c`` at the end of each shard. One ranged read per run of chunks (a run that is a whole shard
whose index is not cached yet: one read of the file, index included), the crc32c of every chunk checked, blosc
decompressing straight into the destination array: no per-chunk allocation or copy, and both crc32c and blosc
release the GIL, so threads decode in parallel.
"""
from __future__ import annotations

import os

import numpy as np

from saeforge.stores.errors import ChecksumError, StoreDamaged

_MISSING = 2**64 - 1


def _crc32c(data) -> int:
    import crc32c

    return crc32c.crc32c(data)


class ChunkReader:
    """Rows [lo, hi) of one array whose bounds are chunk-aligned (the end may be the array's end)."""

    def __init__(self, store, name: str):
        arr = store.array(name)
        meta = arr.metadata.to_dict()
        self.loc, self.name, self.path = store.loc, name, store.path
        self.shape, self.dtype = tuple(arr.shape), np.dtype(arr.dtype)
        self.shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        sharding = meta["codecs"][0]["configuration"]
        self.chunk_rows = int(sharding["chunk_shape"][0])
        self.per_shard = self.shard_rows // self.chunk_rows
        self._index: dict[int, np.ndarray] = {}
        from numcodecs import Blosc

        self._blosc = Blosc()

    @staticmethod
    def supports(store, name: str) -> bool:
        try:
            meta = store.array(name).metadata.to_dict()
            (codec,) = meta["codecs"]
            cfg = codec["configuration"]
            inner = [c["name"] for c in cfg["codecs"]]
            return (codec["name"] == "sharding_indexed" and inner == ["bytes", "blosc", "crc32c"]
                    and [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]
                    and cfg["index_location"] == "end" and cfg["codecs"][0]["configuration"]["endian"] == "little"
                    and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                    and len(meta["shape"]) == 2 and cfg["chunk_shape"][1] == meta["shape"][1]
                    and meta["chunk_grid"]["configuration"]["chunk_shape"][1] == meta["shape"][1])
        except (KeyError, ValueError, TypeError, AttributeError):
            return False

    def _file(self, shard: int) -> str:
        return self.loc.sub(self.name, "c", str(shard), "0")

    def _read_range(self, path: str, start: int, stop: int | None) -> bytes:
        try:
            return self._read_file_range(path, start, stop)
        except FileNotFoundError:
            shard = path.rsplit("/", 2)[-2]
            raise StoreDamaged(f"{self.path}: {self.name} shard file {self.name}/c/{shard}/0 is missing, so its "
                               f"rows cannot be read; the store is damaged (run `saeforge store verify "
                               f"{self.path}`)") from None

    def _read_file_range(self, path: str, start: int, stop: int | None) -> bytes:
        """Bytes [start, stop) of a file; a negative start counts from its end (all of it when shorter), stop None
        reads to the end. One request on an object store (fsspec's cat_file takes both, by keyword: s3fs's second
        positional parameter is version_id)."""
        if not self.loc.is_local:
            return self.loc.fs.cat_file(path, start=start, end=stop)
        with open(path, "rb") as f:
            if start < 0:
                f.seek(max(os.fstat(f.fileno()).st_size + start, 0))
            else:
                f.seek(start)
            return f.read() if stop is None else f.read(stop - f.tell())

    def index(self, shard: int) -> np.ndarray:
        """(chunks per shard, 2) uint64 offsets and sizes, crc32c-checked, cached."""
        if shard not in self._index:
            self._index[shard] = self._parse_index(self._read_range(self._file(shard), -self._index_bytes, None), shard)
        return self._index[shard]

    @property
    def _index_bytes(self) -> int:
        return self.per_shard * 16 + 4

    def _parse_index(self, raw: bytes, shard: int) -> np.ndarray:
        body, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
        if len(raw) != self._index_bytes or _crc32c(body) != crc:
            raise ChecksumError(f"{self.path}: {self.name} shard {shard} (file {self.name}/c/{shard}/0): "
                                "crc32c mismatch in the shard index; the file is corrupt (run `saeforge store verify "
                                f"{self.path}`)")
        return np.frombuffer(body, dtype="<u8").reshape(self.per_shard, 2)

    def _whole_shard(self, shard: int, lo: int, hi: int) -> memoryview | None:
        """The shard file's bytes, read in one request, when rows [lo, hi) are all of the shard and its index is not
        known yet (an object store then answers one GET instead of two: index, then rows); else None."""
        base = shard * self.shard_rows
        if shard in self._index or lo != base or hi < min(base + self.shard_rows, self.shape[0]):
            return None
        blob = self._read_range(self._file(shard), 0, None)
        self._index[shard] = self._parse_index(blob[-self._index_bytes :], shard)
        return memoryview(blob)

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, int]:
        """Decoded rows [lo, hi) (inside one shard) and the bytes read from storage."""
        shard, d = lo // self.shard_rows, self.shape[1]
        c0 = (lo - shard * self.shard_rows) // self.chunk_rows
        c1 = -(-(hi - shard * self.shard_rows) // self.chunk_rows)
        blob = self._whole_shard(shard, lo, hi)
        self.check_present(shard, lo, hi)
        idx = self.index(shard)[c0:c1]
        out = np.empty((hi - lo, d), self.dtype)
        start = int(idx[:, 0].min())
        stop = int((idx[:, 0] + idx[:, 1]).max())
        buf = blob[start:stop] if blob is not None else memoryview(self._read_range(self._file(shard), start, stop))
        for k, (off, size) in enumerate(idx.tolist()):
            r0 = (c0 + k) * self.chunk_rows + shard * self.shard_rows - lo
            r1 = min(r0 + self.chunk_rows, hi - lo)
            self._decode(buf[off - start : off - start + size], out, r0, r1, c0 + k, shard)
        return out, stop - start

    def check_present(self, shard: int, lo: int = 0, hi: int | None = None) -> None:
        """StoreDamaged when a chunk of the shard holding rows of [lo, hi) is absent from the shard's index.

        The writer writes every chunk (even one of zeros), so an absent chunk is damage: it is never read as
        the fill value.
        """
        base = shard * self.shard_rows
        hi = self.shape[0] if hi is None else hi
        c0 = max(lo - base, 0) // self.chunk_rows
        c1 = -(-(min(hi, base + self.shard_rows, self.shape[0]) - base) // self.chunk_rows)
        absent = np.nonzero(self.index(shard)[c0:c1, 0] == _MISSING)[0]
        if len(absent):
            first = base + (c0 + int(absent[0])) * self.chunk_rows
            raise StoreDamaged(f"{self.path}: {self.name} rows {first}:{min(first + self.chunk_rows, self.shape[0])} "
                               f"(chunk {c0 + int(absent[0])} of file {self.name}/c/{shard}/0) are missing from the "
                               f"shard's index, so they cannot be read; the store is damaged (run `saeforge store "
                               f"verify {self.path}`)")

    def _decode(self, chunk, out, r0, r1, chunk_no, shard) -> None:
        if _crc32c(chunk[:-4]) != int.from_bytes(chunk[-4:], "little"):
            first = shard * self.shard_rows + chunk_no * self.chunk_rows
            raise ChecksumError(f"{self.path}: {self.name} rows {first}:{first + self.chunk_rows} (chunk "
                                f"{chunk_no} of file {self.name}/c/{shard}/0): crc32c checksum mismatch, the "
                                f"data on disk is corrupt (run `saeforge store verify {self.path}`)")
        if r1 - r0 == self.chunk_rows:
            self._blosc.decode(chunk[:-4], out=out[r0:r1])
        else:  # the array's last chunk is stored full size; keep its valid rows
            full = np.empty((self.chunk_rows, out.shape[1]), out.dtype)
            self._blosc.decode(chunk[:-4], out=full)
            out[r0:r1] = full[: r1 - r0]
