"""Where a command writes: checked before any work, so that bad output paths cost nothing and leave nothing.

:func:`check_output_dir` takes what a user typed for an output directory (``--out``, ``--cache-dir``, demo's
``OUT``) and fails with one :class:`~saeforge.pipeline.errors.OutputError` line when it is empty, a URL where
only local paths work, a file, under a file, or in a directory this process cannot write. It creates nothing
(the checks are ``saeforge.stores.files.local_dir_problem``, shared with the trainer's run directories). A store
may live at an fsspec URL: there the check asks the filesystem whether its bucket exists and the credentials are
accepted (``saeforge.stores.remote.check_remote``), writing nothing either.
"""
from __future__ import annotations

from pathlib import Path

from saeforge.pipeline.errors import OutputError
from saeforge.stores.files import is_url, local_dir_problem

__all__ = ["check_output_dir", "is_url"]


def check_output_dir(path: str | Path, what: str, *, urls: bool = False, holds: str = "this output is",
                     storage_options: dict | None = None) -> None:
    """OutputError naming ``what`` (the option, e.g. ``--out``) unless ``path`` is a local directory this process
    can write into, or can be created as one; ``holds`` says what is written there ("the demo folder is").

    ``urls``: a store, which may be an fsspec URL; one is opened with ``storage_options`` and refused with a
    StoreError when its bucket is missing, its endpoint out of reach or its credentials refused."""
    if urls and is_url(str(path)):
        from saeforge.stores.remote import check_remote

        check_remote(str(path), storage_options, writing=True)
        return
    problem = local_dir_problem(str(path), what, holds)
    if problem:
        raise OutputError(problem)
