"""Where a run's metrics rows go: its metrics.jsonl always, and the experiment trackers `TrainConfig.log_to` names.

Every row the training loop reports for an SAE (a logging window's metrics, `window.Metrics.flush`, or an event line
such as `{"step": s, "event": "resample", "features": n}`) goes to that SAE's one `MetricsSink`:

    sinks = open_sinks(train, run_dirs, records, step=trainer.step, group="sweep1")   # one per SAE
    sinks[i].log({"step": 100, "loss": 0.31, "l0": 12.5, ...})
    close_sinks(sinks, ok=True)

`JsonlSink` is metrics.jsonl; `WandbSink` and `TensorBoardSink` log the same rows, with the same step numbers, to
one tracker run per SAE (a sweep of K SAEs: K wandb runs in one group, K TensorBoard folders) whose config is the
run's record (what identifies it: cfg.json's `saeforge` entry, as `run.run_record` makes it). An event line's numbers are logged as `<event>/<key>`
(`resample/features`). The trackers' packages are imported only when asked for; `check_trackers` refuses a missing
one before anything is written.

Resuming: TensorBoard's writer starts with `purge_step`, so the events a killed run logged after its checkpoint are
dropped and logged again, like metrics.jsonl's lines. wandb cannot rewrite a run's history: the resumed run
continues the same wandb run (`resume="allow"`, its id kept in `<run>/wandb.jsonl` with the steps sent) and skips
the rows wandb already has.
"""
from __future__ import annotations

import importlib
import json
import numbers
import secrets
import string
from pathlib import Path
from typing import Protocol

from saeforge.trainer import rundir
from saeforge.trainer.config import TrainConfig
from saeforge.trainer.errors import ConfigError, RunCorrupt

WANDB_FILE = "wandb.jsonl"
"""In a run directory: {"id": the wandb run id} on its first line, then {"step": s, "row": "metrics" or the event}
for every row sent to that run."""
TENSORBOARD_DIR = "tensorboard"
"""The TensorBoard event folder inside a run directory (when `TrainConfig.log_dir` is None)."""
TRACKER_MODULES = {"wandb": "wandb", "tensorboard": "torch.utils.tensorboard"}
"""What each tracker imports; the extra of the same name installs it."""
TRACKER_FIELDS = frozenset({"log_to", "wandb_project", "log_dir"})
"""TrainConfig fields that say where rows go, not what is trained (a resumed run may change them)."""


class MetricsSink(Protocol):
    """Receives one SAE's metrics rows in step order."""

    def log(self, row: dict) -> None:
        """One metrics.jsonl row: {"step": int, name: value, ...} (an event line also has "event")."""

    def close(self, ok: bool = True) -> None:
        """End of this session; `ok` False when training stopped on an error."""


def check_trackers(log_to) -> None:
    """Import every tracker of `log_to`; ConfigError naming the extra to install when one cannot be imported."""
    for name in log_to:
        try:
            importlib.import_module(TRACKER_MODULES[name])
        except ImportError as exc:
            raise ConfigError(f"log_to {name!r} needs the {name} package, which cannot be imported ({exc}); install "
                              f"it with: pip install 'saeforge[{name}]'") from None


