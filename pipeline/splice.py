"""Splice SAE reconstructions into the LM and measure what arXiv 2404.16014 §4 measures.

`evaluate_hooks` is the engine: it takes an already-built TransformerBridge, token batches with the mask of
positions the store kept, and SAE-like modules per hook (anything with `encode`/`decode` in the activation's
original scale). Per batch it runs the model up to the splice point ONCE (the shared prefix), then per
replacement (clean, zero ablation, mean ablation, each SAE) only the rest of the model. Run directories,
eval.json and the ablation cache are `saeforge.pipeline.evaluate`.

How the shared prefix works on TransformerBridge: `forward(..., stop_at_layer=k)` really stops before block
k; the suffix, `lm.resume_forward` (TransformerLens 4: `forward(resid, start_at_layer=k)`; TransformerLens 3,
which has no start_at_layer: block k's `hook_in` returns the residual), still executes blocks 0..k-1 and
discards their output. So, inside a try/finally, blocks 0..k-1 pass their input straight through
(instance-level `forward` override); block k swaps in the residual. A splice at `blocks.L.hook_resid_post`
resumes at block L+1 with the spliced residual; any other site in block L resumes at block L from the clean
`hook_resid_pre` with a replacement hook at the site.
Strategy `auto` checks this once per (model, splice point) per process, on one window of the first batch with
a zero-ablation splice, against a full forward with a hook; if they differ (or resuming raises), the engine
says so on stderr and falls back to one full `run_with_hooks` forward per replacement.

Scoring cost: the clean next-token log-probabilities of a batch are computed once and shared by every
replacement at that hook; per replacement one float32 log-softmax gives both CE (a gather) and KL. Per-token
values are float32; sums over tokens are float64 (never a float64 (rows, d_vocab) tensor). Sums stay on the
device until the end, so a GPU run does not synchronise per SAE.

Per-window sums: every CE (clean, zero, mean, each SAE) is also returned as a (n_windows,) float64 array of
per-window CE sums, with the (n_windows,) counts of scored predictions, so that `saeforge.pipeline.bootstrap`
can resample windows for paired intervals of eq. 5 and ΔCE.

Conventions: CE is the mean over next-token predictions (logits at t scored against token t+1,
t = 0..pos-2) whose target is not the pad token; the replacement is applied only where `kept` is True,
other positions keep the clean activation; reconstruction metrics are over kept positions only.
"""
from __future__ import annotations

import re
import sys
import weakref
from contextlib import contextmanager
from typing import Iterable, Literal, NamedTuple

import numpy as np
import torch

from saeforge.pipeline import metrics as M
from saeforge.pipeline.errors import EvalError
from saeforge.pipeline.lm import resume_forward, stop_layer

Strategy = Literal["auto", "shared_prefix", "full"]
_SITE_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_RESID_POST = {"hook_resid_post", "hook_out"}
_RESID_PRE = {"hook_resid_pre", "hook_in"}


class AblationCE(NamedTuple):
    """Cross-entropies that depend only on (model, hook, eval text): cacheable across SAEs and runs.

    `clean`, `zero`, `mean` are means over scored predictions; the `_w` arrays are (n_windows,) per-window
    CE sums (float64) and scored-prediction counts (int64), None where unknown (e.g. a cache without them).
    """

    clean: float
    zero: float
    mean: float | None
    n_scored: int
    clean_w: np.ndarray | None = None
    zero_w: np.ndarray | None = None
    mean_w: np.ndarray | None = None
    n_scored_w: np.ndarray | None = None


class SpliceResult(NamedTuple):
    """One SAE at one hook: spliced CE, KL(clean || spliced) per scored token, reconstruction metrics."""

    ce: float
    kl: float
    recon: M.ReconstructionMetrics
    ce_w: np.ndarray | None = None
    """(n_windows,) per-window sums of the spliced CE over scored predictions (float64)."""


class HookResult(NamedTuple):
    hook: str
    ablation: AblationCE
    saes: list[SpliceResult]
    strategy: str
    n_spliced: int
    """Positions where the replacement was applied (= rows of reconstruction metrics)."""


class _Plan(NamedTuple):
    """Where a hook's splice happens and where the suffix resumes."""

    hook: str
    resume: int | None  # block index the suffix starts at; None: no resumable point (full forwards only)
    residual_splice: bool  # True: the spliced activation IS the residual entering block `resume`
    capture: str | None  # clean residual entering `resume` when not residual_splice


