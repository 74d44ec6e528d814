"""What the pipeline's commands share: one ``Error:`` line per failure, naming what the user typed.

Only click is imported here (``--help`` stays instant).
"""
from __future__ import annotations

import click


def one_line(exc: BaseException) -> click.ClickException:
    """The ``Error:`` line of a domain error: its message's first line (its class name when it has none)."""
    text = str(exc).strip()
    return click.ClickException(text.splitlines()[0] if text else type(exc).__name__)


def config_failure(exc: BaseException, *, table: str, flags: dict, file, renamed: dict | None = None
                   ) -> click.ClickException:
    """The ``Error:`` line of a config dataclass's error: each bad field named as the user gave it, as its option
    (``--seed``) when it came from a flag, as ``FILE: table.key`` when from the --config file. ``renamed``: fields
    set by an option of another name (``writer_memory_bytes`` from ``--writer-memory-mb``)."""
    problems = getattr(exc, "problems", ())
    if not problems:
        return one_line(exc)
    renamed, from_file = renamed or {}, file.get(table)

    def name(field: str) -> str:
        if field in renamed:
            return renamed[field]
        if field in flags:
            return "--" + field.replace("_", "-")
        return f"{file.path}: {table}.{field}" if field in from_file else field

    return click.ClickException("; ".join(text if field is None else f"{name(field)} {text}"
                                          for field, text in problems))


def stage_config(cls, table: str, config_file: str | None, flags: dict):
    """(the checked --config file, `cls` built from its [table] and the flags given), or the ``Error:`` line."""
    from saeforge.pipeline.errors import ConfigError
    from saeforge.trainer.options import build_config, given

    file = read_config_or_fail(config_file)
    flags = given(flags, table)
    try:
        return file, build_config(cls, file.get(table), flags)
    except ConfigError as e:
        raise config_failure(e, table=table, flags=flags, file=file) from None


def read_config_or_fail(path: str | None):
    """The checked --config file (`trainer/options.py: read_config`), or its ``Error:`` line."""
    from saeforge.trainer.errors import TrainerError
    from saeforge.trainer.options import read_config

    try:
        return read_config(path)
    except TrainerError as e:
        raise one_line(e) from None
