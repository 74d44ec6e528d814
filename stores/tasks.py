"""Task-staged rows: the first shuffle pass written by many independent workers, without locks.

A distributed producer (``saeforge.pipeline.distributed``) cuts its row stream into tasks, each a contiguous
range of stream indices known before the task runs. A task stages its rows exactly as the single-process
writer does (``shuffle.Stager``: each row's bucket comes from its stream index alone, so the bucket of a row
does not depend on which worker staged it), into a folder of its own, named by the task and a random attempt
id, then commits by atomically writing its manifest (``files.write_json_atomic``)::

    <store>/.saeforge/stage/tasks/t0000012.json          the commit: row range and the attempt's files
    <store>/.saeforge/stage/tasks/t0000012-3f9c1a2b/     one attempt's staged files (f0000000.bin, ...)

Nothing in an attempt's folder counts until its manifest names it. A task killed mid-way leaves a folder no
manifest names (removed with the stage folder when the store completes); a task that ran twice (a worker
presumed dead finished anyway) leaves two valid attempts with identical rows, and the manifest names one.
The writer adopts the committed tasks' files, in stream order, as part of its staged input
(``StoreWriter.adopt_tasks``), so the second pass reads a bucket's rows in stream order whoever staged them.
"""
from __future__ import annotations

import secrets
from typing import NamedTuple

from saeforge.stores.files import read_json, write_json_atomic
from saeforge.stores.schema import STATE_DIR, Location
from saeforge.stores.shuffle import Stager
from saeforge.stores.spec import WriterSpec
from saeforge.stores.staging import StagedFile, read_counts

TASKS_DIR = f"{STATE_DIR}/stage/tasks"


class TaskManifest(NamedTuple):
    """A committed task: rows [row_start, row_start + n_rows) of the stream, staged in ``files`` (in order)."""

    task: int
    row_start: int
    n_rows: int
    files: list[str]
    """Paths relative to the tasks folder."""

    def to_json(self) -> dict:
        return self._asdict()


class TaskStager:
    """Stages one task's rows (in stream order, first row = stream index ``row_start``) into a fresh attempt
    folder; ``commit()`` writes the manifest. Runs anywhere the store's location can be written."""

    def __init__(self, loc: Location, spec: WriterSpec, task: int, row_start: int):
        self.loc, self.spec, self.task, self.row_start = loc, spec, task, row_start
        self.attempt = f"t{task:07d}-{secrets.token_hex(4)}"
        directory = loc.sub(TASKS_DIR, self.attempt)
        loc.fs.makedirs(directory, exist_ok=True)
        self.stager = Stager(spec.shuffle_context(loc), directory, spec.n_buckets, (0,), next_index=row_start)

    def add(self, acts: dict, *, token_ids, seq_idx, pos) -> None:
        """Rows in stream order, as ``StoreWriter.append`` takes them."""
        data = self.spec.convert_batch(acts, token_ids=token_ids, seq_idx=seq_idx, pos=pos)
        if data:
            self.stager.add(data)

    def commit(self) -> TaskManifest:
        self.stager.flush()
        files = [f"{self.attempt}/{sf.path.rsplit('/', 1)[-1]}" for sf in self.stager.files]
        manifest = TaskManifest(self.task, self.row_start, self.stager.next_index - self.row_start, files)
        write_json_atomic(self.loc, manifest_path(self.loc, self.task), manifest.to_json())
        return manifest


def manifest_path(loc: Location, task: int) -> str:
    return loc.sub(TASKS_DIR, f"t{task:07d}.json")


def committed_tasks(loc: Location) -> dict[int, TaskManifest]:
    """Every committed task's manifest, by task number (an unreadable manifest counts as not committed)."""
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in loc.fs.ls(loc.sub(TASKS_DIR), detail=False)]
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        if not (name.startswith("t") and name.endswith(".json") and name[1:-5].isdigit()):
            continue
        try:
            raw = read_json(loc, loc.sub(TASKS_DIR, name))
            manifest = TaskManifest(**raw)
        except (ValueError, TypeError):
            continue
        out[manifest.task] = manifest
    return out


def task_files(loc: Location, manifests: list[TaskManifest], n_buckets: int) -> list[StagedFile]:
    """The staged files of ``manifests`` in stream order (each manifest's files are in order already)."""
    ordered = sorted(manifests, key=lambda m: m.row_start)
    return [read_counts(loc, loc.sub(TASKS_DIR, f), n_buckets) for m in ordered for f in m.files]
