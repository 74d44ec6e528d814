"""The pipeline's errors. Messages name the path, hook, model or budget involved and what to change.

Everything ``saeforge.pipeline`` raises on purpose derives from :class:`PipelineError`, one subclass per kind
of bad input. A command line catches ``(StoreError, TrainerError, PipelineError)`` and prints the message's
first line; anything else is a bug and keeps its traceback. Store errors met while reading or writing a store
stay ``saeforge.stores.errors.StoreError``s, run-directory errors ``saeforge.trainer.errors.TrainerError``s.

Only :class:`ConfigError` is also a ``ValueError``: it is what a config dataclass's ``__post_init__`` raises
(the convention of ``trainer/config.py``), and callers that validate settings catch ``ValueError``.
"""
from __future__ import annotations


class PipelineError(Exception):
    """Base class of saeforge.pipeline's errors."""


class ConfigError(PipelineError, ValueError):
    """Settings that cannot work together (``HarvestConfig``, ``EvalConfig``, ``WindowRules``); the message
    names every bad field.

    ``problems`` holds the same as (field, what is wrong with it) pairs (field None for a problem of several),
    so a command line can name its option, or a config file its key, where the message names the field.
    """

    def __init__(self, message: str, problems: tuple[tuple[str | None, str], ...] = ()):
        super().__init__(message)
        self.problems = tuple(problems)

    @classmethod
    def of(cls, problems: list[tuple[str | None, str]]) -> "ConfigError":
        """One error for every (field, problem) pair, its message "field problem; field problem; ..."."""
        return cls("; ".join(text if field is None else f"{field} {text}" for field, text in problems), problems)


class DatasetError(PipelineError):
    """A text source that cannot be read, is empty, or is too short for the request."""


class ModelLoadError(PipelineError):
    """The model spec names nothing loadable (unknown name, missing file, missing distribution)."""


class HookError(PipelineError):
    """A requested hook does not exist on the model (the message lists the closest valid names)."""


class HarvestError(PipelineError):
    """A harvest that cannot run as asked: output not writable, context too long, another harvest's store."""


class OutputError(PipelineError):
    """An output location that cannot be written: empty, a URL where only local paths work, a file, under a
    file, or read-only (``saeforge.pipeline.paths``)."""


class EvalError(PipelineError):
    """Evaluation cannot proceed: the message names the run, hook, model or budget and what to do."""


class ProvenanceError(PipelineError):
    """A store or run records no (or an unreadable) provenance, so its text cannot be regenerated."""


def domain_errors() -> tuple[type[Exception], ...]:
    """What a command line reports as one ``Error:`` line: every error saeforge raises on purpose.

    Imported on call, so a CLI module that only builds ``--help`` does not import the store machinery.
    """
    from saeforge.stores.errors import StoreError
    from saeforge.trainer.errors import TrainerError

    return (StoreError, TrainerError, PipelineError)