def plan_splice(hook: str, n_layers: int) -> _Plan:
    """Resume point for a hook: block L+1 for resid_post, block L for resid_pre or any site inside block L."""
    m = _SITE_RE.match(hook)
    if not m:
        return _Plan(hook, None, False, None)
    layer, site = int(m.group(1)), m.group(2)
    if site in _RESID_POST and layer + 1 < n_layers:
        return _Plan(hook, layer + 1, True, None)
    if site in _RESID_PRE:
        return _Plan(hook, layer, True, None)
    return _Plan(hook, layer, False, f"blocks.{layer}.hook_resid_pre")


def _passthrough(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def skip_blocks(bridge, k: int):
    """Blocks 0..k-1 return their input untouched while inside; restored in `finally`.

    Written to the instance `__dict__` directly: the bridge's `__setattr__` would forward `forward` to the
    wrapped HF layer.
    """
    blocks = list(bridge.blocks)[:k]
    saved = [b.__dict__.get("forward") for b in blocks]
    for b in blocks:
        b.__dict__["forward"] = _passthrough
    try:
        yield
    finally:
        for b, s in zip(blocks, saved):
            if s is None:
                b.__dict__.pop("forward", None)
            else:
                b.__dict__["forward"] = s


class _Engine:
    """Runs prefix and suffixes on a bridge for one batch at a time."""

    def __init__(self, bridge, strategy: Strategy):
        self.bridge, self.strategy = bridge, strategy
        self.n_layers = len(bridge.blocks)

    def capture(self, token_ids, names: list[str]):
        """Clean activations at `names`; full clean logits too when running full forwards (else None)."""
        got: dict[str, torch.Tensor] = {}

        def grab(name):
            def fn(act, hook):
                got[name] = act.detach().clone()
            return fn

        hooks = [(n, grab(n)) for n in names]
        stop = stop_layer(names) or self.n_layers
        if self.strategy == "full" or stop >= self.n_layers:
            return got, self.bridge.run_with_hooks(token_ids, fwd_hooks=hooks)
        self.bridge.run_with_hooks(token_ids, fwd_hooks=hooks, stop_at_layer=stop)
        return got, None

    def run(self, plan: _Plan, token_ids, captured, replacement: torch.Tensor | None, *, full: bool = False):
        """Logits with the hook's activation replaced by `replacement` (None: clean); `full`: no shared prefix."""
        site_shape = captured[plan.hook].shape
        hook_fn = None
        if replacement is not None:
            rep = replacement.reshape(site_shape).to(captured[plan.hook].dtype)  # (batch, pos, d) -> site shape
            hook_fn = lambda act, hook: rep  # noqa: E731
        if full or self.strategy == "full" or plan.resume is None:
            hooks = [(plan.hook, hook_fn)] if hook_fn else []
            return self.bridge.run_with_hooks(token_ids, fwd_hooks=hooks)
        if plan.residual_splice:
            resid = captured[plan.hook] if replacement is None else rep
            hooks = []
        else:
            resid = captured[plan.capture]
            hooks = [(plan.hook, hook_fn)] if hook_fn else []
        with skip_blocks(self.bridge, plan.resume):
            return resume_forward(self.bridge, resid, plan.resume, token_ids=token_ids, fwd_hooks=hooks)


def _module_dtype(module) -> torch.dtype:
    p = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return p.dtype if p is not None else torch.float32


def _replace(x_BPD, kept_BP, values_ND):
    """``x_BPD`` with its kept positions set to ``values_ND`` (rows in row-major order, or a broadcastable value)."""
    out_BPD = x_BPD.clone()
    out_BPD[kept_BP] = values_ND.to(x_BPD.dtype)
    return out_BPD


def _site(captured, plan: _Plan) -> torch.Tensor:
    """The clean activation at the plan's hook as (batch, pos, d) (attention sites are flattened over heads)."""
    x = captured[plan.hook]
    return x.reshape(*x.shape[:2], -1)  # attn.hook_z: (batch, pos, n_heads, d_head) -> (batch, pos, d)


# ------------------------------------------------------------------ auto: is resuming exact on this model?

_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""bridge -> {plan: None (resuming agrees with a full forward) | why it does not}; once per process and model."""


def _check_plan(engine: _Engine, plan: _Plan, token_ids, kept, captured) -> str | None:
    """Zero-ablation splice on these (one-window) token_ids: resumed suffix vs a full forward with a hook."""
    try:
        rep = _replace(_site(captured, plan), kept, torch.zeros(()))
        full = engine.run(plan, token_ids, captured, rep, full=True)
        part = engine.run(plan, token_ids, captured, rep)
        tol = 50 * torch.finfo(full.dtype).eps
        if not torch.allclose(part, full, rtol=tol, atol=tol * float(full.abs().max())):
            return f"resumed logits at {plan.hook} differ from a full forward by {float((part - full).abs().max()):.3g}"
    except Exception as e:  # noqa: BLE001 — any failure to resume means: use full forwards
        return f"{type(e).__name__}: {e}"
    return None


def _self_check(engine: _Engine, plans: list[_Plan], token_ids, kept, captured) -> str | None:
    """Why the shared prefix cannot be used for some plan (None: it can); checks each plan once per model."""
    done = _VERIFIED.setdefault(engine.bridge, {})
    one = {name: act[:1] for name, act in captured.items()}
    for plan in plans:
        if plan.resume is None:
            continue
        if plan not in done:
            done[plan] = _check_plan(engine, plan, token_ids[:1], kept[:1], one)
        if done[plan] is not None:
            return done[plan]
    return None


# ------------------------------------------------------------------ scoring


class _CleanRef(NamedTuple):
    """The clean next-token distribution of one batch, shared by every replacement at a hook."""

    logp: torch.Tensor  # (preds, d_vocab) float32, preds = batch * (pos - 1) next-token predictions
    p: torch.Tensor  # exp(logp)
    target: torch.Tensor  # (preds,) next token ids
    scored: torch.Tensor  # (preds,) bool
    n_windows: int  # batch


def _next_logp(logits_BPV: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of every next-token prediction, (batch * (pos - 1), d_vocab) float32.

    Same operations as `metrics.next_token_ce_sum` (its `F.cross_entropy` is log_softmax + gather), so the
    clean CE is bit-identical to it.
    """
    return torch.log_softmax(logits_BPV[:, :-1].reshape(-1, logits_BPV.shape[-1]).float(), dim=-1)


def _clean_ref(logits_BPV: torch.Tensor, token_ids_BP: torch.Tensor, scored: torch.Tensor) -> _CleanRef:
    logp = _next_logp(logits_BPV)
    return _CleanRef(logp, logp.exp(), token_ids_BP[:, 1:].reshape(-1), scored.reshape(-1), token_ids_BP.shape[0])


def _ce_sum(logp: torch.Tensor, ref: _CleanRef) -> torch.Tensor:
    """Per-window sums over scored predictions of -log p(target): float32 per token, float64 sums
    ((batch,), on the device)."""
    nll = logp.gather(1, ref.target[:, None]).squeeze(1).neg().double()  # (preds,)
    return torch.where(ref.scored, nll, 0.0).reshape(ref.n_windows, -1).sum(1)  # (batch, pos - 1) -> (batch,)


def _ce_kl_sums(logits_BPV: torch.Tensor, ref: _CleanRef) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-window CE sums, KL(clean || spliced) sum) over scored predictions from ONE log-softmax;
    exactly 0 KL if equal."""
    logp = _next_logp(logits_BPV)
    ce = _ce_sum(logp, ref)
    kl = logp.neg_().add_(ref.logp).mul_(ref.p).sum(-1)  # in place: p * (logp_clean - logp), float32 per token
    return ce, kl.double()[ref.scored].sum()


class _HookState:
    """Accumulators for one hook across batches: per-batch (batch,) float64 per-window CE sums and 0-d KL
    sums, on the model's device until `_finish`."""

    def __init__(self, plan: _Plan, saes: list, mean: torch.Tensor | None, known: AblationCE | None):
        self.plan, self.saes, self.mean, self.known = plan, saes, mean, known
        self.ce: dict[str, list[torch.Tensor]] = {"clean": [], "zero": [], "mean": []}
        self.ce_sae: list[list[torch.Tensor]] = [[] for _ in saes]
        self.kl_sae = [0.0] * len(saes)
        self.recon: list[M.ReconstructionAccumulator | None] = [None] * len(saes)
        self.n_scored_w: list[torch.Tensor] = []
        self.n_spliced = 0


