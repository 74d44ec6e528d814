"""WriterSpec: the writer's settings and everything they decide.

Fields (one per hook plus token_ids/seq_idx/pos), chunk and shard sizes, shuffle buckets and buffer sizes,
the store's initial attributes (``StoreAttrs``), the arrays as created, and how an appended batch is checked
and converted to storage dtypes. Same spec + same input rows = same store, byte for byte.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

from saeforge.stores import schema
from saeforge.stores.attrs import ChunkLayout, ShuffleParams, StoreAttrs
from saeforge.stores.errors import InvalidInput
from saeforge.stores.records import RECORDS
from saeforge.stores.staging import Field

SHUFFLE_DOC = ("two-pass external shuffle: row i goes to bucket splitmix64(splitmix64(i) ^ key(seed)) mod "
               "n_buckets; each bucket is permuted by numpy default_rng([seed, 0, bucket]); buckets larger "
               "than bucket_max_rows recurse the same way")


@dataclass(frozen=True, kw_only=True)
class WriterSpec:
    """Everything that determines a store's bytes (same spec + same input rows = same store)."""

    hooks: dict
    """Hook name -> d (width of its rows), sorted by name."""
    dtype: str
    """Logical storage dtype of the hook arrays: float32, float16 or bfloat16."""
    seed: int
    """Seed of the shuffle."""
    expected_rows: int | None
    """Rows the producer expects to append (sizes the buckets; None: grow by recursion)."""
    provenance: dict
    """Free-form JSON description of where the rows came from (harvest fills it)."""
    memory_limit_bytes: int
    """Bound on the writer's buffers, in bytes."""
    chunk_rows: int
    """Rows per compressed chunk (the unit the loader reads and decodes)."""
    shard_rows: int
    """Rows per shard file (a whole number of chunks)."""
    n_buckets: int
    """Buckets of the first shuffle pass."""
    stage_rows: int
    """Rows buffered before each flush of pass 1 (about a third of the memory limit)."""
    bucket_max_rows: int
    """Largest bucket permuted in memory (a quarter of the memory limit); larger ones recurse."""

    def __post_init__(self):
        problems = []
        if self.dtype not in schema.DTYPES:
            problems.append(f"dtype must be one of {schema.DTYPES}, got {self.dtype!r}")
        if not self.hooks:
            problems.append("hooks must name at least one hook")
        bad = {h: d for h, d in self.hooks.items() if not isinstance(d, (int, np.integer)) or d < 1 or "/" in h}
        if bad:
            problems.append(f"hooks need a positive int d and no '/' in the name: {bad}")
        taken = sorted(set(self.hooks) & {*schema.META_ARRAYS, RECORDS, schema.STATE_DIR})
        if taken:
            problems.append(f"hook names {taken} are taken by the store's own arrays and folders")
        if self.expected_rows is not None and self.expected_rows < 0:
            problems.append(f"expected_rows must be >= 0, got {self.expected_rows}")
        if self.shard_rows % self.chunk_rows:
            problems.append(f"shard_rows {self.shard_rows} must be a multiple of chunk_rows {self.chunk_rows}")
        if self.shard_rows * self.row_bytes > self.memory_limit_bytes // 8:
            problems.append(f"a shard ({self.shard_rows} rows x {self.row_bytes} B) must fit in 1/8 of "
                            f"memory_limit_bytes={self.memory_limit_bytes}; raise it or lower chunk_rows")
        try:
            json.dumps(self.provenance, allow_nan=False)
        except (TypeError, ValueError) as e:
            problems.append(f"provenance must be JSON-serialisable: {e}")
        if problems:
            raise InvalidInput("; ".join(problems))

    @classmethod
    def build(cls, *, hooks, dtype, seed, expected_rows, provenance, memory_limit_bytes, chunk_rows,
              shard_chunks) -> "WriterSpec":
        hooks = {str(h): int(d) if isinstance(d, (int, np.integer)) else d for h, d in sorted(dict(hooks).items())}
        itemsize = np.dtype(schema.STORAGE_DTYPE.get(dtype, np.float32)).itemsize
        row_bytes = _row_bytes(hooks, itemsize)
        budget = max(1, memory_limit_bytes // 8)
        auto = chunk_rows is None
        chunk_rows = chunk_rows or schema.chunk_rows_for(max([d for d in hooks.values() if isinstance(d, int)] or [1]), itemsize)
        while auto and chunk_rows > 16 and chunk_rows * row_bytes > budget:
            chunk_rows //= 2
        while shard_chunks > 1 and chunk_rows * shard_chunks * row_bytes > budget:
            shard_chunks //= 2
        bucket_max = max(1, memory_limit_bytes // 4 // row_bytes)
        n_buckets = max(1, math.ceil((expected_rows or 0) / max(1, bucket_max // 2))) if expected_rows else 16
        return cls(hooks=hooks, dtype=dtype, seed=int(seed), expected_rows=expected_rows, provenance=provenance,
                   memory_limit_bytes=int(memory_limit_bytes), chunk_rows=int(chunk_rows),
                   shard_rows=int(chunk_rows * shard_chunks), n_buckets=n_buckets,
                   stage_rows=max(1, memory_limit_bytes // 3 // row_bytes), bucket_max_rows=bucket_max)

    @property
    def row_bytes(self) -> int:
        return _row_bytes(self.hooks, np.dtype(schema.STORAGE_DTYPE.get(self.dtype, np.float32)).itemsize)

    def shuffle_context(self, loc: schema.Location):
        """The two-pass shuffle's settings for this spec's store at ``loc`` (sub-buckets in its writer state)."""
        from saeforge.stores.shuffle import ShuffleContext

        return ShuffleContext(loc, self.fields(), self.seed, self.stage_rows, self.bucket_max_rows,
                              loc.sub(schema.STATE_DIR, "sub"))

    def fields(self) -> list[Field]:
        storage = np.dtype(schema.STORAGE_DTYPE[self.dtype])
        return [Field(h, storage, (d,)) for h, d in self.hooks.items()] + [
            Field(name, np.dtype(dt), ()) for name, dt in schema.META_ARRAYS.items()]

    def config_dict(self) -> dict:
        """What a resuming writer must match, JSON-normalised."""
        d = dataclasses.asdict(self)
        d["format_version"] = schema.FORMAT_VERSION
        return json.loads(json.dumps(d))

    def initial_attrs(self) -> StoreAttrs:
        """The attributes of the store while it is being written (no rows, statistics or completion yet)."""
        return StoreAttrs(
            format_version=schema.FORMAT_VERSION,
            description=schema.ATTRS_DOC,
            dtype=self.dtype,
            hooks=dict(self.hooks),
            meta_arrays={k: np.dtype(v).name for k, v in schema.META_ARRAYS.items()},
            n_rows=None,
            seed=self.seed,
            shuffle=ShuffleParams(algorithm=SHUFFLE_DOC, n_buckets=self.n_buckets,
                                  bucket_max_rows=self.bucket_max_rows),
            layout=ChunkLayout(chunk_rows=self.chunk_rows, shard_rows=self.shard_rows),
            provenance=self.provenance,
            writer_config=self.config_dict(),
            stats=None,
            complete=None,
        )

    def convert_batch(self, acts: dict, *, token_ids, seq_idx, pos) -> dict:
        """Validate one appended batch and convert it to storage arrays (numpy, contiguous)."""
        missing, extra = set(self.hooks) - set(acts), set(acts) - set(self.hooks)
        if missing or extra:
            raise InvalidInput(f"append needs exactly the hooks {sorted(self.hooks)}; "
                               f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        out = {h: _as_storage(acts[h], self.dtype, h, d) for h, d in self.hooks.items()}
        n = {len(v) for v in out.values()}
        if len(n) != 1:
            counts = {h: len(v) for h, v in out.items()}
            raise InvalidInput(f"hooks have different row counts in one append: {counts}")
        n = n.pop()
        for name, val in (("token_ids", token_ids), ("seq_idx", seq_idx), ("pos", pos)):
            arr = np.full(n, -1) if val is None else _to_numpy(val).reshape(-1)
            if len(arr) != n:
                raise InvalidInput(f"{name} has {len(arr)} entries for {n} rows")
            out[name] = np.ascontiguousarray(arr, dtype=schema.META_ARRAYS[name])
        return out if n else {}


def _row_bytes(hooks: dict, itemsize: int) -> int:
    meta = sum(np.dtype(t).itemsize for t in schema.META_ARRAYS.values())
    return sum(d * itemsize for d in hooks.values() if isinstance(d, int)) + meta


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (torch is already imported by whoever made it)
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import torch

            return x.contiguous().view(torch.int16).numpy().view(np.uint16)
        return x.numpy()
    return np.asarray(x)


def _as_storage(x, dtype: str, hook: str, d: int) -> np.ndarray:
    is_bf16_bits = hasattr(x, "detach") and str(x.dtype) == "torch.bfloat16"
    arr = _to_numpy(x)
    if arr.ndim != 2 or arr.shape[1] != d:
        raise InvalidInput(f"{hook}: expected rows of shape (rows, {d}), got {tuple(arr.shape)}")
    if is_bf16_bits:
        if dtype != "bfloat16":  # widen exactly, then narrow to the storage dtype
            arr = schema.bf16_bits_to_fp32(arr)
        finite = ((arr & 0x7F80) != 0x7F80).all() if dtype == "bfloat16" else np.isfinite(arr).all()
    else:
        if not np.issubdtype(arr.dtype, np.floating):
            raise InvalidInput(f"{hook}: expected floating-point rows, got {arr.dtype}")
        finite = np.isfinite(arr).all()
    if not finite:
        raise InvalidInput(f"{hook}: rows contain NaN or inf; a store must hold finite activations")
    out = schema.to_storage(arr, dtype)
    if dtype != "bfloat16" and not np.isfinite(out).all():
        raise InvalidInput(f"{hook}: values overflow {dtype}; store them as bfloat16 or float32")
    return out


# --- the arrays ----------------------------------------------------------------------------------------
def create_arrays(loc: schema.Location, spec: WriterSpec, n_rows: int) -> None:
    """Create (or re-create, after a crash) every array of the store, empty, with its final shape."""
    import zarr

    group = zarr.open_group(loc.zarr_store(), mode="r+")
    for h, d in spec.hooks.items():
        group.create_array(h, shape=(n_rows, d), dtype=schema.STORAGE_DTYPE[spec.dtype],
                           chunks=(spec.chunk_rows, d), shards=(spec.shard_rows, d),
                           dimension_names=("rows", "d_in"), overwrite=True, fill_value=0,
                           attributes={"logical_dtype": spec.dtype, "d": d,
                                       "note": "bfloat16 as uint16 bits" if spec.dtype == "bfloat16" else ""},
                           **schema.codecs_for(spec.dtype))
    for name, dt in schema.META_ARRAYS.items():
        group.create_array(name, shape=(n_rows,), dtype=dt, chunks=(spec.shard_rows,),
                           dimension_names=("rows",), overwrite=True, fill_value=0,
                           attributes={"logical_dtype": np.dtype(dt).name}, **schema.meta_codecs(dt))
