"""Evaluate SAE run directories on their training store's held-out text and write `eval.json` into each.

The splicing itself is `saeforge.pipeline.splice.evaluate_hooks`; which store (or cfg.json) a run is evaluated
from is `saeforge.pipeline.eval_source`; this module loads the LM, regenerates the held-out windows, reuses the
cached clean/ablation cross-entropies (they depend only on model, hook and text), adds paired bootstrap intervals
over windows (`saeforge.pipeline.bootstrap`), and turns the engine's results into the eval.json records that
`saeforge plot` reads. A run whose eval.json is current (same
settings, weights and store: `saeforge.pipeline.eval_files`) is not evaluated again.

Compute dtype: by default the LM runs in the dtype the store was harvested with (provenance `lm_dtype`), so
the SAE's reconstruction is spliced into the same numerics it was trained on; `dtype` overrides it, and
`auto` / explicit names go through `saeforge.trainer.device.resolve_dtype`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import torch

from saeforge.pipeline import bootstrap as B
from saeforge.pipeline import eval_files as F
from saeforge.pipeline import metrics as M
from saeforge.pipeline.errors import ConfigError, DatasetError, EvalError
from saeforge.pipeline.eval_source import EvalSource, check_runs, group_runs
from saeforge.pipeline.paths import check_output_dir
from saeforge.pipeline.splice import HookResult, SpliceResult, Strategy, evaluate_hooks
from saeforge.pipeline.provenance import TextProvenance
from saeforge.stores.progress import progress_bar
from saeforge.trainer.device import DTYPE_CHOICES, resolve_device, resolve_dtype

EVAL_FILE, EVAL_FORMAT = F.EVAL_FILE, F.EVAL_FORMAT
DTYPE_SPECS = ("store", *DTYPE_CHOICES)
STORE_DTYPE_DEFAULT = "float32"
"""LM dtype taken for `store` when the store's provenance records no `lm_dtype`."""
CONVENTIONS = {
    "ce": "mean over next-token predictions: logits at position t scored against token t+1, t = 0..pos-2, "
          "every window position (windows are packed, no padding)",
    "splice": "replacement applied only at positions the store keeps (kept_positions); others stay clean",
    "reconstruction": "metrics over kept positions only, SAE in the activation's original scale",
    "loss_recovered": "eq. 5: (CE_ablated - CE_sae) / (CE_ablated - CE_clean); zero ablation unless _mean",
    "ci95": "paired bootstrap over held-out windows: the same resampled windows for clean, ablated and spliced "
            "CE, ratio of means recomputed per resample, 2.5th and 97.5th percentiles",
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

    dtype: Literal["store", "auto", "float32", "bfloat16", "float16"] = "store"
    """LM compute dtype: `store` = the store's harvest dtype (provenance `lm_dtype`); `auto` = bfloat16 where the
    device runs it natively and faster, else float32 (`saeforge.trainer.device.resolve_dtype`)."""

    cache_dir: str | None = None
    """Cache of clean/ablation CEs keyed by (model, compute dtype, hook, eval tokens, store mean);
    None: ~/.cache/saeforge/eval."""

    dense_threshold: float = M.DENSE_THRESHOLD
    """A feature active on more than this fraction of evaluated rows counts as dense."""

    bootstrap_resamples: int = B.N_RESAMPLES
    """Paired bootstrap resamples of the held-out windows for the 95% intervals."""

    bootstrap_seed: int = B.SEED
    """Seed of the bootstrap's resample indices."""

    def __post_init__(self):
        problems = [(name, f"must be >= 1, got {getattr(self, name)}")
                    for name in ("tokens", "batch_size", "bootstrap_resamples") if getattr(self, name) < 1]
        if self.strategy not in ("auto", "shared_prefix", "full"):
            problems.append(("strategy", f"must be auto|shared_prefix|full, got {self.strategy!r}"))
        if self.dtype not in DTYPE_SPECS:
            problems.append(("dtype", f"must be {'|'.join(DTYPE_SPECS)}, got {self.dtype!r}"))
        if not 0 < self.dense_threshold <= 1:
            problems.append(("dense_threshold", f"must be in (0, 1], got {self.dense_threshold}"))
        if not 0 <= self.bootstrap_seed < 1 << 63:
            problems.append(("bootstrap_seed", f"must be in [0, 2**63), got {self.bootstrap_seed}"))
        problems += [(name, "must not be empty") for name in ("model", "device", "cache_dir")
                     if getattr(self, name) is not None and not getattr(self, name).strip()]
        if problems:
            raise ConfigError.of(problems)


def _load_runs(run_dirs):
    """(SAE, RunInfo) of every run directory; EvalError naming the directory or the file that cannot be read."""
    from safetensors import SafetensorError

    from saeforge.trainer.errors import TrainerError
    from saeforge.trainer.rundir import CFG_FILE
    from saeforge.trainer.saelens_files import load_sae

    runs = []
    for d in run_dirs:
        if not str(d).strip():
            raise EvalError("a run directory given is empty ('')")
        try:
            sae, info = load_sae(d)
        except TrainerError as e:
            raise EvalError(str(e)) from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # cfg.json parses but is no SAE config
            raise EvalError(f"{Path(d) / CFG_FILE} is not an SAE config saeforge can read "
                            f"({type(e).__name__}: {e})") from None
        except (SafetensorError, RuntimeError, OSError) as e:  # unreadable weights, or not of cfg.json's shapes
            raise EvalError(f"{Path(d) / F.WEIGHTS_FILE} cannot be loaded ({str(e).splitlines()[0]})") from None
        runs.append((sae, info))
    return runs


def _n_batches(text: TextProvenance, cfg: EvalConfig) -> int:
    ctx = text.rules.context_size
    n_batches = cfg.tokens // (ctx * cfg.batch_size)
    if n_batches == 0:
        raise EvalError(f"--tokens {cfg.tokens} is smaller than one batch ({cfg.batch_size} windows x "
                        f"{ctx} tokens = {cfg.batch_size * ctx}); raise --tokens or lower --batch-size")
    return n_batches


def _eval_windows(text: TextProvenance, tokenizer, cfg: EvalConfig, where: str) -> torch.Tensor:
    """(windows, pos) int64: the first held-out windows of the text `where` records, in whole batches."""
    ctx, n_batches = text.rules.context_size, _n_batches(text, cfg)
    try:
        windows = list(islice(text.heldout_windows(tokenizer), n_batches * cfg.batch_size))
    except (OSError, DatasetError) as e:
        raise EvalError(f"held-out text of {where} is unavailable ({e})") from None
    usable = len(windows) - len(windows) % cfg.batch_size
    if usable == 0:
        raise EvalError(f"{where}: only {len(windows)} held-out windows, fewer than one batch of "
                        f"{cfg.batch_size}; lower --batch-size or harvest more text")
    if usable < len(windows) or usable < n_batches * cfg.batch_size:
        print(f"saeforge eval: {where} holds {usable * ctx} held-out tokens in whole batches, "
              f"fewer than the {cfg.tokens} asked for; using them all", file=sys.stderr)
    return torch.as_tensor(np.stack(windows[:usable]), dtype=torch.long)


def resolve_settings(cfg: EvalConfig, store_dtype: str | None, *, warn: bool = True) -> tuple[EvalConfig, str | None]:
    """(cfg with `device` and `dtype` resolved, `store_dtype`): `store_dtype` is the store's harvest dtype
    (provenance `lm_dtype`), None when it records none.

    `warn`: let `resolve_dtype` print its warning line (bf16 on a CPU without native bf16).
    """
    spec = (store_dtype or STORE_DTYPE_DEFAULT) if cfg.dtype == "store" else cfg.dtype
    device = resolve_device(cfg.device)
    return replace(cfg, device=str(device), dtype=resolve_dtype(spec, device, warn=warn)), store_dtype


def _model_names(spec: str, prov) -> set[str]:
    """Every name of the model ``spec``: itself, the hub name TransformerLens resolves it to, and, when it is the
    store's model, the hub name and alias its provenance records (``smollm2-135m`` is HuggingFaceTB/SmolLM2-...)."""
    from saeforge.pipeline.lm import official_name

    names = {spec, official_name(spec)}
    if spec == prov.model:
        names |= {prov.model_info.get(k) for k in ("hf_name", "alias")} - {None}
    return names


def _check_models(runs, spec: str, prov) -> None:
    """Every run names the model evaluated (by any of its names). A folder SAELens wrote names it in its own way
    (``gpt2-small``, a local path): a mismatch there is one line on stderr, not a refusal."""
    from saeforge.pipeline.lm import official_name

    names = _model_names(spec, prov)
    for _, info in runs:
        if not info.model_name or {info.model_name, official_name(info.model_name)} & names:
            continue
        if "saeforge" not in info.cfg:
            print(f"saeforge eval: {info.run_dir} (written by SAELens) names model {info.model_name!r}; evaluating it "
                  f"with {spec!r}", file=sys.stderr)
            continue
        raise EvalError(f"run {info.run_dir} was trained on model {info.model_name!r}, not {spec!r}; "
                        "drop --model or pass the model it was trained on")


def _intervals(a, r: SpliceResult, cfg: EvalConfig) -> dict:
    if a.clean_w is None or r.ce_w is None or len(r.ce_w) == 0:
        return {"loss_recovered_ci95": None, "loss_recovered_mean_ci95": None, "delta_ce_ci95": None}
    return B.splice_intervals(a.clean_w, r.ce_w, a.n_scored_w, zero=a.zero_w, mean=a.mean_w,
                              n_resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)


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
        "frac_alive": dens.frac_alive, **_intervals(a, r, cfg),
        "n_windows": meta["tokens"]["n_windows"], "bootstrap_resamples": cfg.bootstrap_resamples,
        "bootstrap_seed": cfg.bootstrap_seed,
    }
    return {"format": EVAL_FORMAT, "run_dir": str(info.run_dir), "architecture": info.architecture,
            "hook": info.hook_name, **meta, "identity": meta["identity"][str(info.run_dir)],
            "strategy": hook.strategy, "config": asdict(cfg), "conventions": CONVENTIONS,
            "tokens": {**meta["tokens"], "n_scored": a.n_scored, "n_spliced": hook.n_spliced},
            "metrics": {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()},
            "density_histogram": {"log10_edges": dens.log10_edges, "counts": dens.counts,
                                  "n_dead": dens.n_dead, "threshold": dens.threshold}}


