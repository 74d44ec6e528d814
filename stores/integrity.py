"""check_store: the cheap consistency check of a complete store, run by ``open_store`` before anything is read.

It reads the group attributes (already parsed), each array's ``zarr.json`` and the list of chunk files, never a
chunk: attributes that are well-formed and agree with one another (row counts, widths, dtypes, layout, the
completion record, statistics that can be right), array metadata as format version 1 writes it (shape, dtype,
fill value, chunking, codecs), and every chunk file there and none beyond the rows. Training and evaluation
thus refuse a damaged store before their first step; ``verify`` adds what only reading every chunk finds.
"""
from __future__ import annotations

import json
import math
from typing import NamedTuple

import numpy as np

from saeforge.stores import schema
from saeforge.stores.attrs import StoreAttrs
from saeforge.stores.errors import StoreDamaged
from saeforge.stores.files import read_json
from saeforge.stores.remote import remote_error

_REL_TOL = 1e-9
"""Tolerance of the statistics' identities: scale = sqrt(d / E||x||^2) is computed exactly so; the others are
inequalities that float64 sums satisfy to far better than this."""


class Problem(NamedTuple):
    text: str
    """One line: what is wrong, with the values."""
    array: str | None = None
    """The array whose metadata or files are wrong (verify does not read it), None for the attributes."""
    blocking: bool = False
    """The attributes cannot describe the arrays at all; nothing further is checked."""


def check_store(loc: schema.Location, attrs: StoreAttrs) -> list[Problem]:
    """Every problem the attributes, the arrays' metadata and the chunk file lists show; empty when none."""
    problems = check_attrs(attrs)
    if any(p.blocking for p in problems):
        return problems
    for name in [*attrs.hooks, *schema.META_ARRAYS]:
        found = check_array_meta(loc, attrs, name)
        problems += found or check_chunk_files(loc, attrs, name)
    return problems + check_stats(attrs)


def damaged(loc: schema.Location, problems: list[Problem]) -> StoreDamaged:
    """The one-line error for a store that fails the check (the first problem, and how many more)."""
    more = f" (+{len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return StoreDamaged(f"{loc.url} is damaged: {problems[0].text}{more}. Nothing was read from it; "
                        f"`saeforge store verify {loc.url}` lists every problem; re-harvest the store or restore "
                        "it from a copy")


# --- the attributes ------------------------------------------------------------------------------------
def _count(x) -> bool:
    return type(x) is int and x >= 1


def check_attrs(attrs: StoreAttrs) -> list[Problem]:
    out = []
    if not _count(attrs.n_rows):
        out.append(Problem(f"n_rows is {attrs.n_rows!r} in the attributes; it must be a positive whole number",
                           blocking=True))
    if attrs.dtype not in schema.DTYPES:
        out.append(Problem(f"dtype is {attrs.dtype!r} in the attributes; format version 1 stores "
                           f"{', '.join(schema.DTYPES)}", blocking=True))
    if not attrs.hooks:
        out.append(Problem("the attributes name no hook", blocking=True))
    for h, d in attrs.hooks.items():
        if not _count(d) or "/" in h or h in schema.META_ARRAYS:
            out.append(Problem(f"hook {h} has d={d!r} in the attributes; it must be a positive whole number",
                               blocking=True))
    layout = attrs.layout
    if not (_count(layout.chunk_rows) and _count(layout.shard_rows) and layout.shard_rows % layout.chunk_rows == 0):
        out.append(Problem(f"layout is chunk_rows={layout.chunk_rows!r}, shard_rows={layout.shard_rows!r}; "
                           "shards must be a whole number of chunks", blocking=True))
    if out:
        return out
    want = {k: np.dtype(v).name for k, v in schema.META_ARRAYS.items()}
    for name, dt in want.items():
        if attrs.meta_arrays.get(name) != dt:
            out.append(Problem(f"meta_arrays gives {name} the dtype {attrs.meta_arrays.get(name)!r}; format "
                               f"version 1 stores it as {dt}"))
    if attrs.complete.rows != attrs.n_rows:
        out.append(Problem(f"the completion record says {attrs.complete.rows!r} rows (complete.rows), but n_rows "
                           f"is {attrs.n_rows}"))
    return out


