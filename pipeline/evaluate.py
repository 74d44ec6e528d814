"""Splice SAE reconstructions into the LM and measure what arXiv 2404.16014 §4 measures.

`evaluate_hooks` is the engine: it takes an already-built TransformerBridge, token batches with the mask of
positions the store kept, and SAE-like modules per hook (anything with `encode`/`decode` in the activation's
original scale). Per batch it runs the model up to the splice point ONCE (the shared prefix), then per
replacement (clean, zero ablation, mean ablation, each SAE) only the rest of the model.

How the shared prefix works on TransformerBridge (TransformerLens 4.3): `forward(..., stop_at_layer=k)`
really stops before block k, but `forward(resid, start_at_layer=k)` still executes blocks 0..k-1 and
discards their output. So for the suffix we call `start_at_layer=k` and, inside a try/finally, make blocks
0..k-1 pass their input straight through (instance-level `forward` override); block k swaps in the
residual. A splice at `blocks.L.hook_resid_post` resumes at block L+1 with the spliced residual; any other
site in block L resumes at block L from the clean `hook_resid_pre` with a replacement hook at the site. On the
first batch the clean suffix is checked against one full forward; if they differ (or resuming raises), the
engine says so on stderr and falls back to one full `run_with_hooks` forward per replacement.

Conventions: CE is the mean over next-token predictions (logits at t scored against token t+1,
t = 0..pos-2) whose target is not the pad token; the replacement is applied only where `kept` is True,
other positions keep the clean activation; reconstruction metrics are over kept positions only.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Literal, NamedTuple

import numpy as np
import torch

from saeforge.pipeline import metrics as M

Strategy = Literal["auto", "shared_prefix", "full"]
_SITE_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_RESID_POST = {"hook_resid_post", "hook_out"}
_RESID_PRE = {"hook_resid_pre", "hook_in"}
EVAL_FILE = "eval.json"
EVAL_FORMAT = 1
CONVENTIONS = {
    "ce": "mean over next-token predictions: logits at position t scored against token t+1, t = 0..pos-2, "
          "every window position (windows are packed, no padding)",
    "splice": "replacement applied only at positions the store keeps (kept_positions); others stay clean",
    "reconstruction": "metrics over kept positions only, SAE in the activation's original scale",
    "loss_recovered": "eq. 5: (CE_ablated - CE_sae) / (CE_ablated - CE_clean); zero ablation unless _mean",
    "kl": "KL(clean || spliced) per scored prediction, nats",
    "gamma": "eq. 10 (v2): E||x_hat||^2 / E[x_hat . x], ratio of eval-set means",
    "explained_variance": "1 - E||x - x_hat||^2 / E||x - mean_eval(x)||^2",
    "l2_ratio": "mean over rows of ||x_hat|| / ||x||",
    "l0": "mean number of nonzero final feature activations per row (gated: f_gate * f_mag)",
    "density": "fraction of evaluated rows on which a feature is nonzero; dead: never; dense: > threshold",
}


class EvalError(ValueError):
    """Evaluation cannot proceed: the message names the run, hook, model or budget and what to do."""


class AblationCE(NamedTuple):
    """Cross-entropies that depend only on (model, hook, eval text): cacheable across SAEs and runs."""

    clean: float
    zero: float
    mean: float | None
    n_scored: int


class SpliceResult(NamedTuple):
    """One SAE at one hook: spliced CE, KL(clean || spliced) per scored token, reconstruction metrics."""

    ce: float
    kl: float
    recon: M.ReconstructionMetrics


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


class _HookState:
    """Accumulators for one hook across batches."""

    def __init__(self, plan: _Plan, saes: list, mean: torch.Tensor | None, known: AblationCE | None):
        self.plan, self.saes, self.mean, self.known = plan, saes, mean, known
        self.ce = {"clean": 0.0, "zero": 0.0, "mean": 0.0}
        self.ce_sae = [0.0] * len(saes)
        self.kl_sae = [0.0] * len(saes)
        self.recon: list[M.ReconstructionAccumulator | None] = [None] * len(saes)
        self.n_scored = self.n_spliced = 0


class _Engine:
    """Runs prefix and suffixes on a bridge for one batch at a time."""

    def __init__(self, bridge, strategy: Strategy):
        self.bridge, self.strategy = bridge, strategy
        self.n_layers = len(bridge.blocks)

    def capture(self, tokens, names: list[str]):
        """Clean activations at `names`; full clean logits too when running full forwards (else None)."""
        got: dict[str, torch.Tensor] = {}

        def grab(name):
            def fn(act, hook):
                got[name] = act.detach().clone()
            return fn

        hooks = [(n, grab(n)) for n in names]
        matches = [_SITE_RE.match(n) for n in names]
        stop = max(int(m.group(1)) + 1 if m else self.n_layers for m in matches)
        if self.strategy == "full" or stop >= self.n_layers:
            return got, self.bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        self.bridge.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=stop)
        return got, None

    def run(self, plan: _Plan, tokens, captured, replacement: torch.Tensor | None):
        """Logits with the hook's activation replaced by `replacement` (None: clean)."""
        site_shape = captured[plan.hook].shape
        hook_fn = None
        if replacement is not None:
            rep = replacement.reshape(site_shape).to(captured[plan.hook].dtype)
            hook_fn = lambda act, hook: rep  # noqa: E731
        if self.strategy == "full" or plan.resume is None:
            hooks = [(plan.hook, hook_fn)] if hook_fn else []
            return self.bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        if plan.residual_splice:
            resid = captured[plan.hook] if replacement is None else rep
            hooks = []
        else:
            resid = captured[plan.capture]
            hooks = [(plan.hook, hook_fn)] if hook_fn else []
        with skip_blocks(self.bridge, plan.resume):
            return self.bridge.run_with_hooks(resid, fwd_hooks=hooks, start_at_layer=plan.resume)