def _cache_keys(lm, spec: str, cfg: EvalConfig, hooks, means, text_hash: str) -> dict[str, dict]:
    """Per hook, what its clean/ablation CEs depend on: model, compute dtype, hook, eval tokens, store mean."""
    model_id = {"spec": spec, **{k: lm.info.get(k) for k in ("sha256", "revision", "hf_name")}, "dtype": cfg.dtype}
    return {h: {"model": model_id, "hook": h, "tokens_sha256": text_hash,
                "mean_sha256": F.digest(means[h].numpy().tobytes())} for h in hooks}


def _compute(source: EvalSource, runs, cfg: EvalConfig, spec: str, lms: dict, progress: bool,
             meta: dict) -> dict[str, dict]:
    """Evaluate `runs` (all from `source`) with resolved settings `cfg`; write and return their eval.json records."""
    from saeforge.pipeline.lm import load_lm

    if (spec, cfg.dtype, cfg.device) not in lms:
        lms[spec, cfg.dtype, cfg.device] = load_lm(spec, device=cfg.device, dtype=cfg.dtype)
    lm = lms[spec, cfg.dtype, cfg.device]
    check_runs(runs, source, lm, spec)
    text = source.provenance.text
    windows_WP = _eval_windows(text, lm.tokenizer, cfg, source.where)
    kept_WP = text.kept_positions(windows_WP)
    text_hash = F.digest(windows_WP.numpy().tobytes(), kept_WP.numpy().tobytes())
    hooks = list(dict.fromkeys(info.hook_name for _, info in runs))
    means = {h: torch.as_tensor(source.means[h], dtype=torch.float32) for h in hooks}
    keys = _cache_keys(lm, spec, cfg, hooks, means, text_hash)
    paths = {h: F.cache_path(cfg.cache_dir, keys[h]) for h in hooks}
    known = {h: c for h in hooks if (c := F.read_cache(paths[h])) is not None}
    by_hook = {h: [sae.to(lm.device) for sae, info in runs if info.hook_name == h] for h in hooks}
    batches = list(zip(windows_WP.split(cfg.batch_size), kept_WP.split(cfg.batch_size)))
    t0 = time.perf_counter()
    with progress_bar(windows_WP.numel(), desc="eval", unit="tok", enabled=progress) as bar:
        results = evaluate_hooks(lm.bridge, batches, by_hook, means=means, known=known,
                                 strategy=cfg.strategy, progress=bar.update)
    for h in hooks:
        if h not in known:
            F.write_cache(paths[h], results[h].ablation, keys[h])
    meta = {"model": spec, "model_info": lm.info, **meta, "eval_seconds": time.perf_counter() - t0,
            "tokens": {"n_windows": int(windows_WP.shape[0]), "context_size": int(windows_WP.shape[1]),
                       "n_tokens": int(windows_WP.numel()), "sha256": text_hash},
            "ablation_cache": {h: ("hit" if h in known else "computed") for h in hooks}}
    counters = {h: 0 for h in hooks}
    records = {}
    for _, info in runs:
        h = info.hook_name
        rec = _record(info, results[h], results[h].saes[counters[h]], cfg, meta)
        counters[h] += 1
        F.write_eval(info.run_dir, rec)
        records[str(info.run_dir)] = rec
    return records


