"""Trainer errors. Messages name the path and the values involved; the CLI turns them into one line."""


class TrainerError(Exception):
    """Base class of saeforge.trainer's errors."""


class RunNotFound(TrainerError):
    """A directory is not (or not a complete) SAE run directory."""


class RunExists(TrainerError):
    """The output directory already holds a run that this command would overwrite."""


class ResumeMismatch(TrainerError):
    """--resume was asked for, but the saved run differs from the requested one (config, d_in, checkpoints)."""
