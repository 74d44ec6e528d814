"""A catalogue of damage done to a complete store on disk, one function each: what an adversarial run did.

Every function takes the store's path (a small bfloat16 store of ``N`` rows, one hook ``HOOK`` of width ``D``,
chunks of 64 rows, shards of 128, written by ``helpers.write_store``) and damages it in place. ``DAMAGE`` maps
a case name to (function, words the one-line report must contain).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HOOK = "blocks.3.hook_resid_post"
N, D = 1200, 16


def make_store(path) -> Path:
    from .helpers import write_store

    write_store(str(path), n=N, hooks={HOOK: D}, dtype="bfloat16")
    return Path(path)


def edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=1))  # NaN is written as the literal NaN, as an editor would


def edit_attrs(edit):
    return lambda p: edit_json(p / "zarr.json", lambda m: edit(m["attributes"]))


def edit_array_meta(name: str, edit):
    return lambda p: edit_json(p / name / "zarr.json", edit)


def edit_stats(key: str, change):
    return edit_attrs(lambda a: a["stats"][HOOK].update({key: change(a["stats"][HOOK][key])}))


def delete(rel: str):
    return lambda p: (p / rel).unlink()


def truncate(rel: str):
    def apply(p):
        data = (p / rel).read_bytes()
        (p / rel).write_bytes(data[: len(data) // 2])
    return apply


def inject_nan_rows(p: Path, rows=(5, 700)) -> None:
    """Rows overwritten with NaN through zarr itself (checksums stay valid)."""
    import zarr

    arr = zarr.open_group(str(p), mode="r+")[HOOK]
    for r in rows:
        arr[r] = np.full(D, 0x7FC0, np.uint16)  # bfloat16 NaN


def mark_chunk_missing(p: Path, shard: int = 1, chunk: int = 1) -> None:
    """Rewrite a shard's index so that one chunk reads as absent (zarr then returns fill values), crc32c valid."""
    import crc32c

    f = p / HOOK / "c" / str(shard) / "0"
    data = bytearray(f.read_bytes())
    per_shard = 2
    start = len(data) - (per_shard * 16 + 4)
    index = np.frombuffer(bytes(data[start:-4]), dtype="<u8").copy().reshape(per_shard, 2)
    index[chunk] = [2**64 - 1, 2**64 - 1]
    body = index.tobytes()
    data[start:-4] = body
    data[-4:] = crc32c.crc32c(body).to_bytes(4, "little")
    f.write_bytes(bytes(data))


DAMAGE = {  # name: (damage, words the report names)
    "hook shard file deleted": (delete(f"{HOOK}/c/2/0"), [HOOK, "c/2/0", "missing"]),
    "token_ids chunk file deleted": (delete("token_ids/c/3"), ["token_ids", "c/3", "missing"]),
    "pos last chunk file deleted": (delete("pos/c/9"), ["pos", "c/9", "missing"]),
    "n_rows -1": (edit_attrs(lambda a: a.update(n_rows=N - 1)), ["n_rows", str(N - 1), str(N)]),
    "n_rows +1": (edit_attrs(lambda a: a.update(n_rows=N + 1)), ["n_rows", str(N + 1), str(N)]),
    "n_rows halved": (edit_attrs(lambda a: a.update(n_rows=N // 2)), ["n_rows", str(N // 2), str(N)]),
    "n_rows not a number": (edit_attrs(lambda a: a.update(n_rows="many")), ["n_rows", "many"]),
    "hook array shape edited": (edit_array_meta(HOOK, lambda m: m.update(shape=[N - 200, D])),
                                [HOOK, "shape", str(N - 200)]),
    "token_ids array shape edited": (edit_array_meta("token_ids", lambda m: m.update(shape=[N + 128])),
                                     ["token_ids", "shape", str(N + 128)]),
    "completion format_version 2": (edit_attrs(lambda a: a["complete"].update(format_version=2)),
                                    ["format version", "2"]),
    "completion rows edited": (edit_attrs(lambda a: a["complete"].update(rows=N - 64)), ["complete", str(N - 64)]),
    "hook fill_value NaN": (edit_array_meta(HOOK, lambda m: m.update(fill_value=float("nan"))),
                            [HOOK, "fill_value"]),
    "token_ids fill_value 7": (edit_array_meta("token_ids", lambda m: m.update(fill_value=7)),
                               ["token_ids", "fill_value", "7"]),
    "stats scale NaN": (edit_stats("scale", lambda v: float("nan")), [HOOK, "scale", "nan"]),
    "stats scale 0": (edit_stats("scale", lambda v: 0.0), [HOOK, "scale"]),
    "stats scale x1000": (edit_stats("scale", lambda v: v * 1000), [HOOK, "scale"]),
    "stats mean_sq_norm x2": (edit_stats("mean_sq_norm", lambda v: v * 2), [HOOK, "mean_sq_norm"]),
    "stats mean_norm x10": (edit_stats("mean_norm", lambda v: v * 10), [HOOK, "mean_norm"]),
    "stats mean of the wrong length": (edit_stats("mean", lambda v: v[:-1]), [HOOK, "mean", str(D - 1)]),
    "hook zarr.json deleted": (delete(f"{HOOK}/zarr.json"), [HOOK, "zarr.json"]),
    "seq_idx zarr.json deleted": (delete("seq_idx/zarr.json"), ["seq_idx", "zarr.json"]),
    "hook zarr.json garbage": (lambda p: (p / HOOK / "zarr.json").write_text("{not json"), [HOOK, "zarr.json"]),
    "hook d edited in attributes": (edit_attrs(lambda a: a["hooks"].update({HOOK: D - 1})), [HOOK, str(D - 1)]),
    "hook d not a number": (edit_attrs(lambda a: a["hooks"].update({HOOK: "wide"})), [HOOK, "wide"]),
    "dtype edited in attributes": (edit_attrs(lambda a: a.update(dtype="float32")), [HOOK, "float32", "uint16"]),
    "dtype unknown in attributes": (edit_attrs(lambda a: a.update(dtype="int8")), ["dtype", "int8"]),
    "hook data_type edited": (edit_array_meta(HOOK, lambda m: m.update(data_type="int16")), [HOOK, "int16"]),
    "token_ids data_type edited": (edit_array_meta("token_ids", lambda m: m.update(data_type="float64")),
                                   ["token_ids", "float64"]),
    "meta_arrays dtype edited": (edit_attrs(lambda a: a["meta_arrays"].update(pos="int8")), ["pos", "int8"]),
    "chunk_rows edited": (edit_attrs(lambda a: a["layout"].update(chunk_rows=32)), ["chunk_rows", "32"]),
}
"""Damage that the cheap check on open catches (``open_store`` refuses; verify reports it)."""

DEEP_DAMAGE = {  # found only by reading every chunk (verify), or by the loader when it reaches them
    "chunk marked absent in a shard index": (mark_chunk_missing, [HOOK, "c/1/0", "missing"]),
    "seq_idx chunk truncated to half": (truncate("seq_idx/c/4"), ["seq_idx", "c/4"]),
    "hook shard truncated to half": (truncate(f"{HOOK}/c/3/0"), [HOOK, "c/3/0"]),
    "NaN rows injected through zarr": (inject_nan_rows, [HOOK, "NaN", "5", "700"]),
}