def _evaluate_group(source: EvalSource, runs, cfg: EvalConfig, lms: dict, progress: bool,
                    force: bool) -> dict[str, dict]:
    """{run_dir: eval.json record} for the runs of one source: current ones read back, the others computed."""
    prov = source.provenance
    spec = cfg.model or prov.model or runs[0][1].model_name
    _n_batches(prov.text, cfg)  # cheap checks fail before the model loads
    _check_models(runs, spec, prov)
    settings, store_dtype = resolve_settings(cfg, prov.lm_dtype, warn=False)
    identity = {str(info.run_dir): F.run_identity(asdict(settings), info.run_dir, source.identity_doc(info))
                for _, info in runs}
    current = {} if force else {d: rec for d, ident in identity.items()
                                if (rec := F.read_current(Path(d), ident)) is not None}
    for d in current:
        print(f"saeforge eval: {d}: {EVAL_FILE} is up to date (same settings, weights and store); kept",
              file=sys.stderr)
    stale = [(sae, info) for sae, info in runs if str(info.run_dir) not in current]
    if not stale:
        return current
    settings, _ = resolve_settings(cfg, prov.lm_dtype, warn=True)  # its warning line only when the LM will run
    meta = {"store": source.store, "lm_dtype": settings.dtype, "store_lm_dtype": store_dtype,
            "dtype_requested": cfg.dtype, "identity": identity}
    return {**current, **_compute(source, stale, settings, spec, lms, progress, meta)}