def _eval_hook_batch(engine: _Engine, st: _HookState, token_ids, kept, scored, captured, full_clean) -> None:
    plan = st.plan
    x = _site(captured, plan)  # (batch, pos, d)
    if engine.strategy == "full" and full_clean is not None:
        clean = full_clean  # the capture pass was already the clean full forward
    else:
        clean = engine.run(plan, token_ids, captured, None)
    ref = _clean_ref(clean, token_ids, scored)
    del clean
    st.ce["clean"].append(_ce_sum(ref.logp, ref))
    if st.known is None:
        zero = engine.run(plan, token_ids, captured, _replace(x, kept, torch.zeros(())))
        st.ce["zero"].append(_ce_sum(_next_logp(zero), ref))
        del zero
        if st.mean is not None:
            mean = st.mean.to(x.device, x.dtype).expand(int(kept.sum()), -1)
            ablated = engine.run(plan, token_ids, captured, _replace(x, kept, mean))
            st.ce["mean"].append(_ce_sum(_next_logp(ablated), ref))
            del ablated
    x_ND = x[kept]  # the kept positions, row-major
    for i, sae in enumerate(st.saes):
        x_in = x_ND.to(_module_dtype(sae))
        f = sae.encode(x_in)
        x_hat = sae.decode(f)
        if st.recon[i] is None:
            st.recon[i] = M.ReconstructionAccumulator(x.shape[-1], f.shape[-1])
        st.recon[i].update(x_in, x_hat, f)
        ce, kl = _ce_kl_sums(engine.run(plan, token_ids, captured, _replace(x, kept, x_hat)), ref)
        st.ce_sae[i].append(ce)
        st.kl_sae[i] += kl
    st.n_scored_w.append(scored.sum(1))
    st.n_spliced += int(kept.sum())


