"""Training many SAEs on the same batches: `SweepTrainer` (state + one optimiser step; the loop is `trainer/fit.py`).

SAEs whose `SAEConfig.group_key()` match are stacked into one module and trained with batched matmuls; a run
of one SAE is a stack of one, so a sweep of K and K single runs execute the same code. Each SAE draws its
initial weights and its resampling choices from generators seeded by its own seed only.

    trainer = SweepTrainer(saes, train, d_in, normalisers=Normaliser.from_stats(stats))
    fit(trainer, map(trainer.prepare, batches), steps=train.steps, events=my_events)
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.ddp import Dist
from saeforge.trainer.errors import ConfigError
from saeforge.trainer.losses import l1_training_factor, recon_scale, sae_loss, squared_error
from saeforge.trainer.normaliser import Normaliser, for_hook
from saeforge.trainer.optim import (StackAdam, normalize_decoder_, project_decoder_grad_, resample_multiplier,
                                    warmup_multiplier)
from saeforge.trainer.resample import resample_features_
from saeforge.trainer.sae import SAE, init_sae_, load_into_stack_, make_sae, unstack
from saeforge.trainer.window import MEAN_STATS, Metrics, StepStats

RESAMPLE_SEED_OFFSET = 0x5EED


class _Group:
    """SAEs of one hook and one shape trained as one stacked module with one StackAdam."""

    def __init__(self, cfgs: list[SAEConfig], indices: list[int], hook: str, d_in: int, train: TrainConfig,
                 device: torch.device, dtype: torch.dtype, norm: Normaliser, compiled: bool):
        first, K = cfgs[0], len(cfgs)
        self.cfgs, self.indices, self.hook = cfgs, indices, hook
        self.sae = make_sae(first.arch, d_in, first.d_sae, n_stack=K, dtype=dtype,
                            tie_weights=first.tie_weights, use_r_mag=first.use_r_mag)
        init_sae_(self.sae, [c.seed for c in cfgs], norm.b_dec_init() if train.b_dec_init == "mean" else None)
        self.sae.to(device)
        self.adam = StackAdam(dict(self.sae.named_parameters()), train.adam_betas, train.adam_eps)
        # lambda is given in the paper's units (raw activations); convert it to the training scale once.
        factor = l1_training_factor(train.loss_scaling, first.arch, norm.scale)
        self.l1 = torch.tensor([c.l1_coefficient * factor for c in cfgs], dtype=torch.float64)
        self.lr = torch.tensor([c.lr for c in cfgs], dtype=torch.float64)
        self.recon_scale = recon_scale(train.loss_scaling, first.arch, d_in, norm.training_mean_sq_norm(d_in))
        self.unit_norm = first.unit_norm_decoder
        self.loss_kw = dict(recon_scale=self.recon_scale, weight_l1_by_decoder_norm=not self.unit_norm,
                            **({"freeze_aux_decoder": first.frozen_aux} if first.arch == "gated" else {}))
        self.steps_since_fired = torch.zeros(K, first.d_sae, dtype=torch.long, device=device)
        self.last_resample = torch.full((K,), -(10 ** 9), dtype=torch.long)
        self.generators = [torch.Generator().manual_seed(c.seed + RESAMPLE_SEED_OFFSET) for c in cfgs]
        self.index = torch.tensor(indices, device=device)
        self.loss_fn = torch.compile(sae_loss, dynamic=False) if compiled else sae_loss

    def loss(self, x: Tensor, l1_mult: float):
        l1 = (self.l1 * l1_mult).to(device=x.device, dtype=self.sae.W_dec.dtype)
        return self.loss_fn(self.sae, x, l1, **self.loss_kw)


class SweepTrainer:
    """K SAEs of any mix of architecture, width, lambda, lr and seed, trained on the same batches.

    `normalisers` (one `Normaliser` for every hook, or a dict keyed by hook; None: inputs as they are) set each
    hook's input scale, the b_dec init and E||x||^2. Inputs given to `train_step`/`resample` are in training
    scale: pass batches through `prepare` first. With `dist` (a data-parallel run, trainer/ddp.py) each rank
    passes its share of every batch and every rank ends each step with the same weights and global StepStats."""

    def __init__(self, saes: list[SAEConfig], train: TrainConfig, d_in: int | dict[str, int], *,
                 normalisers: Normaliser | dict[str, Normaliser] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, dist: Dist | None = None):
        self.saes, self.train, self.dist = list(saes), train, dist
        self.world_size = dist.world_size if dist is not None else 1
        self.device, self.dtype = torch.device(device), dtype
        self.step = 0
        self.sae_hooks = [cfg.hook or train.hook for cfg in self.saes]
        self.hooks = list(dict.fromkeys(self.sae_hooks))
        self.d_ins = {h: int(d_in[h] if isinstance(d_in, dict) else d_in) for h in self.hooks}
        self.normalisers = {h: for_hook(normalisers, h) for h in self.hooks}
        self.d_in = self.d_ins[self.hooks[0]] if len(self.hooks) == 1 else None
        self.autocast = self._resolve_autocast()
        self.compiled = self._resolve_compile()
        keys: dict[tuple, list[int]] = {}
        for i, cfg in enumerate(self.saes):
            keys.setdefault((self.sae_hooks[i], *cfg.group_key()[1:]), []).append(i)
        self.groups = []
        for (hook, *_), idx in keys.items():
            for chunk in self._stacks(idx):
                self.groups.append(_Group([self.saes[i] for i in chunk], chunk, hook, self.d_ins[hook], train,
                                          self.device, dtype, self.normalisers[hook], self.compiled))
        self.window = Metrics(self)
        """The open logging window: part of the resumable state, so a resumed run logs what an uninterrupted one
        would."""

    def _resolve_autocast(self) -> bool:
        """Whether steps run under bf16 autocast: `bf16`, or `auto` on fp32 weights where bf16 is native."""
        if self.train.autocast == "auto":
            from saeforge.trainer.device import resolve_dtype

            return self.dtype == torch.float32 and resolve_dtype("auto", self.device) == "bfloat16"
        return self.train.autocast == "bf16"

    def _resolve_compile(self) -> bool:
        """Whether the loss runs through `torch.compile`: `on`, or `auto` on CUDA where inductor (triton) is there."""
        if self.train.compile != "auto":
            return self.train.compile == "on"
        from torch.utils._triton import has_triton

        return self.device.type == "cuda" and has_triton()

    def by_hook(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        """A batch as {hook: (rows, d_in)}; a bare tensor is accepted when every SAE trains on one hook."""
        if isinstance(x, dict):
            return x
        if len(self.hooks) != 1:
            raise ConfigError(f"this sweep trains on hooks {self.hooks}: pass a dict of batches keyed by hook")
        return {self.hooks[0]: x}

    def prepare(self, batch: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        """A batch in the original scale (a dict keyed by hook, or a bare (rows, d_in) tensor when every SAE
        trains on one hook) -> {hook: (rows, d_in)} of the trainer's hooks, on its device and in its dtype,
        in training scale."""
        xs = self.by_hook(batch)  # copied in the stored dtype (pinned, without blocking), converted and scaled there
        return {h: self.normalisers[h].to_training(xs[h].to(self.device, non_blocking=True).to(self.dtype))
                for h in self.hooks}

    def _stacks(self, idx: list[int]) -> list[list[int]]:
        """Split SAEs of one shape into stacks whose (K, rows, d_sae) activations fit `train.stack_mib`."""
        mib = self.train.stack_mib or (64 if self.device.type == "cpu" else 0)
        if not mib:
            return [idx]
        per_sae = self.train.batch_rows * self.saes[idx[0]].d_sae * 4
        k = max(1, (mib << 20) // per_sae)
        return [idx[i:i + k] for i in range(0, len(idx), k)]

    def _autocast(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr_multipliers(self, group: _Group) -> Tensor:
        """Per-SAE LR multiplier at the current step: warm-up x the post-resample cosine."""
        since = self.step - group.last_resample
        post = resample_multiplier(since, self.train.resample_lr_floor, self.train.resample_lr_steps)
        return warmup_multiplier(self.step, self.train.lr_warmup_steps) * post

    def train_step(self, x: Tensor | dict[str, Tensor]) -> StepStats:
        """One optimiser step of every SAE on x (rows, d_in), or on {hook: x} when the SAEs span several hooks;
        returns this batch's per-SAE sums."""
        xs = self.by_hook(x)
        n = len(self.saes)
        out = {name: torch.zeros(n, device=self.device, dtype=torch.float64) for name in StepStats._fields}
        l1_mult = warmup_multiplier(self.step, self.train.l1_warmup_steps)
        for g in self.groups:
            x = xs[g.hook]
            with self._autocast():
                res = g.loss(x, l1_mult)
            res.loss.backward()
            fired = res.f.detach().amax(-2) > 0  # (K, d_sae); f >= 0: fired iff its max over rows is > 0
            if self.dist is not None:
                fired = self.dist.average_grads_(g.sae.parameters(), fired)
            if g.unit_norm:
                project_decoder_grad_(g.sae.W_dec)
            lr = (g.lr * self.lr_multipliers(g)).to(self.device, g.sae.W_dec.dtype)
            g.adam.step(lr)
            g.adam.zero_grad()
            if g.unit_norm:
                normalize_decoder_(g.sae.W_dec)
            with torch.no_grad():
                self._record(g, x, res, fired, out)
        self.step += 1
        self._batch_stats_(xs, out)
        return StepStats(**out)

    @torch.no_grad()
    def _batch_stats_(self, xs: dict[str, Tensor], out: dict[str, Tensor]) -> None:
        """Fill `out["x_var"]` from the batch's moments; on several ranks, sum everything over them first (so the
        StepStats are the global batch's on every rank)."""
        moments = {h: _moments(xs[h]) for h in self.hooks}
        if self.dist is not None:
            self.dist.all_reduce_sum_([*out.values(), *moments.values()])
            for name in MEAN_STATS:
                out[name] /= self.world_size
        x_var = {h: m[-2] - m[:-2].dot(m[:-2]) / m[-1] for h, m in moments.items()}
        out["x_var"] = torch.stack([x_var[h] for h in self.sae_hooks])

    @staticmethod
    def _record(g: _Group, x: Tensor, res, fired: Tensor, out: dict[str, Tensor]) -> None:
        g.steps_since_fired += 1
        g.steps_since_fired.masked_fill_(fired, 0)
        x_hat, xf = res.x_hat.float(), x.float()
        vals = dict(l_recon=res.l_recon, l_sparsity=res.l_sparsity, l_aux=res.l_aux,
                    l0=torch.count_nonzero(res.f, dim=-1).double().mean(-1), sse=res.sq_err.double().sum(-1),
                    xhat_sq=x_hat.pow(2).sum(-1).sum(-1), x_dot_xhat=(x_hat * xf).sum(-1).sum(-1))
        for name, v in vals.items():
            out[name].index_copy_(0, g.index, v.detach().double().reshape(-1))

    def resample_due(self) -> bool:
        """Whether the step just completed is a resampling step."""
        every = self.train.resample_every
        return every > 0 and self.step % every == 0 and self.step <= self.train.resample_stop

    def resample_batches(self) -> int:
        return -(-self.train.resample_rows // self.train.batch_rows)

    @torch.no_grad()
    def resample(self, batches: list[Tensor]) -> dict[int, int]:
        """Resample each SAE's dead features (not fired for `dead_steps` steps) using `batches` as the scored
        inputs; returns {sae index: features resampled} for the SAEs that changed. On several ranks every rank
        scores the global batches (the ranks' shares gathered) and takes rank 0's resampled weights and moments."""
        if self.dist is not None:
            batches = [{h: self.dist.gather_rows(x) for h, x in self.by_hook(b).items()} for b in batches]
        done: dict[int, int] = {}
        for g in self.groups:
            if self._resample_group(g, batches, done) and self.dist is not None:
                self.dist.broadcast_([*g.sae.parameters(), *g.adam.exp_avg.values(), *g.adam.exp_avg_sq.values()])
        return done

    def _resample_group(self, g: _Group, batches: list, done: dict[int, int]) -> bool:
        """Resample the dead features of one stack (recording {sae index: features} in `done`); whether any were."""
        dead = g.steps_since_fired >= self.train.dead_steps
        if not dead.any():
            return False
        hook_batches = [self.by_hook(b)[g.hook] for b in batches]
        inputs = torch.cat(hook_batches)
        with self._autocast():
            sq_err = torch.cat([squared_error(b, g.sae(b)).float() for b in hook_batches], dim=-1)
        for k in range(len(g.cfgs)):
            if dead[k].any():
                n = resample_features_(g.sae, k, dead[k], inputs, sq_err[k], g.generators[k], g.adam).n_resampled
                g.steps_since_fired[k][dead[k]] = 0
                g.last_resample[k] = self.step
                done[g.indices[k]] = n
        return True

    @torch.no_grad()
    def nonfinite_saes(self) -> list[int]:
        """The SAEs (sweep order) whose weights or Adam moments hold NaN or inf; one host sync."""
        flags = []
        for g in self.groups:
            ok = torch.ones(len(g.cfgs), dtype=torch.bool, device=self.device)
            for tensors in (g.sae.state_dict(), g.adam.exp_avg, g.adam.exp_avg_sq):
                for t in tensors.values():  # (K, ...): one SAE per leading index
                    ok &= torch.isfinite(t).reshape(len(g.cfgs), -1).all(-1)
            flags.append((g.indices, ok))
        return sorted(i for indices, ok in flags for i, fine in zip(indices, ok.tolist()) if not fine)

    def _locate(self, i: int) -> tuple[_Group, int]:
        for g in self.groups:
            if i in g.indices:
                return g, g.indices.index(i)
        raise IndexError(i)

    def sae(self, i: int) -> SAE:
        """SAE number `i` (sweep order) as a plain one-SAE module in training scale (a copy)."""
        g, k = self._locate(i)
        return unstack(g.sae, k)

    def dead_fraction(self, i: int) -> float:
        g, k = self._locate(i)
        return float((g.steps_since_fired[k] >= self.train.dead_steps).double().mean())

    def lr_now(self, i: int) -> float:
        g, k = self._locate(i)
        return float(g.lr[k] * self.lr_multipliers(g)[k])

    def recon_scale(self, i: int) -> float:
        """The factor SAE `i`'s reconstruction term is multiplied by (`losses.recon_scale`)."""
        return self._locate(i)[0].recon_scale

    def l1_now(self, i: int) -> float:
        """SAE `i`'s lambda at the current step, in the paper's units (warm-up applied)."""
        return self.saes[i].l1_coefficient * warmup_multiplier(self.step, self.train.l1_warmup_steps)

    def sae_state(self, i: int) -> dict:
        """Everything SAE `i` needs to resume: weights, Adam moments, resampling state, generator."""
        g, k = self._locate(i)
        one = lambda d: {n: t[k].detach().cpu().clone() for n, t in d.items()}  # noqa: E731
        return {"step": self.step, "weights": one(g.sae.state_dict()), "exp_avg": one(g.adam.exp_avg),
                "exp_avg_sq": one(g.adam.exp_avg_sq), "adam_t": g.adam.t,
                "steps_since_fired": g.steps_since_fired[k].cpu().clone(),
                "last_resample": int(g.last_resample[k]), "generator": g.generators[k].get_state(),
                "window": self.window.state(i)}

    @torch.no_grad()
    def load_sae_state(self, i: int, state: dict) -> None:
        g, k = self._locate(i)
        load_into_stack_(g.sae, k, state["weights"])
        for mine, theirs in ((g.adam.exp_avg, state["exp_avg"]), (g.adam.exp_avg_sq, state["exp_avg_sq"])):
            for n, t in mine.items():
                t[k].copy_(theirs[n])
        g.adam.t = state["adam_t"]
        g.steps_since_fired[k].copy_(state["steps_since_fired"])
        g.last_resample[k] = state["last_resample"]
        g.generators[k].set_state(state["generator"])
        self.step = state["step"]
        if "window" in state:  # checkpoints written before the window was saved resume with an empty one
            self.window.load_state(i, state["window"])


def _moments(x: Tensor) -> Tensor:
    """(d_in + 2,) float64: the sum of the rows, the sum of their squared norms, the row count."""
    f64 = torch.float64  # accumulated in float64, without a float64 copy of x
    return torch.cat([x.sum(0, dtype=f64), torch.linalg.vector_norm(x, dtype=f64).square().reshape(1),
                      x.new_tensor([len(x)], dtype=f64)])
