"""Where a command writes: checked before any work, so that bad output paths cost nothing and leave nothing.

:func:`check_output_dir` takes what a user typed for an output directory (``--out``, ``--cache-dir``, demo's
``OUT``) and fails with one :class:`~saeforge.pipeline.errors.OutputError` line when it is empty, a URL where
only local paths work, a file, under a file, or in a directory this process cannot write. It creates nothing:
writability is probed with an anonymous temporary file (``tempfile.TemporaryFile``: on Linux it has no name,
so not even a kill leaves it behind) in the directory itself, or in its nearest existing parent.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from saeforge.pipeline.errors import OutputError


def is_url(path: str) -> bool:
    """Whether ``path`` names an fsspec URL (``memory://x``, ``s3://bucket/x``) rather than a local path."""
    return "://" in str(path)


def check_output_dir(path: str | Path, what: str, *, urls: bool = False) -> None:
    """OutputError naming ``what`` (the option, e.g. ``--out``) unless ``path`` is a local directory this process
    can write into, or can be created as one. ``urls``: accept an fsspec URL as it is (stores; unchecked)."""
    text = str(path)
    if not text.strip():
        raise OutputError(f"{what} is empty: give a directory")
    if is_url(text):
        if urls:
            return
        raise OutputError(f"{what} {text}: a URL, but only a local directory works here")
    target = Path(text).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what} {text} exists and is not a directory")
    parent = target
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {text} cannot be created: {parent} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OutputError(f"{what} {text} is not writable ({parent}: {e.strerror or e})") from None