def evaluate_runs(run_dirs: Iterable[str | Path], cfg: EvalConfig | None = None, *, progress: bool = True,
                  force: bool = False, store: str | None = None, storage_options: dict | None = None) -> list[dict]:
    """Evaluate SAE run directories on their stores' held-out text; writes eval.json into each; returns them
    in the order given.

    `store`: evaluate every run against this store (it must hold each run's hook and the text the run was
    trained on) instead of its training store; without it a run's training store is used while it exists,
    else what its cfg.json records (`saeforge.pipeline.eval_source`). A store at an fsspec URL is opened with
    `storage_options` (credentials, endpoint; not recorded in eval.json); run directories are local.

    Runs are grouped by store: per store, the LM (from its provenance, or `cfg.model`) runs once per batch up
    to the hooks, and every SAE of every hook shares that prefix. A run whose eval.json is up to date
    (`saeforge.pipeline.eval_files`) is read back instead (`force`: evaluate it anyway); when every run is up
    to date no LM is loaded. The returned records carry `run_dir` as given here.
    """
    cfg = cfg or EvalConfig()
    resolve_device(cfg.device)  # an unknown device, or one this machine lacks, fails before anything is read
    if store is not None and not str(store).strip():
        raise EvalError("--store is empty: give a store path or URL, or leave --store out")
    if cfg.cache_dir is not None:  # as given: Path() would turn a URL's "://" into ":/"
        check_output_dir(cfg.cache_dir, "--cache-dir", holds="the CE cache is")
    else:
        check_output_dir(F.cache_root(None), f"the CE cache {F.cache_root(None)} (set it with --cache-dir)")
    runs = _load_runs(run_dirs)
    lms: dict = {}
    records: dict[str, dict] = {}
    for source, group in group_runs(runs, store, storage_options):
        records.update(_evaluate_group(source, group, cfg, lms, progress, force))
    return [{**records[str(info.run_dir)], "run_dir": str(info.run_dir)} for _, info in runs]