def _module_dtype(module) -> torch.dtype:
    p = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return p.dtype if p is not None else torch.float32


def _self_check(engine: _Engine, plans: list[_Plan], tokens, captured) -> str | None:
    """Why shared-prefix logits differ from one full forward on this batch (None: they agree)."""
    try:
        full = engine.bridge(tokens)
        tol = 50 * torch.finfo(full.dtype).eps
        for plan in plans:
            if plan.resume is None:
                continue
            part = engine.run(plan, tokens, captured, None)
            if not torch.allclose(part, full, rtol=tol, atol=tol * float(full.abs().max())):
                gap = float((part - full).abs().max())
                return f"resumed logits at {plan.hook} differ from a full forward by {gap:.3g}"
    except Exception as e:  # noqa: BLE001 — any failure to resume means: use full forwards
        return f"{type(e).__name__}: {e}"
    return None


def _replace(x, kept, values):
    out = x.clone()
    out[kept] = values.to(x.dtype)
    return out


def _eval_hook_batch(engine: _Engine, st: _HookState, tokens, kept, scored, captured, full_clean) -> None:
    plan = st.plan
    x_site = captured[plan.hook]
    x = x_site.reshape(*x_site.shape[:2], -1)
    if engine.strategy == "full" and full_clean is not None:
        clean = full_clean  # the capture pass was already the clean full forward
    else:
        clean = engine.run(plan, tokens, captured, None)
    ref_logp = M.log_probs(clean)
    st.ce["clean"] += M.next_token_ce_sum(clean, tokens, scored)
    del clean
    if st.known is None:
        st.ce["zero"] += M.next_token_ce_sum(
            engine.run(plan, tokens, captured, _replace(x, kept, torch.zeros(()))), tokens, scored)
        if st.mean is not None:
            mean = st.mean.to(x.device, x.dtype).expand(int(kept.sum()), -1)
            st.ce["mean"] += M.next_token_ce_sum(
                engine.run(plan, tokens, captured, _replace(x, kept, mean)), tokens, scored)
    x_kept = x[kept]
    for i, sae in enumerate(st.saes):
        x_in = x_kept.to(_module_dtype(sae))
        f = sae.encode(x_in)
        x_hat = sae.decode(f)
        if st.recon[i] is None:
            st.recon[i] = M.ReconstructionAccumulator(x.shape[-1], f.shape[-1])
        st.recon[i].update(x_in, x_hat, f)
        logits = engine.run(plan, tokens, captured, _replace(x, kept, x_hat))
        st.ce_sae[i] += M.next_token_ce_sum(logits, tokens, scored)
        st.kl_sae[i] += M.kl_sum(ref_logp, logits, scored)
    st.n_scored += int(scored.sum())
    st.n_spliced += int(kept.sum())


