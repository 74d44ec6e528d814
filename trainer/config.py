"""Configs for one SAE (`SAEConfig`) and for the training run that trains one or many (`TrainConfig`).

Defaults follow arXiv 2404.16014 App. D; every choice the paper leaves open is a field
here, so each run directory records what was used.
"""
from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass
from typing import Any, Literal

from saeforge.trainer.errors import ConfigError

Arch = Literal["baseline", "gated"]
Regime = Literal["paper", "anthropic"]
LossScaling = Literal["paper", "per_dim", "sum"]
TRACKERS = ("wandb", "tensorboard")
"""The experiment trackers `TrainConfig.log_to` may name (`trainer/loggers.py`)."""


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """One SAE of a run or sweep: architecture, width, sparsity coefficient, seed and ablation switches."""

    arch: Arch = "gated"
    """`baseline` (Eqs. 2-4, ReLU + L1) or `gated` (Eqs. 6-8)."""

    d_sae: int = 4608
    """Dictionary width M (features)."""

    l1_coefficient: float = 1e-3
    """lambda, the sparsity coefficient, in the paper's units: the coefficient of the L1 term when the loss is
    computed on the RAW activations with the reconstruction scaled as `TrainConfig.loss_scaling` says
    (arXiv 2404.16014 App. D.1: 1/n, and 1/E||x||^2 for baselines). Input normalisation does not change
    its meaning: the trainer converts it (`trainer/losses.py: l1_training_factor`)."""

    lr: float = 3e-4
    """Peak Adam learning rate (paper: 3e-4 for Gated; 1e-3 / 7.5e-4 for the Pythia / Gemma baselines)."""

    seed: int = 0
    """Seeds this SAE's initialisation and resampling only (a sweep of K equals K runs with these seeds)."""

    regime: Regime = "paper"
    """`paper`: plain L1, decoder rows held at exactly unit norm, frozen aux decoder (Eq. 8).
    `anthropic`: the authors' alternative to the paper's loss (as SAELens implements it): decoder-norm-weighted L1, unconstrained decoder,
    unfrozen aux decoder."""

    freeze_aux_decoder: bool | None = None
    """Stop-gradient on W_dec and b_dec in L_aux (Gated only). None: the regime's choice (paper: True,
    anthropic: False). False with the paper regime is the "unfreeze decoder" ablation (arXiv 2404.16014 §5, Fig. 8)."""

    tie_weights: bool = True
    """Gated only: W_mag = exp(r_mag) * W_gate (Eq. 7). False is the "untied encoders" ablation (+M*n+M)."""

    use_r_mag: bool = True
    """Gated only: learn r_mag. False fixes r_mag = 0 (not trainable), the "no r_mag" ablation."""

    hook: str | None = None
    """Hook point (store array) this SAE trains on; None: the run's `TrainConfig.hook`. SAEs of several hooks
    of one store train in one sweep from the same batches (one read feeds them all)."""

    name: str | None = None
    """Run directory name inside a sweep; None derives one from hook, arch, width, lambda and seed."""

    def __post_init__(self):
        problems = []
        if self.arch not in ("baseline", "gated"):
            problems.append(f"arch must be 'baseline' or 'gated', got {self.arch!r}")
        if self.regime not in ("paper", "anthropic"):
            problems.append(f"regime must be 'paper' or 'anthropic', got {self.regime!r}")
        if not isinstance(self.d_sae, int) or not 1 <= self.d_sae <= 1 << 24:
            problems.append(f"d_sae must be an integer in [1, 16777216], got {self.d_sae!r}")
        if not 0 <= self.l1_coefficient <= 1e4:
            problems.append(f"l1_coefficient must be in [0, 1e4], got {self.l1_coefficient!r}")
        if not 0 < self.lr <= 1.0:
            problems.append(f"lr must be in (0, 1], got {self.lr!r}")
        if not _is_seed(self.seed):
            problems.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.regime == "anthropic" and self.freeze_aux_decoder:
            problems.append("regime 'anthropic' (unconstrained decoder, decoder-norm-weighted L1) with a frozen "
                            "aux decoder is the mixed combination the authors warn against; "
                            "leave freeze_aux_decoder unset")
        if self.arch == "baseline" and (self.freeze_aux_decoder is not None or not self.tie_weights
                                        or not self.use_r_mag):
            problems.append("freeze_aux_decoder, tie_weights and use_r_mag apply to arch 'gated' only")
        if problems:
            raise ConfigError("invalid SAE config: " + "; ".join(problems))

    @property
    def frozen_aux(self) -> bool:
        """Whether L_aux sees a stop-gradient decoder (resolved from `freeze_aux_decoder` and `regime`)."""
        return self.regime == "paper" if self.freeze_aux_decoder is None else self.freeze_aux_decoder

    @property
    def unit_norm_decoder(self) -> bool:
        return self.regime == "paper"

    @property
    def run_name(self) -> str:
        site = f"{hook_short_name(self.hook)}_" if self.hook else ""
        return self.name or f"{site}{self.arch}_d{self.d_sae}_l1-{self.l1_coefficient:g}_s{self.seed}"

    def group_key(self) -> tuple:
        """SAEs with equal keys have equal shapes and loss code, so they train as one stacked module."""
        return (self.hook, self.arch, self.d_sae, self.regime, self.frozen_aux, self.tie_weights, self.use_r_mag)


