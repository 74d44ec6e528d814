"""Run records: what a stage measured about a complete store (harvest: tokens, bytes per hook, wall time).

They are kept inside the store as the attributes of a small Zarr group, ``<store>/records/zarr.json``, one key
per record: plain zarr lists a group without a warning (it warns about any other file in the store's folder,
such as a ``harvest.json`` beside the arrays), and the store's own ``zarr.json`` (its attributes, its
identity, the completion record) is never rewritten after the writer finishes. A record is JSON (no NaN).

    write_run_record("acts/l10", "harvest", {"rows": 1000000, "wall_s": 812.5})
    read_run_record("acts/l10", "harvest")                       # -> the dict, or None

Stores from before run records were kept here have ``<name>.json`` beside the arrays; ``read_run_record``
reads those too.
"""
from __future__ import annotations

import json
import re

from saeforge.stores import schema
from saeforge.stores.errors import InvalidInput
from saeforge.stores.files import read_json, write_json_atomic

RECORDS = "records"
"""The group that holds the run records (a name no hook may take)."""
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def write_run_record(store, name: str, obj) -> None:
    """Keep ``obj`` (JSON, no NaN) as the run record ``name`` of a complete store, replacing an older one.

    ``store``: a ``Store``, or the path or URL of a complete store (StoreNotFound / StoreIncomplete otherwise).
    """
    loc = _complete_store(store)
    _check_name(name)
    try:
        text = json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"run record {name!r} for {loc.url} must be JSON without NaN or inf: {e}") from None
    path = loc.sub(RECORDS, "zarr.json")
    meta = read_json(loc, path)
    if not (isinstance(meta, dict) and isinstance(meta.get("attributes"), dict)):
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {}}
    meta["attributes"][name] = json.loads(text)
    loc.fs.makedirs(loc.sub(RECORDS), exist_ok=True)
    write_json_atomic(loc, path, meta)


def read_run_record(store, name: str):
    """The run record ``name`` of a complete store, or None when it has none (also looks for the
    ``<name>.json`` that earlier versions kept beside the arrays)."""
    loc = _complete_store(store)
    _check_name(name)
    try:
        meta = read_json(loc, loc.sub(RECORDS, "zarr.json"))
        if isinstance(meta, dict) and name in (meta.get("attributes") or {}):
            return meta["attributes"][name]
        return read_json(loc, loc.sub(f"{name}.json"))
    except ValueError as e:  # not JSON: say which store and record
        raise InvalidInput(f"run record {name!r} of {loc.url} cannot be read as JSON ({e})") from None


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"a run record's name is letters, digits, '_', '.' or '-', got {name!r}")


def _complete_store(store) -> schema.Location:
    from saeforge.stores.reader import Store, read_attrs

    if isinstance(store, Store):
        return store.loc
    loc, _ = read_attrs(store)
    return loc
