"""What a killed writer leaves behind in a store, and its removal.

A kill between writing a temporary file and renaming it (``files.write_json_atomic``, the lock) leaves that
temporary file (``.<name>.<pid>.<thread>.tmp``; ``<name>.<pid>.tmp`` from earlier versions); a kill after the
completion record but before the writer's last clean-up leaves the state folder ``.saeforge/`` (lock,
progress.json). They are the writer's own: they never make a path foreign to the writer, and a complete store
keeps none of them (plain zarr warns about every name in the group's folder that is not an array or group).
"""
from __future__ import annotations

from saeforge.stores import schema
from saeforge.stores.files import temp_file_pid
from saeforge.stores.lock import pid_alive
from saeforge.stores.records import RECORDS
from saeforge.stores.schema import Location


def names(loc: Location, directory: str) -> list[str]:
    """The entries of a directory, by name (nothing when it does not exist)."""
    try:
        return [n.rstrip("/").rsplit("/", 1)[-1] for n in loc.fs.ls(directory, detail=False)]
    except FileNotFoundError:
        return []


def foreign_names(loc: Location) -> list[str]:
    """Entries of the store's folder that the writer did not make: neither its state folder nor a temporary
    file of one of its atomic writes."""
    return sorted(n for n in names(loc, loc.root) if n != schema.STATE_DIR and temp_file_pid(n) is None)


def remove_temps(loc: Location, directory: str, *, only_dead: bool) -> None:
    """Remove the temporary files of interrupted atomic writes in ``directory`` (not recursive).

    ``only_dead``: keep those whose writer (the pid in the name) is alive on this host; use it where another
    process may be writing one right now (a second writer creating its lock file in the state folder).
    """
    for name in names(loc, directory):
        pid = temp_file_pid(name)
        if pid is None or (only_dead and pid_alive(pid)):
            continue
        try:
            loc.fs.rm_file(f"{directory.rstrip('/')}/{name}")
        except (FileNotFoundError, IsADirectoryError):
            pass


def tidy_complete(loc: Location) -> None:
    """Remove what a writer killed after the completion record left behind: its state folder, and temporary
    files of dead processes in the store's folder and its run records. Best effort (a read-only store is read
    as it is).

    Safe while others read or write: once the completion record is there, no writer writes into the store's
    folder or its state folder again (a writer refuses a complete store before taking the lock), and a run
    record being written by a live process keeps its temporary file.
    """
    try:
        loc.fs.rm(loc.sub(schema.STATE_DIR), recursive=True)
    except OSError:  # none there (FileNotFoundError), or a store we may not write
        pass
    for directory in (loc.root, loc.sub(RECORDS)):
        try:
            remove_temps(loc, directory, only_dead=True)
        except OSError:
            pass

