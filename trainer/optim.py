"""Adam with a per-SAE learning rate for stacked parameters, the LR/lambda schedules, and the unit-norm
decoder constraint (gradient projection before the step, renormalisation after; arXiv 2404.16014 App. D.1)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


class StackAdam:
    """Adam (same update as `torch.optim.Adam`, foreach off, no weight decay) whose learning rate is a tensor
    with one entry per stacked SAE, so SAEs of a sweep follow their own schedules. Moments can be reset per
    feature (`reset_`), as resampling requires."""

    def __init__(self, params: dict[str, Tensor], betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8):
        self.params = params
        self.betas, self.eps = betas, eps
        self.t = 0
        self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}

    @torch.no_grad()
    def step(self, lr: Tensor) -> None:
        """One update; `lr` is a scalar tensor or (K,) for stacked parameters."""
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2_sqrt = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        for name, p in self.params.items():
            if p.grad is None:
                continue
            g, m, v = p.grad, self.exp_avg[name], self.exp_avg_sq[name]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            step_size = (lr / bc1).reshape(lr.shape + (1,) * (p.dim() - lr.dim()))
            p.sub_(step_size * m / denom)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_dict(self) -> dict:
        return {"t": self.t, "exp_avg": dict(self.exp_avg), "exp_avg_sq": dict(self.exp_avg_sq)}

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        for name in self.params:
            self.exp_avg[name].copy_(state["exp_avg"][name])
            self.exp_avg_sq[name].copy_(state["exp_avg_sq"][name])


def warmup_multiplier(step: int, warmup_steps: int) -> float:
    """Linear warm-up: (step + 1) / warmup_steps, capped at 1 (1 when warmup_steps == 0)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def resample_multiplier(steps_since: Tensor | float, floor: float = 0.1, ramp: int = 1000) -> Tensor:
    """LR multiplier k steps after a resample: `floor` at k = 0, cosine back to 1 at k >= ramp (arXiv 2404.16014 App. D.1):
    floor + (1 - floor) * (1 - cos(pi * k / ramp)) / 2. 0.1, 0.55, 1.0 at k = 0, 500, 1000."""
    k = torch.as_tensor(steps_since, dtype=torch.float64).clamp(0, ramp)
    return floor + (1 - floor) * (1 - torch.cos(math.pi * k / ramp)) / 2


@torch.no_grad()
def project_decoder_grad_(W_dec: Tensor) -> None:
    """Remove from each decoder row's gradient its component along the row (the row's norm cannot change to
    first order): g_i -= (g_i . d^_i) d^_i. Rows are features: W_dec is (d_sae, d_in) or (K, d_sae, d_in)."""
    if W_dec.grad is None:
        return
    d_hat = W_dec / W_dec.norm(dim=-1, keepdim=True)
    W_dec.grad.sub_((W_dec.grad * d_hat).sum(-1, keepdim=True) * d_hat)


@torch.no_grad()
def normalize_decoder_(W_dec: Tensor) -> None:
    """Rescale every decoder row to unit norm, in place."""
    W_dec.div_(W_dec.norm(dim=-1, keepdim=True))
