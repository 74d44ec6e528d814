"""The writer lock: one file in the store's state folder, naming the process that holds it.

Only one writer may stage rows into a store at a time. The lock is created exclusively (``O_EXCL`` on a
local disk; best effort on object stores, which have no atomic create-if-absent in fsspec) and holds
``{"pid", "host", "since"}``. A lock is broken only when it names a process on this host that is gone (or
a zombie), or this very process without a live writer holding it: never a lock from another host.
"""
from __future__ import annotations

import json
import os
import socket
import time

from saeforge.stores.errors import StoreLocked
from saeforge.stores.files import read_json
from saeforge.stores.schema import Location

_HELD_LOCKS: set[str] = set()
"""Locks held by writers in this process (a lock naming our pid but absent here is stale)."""
_ATTEMPTS = 3
"""Tries to take a lock that keeps being broken and re-created by others before giving up."""


def acquire_lock(loc: Location, path: str) -> None:
    """Take the writer lock, breaking it only when it names a dead process on this host."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(_ATTEMPTS):
        if _create_exclusive(loc, path, json.dumps(me).encode()):
            _HELD_LOCKS.add(path)
            return
        holder = read_json(loc, path) or {}
        if not _is_stale(holder, path):
            raise StoreLocked(
                f"{loc.url} is being written by pid {holder.get('pid')} on {holder.get('host')} "
                f"(lock {path}); wait for it, or delete the lock if that process is gone"
            )
        loc.fs.rm_file(path)
    raise StoreLocked(f"could not take the lock {path} of {loc.url}")


def release_lock(loc: Location, path: str) -> None:
    """Give the lock back (a lock already gone is fine)."""
    _HELD_LOCKS.discard(path)
    try:
        loc.fs.rm_file(path)
    except FileNotFoundError:
        pass


def _create_exclusive(loc: Location, path: str, data: bytes) -> bool:
    if loc.is_local:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if loc.fs.exists(path):  # best effort on object stores (no atomic create-if-absent in fsspec)
        return False
    loc.fs.pipe_file(path, data)
    return True


def _is_stale(holder: dict, path: str) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return path not in _HELD_LOCKS
    return not _pid_alive(holder["pid"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if os.path.exists(f"/proc/{pid}/stat"):  # a killed-but-unreaped child is a zombie: dead for us
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    return True