def scalars(row: dict) -> tuple[int, dict[str, float]]:
    """A metrics row as (step, {name: number}) for a tracker; an event line's numbers are named `<event>/<key>`."""
    prefix = f"{row['event']}/" if "event" in row else ""
    return int(row["step"]), {prefix + k: v for k, v in row.items() if k not in ("step", "event")
                              and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class JsonlSink:
    """The run directory's metrics.jsonl (rundir.py reads it back)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def log(self, row: dict) -> None:
        rundir.append_metrics(self.run_dir, [row])

    def close(self, ok: bool = True) -> None:
        pass


class TensorBoardSink:
    """One TensorBoard run folder: every number of a row as a scalar at the row's step; the config as text."""

    def __init__(self, folder: Path, config: dict, *, step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop what an earlier session logged after `step` (it is logged again from here)
        self.writer = SummaryWriter(str(folder), purge_step=step + 1)
        self.writer.add_text("config", f"```json\n{json.dumps(config, indent=2)}\n```", step)
        self.writer.flush()

    def log(self, row: dict) -> None:
        step, values = scalars(row)
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a killed run keeps every row up to its checkpoint (those are not logged again)

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class WandbSink:
    """One wandb run per SAE, resumed across sessions through the id in `<run>/wandb.jsonl`."""

    def __init__(self, run_dir: Path, config: dict, *, project: str, group: str | None, log_dir: str | None,
                 system_metrics: bool):
        import wandb

        self.path = run_dir / WANDB_FILE
        run_id, self.sent_step, self.sent_rows = read_wandb_file(self.path)
        if self.path.is_file() and not self.path.read_bytes().endswith(b"\n"):
            with open(self.path, "a") as fh:  # end the line a kill cut short: the next entry gets a line of its own
                fh.write("\n")
        if run_id is None:  # written before init: a session killed during init resumes the same id
            run_id = new_wandb_id()
            self._append({"id": run_id})
        settings = wandb.Settings(console="off", quiet=True, x_disable_stats=not system_metrics)
        self.run = wandb.init(project=project, id=run_id, name=run_dir.name, group=group, resume="allow",
                              reinit="create_new", settings=settings, **({"dir": log_dir} if log_dir else {}))
        self.run.config.update(config, allow_val_change=True)  # a resumed run may have changed `steps`

    def _append(self, entry: dict) -> None:
        with open(self.path, "a") as fh:  # appended, not rewritten: a few microseconds per row
            fh.write(json.dumps(entry) + "\n")

    def log(self, row: dict) -> None:
        step, values = scalars(row)
        kind = row.get("event", "metrics")
        if step < self.sent_step or (step == self.sent_step and kind in self.sent_rows):
            return  # an earlier session sent it, then stopped after the checkpoint this session resumed from
        self.run.log(values, step=step)
        self._append({"step": step, "row": kind})

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def read_wandb_file(path: Path) -> tuple[str | None, int, set[str]]:
    """(wandb run id, last step sent, the rows sent at that step) from a run's wandb.jsonl; (None, -1, {}) when
    there is none. A last line cut short by a kill is left out (that row is sent again)."""
    entries = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    if not entries:
        return None, -1, set()
    if not isinstance(entries[0], dict) or not isinstance(entries[0].get("id"), str):
        raise RunCorrupt(f"{path}: its first line should hold the wandb run id; move the file away (the next run "
                         "starts a new wandb run)")
    sent = [e for e in entries[1:] if isinstance(e, dict) and "step" in e]
    last = sent[-1]["step"] if sent else -1
    return entries[0]["id"], last, {e["row"] for e in sent if e["step"] == last}


def new_wandb_id() -> str:
    """A fresh wandb run id: 8 characters of [a-z0-9], as wandb makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class FanOut:
    """One SAE's sinks as one: metrics.jsonl first, then the trackers."""

    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = sinks

    def log(self, row: dict) -> None:
        for sink in self.sinks:
            sink.log(row)

    def close(self, ok: bool = True) -> None:
        close_sinks(self.sinks, ok)


def open_sinks(train: TrainConfig, run_dirs: list[Path], records: list[dict], *, step: int,
               group: str | None = None) -> list[FanOut]:
    """One sink per run directory (sweep order) for a session that starts after `step`. `records`: each run's
    record (`run.run_record`), logged as its tracker config; `group`: a sweep's name. A tracker that
    cannot start is a ConfigError naming it (the sinks opened so far are closed)."""
    out: list[FanOut] = []
    for i, (run_dir, record) in enumerate(zip(run_dirs, records)):
        out.append(FanOut([JsonlSink(run_dir)]))
        for name in dict.fromkeys(train.log_to):
            try:
                out[-1].sinks.append(_tracker(name, train, run_dir, record, step=step, group=group, first=i == 0))
            except Exception as exc:
                close_sinks(out, ok=False)
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ConfigError(f"cannot start the {name} run of {run_dir} ({type(exc).__name__}: {text}); fix "
                                  "that or drop log_to, then rerun the same command (it resumes)") from exc
    return out


def _tracker(name: str, train: TrainConfig, run_dir: Path, record: dict, *, step: int, group: str | None,
             first: bool) -> MetricsSink:
    if name == "wandb":  # system metrics (CPU, GPU) once per process: in the first SAE's run
        return WandbSink(run_dir, record, project=train.wandb_project, group=group, log_dir=train.log_dir,
                         system_metrics=first)
    if train.log_dir:  # <log_dir>/<sweep>/<run> or <log_dir>/<run>
        folder = Path(train.log_dir) / (group or "") / run_dir.name
    else:
        folder = run_dir / TENSORBOARD_DIR
    return TensorBoardSink(folder, record, step=step)


def close_sinks(sinks: list[MetricsSink], ok: bool = True) -> None:
    """Close every sink, even when one fails to; after a clean session the first failure is raised, after a failed
    one it is dropped (the error that stopped training is the one to report)."""
    errors = []
    for sink in sinks:
        try:
            sink.close(ok)
        except Exception as exc:  # noqa: BLE001 - a tracker failing to finish must not keep the others open
            errors.append(exc)
    if errors and ok:
        raise errors[0]
