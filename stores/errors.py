"""The store's error hierarchy. Every message carries the store path and the values involved.

Everything ``saeforge.stores`` raises on purpose is a :class:`StoreError`; subclasses that also derive from a
builtin (``InvalidInput`` is a ``ValueError``, ``HookNotInStore`` a ``KeyError``) keep callers that catch the
builtin working.
"""
from __future__ import annotations


class StoreError(Exception):
    """Base class for everything that can go wrong with an activation store."""


class StoreNotFound(StoreError):
    """No store at the path (nothing there, or something that is not a saeforge store)."""


class SchemaMismatch(StoreError):
    """The store's format version or configuration differs from what the caller expects."""


class StoreIncomplete(StoreError):
    """The store's writer has not finished (crashed or still running); it can be resumed."""


class StoreDamaged(StoreError):
    """A complete store whose files disagree with what it says about itself: a missing or undecodable chunk,
    array metadata or attributes edited, statistics that cannot be right. Nothing is read from it."""


class ChecksumError(StoreDamaged):
    """A chunk's stored crc32c does not match its bytes: the data on disk is corrupt."""


class DiskFull(StoreError):
    """The filesystem ran out of space while the writer was writing; rerunning the same command resumes."""


class StoreLocked(StoreError):
    """Another live writer holds the store's lock."""


class InvalidInput(StoreError, ValueError):
    """Arguments or rows the writer or loader cannot accept (wrong hooks, shapes, dtypes, settings)."""


class HookNotInStore(StoreError, KeyError):
    """A requested hook point is not one of the store's arrays."""

    def __str__(self):  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""
