"""Baseline and Gated SAE modules (arXiv 2404.16014 Eqs. 2-3 and 6-7). Pure: no I/O, logging or device choice.

Weights are raw parameters in one orientation, `x @ W`: `W_enc`/`W_gate`/`W_mag (d_in, d_sae)`,
`W_dec (d_sae, d_in)`. A module built with `n_stack=K` holds K SAEs of the same shape in stacked tensors
(`W_dec (K, d_sae, d_in)`, biases `(K, 1, d)`); the same code then runs batched matmuls and returns
`(K, rows, ...)` for an input of `(rows, d_in)`. `n_stack=None` is one plain SAE.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.functional import relu


class BaselineEncoding(NamedTuple):
    f: Tensor
    """Feature activations ReLU(pre_acts), (rows, d_sae)."""
    pre_acts: Tensor
    """W_enc (x - b_dec) + b_enc, (rows, d_sae)."""


class GatedEncoding(NamedTuple):
    f: Tensor
    """Final activations f~ = f_gate * f_mag (Eq. 6), (rows, d_sae)."""
    pi_gate: Tensor
    """Gate pre-activations W_gate (x - b_dec) + b_gate; L_sparsity and L_aux use ReLU(pi_gate)."""
    pi_mag: Tensor
    """Magnitude pre-activations exp(r_mag) * (W_gate (x - b_dec)) + b_mag."""
    f_gate: Tensor
    """Strict Heaviside 1[pi_gate > 0] in the model dtype (no gradient)."""
    f_mag: Tensor
    """ReLU(pi_mag)."""


def _shape(n_stack: int | None, *dims: int) -> tuple[int, ...]:
    return dims if n_stack is None else (n_stack, *dims)


def _bias_shape(n_stack: int | None, d: int) -> tuple[int, ...]:
    return (d,) if n_stack is None else (n_stack, 1, d)


def centered_matmul(x: Tensor, b_dec: Tensor, W: Tensor) -> Tensor:
    """(x - b_dec) @ W, with b_dec's gradient at the cost of a vector-matrix product instead of a
    (rows, d_in) matmul: the centred input enters with b_dec detached, and the zero-valued term
    (b_dec.detach() - b_dec) @ W carries -sum_rows(grad) @ W^T to b_dec. Values are unchanged bit for bit."""
    return (x - b_dec.detach()) @ W + (b_dec.detach() - b_dec) @ W


class _SAEBase(nn.Module):
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(self, d_in: int, d_sae: int, n_stack: int | None, dtype: torch.dtype | None):
        super().__init__()
        self.d_in, self.d_sae, self.n_stack = d_in, d_sae, n_stack
        self.W_dec = nn.Parameter(torch.zeros(_shape(n_stack, d_sae, d_in), dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(_bias_shape(n_stack, d_in), dtype=dtype))

    def decode(self, f: Tensor) -> Tensor:
        """x_hat = f @ W_dec + b_dec (Eq. 3): (rows, d_sae) -> (rows, d_in)."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def encoder_weights(self) -> list[str]:
        """Names of the (d_in, d_sae) encoder matrices (their columns are per-feature)."""
        raise NotImplementedError

    def feature_biases(self) -> list[str]:
        """Names of the per-feature (d_sae,) vectors reset to 0 on resampling."""
        raise NotImplementedError