def _windows(parts: list[torch.Tensor]) -> np.ndarray:
    """Per-batch (batch,) tensors -> one (n_windows,) numpy array (one device-to-host copy)."""
    return torch.cat(parts).cpu().numpy() if parts else np.zeros(0)


def _finish(st: _HookState, strategy: str) -> HookResult:
    n_w = _windows(st.n_scored_w).astype(np.int64)
    n_scored = int(n_w.sum())
    n = max(n_scored, 1)
    w = {k: _windows(v) for k, v in st.ce.items()}
    clean = float(w["clean"].sum()) / n
    if st.known is not None:
        k = st.known
        if k.zero_w is not None and len(k.zero_w) != len(n_w):
            raise EvalError(f"{st.plan.hook}: known ablation CEs cover {len(k.zero_w)} windows, not {len(n_w)}")
        abl = AblationCE(clean, k.zero, k.mean, n_scored, w["clean"], k.zero_w, k.mean_w, n_w)
    else:
        mean = float(w["mean"].sum()) / n if st.mean is not None else None
        mean_w = w["mean"] if st.mean is not None else None
        abl = AblationCE(clean, float(w["zero"].sum()) / n, mean, n_scored, w["clean"], w["zero"], mean_w, n_w)
    saes = []
    for parts, kl, acc in zip(st.ce_sae, st.kl_sae, st.recon):
        ce_w = _windows(parts)
        saes.append(SpliceResult(float(ce_w.sum()) / n, float(kl) / n, acc.result(), ce_w))
    return HookResult(st.plan.hook, abl, saes, strategy, st.n_spliced)


@torch.inference_mode()
def evaluate_hooks(bridge, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], saes_by_hook: dict[str, list],
                   *, means: dict[str, torch.Tensor] | None = None, known: dict[str, AblationCE] | None = None,
                   strategy: Strategy = "auto", pad_id: int | None = None, progress=None) -> dict[str, HookResult]:
    """Evaluate every SAE in `saes_by_hook` on `batches` of (token_ids (batch, pos), kept (batch, pos) bool).

    means: per hook, the (d_in,) activation mean used for mean ablation (omitted: no mean ablation).
    known: per hook, cached ablation CEs; zero/mean-ablation forwards are skipped for those hooks (the clean
    CE is still computed: KL needs the clean logits every batch); their per-window arrays, when present, must
    cover the same windows. progress: a callable(n_tokens) or None. Every CE comes back both as a mean over
    scored predictions and as (n_windows,) per-window sums, windows in batch order.
    """
    means, known = means or {}, known or {}
    plans = [plan_splice(h, len(bridge.blocks)) for h in saes_by_hook]
    bad = [p.hook for p in plans if p.hook not in bridge.hook_dict]
    if bad:
        raise EvalError(f"hook(s) {bad} do not exist on this model; e.g. blocks.0.hook_resid_post")
    engine = _Engine(bridge, "full" if strategy == "full" else "shared_prefix")
    states = [_HookState(p, saes_by_hook[p.hook], means.get(p.hook), known.get(p.hook)) for p in plans]
    names = sorted({p.hook for p in plans} | {p.capture for p in plans if p.capture})
    checked = strategy != "auto"
    for token_ids, kept in batches:
        token_ids, kept = token_ids.to(bridge.cfg.device), kept.to(bridge.cfg.device)
        scored = token_ids[:, 1:] != pad_id if pad_id is not None else torch.ones_like(token_ids[:, 1:], dtype=torch.bool)
        captured, full_clean = engine.capture(token_ids, names)
        if not checked:
            checked = True
            why = _self_check(engine, plans, token_ids, kept, captured)
            if why is not None:
                print(f"saeforge eval: shared prefix unavailable ({why}); using one full forward per "
                      "replacement", file=sys.stderr)
                engine.strategy = "full"
                captured, full_clean = engine.capture(token_ids, names)
        for st in states:
            _eval_hook_batch(engine, st, token_ids, kept, scored, captured, full_clean)
        if progress is not None:
            progress(token_ids.numel())
    return {st.plan.hook: _finish(st, engine.strategy) for st in states}