def hook_short_name(hook: str) -> str:
    """`blocks.10.hook_resid_post` -> `L10.resid_post` (run-directory names, plot labels)."""
    m = re.match(r"blocks\.(\d+)\.(?:hook_)?(.+)$", hook)
    return f"L{m.group(1)}.{m.group(2).replace('hook_', '')}" if m else hook


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train: data, steps, optimiser, schedules, resampling, precision, logging and checkpoints."""

    hook: str = ""
    """Hook point (store array) to train on, e.g. `blocks.1.hook_resid_post`."""

    steps: int = 300_000
    """Optimiser steps (paper: 300k-400k, about 1.2-1.6 B activations at batch 4096)."""

    batch_rows: int = 4096
    """Activations per optimiser step (paper: 4096); at most the store's rows, so a batch never holds a row twice
    (epochs repeat: a run may see every row many times). Under torchrun the global batch: each of the world_size
    ranks takes batch_rows / world_size of its rows."""

    adam_betas: tuple[float, float] = (0.0, 0.999)
    """Adam (beta1, beta2); paper D.1.1: (0, 0.999) following Templeton et al."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    lr_warmup_steps: int = 1000
    """Linear learning-rate warm-up from 0 (the paper warms up; length unstated, 1000 as in dictionary_learning)."""

    l1_warmup_steps: int = 0
    """Linear lambda warm-up from 0 (not in the paper; dictionary_learning uses 2000). 0 disables."""

    loss_scaling: LossScaling = "paper"
    """Reconstruction (and L_aux) scaling. `paper`: divide by n = d_in, and for baselines also by E||x||^2
    of the training inputs (arXiv 2404.16014 App. D.1). `per_dim`: divide by n only.
    `sum`: plain sum over dimensions (SAELens / dictionary_learning)."""

    normalize_inputs: bool = True
    """Multiply inputs by the store's fixed scale sqrt(d_in / E||x||^2) (one factor per store, so lambda means
    the same across a sweep); saved weights are always in the original scale."""

    b_dec_init: Literal["mean", "zeros"] = "mean"
    """Initial b_dec: the store's per-dimension mean (in training scale), or zeros."""

    resample_every: int = 25_000
    """Resample dead features every this many steps (Bricken et al.: 25k); 0 disables."""

    resample_until: int | None = None
    """No resampling after this step; None: half of `steps`."""

    dead_window: int | None = None
    """A feature is dead when it has not fired for this many steps; None: `resample_every`."""

    resample_rows: int = 819_200
    """Inputs drawn from the stream to score for loss-weighted sampling (Bricken: 819,200)."""

    resample_lr_floor: float = 0.1
    """LR multiplier right after a resample; it returns to 1 by a cosine (paper D.1.1: 0.1)."""

    resample_lr_steps: int = 1000
    """Length of that cosine (paper D.1.1: 1000 steps)."""

    autocast: Literal["auto", "none", "bf16"] = "auto"
    """Mixed precision for forward and loss: `bf16` autocast (weights and optimiser stay fp32), `none`, or
    `auto`: bf16 only where the device runs it natively and faster (`trainer/device.py`), else none."""

    compile: Literal["auto", "on", "off"] = "auto"
    """Fuse the loss's elementwise work on (batch x d_sae) tensors with `torch.compile`: `on`, `off`, or `auto`: on
    for CUDA (where that work, not the matmuls, bounds a bf16 step), off on the CPU (where eager is as fast and
    compiling takes tens of seconds). The first steps pay the compile time."""

    stack_mib: int = 0
    """Upper bound, in MiB, on one stacked module's (K, batch_rows, d_sae) fp32 activation tensor: SAEs of one
    shape are stacked in groups small enough to fit it (0: auto, 64 MiB on CPU where big stacks thrash
    memory, unbounded on GPU). Results do not depend on it."""

    device: str = "auto"
    """`auto` (cuda if available), `cpu`, `cuda`, `cuda:1`, ... Under torchrun `auto` and `cuda` mean
    cuda:LOCAL_RANK (one GPU per rank)."""

    log_every: int = 100
    """Steps between metrics.jsonl lines (and progress-bar updates)."""

    log_to: tuple[str, ...] = ()
    """Experiment trackers that also get every metrics.jsonl row (same values, same steps), one tracker run per SAE
    with its run's config: `wandb`, `tensorboard` or both (extras `saeforge[wandb]`, `saeforge[tensorboard]`)."""

    wandb_project: str = "saeforge"
    """wandb project of the runs (`log_to` wandb); a sweep's runs share the sweep directory's name as their group."""

    log_dir: str | None = None
    """TensorBoard event folders, one per SAE named as its run directory, go under this folder (None: `tensorboard/`
    inside each run directory); wandb's local files go here too (None: wandb's own default, WANDB_DIR or ./wandb)."""

    checkpoint_every: int = 5000
    """Steps between checkpoints (also written at the end); 0: only at the end."""

    loader_threads: int = 2
    """Decode threads of the store loader."""

    data_seed: int = 0
    """Seed of the loader's chunk order (shared by every SAE of a sweep)."""

    def __post_init__(self):
        problems = []
        positive = dict(steps=self.steps, batch_rows=self.batch_rows, log_every=self.log_every,
                        resample_lr_steps=self.resample_lr_steps, resample_rows=self.resample_rows,
                        loader_threads=self.loader_threads)
        if not _is_seed(self.data_seed):
            problems.append(f"data_seed must be an integer in [0, 2**63), got {self.data_seed!r}")
        if self.stack_mib < 0:
            problems.append(f"stack_mib must be >= 0, got {self.stack_mib!r}")
        problems += [f"{k} must be a positive integer, got {v!r}" for k, v in positive.items()
                     if not isinstance(v, int) or v < 1]
        nonneg = dict(lr_warmup_steps=self.lr_warmup_steps, l1_warmup_steps=self.l1_warmup_steps,
                      resample_every=self.resample_every, checkpoint_every=self.checkpoint_every)
        problems += [f"{k} must be an integer >= 0, got {v!r}" for k, v in nonneg.items()
                     if not isinstance(v, int) or v < 0]
        b1, b2 = self.adam_betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            problems.append(f"adam_betas must lie in [0, 1), got {self.adam_betas!r}")
        if not 0 < self.resample_lr_floor <= 1:
            problems.append(f"resample_lr_floor must be in (0, 1], got {self.resample_lr_floor!r}")
        if self.loss_scaling not in ("paper", "per_dim", "sum"):
            problems.append(f"loss_scaling must be paper, per_dim or sum, got {self.loss_scaling!r}")
        if self.autocast not in ("auto", "none", "bf16"):
            problems.append(f"autocast must be 'auto', 'none' or 'bf16', got {self.autocast!r}")
        if self.compile not in ("auto", "on", "off"):
            problems.append(f"compile must be 'auto', 'on' or 'off', got {self.compile!r}")
        bad_trackers = [t for t in self.log_to if t not in TRACKERS]
        if isinstance(self.log_to, str) or bad_trackers:
            problems.append(f"log_to must list trackers among {', '.join(TRACKERS)}, got {bad_trackers or self.log_to!r}")
        if self.dead_window is not None and self.dead_window < 1:
            problems.append(f"dead_window must be >= 1, got {self.dead_window!r}")
        if problems:
            raise ConfigError("invalid train config: " + "; ".join(problems))

    @property
    def resample_stop(self) -> int:
        return self.steps // 2 if self.resample_until is None else self.resample_until

    @property
    def dead_steps(self) -> int:
        return self.dead_window or self.resample_every or 10_000


def _is_seed(value) -> bool:
    """Seeds feed torch.Generator.manual_seed and numpy's default_rng, which take non-negative integers."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < 1 << 63


def config_dict(cfg) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(obj):
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def build(cls, *layers: dict[str, Any], where: str = "config"):
    """`cls(**merged)` with later layers winning; unknown keys are an error (sweep SAEs, `trainer/grid.py`;
    config files and flags go through `trainer/options.py`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged: dict[str, Any] = {}
    for layer in layers:
        unknown = sorted(set(layer) - names)
        if unknown:
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (valid: {', '.join(sorted(names))})")
        merged.update({k: v for k, v in layer.items() if v is not None})
    if "adam_betas" in merged:
        merged["adam_betas"] = tuple(merged["adam_betas"])
    return cls(**merged)


SAE_FIELDS = frozenset(f.name for f in dataclasses.fields(SAEConfig))
