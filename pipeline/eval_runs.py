"""Evaluate SAE run directories on their training store's held-out text and write `eval.json` into each.

The splicing itself is `saeforge.pipeline.evaluate.evaluate_hooks`; this module finds the store, the LM and
the held-out windows, caches the clean/ablation cross-entropies (they depend only on model, hook and text), and
turns the engine's results into the eval.json records that `saeforge plot` reads.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import torch

from saeforge.pipeline import metrics as M
from saeforge.pipeline.evaluate import AblationCE, EvalError, HookResult, SpliceResult, Strategy, evaluate_hooks

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