def check_stats(attrs: StoreAttrs) -> list[Problem]:
    """Statistics that are finite and consistent: scale = sqrt(d / E||x||^2), (E||x||)^2 <= E||x||^2 and
    ||E x|| <= E||x|| (Jensen)."""
    stats = attrs.stats or {}
    if sorted(stats) != sorted(attrs.hooks):
        return [Problem(f"the attributes give statistics for {sorted(stats)}, but the hooks are {sorted(attrs.hooks)}")]
    out = []
    for h, st in stats.items():
        text = _stats_problem(st, attrs.hooks[h])
        if text:
            out.append(Problem(f"statistics of {h}: {text}"))
    return out


def _stats_problem(st, d: int) -> str | None:
    mean, msq, mn, scale = np.asarray(st.mean), st.mean_sq_norm, st.mean_norm, st.scale
    if mean.shape != (d,):
        return f"mean has {mean.size} entries, d is {d}"
    bad = [f"{k}={v}" for k, v in (("mean_sq_norm", msq), ("mean_norm", mn), ("scale", scale)) if not math.isfinite(v)]
    bad += ["mean holds NaN or inf"] if not np.isfinite(mean).all() else []
    if bad:
        return f"{', '.join(bad)}: not finite"
    if msq < 0 or mn < 0 or scale <= 0:
        return f"mean_sq_norm={msq}, mean_norm={mn}, scale={scale}: a norm cannot be negative nor the scale <= 0"
    want = math.sqrt(d / msq) if msq > 0 else 1.0
    if not math.isclose(scale, want, rel_tol=_REL_TOL):
        return f"scale={scale} but sqrt(d / mean_sq_norm) = sqrt({d} / {msq}) = {want}"
    if mn * mn > msq * (1 + _REL_TOL):
        return f"mean_norm={mn} but mean_norm^2 = {mn * mn:.6g} exceeds mean_sq_norm={msq:.6g}, which is impossible"
    norm = float(np.linalg.norm(mean))
    if norm > mn * (1 + _REL_TOL) + 1e-300:
        return f"|mean| = {norm:.6g} exceeds mean_norm={mn:.6g}, which is impossible"
    return None


