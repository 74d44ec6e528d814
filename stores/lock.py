"""The writer lock: one file in the store's state folder, naming the process that holds it.

Only one writer may stage rows into a store at a time. On a local disk the lock is never seen half-written:
its content goes to a temporary file first, which is then hard-linked to the lock's name (``os.link`` fails
when the lock exists, so creation is exclusive and all-or-nothing); on object stores it is best effort (fsspec
has no atomic create-if-absent). The lock holds ``{"pid", "host", "since", "pid_start", "boot_id"}``:
``pid_start`` is the process's start time (``/proc/<pid>/stat`` field 22, clock ticks since boot) and
``boot_id`` the kernel's boot id, so a pid reused by another process, or a lock from before a reboot, is seen
to be stale. A lock is broken only when it names a process on this host that is gone (or a zombie, or another
process under the same pid), or this very process without a live writer holding it: never a lock from another
host. A lock file that is not a lock (empty, not JSON, no pid) is refused with how to clear it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from saeforge.stores.errors import StoreLocked
from saeforge.stores.files import _tmp_name
from saeforge.stores.schema import Location

_HELD_LOCKS: set[str] = set()
"""Locks held by writers in this process (a lock naming our pid but absent here is stale)."""
_ATTEMPTS = 3
"""Tries to take a lock that keeps being broken and re-created by others before giving up."""
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}
"""What ``os.link`` raises on filesystems without hard links (then the lock is created with O_EXCL)."""


def acquire_lock(loc: Location, path: str) -> None:
    """Take the writer lock, breaking it only when it names a dead process on this host."""
    data = json.dumps(_me()).encode()
    for _ in range(_ATTEMPTS):
        if _create_exclusive(loc, path, data):
            _HELD_LOCKS.add(path)
            return
        seen = _read(loc, path)
        if seen is None:  # released between our attempt and the read: try again
            continue
        holder = _parse(loc, path, seen)
        if not _is_stale(holder, path):
            raise StoreLocked(
                f"{loc.url} is being written by pid {holder['pid']} on {holder['host']} "
                f"(lock {path}); wait for it, or delete the lock if that process is gone"
            )
        _break(loc, path, seen)
    raise StoreLocked(f"could not take the lock {path} of {loc.url}: other writers keep taking it; "
                      "make sure only one harvest writes to this path, then rerun")


def release_lock(loc: Location, path: str) -> None:
    """Give the lock back (a lock already gone is fine)."""
    _HELD_LOCKS.discard(path)
    try:
        loc.fs.rm_file(path)
    except FileNotFoundError:
        pass


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22); None when the
    process does not exist, is a zombie, or the platform has no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()  # the name in (...) may hold spaces
    except OSError:
        return None
    if not fields or fields[0] in (b"Z", b"X"):  # a killed-but-unreaped child is a zombie: dead for us
        return None
    return int(fields[19])  # fields[0] is field 3 (state), so field 22 is fields[19]


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "pid_start": process_start(os.getpid()), "boot_id": _boot_id()}


def _create_exclusive(loc: Location, path: str, data: bytes) -> bool:
    if not loc.is_local:  # best effort on object stores (no atomic create-if-absent in fsspec)
        if loc.fs.exists(path):
            return False
        loc.fs.pipe_file(path, data)
        return True
    tmp = _tmp_name(Path(path))
    try:
        with open(tmp, "wb") as f:  # fully written and on disk before it gets the lock's name
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
        return _create_with_o_excl(path, data)
    finally:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass


def _create_with_o_excl(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _read(loc: Location, path: str) -> bytes | None:
    try:
        return loc.fs.cat_file(path)
    except FileNotFoundError:
        return None


def _parse(loc: Location, path: str, raw: bytes) -> dict:
    """The lock's holder, or StoreLocked saying that the file is not a valid lock and how to clear it."""
    try:
        holder = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        holder = None
    valid = (isinstance(holder, dict) and type(holder.get("pid")) is int and holder["pid"] > 0
             and isinstance(holder.get("host"), str)
             and (holder.get("pid_start") is None or type(holder["pid_start"]) is int))
    if valid:
        return holder
    what = "is empty" if not raw else f"holds {raw[:60]!r}" + (" ..." if len(raw) > 60 else "")
    raise StoreLocked(f"the lock file {path} of {loc.url} is not a valid writer lock (it {what}; a lock is a "
                      'JSON object with an integer "pid" and a "host"); if no harvest is writing to this store, '
                      "delete that file and rerun the same command to resume")


def _is_stale(holder: dict, path: str) -> bool:
    if holder["host"] != socket.gethostname():
        return False
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return True  # written before this machine rebooted: its process is gone
    pid, recorded = holder["pid"], holder.get("pid_start")
    if pid == os.getpid() and recorded in (None, process_start(pid)):
        return path not in _HELD_LOCKS
    if not pid_alive(pid):
        return True
    start = process_start(pid)
    return recorded is not None and start is not None and start != recorded  # the pid now names another process


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if os.path.exists(f"/proc/{pid}/stat"):
        return process_start(pid) is not None  # None: a zombie
    return True


def _break(loc: Location, path: str, seen: bytes) -> None:
    """Remove the stale lock whose bytes were ``seen``, and nothing else: on a local disk it is first renamed
    aside, and put back if it turns out to be a lock another writer took meanwhile."""
    if not loc.is_local:
        try:
            loc.fs.rm_file(path)
        except FileNotFoundError:
            pass
        return
    aside = _tmp_name(Path(path).with_name(Path(path).name + "-stale"))
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    with open(aside, "rb") as f:
        taken = f.read() != seen
    if taken:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    os.remove(aside)