def _finish(st: _HookState, strategy: str) -> HookResult:
    n = max(st.n_scored, 1)
    if st.known is not None:
        abl = AblationCE(st.ce["clean"] / n, st.known.zero, st.known.mean, st.n_scored)
    else:
        abl = AblationCE(st.ce["clean"] / n, st.ce["zero"] / n,
                         st.ce["mean"] / n if st.mean is not None else None, st.n_scored)
    saes = [SpliceResult(ce / n, kl / n, acc.result()) for ce, kl, acc in zip(st.ce_sae, st.kl_sae, st.recon)]
    return HookResult(st.plan.hook, abl, saes, strategy, st.n_spliced)


@torch.inference_mode()
def evaluate_hooks(bridge, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], saes_by_hook: dict[str, list],
                   *, means: dict[str, torch.Tensor] | None = None, known: dict[str, AblationCE] | None = None,
                   strategy: Strategy = "auto", pad_id: int | None = None, progress=None) -> dict[str, HookResult]:
    """Evaluate every SAE in `saes_by_hook` on `batches` of (tokens (batch, pos), kept (batch, pos) bool).

    means: per hook, the (d_in,) activation mean used for mean ablation (omitted: no mean ablation).
    known: per hook, cached ablation CEs; zero/mean-ablation forwards are skipped for those hooks (the clean
    CE is still computed: KL needs the clean logits every batch). progress: a callable(n_tokens) or None.
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
    for tokens, kept in batches:
        tokens, kept = tokens.to(bridge.cfg.device), kept.to(bridge.cfg.device)
        scored = tokens[:, 1:] != pad_id if pad_id is not None else torch.ones_like(tokens[:, 1:], dtype=torch.bool)
        captured, full_clean = engine.capture(tokens, names)
        if not checked:
            checked = True
            why = _self_check(engine, plans, tokens, captured)
            if why is not None:
                print(f"saeforge eval: shared prefix unavailable ({why}); using one full forward per "
                      "replacement", file=sys.stderr)
                engine.strategy = "full"
                captured, full_clean = engine.capture(tokens, names)
        for st in states:
            _eval_hook_batch(engine, st, tokens, kept, scored, captured, full_clean)
        if progress is not None:
            progress(tokens.numel())
    return {st.plan.hook: _finish(st, engine.strategy) for st in states}


# ------------------------------------------------------------------ run directories


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How `evaluate_runs` evaluates SAE run directories (recorded in every eval.json)."""

    tokens: int = 2**18
    """Budget: held-out tokens to evaluate on (windows x context size), rounded down to whole batches.
    The paper used over a million (2**20); 2**18 keeps a CPU run of SmolLM2 in minutes."""

    batch_size: int = 8
    """Windows per forward pass."""

    strategy: Strategy = "auto"
    """`shared_prefix`: run the model up to the hook once per batch, then only the rest per SAE;
    `full`: one full forward per replacement; `auto`: shared prefix after checking it on the first batch."""

    model: str | None = None
    """LM spec (load_lm) to evaluate with; None: the model the store's provenance records."""

    device: str = "auto"
    """Torch device for the LM and SAEs (`auto`: cuda when available)."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """LM compute dtype."""

    cache_dir: str | None = None
    """Cache of clean/ablation CEs keyed by (model, hook, eval tokens, store mean); None: ~/.cache/saeforge/eval."""

    dense_threshold: float = M.DENSE_THRESHOLD
    """A feature active on more than this fraction of evaluated rows counts as dense."""

    def __post_init__(self):
        problems = []
        if self.tokens < 1:
            problems.append(f"tokens must be >= 1, got {self.tokens}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.strategy not in ("auto", "shared_prefix", "full"):
            problems.append(f"strategy must be auto|shared_prefix|full, got {self.strategy!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype must be float32|bfloat16|float16, got {self.dtype!r}")
        if not 0 < self.dense_threshold <= 1:
            problems.append(f"dense_threshold must be in (0, 1], got {self.dense_threshold}")
        if problems:
            raise ValueError("; ".join(problems))


def _load_runs(run_dirs):
    from saeforge.trainer.errors import TrainerError
    from saeforge.trainer.io import load_sae

    runs = []
    for d in run_dirs:
        try:
            sae, info = load_sae(d)
        except TrainerError as e:
            raise EvalError(str(e)) from None
        if not info.store:
            raise EvalError(f"{d}: cfg.json records no training store, so there is no held-out text to use")
        runs.append((sae, info))
    return runs


def _n_batches(prov: dict, cfg: EvalConfig) -> int:
    ctx = int(prov["context_size"])
    n_batches = cfg.tokens // (ctx * cfg.batch_size)
    if n_batches == 0:
        raise EvalError(f"--tokens {cfg.tokens} is smaller than one batch ({cfg.batch_size} windows x "
                        f"{ctx} tokens = {cfg.batch_size * ctx}); raise --tokens or lower --batch-size")
    return n_batches


def _eval_windows(prov: dict, tokenizer, cfg: EvalConfig, store_path: str) -> torch.Tensor:
    from saeforge.pipeline.data import heldout_windows

    ctx, n_batches = int(prov["context_size"]), _n_batches(prov, cfg)
    try:
        windows = list(islice(heldout_windows(prov, tokenizer), n_batches * cfg.batch_size))
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"held-out text of store {store_path} is unavailable ({e})") from None
    usable = len(windows) - len(windows) % cfg.batch_size
    if usable == 0:
        raise EvalError(f"store {store_path}: only {len(windows)} held-out windows, fewer than one batch of "
                        f"{cfg.batch_size}; lower --batch-size or harvest more text")
    if usable < len(windows) or usable < n_batches * cfg.batch_size:
        print(f"saeforge eval: store {store_path} holds {usable * ctx} held-out tokens in whole batches, "
              f"fewer than the {cfg.tokens} asked for; using them all", file=sys.stderr)
    return torch.as_tensor(np.stack(windows[:usable]), dtype=torch.long)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_path(cfg: EvalConfig, key: str) -> Path:
    root = Path(cfg.cache_dir) if cfg.cache_dir else Path.home() / ".cache" / "saeforge" / "eval"
    return root / f"{key}.json"


def _read_cache(path: Path) -> AblationCE | None:
    try:
        d = json.loads(path.read_text())
        return AblationCE(d["clean"], d["zero"], d["mean"], d["n_scored"])
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(path: Path, abl: AblationCE, what: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**abl._asdict(), "key": what}, indent=1))
    tmp.replace(path)


def _check_models(runs, spec: str) -> None:
    for _, info in runs:
        if info.model_name and info.model_name != spec:
            raise EvalError(f"run {info.run_dir} was trained on model {info.model_name!r}, not {spec!r}; "
                            "drop --model or pass the model it was trained on")


def _check_runs(runs, store, lm, spec: str) -> None:
    for _, info in runs:
        where = f"run {info.run_dir}"
        if info.hook_name not in lm.bridge.hook_dict:
            raise EvalError(f"{where}: hook {info.hook_name!r} does not exist on model {spec!r}")
        if info.hook_name not in store.hooks:
            raise EvalError(f"{where}: hook {info.hook_name!r} is not in store {store.path} "
                            f"(it holds {', '.join(store.hooks)})")
        if store.d(info.hook_name) != info.d_in:
            raise EvalError(f"{where}: d_in {info.d_in} but {info.hook_name} is {store.d(info.hook_name)} wide")


def _record(info, hook: HookResult, r: SpliceResult, cfg: EvalConfig, meta: dict) -> dict:
    a = hook.ablation
    dens = M.feature_density(r.recon.feature_counts, r.recon.n_rows, cfg.dense_threshold)
    metrics = {
        "ce_clean": a.clean, "ce_sae": r.ce, "ce_zero_ablation": a.zero, "ce_mean_ablation": a.mean,
        "loss_recovered": M.loss_recovered(a.clean, r.ce, a.zero),
        "loss_recovered_mean": M.loss_recovered(a.clean, r.ce, a.mean) if a.mean is not None else None,
        "delta_ce": M.delta_ce(a.clean, r.ce), "kl": r.kl, "l0": r.recon.l0, "mse": r.recon.mse,
        "sq_err": r.recon.sq_err, "explained_variance": r.recon.explained_variance, "gamma": r.recon.gamma,
        "l2_ratio": r.recon.l2_ratio, "d_sae": info.d_sae, "n_dead": dens.n_dead, "n_dense": dens.n_dense,
        "frac_alive": dens.frac_alive,
    }
    return {"format": EVAL_FORMAT, "run_dir": str(info.run_dir), "architecture": info.architecture,
            "hook": info.hook_name, **meta, "strategy": hook.strategy, "config": asdict(cfg),
            "conventions": CONVENTIONS,
            "tokens": {**meta["tokens"], "n_scored": a.n_scored, "n_spliced": hook.n_spliced},
            "metrics": {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()},
            "density_histogram": {"log10_edges": dens.log10_edges, "counts": dens.counts,
                                  "n_dead": dens.n_dead, "threshold": dens.threshold}}


def _evaluate_store(store_path: str, runs, cfg: EvalConfig, lms: dict, progress: bool) -> list[dict]:
    from tqdm import tqdm

    from saeforge.pipeline.data import kept_positions
    from saeforge.pipeline.lm import load_lm
    from saeforge.stores import open_store

    store = open_store(store_path)
    prov = store.provenance
    spec = cfg.model or prov.get("model") or runs[0][1].model_name
    _n_batches(prov, cfg)  # cheap checks fail before the model loads
    _check_models(runs, spec)
    if spec not in lms:
        lms[spec] = load_lm(spec, device=cfg.device, dtype=cfg.dtype)
    lm = lms[spec]
    _check_runs(runs, store, lm, spec)
    tokens = _eval_windows(prov, lm.tokenizer, cfg, store_path)
    kept = kept_positions(tokens, prov)
    text_hash = _digest(tokens.numpy().tobytes(), kept.numpy().tobytes())
    hooks = list(dict.fromkeys(info.hook_name for _, info in runs))
    means = {h: torch.as_tensor(store.stats(h).mean, dtype=torch.float32) for h in hooks}
    model_id = {"spec": spec, **{k: lm.info.get(k) for k in ("sha256", "revision", "hf_name")}, "dtype": cfg.dtype}
    keys = {h: {"model": model_id, "hook": h, "tokens_sha256": text_hash, "format": EVAL_FORMAT,
                "mean_sha256": _digest(means[h].numpy().tobytes())} for h in hooks}
    paths = {h: _cache_path(cfg, _digest(keys[h])) for h in hooks}
    known = {h: c for h in hooks if (c := _read_cache(paths[h])) is not None}
    by_hook = {h: [sae.to(lm.device) for sae, info in runs if info.hook_name == h] for h in hooks}
    batches = [(t, k) for t, k in zip(tokens.split(cfg.batch_size), kept.split(cfg.batch_size))]
    t0 = time.perf_counter()
    with tqdm(total=tokens.numel(), unit="tok", desc="eval", file=sys.stderr, disable=not progress) as bar:
        results = evaluate_hooks(lm.bridge, batches, by_hook, means=means, known=known,
                                 strategy=cfg.strategy, progress=bar.update)
    for h in hooks:
        if h not in known:
            _write_cache(paths[h], results[h].ablation, keys[h])
    meta = {"model": spec, "model_info": lm.info, "store": str(store_path), "eval_seconds": time.perf_counter() - t0,
            "tokens": {"n_windows": int(tokens.shape[0]), "context_size": int(tokens.shape[1]),
                       "n_tokens": int(tokens.numel()), "sha256": text_hash},
            "ablation_cache": {h: ("hit" if h in known else "computed") for h in hooks}}
    counters = {h: 0 for h in hooks}
    records = []
    for _, info in runs:
        h = info.hook_name
        rec = _record(info, results[h], results[h].saes[counters[h]], cfg, meta)
        counters[h] += 1
        (Path(info.run_dir) / EVAL_FILE).write_text(json.dumps(rec, indent=2))
        records.append(rec)
    return records


def evaluate_runs(run_dirs: Iterable[str | Path], cfg: EvalConfig | None = None, *,
                  progress: bool = True) -> list[dict]:
    """Evaluate SAE run directories on their stores' held-out text; writes eval.json into each; returns them.

    Runs are grouped by training store: per store, the LM (from its provenance, or `cfg.model`) runs once per
    batch up to the hooks, and every SAE of every hook shares that prefix.
    """
    cfg = cfg or EvalConfig()
    runs = _load_runs(run_dirs)
    groups: dict[str, list] = {}
    for sae, info in runs:
        groups.setdefault(str(info.store), []).append((sae, info))
    lms: dict = {}
    order = {str(info.run_dir): i for i, (_, info) in enumerate(runs)}
    records = [rec for store, group in groups.items() for rec in _evaluate_store(store, group, cfg, lms, progress)]
    return sorted(records, key=lambda r: order[r["run_dir"]])