# --- the arrays' metadata ------------------------------------------------------------------------------
def expected_meta(attrs: StoreAttrs, name: str) -> dict:
    """The fields of ``<name>/zarr.json`` that format version 1 fixes, as the writer writes them."""
    n, shard = attrs.n_rows, attrs.layout.shard_rows
    tail = [attrs.hooks[name]] if name in attrs.hooks else []
    storage = schema.STORAGE_DTYPE[attrs.dtype] if name in attrs.hooks else schema.META_ARRAYS[name]
    return {"zarr_format": 3, "node_type": "array", "shape": [n, *tail], "data_type": np.dtype(storage).name,
            "fill_value": 0, "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard, *tail]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}}}


def check_array_meta(loc: schema.Location, attrs: StoreAttrs, name: str) -> list[Problem]:
    rel = f"{name}/zarr.json"
    try:
        meta = read_json(loc, loc.sub(name, "zarr.json"))
    except (ValueError, OSError) as e:  # not JSON (UnicodeDecodeError is a ValueError), or unreadable
        remote = None if loc.is_local else remote_error(loc, e)
        if remote is not None:  # a denied read or a lost endpoint is not damage to the store
            raise remote from None
        return [Problem(f"{rel} cannot be read as JSON ({type(e).__name__}: {e})", name)]
    if meta is None:
        return [Problem(f"array {name} has lost its metadata: {rel} is missing", name)]
    if not isinstance(meta, dict):
        return [Problem(f"{rel} holds {type(meta).__name__}, not a Zarr array's metadata", name)]
    out = []
    for key, want in expected_meta(attrs, name).items():
        got = meta.get(key)
        if got != want or type(got) is bool:
            out.append(Problem(f"{rel}: {key} is {json.dumps(got)}, expected {json.dumps(want)}"
                               f"{_why(attrs, name, key)}", name))
    codecs = _codec_problem(meta.get("codecs"), attrs, name)
    if codecs:
        out.append(Problem(f"{rel}: {codecs}", name))
    return out


def _why(attrs: StoreAttrs, name: str, key: str) -> str:
    if key == "shape":
        d = f", d {attrs.hooks[name]}" if name in attrs.hooks else ""
        return f" (from the attributes: n_rows {attrs.n_rows}{d})"
    if key == "data_type" and name in attrs.hooks:
        return f" (the attributes' dtype {attrs.dtype} is stored as {np.dtype(schema.STORAGE_DTYPE[attrs.dtype]).name})"
    if key == "fill_value":
        return " (format version 1 writes 0, and never reads a fill value)"
    return ""


def _codec_problem(codecs, attrs: StoreAttrs, name: str) -> str | None:
    """What differs from format version 1's codecs (``schema.codecs_for``, ``schema.meta_codecs``), or None."""
    try:
        if name not in attrs.hooks:
            got = [c["name"] for c in codecs]
            return None if got == ["bytes", "blosc", "crc32c"] else f"codecs {got}, expected bytes, blosc, crc32c"
        (shard,) = codecs
        cfg = shard["configuration"]
        inner, index = [c["name"] for c in cfg["codecs"]], [c["name"] for c in cfg["index_codecs"]]
        rows = cfg["chunk_shape"]
    except (TypeError, KeyError, ValueError):
        return f"codecs {json.dumps(codecs)[:120]} are not format version 1's"
    if shard.get("name") != "sharding_indexed" or inner != ["bytes", "blosc", "crc32c"] or index != [
            "bytes", "crc32c"] or cfg.get("index_location") != "end":
        return f"codecs {json.dumps(codecs)[:120]} are not format version 1's"
    want = [attrs.layout.chunk_rows, attrs.hooks[name]]
    if rows != want:
        return (f"chunks of shape {rows} inside the shards, but the attributes' layout gives chunk_rows "
                f"{attrs.layout.chunk_rows} (shape {want})")
    return None


# --- the chunk files -----------------------------------------------------------------------------------
def chunk_keys(attrs: StoreAttrs, name: str) -> list[str]:
    """The file of every chunk (meta arrays) or shard (hooks) of an array, relative to the store, in order."""
    n_files = -(-attrs.n_rows // attrs.layout.shard_rows)
    return [f"{name}/c/{i}/0" if name in attrs.hooks else f"{name}/c/{i}" for i in range(n_files)]


def check_chunk_files(loc: schema.Location, attrs: StoreAttrs, name: str) -> list[Problem]:
    """Every chunk file there, none beyond the rows (zarr would read a missing chunk as its fill value)."""
    want = chunk_keys(attrs, name)
    prefix = loc.sub(name, "c")
    try:
        found = {p[len(loc.root.rstrip("/")) + 1 :] for p in loc.fs.find(prefix)}
    except FileNotFoundError:
        found = set()
    depth = 2 if name in attrs.hooks else 1
    chunkish = {k for k in found if len(parts := k.split("/")[2:]) == depth and all(x.isdigit() for x in parts)}
    missing = [k for k in want if k not in found]
    extra = sorted(chunkish - set(want))
    out = []
    if missing:
        first = _rows_of(attrs, missing[0])
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{' ...' if len(missing) > 4 else ''})" \
            if len(missing) > 1 else ""
        out.append(Problem(f"{name}: chunk file {missing[0]} (rows {first}) is missing{more}", name))
    if extra:
        out.append(Problem(f"{name}: chunk file {extra[0]} lies beyond the {attrs.n_rows} rows the attributes "
                           f"give{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}", name))
    return out


def _rows_of(attrs: StoreAttrs, key: str) -> str:
    i = int(key.split("/")[2])
    lo = i * attrs.layout.shard_rows
    return f"{lo}:{min(lo + attrs.layout.shard_rows, attrs.n_rows)}"
