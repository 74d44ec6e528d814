"""kill -9 a writer at random points (staging, shuffling, finalising), with its second pass serial or in a pool of
threads or processes; resuming, with any number of workers, gives the store an uninterrupted serial run wrote,
file for file."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saeforge.stores import open_store, verify_store
from saeforge.stores.schema import STATE_DIR

SCRIPT = Path(__file__).with_name("crash_writer.py")
STORE_ENV = "SAEFORGE_CRASH_STORE"
"""crash_writer.STORE_ENV."""
KILLED_IN: list[str] = []
"""Writer phase found after each kill (staging / writing / complete), to check both passes got hit."""


def run_writer(path, kill_after=None, *pool):
    """Run the producer (``pool``: crash_writer's --workers/--executor options); ``kill_after`` seconds after it
    opened the writer, SIGKILL it. Returns (exit code, seconds from "started" to "staged", seconds from
    "started" to exit)."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(path), *pool], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    t0 = time.perf_counter()
    staged_s = None
    if kill_after is not None and line.startswith("started"):
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    elif line.startswith("started"):
        proc.stdout.readline()
        staged_s = time.perf_counter() - t0
    rc = proc.wait()
    proc.stdout.close()
    return rc, staged_s, time.perf_counter() - t0


def store_files(path: Path) -> dict:
    """Every file of the store (the writer's private state dir excluded) and its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and STATE_DIR not in p.relative_to(path).parts}


def _phase(path: Path) -> str:
    import json

    progress = path / STATE_DIR / "progress.json"
    return json.loads(progress.read_text())["phase"] if progress.exists() else "complete-or-not-started"


THREADS = ("--workers", "2", "--executor", "threads")
PROCESSES = ("--workers", "2", "--executor", "processes")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The store an uninterrupted serial writer makes (finalize_workers=1), and its timings."""
    path = tmp_path_factory.mktemp("crash") / "reference"
    rc, staged_s, total_s = run_writer(path)
    assert rc == 0
    return path, staged_s, total_s


@pytest.mark.parametrize("trial", range(4))
def test_kill9_at_random_points_then_resume_is_bit_identical(tmp_path, reference, trial):
    ref_path, staged_s, total_s = reference
    rng = random.Random(trial)
    # kill windows (seconds after the writer opened): during staging, early/late in the shuffle pass, anywhere
    lo, hi = [(0.0, staged_s), (staged_s, 0.6 * total_s), (0.5 * total_s, 1.1 * total_s), (0.0, 1.1 * total_s)][trial]
    pools = [(), THREADS, PROCESSES]  # killed with one second pass, resumed with the next
    path = tmp_path / "store"
    kills = 0
    for attempt in range(4):
        rc, *_ = run_writer(path, rng.uniform(lo, hi), *pools[(trial + attempt) % 3])
        kills += rc == -signal.SIGKILL
        if rc == -signal.SIGKILL:
            KILLED_IN.append(_phase(path))
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, f"writer failed on resume (exit {rc})"
    if rc != 0:  # finish without interruption
        assert run_writer(path)[0] == 0
    got, want = store_files(path), store_files(ref_path)
    assert sorted(got) == sorted(want)
    different = [k for k in want if got[k] != want[k]]
    assert not different, f"files differ after {kills} kills: {different[:5]}"
    assert verify_store(path).ok
    assert open_store(path).n_rows == 4000


def test_kills_hit_both_the_staging_and_the_writing_pass():
    if not KILLED_IN:
        pytest.skip("run together with the kill trials")
    assert {"staging", "writing"} <= set(KILLED_IN), KILLED_IN


def run_until(path, kill_at: str, *pool) -> int:
    """Run the producer armed to SIGKILL itself at ``kill_at`` (crash_writer.arm); its exit code (once it exits:
    a worker that outlived it, holding its stdout, is assert_no_worker_survives's to find)."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(path), kill_at, *pool], stdout=subprocess.DEVNULL)
    return proc.wait(timeout=120)


def progress(path: Path) -> dict:
    import json

    return json.loads((path / STATE_DIR / "progress.json").read_text())


def assert_same_store(path: Path, ref_path: Path) -> None:
    got, want = store_files(path), store_files(ref_path)
    assert sorted(got) == sorted(want)
    different = [k for k in want if got[k] != want[k]]
    assert not different, f"files differ: {different[:5]}"
    assert not (path / STATE_DIR).exists(), "a complete store keeps no writer state"
    assert verify_store(path).ok


def committed(path: Path) -> set[int]:
    """The shards with a commit record."""
    return {int(p.stem[1:]) for p in (path / STATE_DIR / "shards").glob("s*.json")}


def assert_no_worker_survives(path: Path) -> None:
    """No finalize worker of a killed writer lives on to write into its store (they die with the writer;
    crash_writer marks its processes with the store's path in their environment)."""
    mark = f"{STORE_ENV}={path}".encode()
    time.sleep(0.2)  # the kernel's own time to deliver the signal
    survivors = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in environ.read_bytes().split(b"\0"):
                survivors.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours
            pass
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == []


def rows_in(shards: set[int]) -> int:
    return sum(min(128, 4000 - 128 * k) for k in shards)  # 32 shards of 128 rows, the last one of 32


@pytest.mark.parametrize("first, second", [((), THREADS), (THREADS, PROCESSES), (PROCESSES, ())],
                         ids=["serial-then-threads", "threads-then-processes", "processes-then-serial"])
def test_killed_twice_while_finalizing_then_resumed_is_bit_identical(tmp_path, reference, first, second):
    path = tmp_path / "store"
    assert run_until(path, "shard:3", *first) == -signal.SIGKILL
    assert progress(path)["phase"] == "writing"
    done = committed(path)
    assert 2 <= len(done) < 32  # this run's first two shards (and a pool's others) committed; not its third
    assert_no_worker_survives(path)
    assert run_until(path, "shard:2", *second) == -signal.SIGKILL  # resumed in the write phase, killed again
    again = committed(path)
    assert_no_worker_survives(path)
    assert progress(path)["phase"] == "writing" and done < again and len(again) < 32
    assert rows_in(done) <= progress(path)["rows_written"] <= rows_in(again)  # a pool's count may lag its records
    assert run_writer(path)[0] == 0
    assert_same_store(path, reference[0])


@pytest.mark.parametrize("kill_at, leftover", [
    ("create", r"\.zarr\.json\.\d+\.\d+\.tmp"),  # killed writing the store's first zarr.json
    ("lock", r"\.saeforge/\.lock\.\d+\.\d+\.tmp"),  # killed writing its lock
])
def test_killed_while_creating_the_store_then_resumed(tmp_path, reference, kill_at, leftover):
    import re

    path = tmp_path / "store"
    assert run_until(path, kill_at) == -signal.SIGKILL
    left = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    assert any(re.fullmatch(leftover, name) for name in left), left
    assert not (path / STATE_DIR / "lock").exists() or kill_at == "create"
    assert run_writer(path)[0] == 0  # the rerun resumes: the leftovers are the writer's own
    assert_same_store(path, reference[0])
    assert not [p for p in path.rglob("*.tmp")]


def test_killed_just_before_the_completion_record_then_resumed(tmp_path, reference):
    path = tmp_path / "store"
    assert run_until(path, "completing") == -signal.SIGKILL
    assert len(committed(path)) == 32 and not (path / STATE_DIR / "stage").exists()  # all written, input gone
    assert run_writer(path)[0] == 0  # writes the completion record from the shards' records alone
    assert_same_store(path, reference[0])


def test_killed_just_after_the_completion_record_leaves_nothing_for_good(tmp_path, reference):
    import warnings

    import zarr

    path = tmp_path / "store"
    assert run_until(path, "completed") == -signal.SIGKILL
    assert (path / STATE_DIR / "lock").exists() and (path / STATE_DIR / "progress.json").exists()
    assert open_store(path).n_rows == 4000  # opening a complete store removes what its writer left
    assert not (path / STATE_DIR).exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(list(zarr.open_group(str(path), mode="r").arrays())) == 5
    assert not caught, [str(w.message) for w in caught]
    assert run_writer(path)[0] == 0  # rerunning the harvest: nothing to do
    assert_same_store(path, reference[0])
