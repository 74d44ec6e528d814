"""One progress bar for every stage: tqdm on stderr (results go to stdout), or a silent bar.

Callers never test whether progress is on: a disabled bar takes ``update``/``close``/``with`` like an
enabled one and prints nothing.

    with progress_bar(n_rows, desc="shuffle+write", unit="row", enabled=progress) as bar:
        for block in blocks:
            ...
            bar.update(len(block))
"""
from __future__ import annotations

import sys


def progress_bar(total: int | None, *, desc: str, unit: str, enabled: bool, initial: int = 0,
                 unit_scale: bool = False, smoothing: float = 0.3, dynamic_ncols: bool = False):
    """A tqdm bar on stderr counting ``unit`` up to ``total`` from ``initial`` (work done by an earlier run).

    ``unit_scale``: print 1.2M instead of 1200000. ``smoothing``: 0 averages over the whole run, 1 shows the
    latest rate (tqdm's default 0.3). ``dynamic_ncols``: follow the terminal's width. Not ``enabled``: a
    bar that prints nothing.
    """
    from tqdm import tqdm  # here, so that importing saeforge.stores does not import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, smoothing=smoothing,
                dynamic_ncols=dynamic_ncols, file=sys.stderr, disable=not enabled)
