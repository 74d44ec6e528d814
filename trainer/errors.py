"""Trainer errors. Messages name the path and the values involved; the CLI turns them into one line.

Everything `saeforge.trainer` raises on purpose derives from `TrainerError` (store errors raised while reading
a store stay `saeforge.stores.errors.StoreError`s).
"""


class TrainerError(Exception):
    """Base class of saeforge.trainer's errors."""


class ConfigError(TrainerError, ValueError):
    """A setting the trainer cannot use (sweep grid, run names, batch layout). Also a ValueError, so callers that
    catch ValueError for bad input keep working."""


class RunNotFound(TrainerError):
    """A directory is not (or not a complete) SAE run directory."""


class RunExists(TrainerError):
    """The output directory already holds a run that this command would overwrite."""


class ResumeMismatch(TrainerError):
    """--resume was asked for, but the saved run differs from the requested one (config, d_in, checkpoints)."""


class RunCorrupt(TrainerError):
    """A file of a run directory cannot be read (invalid JSON, an unreadable checkpoint); the message names it."""


class NonFinite(TrainerError):
    """A batch, a loss or the weights became NaN or infinite: training stopped, and nothing from that step on was
    saved (the run directory keeps its last good checkpoint and weights)."""
