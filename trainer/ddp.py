"""Data-parallel training under torchrun (torch.distributed): what every rank does alike, and the collectives.

    torchrun --nproc-per-node 4 -m saeforge train --store acts --hook blocks.10.hook_resid_post --out runs/g1

`WORLD_SIZE > 1` in the environment (torchrun sets it) makes `run.train_from_store` join the process group
(`gloo` on the CPU, `nccl` on CUDA; `--device auto` or `cuda` becomes `cuda:LOCAL_RANK`). Every rank builds the
same SAEs from the same seeds and trains them on its share of each global batch of `batch_rows` rows: its loader
(`StoreLoader(interleave=True)`) hands rank r rows [r*b, (r+1)*b) of the batch one process would read,
b = batch_rows / world_size. What keeps the ranks identical, per step and stack of SAEs (`loop.SweepTrainer`):

- gradients: each rank's loss is a mean over its b rows, so the average of the ranks' gradients is the gradient
  of the global batch's mean; one all-reduce of the stack's flattened gradients, before the decoder-gradient
  projection and the Adam step (`Dist.average_grads_`);
- which features fired: summed over the ranks in the same all-reduce, so the dead-feature counts are the global
  ones and every rank makes the same resampling decision;
- the step's metric sums (losses, L0, squared errors, the batch's moments for the explained variance): one
  float64 all-reduce (`Dist.all_reduce_sum_`), so every rank logs, checks for NaN and saves the global values.

Resampling scores the global batches (`Dist.gather_rows`: the ranks' shares, in rank order, are the batches one
process would score) and rank 0's resampled weights and moments are broadcast. LR and lambda schedules, the
normaliser (from the store's attributes) and the unit-norm projection follow from identical inputs. Rank 0 alone
writes the run directories; checkpoints hold every rank's loader position (`Dist.all_gather_object`).

Failures before training (a store a rank cannot open, a world size the store cannot feed) are collected from
every rank in one collective (`agreed`): every rank stops with one line, none waits for a peer that stopped.
Every collective times out after `TIMEOUT_S`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from saeforge.trainer.errors import ConfigError, TrainerError

TIMEOUT_S = 600
"""Seconds any collective may wait for the other ranks (a rank writing a large checkpoint keeps the others
waiting at the next step's all-reduce)."""
T = TypeVar("T")


class RankFailed(TrainerError):
    """Another rank of a data-parallel run failed; this one stopped with it."""


def env_world_size() -> int:
    """The world size torchrun set (`WORLD_SIZE`), 1 without torchrun."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """This process's rank (`RANK`), 0 without torchrun: rank 0 prints and writes."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; start data-parallel runs "
                          "with torchrun") from None


class Dist:
    """The collectives a data-parallel run needs, over the default process group."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def average_grads_(self, params: Iterable[Tensor], fired: Tensor) -> Tensor:
        """Average the gradients of `params` over the ranks, in place, and return `fired` (bool, any shape) OR-ed
        over the ranks: one all-reduce of one flat bucket. DistributedDataParallel is not used: it wraps one
        module's forward, while a sweep step runs several stacked modules through a loss function, and a bucketed
        all-reduce of a handful of large stacked gradients is all it would do here."""
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [fired.reshape(-1).to(grads[0].dtype)])
        dist.all_reduce(flat)
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g)).div_(self.world_size)
            at += g.numel()
        return flat[at:].view(fired.shape) > 0

    @torch.no_grad()
    def all_reduce_sum_(self, tensors: list[Tensor]) -> None:
        """Sum each tensor over the ranks, in place (one float64 all-reduce)."""
        flat = torch.cat([t.reshape(-1).double() for t in tensors])
        dist.all_reduce(flat)
        at = 0
        for t in tensors:
            t.copy_(flat[at : at + t.numel()].view_as(t))
            at += t.numel()

    @torch.no_grad()
    def gather_rows(self, x: Tensor) -> Tensor:
        """The ranks' (rows, d) tensors concatenated in rank order (every rank gets the whole)."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @torch.no_grad()
    def broadcast_(self, tensors: Iterable[Tensor]) -> None:
        """Overwrite each tensor with rank 0's, in place."""
        for t in tensors:
            dist.broadcast(t, src=0)

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` (picklable), on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def agree(self, error: BaseException | None) -> None:
        """One collective after a phase every rank ran: when any rank failed, every rank raises, with its own error
        where it has one, else naming the first rank that failed and its message."""
        lines = self.all_gather_object(None if error is None else _one_line(error))
        failed = [r for r, line in enumerate(lines) if line is not None]
        if not failed:
            return
        if error is not None:
            error.args = (f"rank {self.rank} of {self.world_size}: {lines[self.rank]}",)
            raise error
        raise RankFailed(f"rank {self.rank} of {self.world_size} stopped because rank {failed[0]} failed: "
                         f"{lines[failed[0]]}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def agreed(d: Dist | None, fn: Callable[[], T]) -> T:
    """`fn()` on every rank, then `Dist.agree` (no barrier beyond that one collective): every rank returns, or every
    rank raises. One process: `fn()`."""
    if d is None:
        return fn()
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks, then propagates
        result, error = None, exc
    d.agree(error)
    return result


def check_shards(store, batch_rows: int, world_size: int) -> None:
    """ConfigError when the store cannot feed `world_size` ranks: fewer chunks than ranks (every rank decodes whole
    chunks; some rank would have none of its own), or a global batch the ranks cannot share equally."""
    chunks = -(-store.n_rows // store.chunk_rows)
    if world_size > chunks:
        raise ConfigError(f"{world_size} ranks (torchrun --nproc-per-node) but {store.path} holds {store.n_rows} rows "
                          f"in {chunks} chunk(s) of {store.chunk_rows} rows, fewer than one per rank; use at most "
                          f"{chunks} rank(s) or harvest more rows")
    if batch_rows % world_size:
        raise ConfigError(f"batch_rows {batch_rows} is not divisible by the {world_size} ranks: each rank takes "
                          f"batch_rows / world_size rows of every batch; use a multiple of {world_size}")


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[tuple[torch.device, Dist | None]]:
    """(this rank's device, Dist) for the duration of a run, joining torchrun's process group when
    `WORLD_SIZE > 1` (and leaving it after, unless the caller had joined it); (device, None) otherwise."""
    from saeforge.trainer.device import resolve_device

    world, dev = env_world_size(), resolve_device(device)
    if world <= 1:
        yield dev, None
        return
    if dev.type not in ("cpu", "cuda") or dev.index is not None:
        raise ConfigError(f"data-parallel training runs on cpu, or on cuda with one GPU per rank (cuda:LOCAL_RANK), "
                          f"not on {device} (--device): pass --device auto, cuda or cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", _env_int("LOCAL_RANK", 0))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    joined = not dist.is_initialized()
    if joined:
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=TIMEOUT_S))
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"WORLD_SIZE={world} but this process cannot join the process group "
                              f"({_one_line(exc)}); start data-parallel runs with torchrun") from None
    try:
        yield dev, Dist(dist.get_rank(), dist.get_world_size())
    finally:
        if joined:
            dist.destroy_process_group()
