"""One progress bar for every stage: tqdm on stderr (results go to stdout), or a silent bar; and :func:`quiet`,
what every command's ``--quiet`` does.

Callers never test whether progress is on: a disabled bar takes ``update``/``close``/``with`` like an
enabled one and prints nothing.

    with progress_bar(n_rows, desc="shuffle+write", unit="row", enabled=progress) as bar:
        for block in blocks:
            ...
            bar.update(len(block))
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

QUICK_DELAY_S = 1.0
"""A ``quick`` bar (work that often ends sooner: verify a small store, tokenise a short text) shows after this long."""
_QUIET = [0]
"""How many :func:`quiet` blocks are open (bars drawn in background threads read it too)."""

QUIET_ENV = {
    "WANDB_SILENT": "true",  # wandb's console lines (trainer/loggers.py), read when a run starts
    "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error", "HF_HUB_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # tqdm bars other libraries draw themselves, when tqdm is first imported in the block
}
"""Environment variables that silence libraries a command may import while quiet (each reads its own)."""

_LIBRARIES = {  # module -> its logging module, and its bars' switches: off, on, "are they on?"
    "transformers": ("utils.logging", "utils.logging.disable_progress_bar", "utils.logging.enable_progress_bar",
                     "utils.logging.is_progress_bar_enabled"),
    "datasets": ("utils.logging", "disable_progress_bars", "enable_progress_bars", "is_progress_bar_enabled"),
    "huggingface_hub": ("utils.logging", "utils.disable_progress_bars", "utils.enable_progress_bars", None),
}
"""Hugging Face libraries already imported when a quiet block starts: their log level and progress bars are set
through their own API (looked up in ``sys.modules``, never imported here) and restored when it ends."""


def progress_bar(total: int | None = None, *, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 unit_scale: bool = False, smoothing: float = 0.3, dynamic_ncols: bool = False, quick: bool = False,
                 leave: bool = True, iterable: Iterable | None = None):
    """A tqdm bar on stderr counting ``unit`` up to ``total`` from ``initial`` (work done by an earlier run).

    ``unit_scale``: print 1.2M instead of 1200000. ``smoothing``: 0 averages over the whole run, 1 shows the
    latest rate (tqdm's default 0.3). ``dynamic_ncols``: follow the terminal's width. ``quick``: the bar first
    shows after ``QUICK_DELAY_S`` (work that ends sooner prints nothing). ``leave``: keep the finished bar on screen.
    ``iterable``: iterate the bar to go through it (``total`` defaults to its length). Not ``enabled``, or inside
    :func:`quiet`: a bar that prints nothing.
    """
    from tqdm import tqdm  # here, so that importing saeforge.stores does not import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                smoothing=smoothing, dynamic_ncols=dynamic_ncols, file=sys.stderr, leave=leave,
                delay=QUICK_DELAY_S if quick else 0.0, disable=not enabled or is_quiet())


def is_quiet() -> bool:
    """Whether a :func:`quiet` block is open: every bar is silent."""
    return _QUIET[0] > 0


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence, for the block, every progress bar (:func:`progress_bar`) and the console output of the libraries
    a command uses: the log lines and bars of transformers, datasets and huggingface_hub, wandb's lines (``QUIET_ENV``,
    ``_LIBRARIES``). Errors still reach stderr. Everything is restored when the block ends; a library first
    imported inside it stays as its environment variables set it. ``enabled`` False: does nothing."""
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    restore = [_silence(name) for name in _LIBRARIES if name in sys.modules]
    _QUIET[0] += 1
    try:
        yield
    finally:
        _QUIET[0] -= 1
        for undo in restore:
            undo()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _silence(name: str):
    """Set an imported library's log level to errors and switch its bars off; returns what undoes it."""
    module = sys.modules[name]
    log, off, on, is_on = (None if path is None else _lookup(module, path) for path in _LIBRARIES[name])
    level = log.get_verbosity()
    was_on = is_on() if is_on else not module.utils.are_progress_bars_disabled()
    log.set_verbosity_error()
    off()

    def undo():
        log.set_verbosity(level)
        if was_on:
            on()
    return undo


def _lookup(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
