"""SAE run files in SAELens's layout: `cfg.json` + `sae_weights.safetensors` (file names: rundir.py).

Weights are saved in the activations' ORIGINAL scale: the hook's normalisation is folded in
(`Normaliser.to_original_`), so `load_sae(dir)[0](x)` equals the training-scale SAE's `sae(x * s) / s`.
Tensor names and cfg keys follow SAELens v6 (`architecture` "standard" or "gated"; `W_enc (d_in, d_sae)` is
the Gated SAE's shared W_gate; `metadata.hook_name`); saeforge's own record sits under the `saeforge` key
(rundir.py lists what it holds).
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from saeforge.stores.files import atomic_path, write_atomic
from saeforge.stores.schema import hook_layer
from saeforge.trainer.errors import RunNotFound
from saeforge.trainer.normaliser import Normaliser
from saeforge.trainer.rundir import CFG_FILE, WEIGHTS_FILE, read_cfg
from saeforge.trainer.sae import SAE, GatedSAE, make_sae, unstack

SAELENS_ARCH = {"baseline": "standard", "gated": "gated"}
# SAELens v6 reads configs whose metadata carries a 6.x `sae_lens_version` as-is (older ones go through a
# converter): it names the file format. `sae_lens_training_version` says who trained the SAE, so it is null (an
# absent key would be filled with the loading SAELens's own version: sae_lens/saes/sae.py, SAEMetadata).
SAELENS_FORMAT_VERSION = "6.0.0"


class RunInfo(NamedTuple):
    run_dir: Path
    architecture: str
    """`baseline` or `gated`."""
    hook_name: str
    model_name: str | None
    store: str | None
    """Path or URL of the training store."""
    d_in: int
    d_sae: int
    cfg: dict
    """The whole cfg.json."""


def saelens_state_dict(sae: SAE) -> dict[str, torch.Tensor]:
    """Tensor names SAELens expects: W_gate is saved as W_enc."""
    state = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    if isinstance(sae, GatedSAE):
        state["W_enc"] = state.pop("W_gate")
        if not sae.tie_weights:
            state.pop("r_mag", None)
    return state


def _saeforge_version() -> str | None:
    """Who trained the SAE (cfg.json `saeforge.saeforge_version`; `metadata.sae_lens_training_version` is null)."""
    try:
        return importlib.metadata.version("saeforge")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return None


def cfg_json(sae: SAE, *, hook_name: str, model_name: str | None = None, store: str | None = None,
             provenance: dict | None = None, saeforge: dict | None = None) -> dict[str, Any]:
    arch = SAELENS_ARCH[sae.architecture]
    if isinstance(sae, GatedSAE) and not sae.tie_weights:
        arch = "saeforge_gated_untied"  # no SAELens equivalent (the untied-encoder ablation)
    prov = provenance or {}
    metadata = {"model_name": model_name, "hook_name": hook_name, "hook_layer": hook_layer(hook_name),
                "context_size": prov.get("context_size"), "prepend_bos": prov.get("prepend_bos"),
                "dataset_path": store, "sae_lens_version": SAELENS_FORMAT_VERSION,
                "sae_lens_training_version": None}
    return {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "model_name": model_name, "hook_name": hook_name, "metadata": metadata,
            "saeforge": {**(saeforge or {}), "store": store, "saeforge_version": _saeforge_version()}}


def save_sae(sae: SAE, run_dir: str | Path, *, hook_name: str, normaliser: Normaliser | None = None,
             model_name: str | None = None, store: str | None = None, provenance: dict | None = None,
             saeforge: dict | None = None) -> Path:
    """Write `sae` (in training scale, trained on `normaliser.to_training(x)`; a plain or one-slot stacked
    module) to `run_dir` in the original scale. Both files are replaced atomically. Returns the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    normaliser = normaliser or Normaliser()
    one = normaliser.to_original_(unstack(sae).float())
    record = {**(saeforge or {}), "input_scale": normaliser.scale, "weights_scale": "original"}
    cfg = cfg_json(one, hook_name=hook_name, model_name=model_name, store=store, provenance=provenance,
                   saeforge=record)
    with atomic_path(run_dir / WEIGHTS_FILE) as tmp:
        save_file(saelens_state_dict(one), str(tmp))
    write_atomic(run_dir / CFG_FILE, json.dumps(cfg, indent=2, sort_keys=False))
    return run_dir


def _module_for(cfg: dict, state: dict, run_dir: Path) -> SAE:
    """An empty SAE module of the architecture cfg.json names; renames W_enc back to W_gate in `state`."""
    arch = {"standard": "baseline", "gated": "gated", "saeforge_gated_untied": "gated"}.get(cfg["architecture"])
    if arch is None:
        raise RunNotFound(f"{run_dir}: unsupported architecture {cfg['architecture']!r}")
    if arch == "baseline":
        return make_sae("baseline", cfg["d_in"], cfg["d_sae"])
    state["W_gate"] = state.pop("W_enc")
    untied = "W_mag" in state
    r_mag_trained = untied or bool(cfg.get("saeforge", {}).get("sae", {}).get("use_r_mag", True))
    return make_sae("gated", cfg["d_in"], cfg["d_sae"], tie_weights=not untied, use_r_mag=r_mag_trained)


def load_sae(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[SAE, RunInfo]:
    """(SAE working on the original-scale activations, RunInfo) from a run directory; the module also carries
    the RunInfo as `sae.info` (its cfg.json as `sae.info.cfg`)."""
    run_dir = Path(run_dir)
    cfg = read_cfg(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise RunNotFound(f"{run_dir} has {CFG_FILE} but no {WEIGHTS_FILE}")
    state = load_file(str(weights))
    sae = _module_for(cfg, state, run_dir)
    sae.load_state_dict(state)
    sae.to(device).eval()
    meta = cfg.get("metadata", {})
    info = RunInfo(run_dir, sae.architecture, meta.get("hook_name") or cfg.get("hook_name"),
                   meta.get("model_name") or cfg.get("model_name"), cfg.get("saeforge", {}).get("store"),
                   cfg["d_in"], cfg["d_sae"], cfg)
    sae.info = info  # the SAE carries its run's config (cfg.json, hook, model, store) wherever it goes
    return sae, info
