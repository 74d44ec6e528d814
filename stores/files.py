"""Small files, written so that a crash never leaves a half-written one: one helper of each kind.

Local files (run directories, caches): :func:`write_atomic` for bytes or text, :func:`atomic_path` for
libraries that write a path themselves (``torch.save``, ``safetensors``). Files of a store, local or on any
fsspec filesystem: :func:`write_json_atomic` (the writer's commit points), :func:`write_bytes_durable`,
:func:`read_json`. And one way to hash: :func:`sha256_file`, :func:`sha256_bytes`.

Where outputs may go: :func:`is_url` is the one place that tells a local path from an fsspec URL; stores may live
at URLs, everything else a command writes (run directories, eval caches, plots, the demo folder) is local, and
:func:`local_dir_problem` / :func:`writable_problem` say, in one line and before anything is made, why a path
cannot be such a local output directory. :func:`expand_path` is what every entry point (command line, config
file) does to a path it is given: ``~`` expanded, URLs untouched.

Atomic here means: written to a temporary file in the same directory, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows), so readers see the old file or the new one, never a mix. The file
gets the mode a plain ``open`` would give it (``0o666 & ~umask``), whatever the library that wrote the temporary
file chose (safetensors writes 0600).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from saeforge.stores.schema import Location

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*::)*[A-Za-z][A-Za-z0-9+.-]*://")
"""An fsspec URL: a protocol and ``://``, possibly after chained ones (``simplecache::s3://bucket/x``)."""
_HASH_BLOCK = 1 << 20
"""Bytes read at a time by sha256_file (bounded memory for multi-GB weight files)."""


def _tmp_name(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique per process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


_TMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.\d+\.tmp|(?P<old>.+)\.(?P<old_pid>\d+)\.tmp")
"""``_tmp_name``'s pattern, and ``<name>.<pid>.tmp``, the temporary name of earlier saeforge versions."""


def temp_file_pid(name: str) -> int | None:
    """The pid of the process that wrote ``name`` when it is the temporary file of an atomic write (a kill
    between writing it and renaming it leaves one behind); None for any other name."""
    m = _TMP_NAME.fullmatch(name)
    return None if m is None else int(m["pid"] or m["old_pid"])


def _fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (not every filesystem allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it.

        with atomic_path(run_dir / "checkpoint.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def current_umask() -> int:
    """This process's umask, read without changing it (``/proc/self/status`` on Linux; elsewhere set and restored
    under a lock, the only way POSIX offers)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def _write_local(path: str | os.PathLike, data: bytes, *, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, data: bytes | str, *, durable: bool = False) -> None:
    """Replace the local file ``path`` with ``data`` (text is written as UTF-8) all at once.

    ``durable``: also fsync the file and its directory, so the new content survives a power loss.
    """
    data = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        _write_local(tmp, data, fsync=durable)
    if durable:
        _fsync_dir(Path(path).parent)


def write_bytes_durable(loc: Location, path: str, data: bytes) -> None:
    """Write a file; on local disks fsync it. Not atomic: callers commit through ``write_json_atomic``."""
    if loc.is_local:
        _write_local(path, data, fsync=True)
    else:
        loc.fs.pipe_file(path, data)


def write_json_atomic(loc: Location, path: str, obj) -> None:
    """Replace ``path`` with ``obj`` as JSON all at once (tmp + fsync + rename locally; one PUT elsewhere).

    The encoding (``indent=1``, no NaN) is part of the store format: zarr.json is written through here.
    """
    data = json.dumps(obj, indent=1, allow_nan=False).encode()
    if loc.is_local:
        write_atomic(path, data, durable=True)
    else:
        loc.fs.pipe_file(path, data)


def read_json(loc: Location, path: str):
    """The JSON document at ``path``, or None when there is no such file."""
    try:
        with loc.fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ paths, and local output directories


def expand_path(path: str | os.PathLike | None) -> str | None:
    """A path as the user meant it: ``~`` and ``~user`` expanded; an fsspec URL (and None) returned unchanged.
    Every command applies it to every path it takes (arguments, options, config file keys), so ``'~/acts'``
    quoted, or written in a TOML file, never names a folder called ``~``."""
    if path is None:
        return None
    text = os.fspath(path)
    return text if is_url(text) else os.path.expanduser(text)


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an fsspec URL (``memory://x``, ``s3://bucket/x``) rather than a local path;
    ``file://`` URLs are local paths."""
    text = os.fspath(path)
    return bool(_URL.match(text)) and not text.startswith("file://")


def local_dir_problem(path: str | os.PathLike, what: str, holds: str = "this output is", *,
                      writable: bool = True) -> str | None:
    """Why ``path`` cannot be a local output directory, in one line naming ``what`` (the option, e.g.
    ``--out``) and ``holds`` (what is written there: "run directories are"); None when it can be. Refused: an
    empty string (never the current directory), a URL, a file, a path under a file, and with ``writable`` a
    directory this process cannot create anything in. Nothing is created."""
    text = os.fspath(path)
    if not text.strip():
        return f"{what} is empty: give a directory"
    if is_url(text):
        return (f"{what} {text}: a URL, but only a local directory works here: {holds} written to a local path; "
                "stores may live at URLs (--store)")
    target = Path(text).expanduser().absolute()
    if target.exists() and not target.is_dir():
        return f"{what} {text} exists and is not a directory: {text} is a file; choose another output"
    parent = _nearest_existing(target)
    if not parent.is_dir():
        return f"{what} {text} cannot be created: {parent} is a file, not a directory; choose another output"
    return writable_problem(target, f"{what} {text}") if writable else None


def writable_problem(path: str | os.PathLike, name: str | None = None) -> str | None:
    """Why this process cannot write into the local directory ``path`` (or create it, when it does not exist),
    in one line starting with ``name`` (default: the path); None when it can. Asked of the directory or its nearest
    existing parent: its permission bits (``os.access``), then an anonymous temporary file created in it
    (``tempfile.TemporaryFile``: on Linux it has no name, so not even a kill leaves it behind), which also catches
    what the bits do not say (root on a read-only mount, /proc)."""
    target = Path(path).expanduser().absolute()
    parent = _nearest_existing(target)
    where = "is" if parent == target else f"cannot be created: {parent} is"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{name or path} {where} not writable (read-only, or owned by another user); choose another output"
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        return f"{name or path} {where} not writable ({e.strerror or e}); choose another output"
    return None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
