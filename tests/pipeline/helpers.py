"""Helpers the bad-input tests share: a directory this process cannot write into, and the one-line check."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def read_only_dir(tmp_path: Path):
    """A directory this process cannot create anything in: a chmod 555 folder, or /proc when running as root
    (root writes through permission bits; /proc refuses new entries to everyone)."""
    if os.geteuid() != 0:
        d = tmp_path / "read_only"
        d.mkdir()
        d.chmod(0o555)
        try:
            yield d
        finally:
            d.chmod(0o755)
    elif Path("/proc/self").is_dir():
        yield Path("/proc")
    else:
        pytest.skip("running as root without /proc: no directory is read-only here")


def one_error_line(result, *needles: str) -> str:
    """Assert a CliRunner result is a refusal: exit 1 through click (no exception escaped, so no traceback),
    nothing on stdout, and one `Error:` line on stderr holding every needle. Returns that line."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert result.stdout == "" and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


WORDS = ("to be or not that is the question whether tis nobler in the mind suffer slings and arrows of "
         "outrageous fortune take arms against a sea troubles by opposing end them die sleep").split()


def word_docs(directory: Path, n_docs: int, n_words: int, seed: int, words=WORDS) -> Path:
    """``directory/docs.jsonl``: ``n_docs`` documents of ``n_words`` random words each (seeded, so reruns match)."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    path = directory / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, n_words))}) for _ in range(n_docs)))
    return path


def text_docs(directory: Path, words: list[str], n_docs: int = 4, n_words: int = 300, seed: int = 0) -> Path:
    """``directory/doc{i}.txt``: ``n_docs`` plain-text documents of ``n_words`` random ``words`` (seeded)."""
    import random

    rng = random.Random(seed)
    for i in range(n_docs):
        (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(n_words)))
    return directory
