"""The store's group attributes (its ``zarr.json``), typed: :class:`StoreAttrs` and its pieces.

A store's attributes are read once, when it is opened (``reader.read_attrs``), and passed around typed.
``StoreAttrs.to_json()`` gives back exactly the dict that is stored: the writer writes zarr.json through it,
and the key order below is the order format version 1 writes, so the same seed and input give a
byte-identical zarr.json. ``provenance`` stays an opaque JSON dict (harvest owns its schema).

    saeforge_format_version  1                          description  how to read the arrays (schema.ATTRS_DOC)
    dtype        logical dtype of the hook arrays       hooks        {hook: d}, sorted by name
    meta_arrays  {name: numpy dtype} of token_ids/...   n_rows       rows per array (None while incomplete)
    seed         seed of the shuffle                    shuffle      ShuffleParams
    layout       ChunkLayout                            provenance   where the rows came from
    writer_config  what a resuming writer must match    stats        {hook: HookStats} (None while incomplete)
    complete     Completion, written last (None while incomplete)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from saeforge.stores import schema
from saeforge.stores.errors import SchemaMismatch
from saeforge.stores.files import read_json, write_json_atomic

FORMAT_KEY = "saeforge_format_version"
"""The attribute that marks a zarr group as a saeforge store."""


class HookStats(NamedTuple):
    """Statistics of one hook over all rows of the store (of the stored, possibly rounded, values)."""

    mean: np.ndarray
    """(d,) float64 mean vector."""
    mean_sq_norm: float
    """E||x||^2."""
    mean_norm: float
    """E||x||."""
    scale: float
    """sqrt(d / E||x||^2): multiply rows by it so that E||x||^2 = d."""

    @classmethod
    def from_json(cls, entry: dict) -> "HookStats":
        return cls(np.asarray(entry["mean"], dtype=np.float64), float(entry["mean_sq_norm"]),
                   float(entry["mean_norm"]), float(entry["scale"]))

    from_attrs = from_json  # the name it had before StoreAttrs

    def to_json(self) -> dict:
        return {"mean": np.asarray(self.mean, dtype=np.float64).tolist(), "mean_sq_norm": float(self.mean_sq_norm),
                "mean_norm": float(self.mean_norm), "scale": float(self.scale)}


@dataclass(frozen=True, kw_only=True)
class ShuffleParams:
    """How the writer shuffled (``spec.SHUFFLE_DOC`` is the algorithm's description)."""

    algorithm: str
    n_buckets: int
    """Buckets of the first pass."""
    bucket_max_rows: int
    """Largest bucket permuted in memory; larger ones were shuffled recursively."""


@dataclass(frozen=True, kw_only=True)
class ChunkLayout:
    """Rows per compressed chunk (the unit the loader decodes) and per shard file (a whole number of chunks)."""

    chunk_rows: int
    shard_rows: int


@dataclass(frozen=True, kw_only=True)
class Completion:
    """The completion record: the writer's last write. A store without one is incomplete."""

    rows: int
    format_version: int


def _piece(cls, obj, key: str):
    """Parse one nested attribute into its dataclass, naming the key when it does not fit."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(obj, dict) or sorted(obj) != sorted(names):
        raise SchemaMismatch(f"attribute {key!r} should hold the keys {names}, got {obj!r}")
    return cls(**obj)


_KEYS = (FORMAT_KEY, "description", "dtype", "hooks", "meta_arrays", "n_rows", "seed", "shuffle", "layout",
         "provenance", "writer_config", "stats", "complete")
"""Format version 1's attributes, in the order it writes them."""


@dataclass(frozen=True, kw_only=True, eq=False)
class StoreAttrs:
    """Everything a store says about itself (its group attributes). Compare with ``==`` (by ``to_json()``)."""

    format_version: int
    """Store format version (stored as ``saeforge_format_version``)."""
    description: str
    dtype: str
    """Logical dtype of the hook arrays: float32, float16 or bfloat16 (stored as uint16 bits)."""
    hooks: dict
    """Hook name -> d (width of its rows), sorted by name."""
    meta_arrays: dict
    """Name -> numpy dtype name of the 1-D arrays aligned with the hooks (token_ids, seq_idx, pos)."""
    n_rows: int | None
    """Rows in every array; None until the writer has staged everything."""
    seed: int
    shuffle: ShuffleParams
    layout: ChunkLayout
    provenance: dict
    """Where the rows came from (free-form JSON written by harvest; not copied, do not modify)."""
    writer_config: dict
    """The writer's settings as JSON (``WriterSpec.config_dict``): what a resuming writer must match."""
    stats: dict | None
    """Hook name -> HookStats; None while incomplete."""
    complete: Completion | None
    """The completion record; None while incomplete."""
    extra: dict = field(default_factory=dict)
    """Attributes format version 1 does not define (kept, so ``to_json(from_json(x)) == x``)."""

    @property
    def is_complete(self) -> bool:
        return self.complete is not None

    def completed(self, n_rows: int, stats: dict) -> "StoreAttrs":
        """These attributes with the row count, the statistics and the completion record filled in."""
        return dataclasses.replace(self, n_rows=int(n_rows), stats=dict(stats),
                                   complete=Completion(rows=int(n_rows), format_version=self.format_version))

    def to_json(self) -> dict:
        """The attributes as stored (keys in format version 1's order)."""
        return {
            FORMAT_KEY: self.format_version,
            "description": self.description,
            "dtype": self.dtype,
            "hooks": dict(self.hooks),
            "meta_arrays": dict(self.meta_arrays),
            "n_rows": self.n_rows,
            "seed": self.seed,
            "shuffle": dataclasses.asdict(self.shuffle),
            "layout": dataclasses.asdict(self.layout),
            "provenance": self.provenance,
            "writer_config": self.writer_config,
            "stats": None if self.stats is None else {h: s.to_json() for h, s in self.stats.items()},
            "complete": None if self.complete is None else dataclasses.asdict(self.complete),
            **self.extra,
        }

    @classmethod
    def from_json(cls, obj: dict) -> "StoreAttrs":
        """Parse stored attributes; SchemaMismatch naming the keys that are missing or malformed."""
        if not isinstance(obj, dict):
            raise SchemaMismatch(f"store attributes should be a JSON object, got {type(obj).__name__}")
        missing = [k for k in _KEYS if k not in obj]
        if missing:
            raise SchemaMismatch(f"store attributes lack {missing}")
        try:
            stats = obj["stats"]
            return cls(
                format_version=obj[FORMAT_KEY], description=obj["description"], dtype=obj["dtype"],
                hooks=dict(obj["hooks"]), meta_arrays=dict(obj["meta_arrays"]), n_rows=obj["n_rows"],
                seed=obj["seed"], shuffle=_piece(ShuffleParams, obj["shuffle"], "shuffle"),
                layout=_piece(ChunkLayout, obj["layout"], "layout"), provenance=obj["provenance"],
                writer_config=obj["writer_config"],
                stats=None if stats is None else {h: HookStats.from_json(s) for h, s in stats.items()},
                complete=None if obj["complete"] is None else _piece(Completion, obj["complete"], "complete"),
                extra={k: v for k, v in obj.items() if k not in _KEYS})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SchemaMismatch(f"store attributes are malformed ({type(e).__name__}: {e})") from e

    def __eq__(self, other) -> bool:
        if not isinstance(other, StoreAttrs):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None

    # Read access by stored key (``attrs["n_rows"]``, ``attrs.get("complete")``), for callers outside
    # stores/ that still read the untyped dict; to be removed once they use the fields.
    def __getitem__(self, key: str):
        return self.to_json()[key]

    def get(self, key: str, default=None):
        return self.to_json().get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.to_json()


# --- the group document (zarr.json) ------------------------------------------------------------------
def read_group_attrs(loc: schema.Location) -> dict | None:
    """The group's attributes as stored (untyped), or None where there is no zarr.json (not a zarr group)."""
    meta = read_json(loc, loc.sub("zarr.json"))
    if meta is None:
        return None
    return meta.get("attributes", {}) if isinstance(meta, dict) else {}


def parse_attrs(loc: schema.Location, raw: dict) -> StoreAttrs:
    """Typed attributes of a saeforge store; SchemaMismatch for another format version or malformed ones."""
    version = raw[FORMAT_KEY]
    if version != schema.FORMAT_VERSION:
        raise SchemaMismatch(f"{loc.url} has store format version {version!r}; this saeforge reads version "
                             f"{schema.FORMAT_VERSION} (upgrade saeforge or re-harvest the store)")
    try:
        return StoreAttrs.from_json(raw)
    except SchemaMismatch as e:
        raise SchemaMismatch(f"{loc.url}: {e}") from None


def write_group_attrs(loc: schema.Location, attrs: StoreAttrs) -> None:
    """Replace the group's zarr.json (Zarr v3 group metadata) atomically."""
    loc.fs.makedirs(loc.root, exist_ok=True)
    write_json_atomic(loc, loc.sub("zarr.json"),
                      {"zarr_format": 3, "node_type": "group", "attributes": attrs.to_json()})