class BaselineSAE(_SAEBase):
    """ReLU SAE of Bricken et al. as in arXiv 2404.16014 §2.1: f = ReLU(W_enc (x - b_dec) + b_enc) (Eq. 2),
    x_hat = W_dec f + b_dec (Eq. 3). Parameters: 2*M*n + M + n."""

    architecture = "baseline"

    def __init__(self, d_in: int, d_sae: int, *, n_stack: int | None = None, dtype: torch.dtype | None = None):
        super().__init__(d_in, d_sae, n_stack, dtype)
        self.W_enc = nn.Parameter(torch.zeros(_shape(n_stack, d_in, d_sae), dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(_bias_shape(n_stack, d_sae), dtype=dtype))

    def encode_full(self, x: Tensor) -> BaselineEncoding:
        pre_acts = centered_matmul(x, self.b_dec, self.W_enc) + self.b_enc
        return BaselineEncoding(relu(pre_acts), pre_acts)

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_full(x).f

    def encoder_weights(self) -> list[str]:
        return ["W_enc"]

    def feature_biases(self) -> list[str]:
        return ["b_enc"]


class GatedSAE(_SAEBase):
    """Gated SAE, arXiv 2404.16014 §3.2 Eqs. 6-7. One shared encoder matmul: pi_gate = x_enc + b_gate and
    pi_mag = exp(r_mag) * x_enc + b_mag with x_enc = (x - b_dec) @ W_gate; no b_enc. Tied parameters:
    2*M*n + 3*M + n (baseline + 2M). `tie_weights=False` adds an independent W_mag (+M*n, and r_mag goes);
    `use_r_mag=False` keeps r_mag as a zero buffer (not trained)."""

    architecture = "gated"

    def __init__(self, d_in: int, d_sae: int, *, n_stack: int | None = None, dtype: torch.dtype | None = None,
                 tie_weights: bool = True, use_r_mag: bool = True):
        super().__init__(d_in, d_sae, n_stack, dtype)
        self.tie_weights, self.use_r_mag = tie_weights, use_r_mag
        self.W_gate = nn.Parameter(torch.zeros(_shape(n_stack, d_in, d_sae), dtype=dtype))
        self.b_gate = nn.Parameter(torch.zeros(_bias_shape(n_stack, d_sae), dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(_bias_shape(n_stack, d_sae), dtype=dtype))
        if not tie_weights:
            self.W_mag = nn.Parameter(torch.zeros(_shape(n_stack, d_in, d_sae), dtype=dtype))
        elif use_r_mag:
            self.r_mag = nn.Parameter(torch.zeros(_bias_shape(n_stack, d_sae), dtype=dtype))
        else:
            self.register_buffer("r_mag", torch.zeros(_bias_shape(n_stack, d_sae), dtype=dtype))

    @property
    def W_enc(self) -> Tensor:
        """SAELens's name for the shared gate matrix."""
        return self.W_gate

    def encode_full(self, x: Tensor) -> GatedEncoding:
        x_enc = centered_matmul(x, self.b_dec, self.W_gate)  # (x - b_dec) W_gate
        pi_gate = x_enc + self.b_gate
        if self.tie_weights:
            pi_mag = torch.addcmul(self.b_mag, self.r_mag.exp(), x_enc)  # W_mag = exp(r_mag) ⊙ W_gate (Eq. 7)
        else:
            pi_mag = centered_matmul(x, self.b_dec, self.W_mag) + self.b_mag
        f_gate = (pi_gate > 0).to(pi_mag.dtype)  # strict Heaviside, mask in the model dtype (SAELens #217)
        f_mag = relu(pi_mag)
        return GatedEncoding(f_gate * f_mag, pi_gate, pi_mag, f_gate, f_mag)

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_full(x).f

    def threshold(self) -> Tensor:
        """JumpReLU threshold theta = b_mag - exp(r_mag) * b_gate (arXiv 2404.16014 §3.2.1, App. E; tied weights only)."""
        return self.b_mag - self.r_mag.exp() * self.b_gate

    def encoder_weights(self) -> list[str]:
        return ["W_gate"] if self.tie_weights else ["W_gate", "W_mag"]

    def feature_biases(self) -> list[str]:
        names = ["b_gate", "b_mag"]
        return names + (["r_mag"] if self.tie_weights else [])


SAE = BaselineSAE | GatedSAE


def make_sae(arch: str, d_in: int, d_sae: int, *, n_stack: int | None = None, dtype: torch.dtype | None = None,
             tie_weights: bool = True, use_r_mag: bool = True) -> SAE:
    """An all-zero SAE (or stack of K) of the given architecture; `init_sae_` fills it."""
    if arch == "baseline":
        return BaselineSAE(d_in, d_sae, n_stack=n_stack, dtype=dtype)
    return GatedSAE(d_in, d_sae, n_stack=n_stack, dtype=dtype, tie_weights=tie_weights, use_r_mag=use_r_mag)


def init_weights(d_in: int, d_sae: int, seed: int) -> tuple[Tensor, Tensor]:
    """(W_dec (d_sae, d_in) with unit-norm rows, W_enc = W_dec^T), float32 on the CPU from `seed` alone,
    so one SAE's initial weights do not depend on the device, the dtype or the rest of a sweep."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return W_dec, W_dec.T.contiguous()


@torch.no_grad()
def init_sae_(sae: SAE, seeds: list[int], b_dec: Tensor | None = None) -> None:
    """Initialise in place (as dictionary_learning does; the paper leaves it open): unit-norm random decoder rows, every encoder matrix = W_dec^T,
    b_dec = `b_dec` (e.g. the data mean) or 0, all other biases and r_mag = 0."""
    for k, seed in enumerate(seeds):
        W_dec, W_enc = init_weights(sae.d_in, sae.d_sae, seed)
        _slice(sae.W_dec, k, sae.n_stack).copy_(W_dec)
        for name in sae.encoder_weights():
            _slice(getattr(sae, name), k, sae.n_stack).copy_(W_enc)
        bias = _slice(sae.b_dec, k, sae.n_stack)
        bias.copy_(b_dec.reshape(bias.shape)) if b_dec is not None else bias.zero_()
    for name in sae.feature_biases():
        getattr(sae, name).zero_()


def _slice(t: Tensor, k: int, n_stack: int | None) -> Tensor:
    return t if n_stack is None else t[k]


def unstack(sae: SAE, k: int = 0) -> SAE:
    """SAE number `k` of a stacked module as a plain one-SAE module (a copy; a plain module is copied)."""
    kw = dict(tie_weights=sae.tie_weights, use_r_mag=sae.use_r_mag) if isinstance(sae, GatedSAE) else {}
    one = make_sae(sae.architecture, sae.d_in, sae.d_sae, dtype=sae.W_dec.dtype, **kw).to(sae.W_dec.device)
    state = {name: _slice(t.detach(), k, sae.n_stack).reshape(getattr(one, name).shape).clone()
             for name, t in sae.state_dict().items()}
    one.load_state_dict(state)
    return one


@torch.no_grad()
def load_into_stack_(stack: SAE, k: int, one_state: dict[str, Tensor]) -> None:
    """Copy a one-SAE state dict into slot `k` of a stacked module."""
    for name, t in stack.state_dict().items():
        t[k].copy_(one_state[name].reshape(t[k].shape))


@torch.no_grad()
def fold_input_scale_(sae: SAE, scale: float) -> None:
    """Make an SAE trained on `x * scale` act on raw `x`: new(x) == old(x * scale) / scale. Encoder matrices
    *= scale, W_dec and b_dec /= scale; b_enc, b_gate, b_mag and r_mag are unchanged (f is unchanged)."""
    for name in sae.encoder_weights():
        getattr(sae, name).mul_(scale)
    sae.W_dec.div_(scale)
    sae.b_dec.div_(scale)


@torch.no_grad()
def fold_decoder_norms_(sae: SAE) -> None:
    """Give every decoder row unit norm without changing forward(x) (the fold SAELens #504 fixed): W_dec
    /= ||d_i||, encoder columns and b_enc/b_gate/b_mag *= ||d_i||; r_mag is a log-scale and is NOT rescaled."""
    norms = sae.W_dec.norm(dim=-1)  # (K?, d_sae)
    sae.W_dec.div_(norms.unsqueeze(-1))
    for name in sae.encoder_weights():
        getattr(sae, name).mul_(norms.unsqueeze(-2))
    for name in sae.feature_biases():
        if name != "r_mag":
            getattr(sae, name).mul_(norms.reshape(getattr(sae, name).shape))


def count_parameters(sae: nn.Module) -> int:
    """Trainable parameter count (buffers such as a fixed r_mag excluded)."""
    return sum(p.numel() for p in sae.parameters() if p.requires_grad)
