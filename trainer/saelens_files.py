"""SAE run files in SAELens's layout: `cfg.json` + `sae_weights.safetensors` (file names: rundir.py).

Weights are saved in the activations' ORIGINAL scale: the hook's normalisation is folded in
(`Normaliser.to_original_`), so `load_sae(dir)[0](x)` equals the training-scale SAE's `sae(x * s) / s`.
Tensor names and cfg keys follow SAELens v6 (`architecture` "standard" or "gated"; `W_enc (d_in, d_sae)` is
the Gated SAE's shared W_gate; `metadata.hook_name`); saeforge's own record sits under the `saeforge` key
(rundir.py lists what it holds).

`load_sae` also reads a folder SAELens 6 wrote (`SAE.save_model`: no `saeforge` record): `standard` becomes the
baseline SAE and `gated` the Gated SAE, whose arithmetic is SAELens's (its `W_enc` is the shared `W_gate`); tensors
in any dtype are cast to float32, `apply_b_dec_to_input: false` is folded into the encoder biases, and the hook is
`metadata.hook_name` (a TransformerLens hook name such as `blocks.0.hook_resid_post`). What it cannot compute (TopK,
JumpReLU, `normalize_activations` other than `none`, an SAE of one head) is refused naming the key.
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


SAELENS_READ = {"standard": "baseline", "gated": "gated", "saeforge_gated_untied": "gated"}
"""cfg.json `architecture` -> the module that computes it (SAELens's topk, jumprelu, ... have none here)."""


def _key_problem(cfg: dict) -> str | None:
    """The first cfg.json key whose value saeforge cannot compute, as `key value: why` (None: all can be)."""
    meta = cfg.get("metadata") or {}
    if cfg.get("architecture") not in SAELENS_READ:
        return (f"architecture {cfg.get('architecture')!r} is not one saeforge computes "
                f"({', '.join(a for a in SAELENS_READ if not a.startswith('saeforge'))})")
    if cfg.get("normalize_activations", "none") != "none":
        return (f"normalize_activations {cfg['normalize_activations']!r}: saeforge evaluates SAEs on raw activations; "
                "fold the normalisation into the weights and save with normalize_activations 'none'")
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        return f"reshape_activations {cfg['reshape_activations']!r}: expected 'none' or 'hook_z'"
    if meta.get("hook_head_index") is not None:
        return f"metadata.hook_head_index {meta['hook_head_index']!r}: an SAE of one attention head is not supported"
    if not (meta.get("hook_name") or cfg.get("hook_name")):
        return "metadata.hook_name is missing: the SAE names no hook point"
    return None


def _centre_input_(cfg: dict, state: dict) -> None:
    """SAELens's `apply_b_dec_to_input: false` (the encoder reads x, not x - b_dec) in saeforge's form, which
    always centres: the encoder biases absorb b_dec @ W_enc (the Gated magnitude path scaled by exp(r_mag))."""
    if cfg.get("apply_b_dec_to_input", True):
        return
    shift = state["b_dec"] @ state["W_enc"]  # (d_sae,)
    if "b_enc" in state:
        state["b_enc"] = state["b_enc"] + shift
        return
    state["b_gate"] = state["b_gate"] + shift
    if "W_mag" in state:  # the untied-encoder ablation: its own magnitude encoder
        state["b_mag"] = state["b_mag"] + state["b_dec"] @ state["W_mag"]
    else:
        state["b_mag"] = state["b_mag"] + shift * (state["r_mag"].exp() if "r_mag" in state else 1.0)


def _module_for(cfg: dict, state: dict, run_dir: Path) -> SAE:
    """An empty SAE module of the architecture cfg.json names; `state` (float32, in place) in saeforge's form:
    W_enc renamed W_gate, a SAELens `apply_b_dec_to_input: false` folded into the biases. RunNotFound naming the
    key when cfg.json asks for something saeforge does not compute (``normalize_activations``, TopK, ...)."""
    missing = [k for k in ("d_in", "d_sae") if not isinstance(cfg.get(k), int)]
    if missing:
        raise RunNotFound(f"{run_dir / CFG_FILE} is not an SAE config saeforge can read (no integer "
                          f"{' and '.join(missing)})")
    problem = _key_problem(cfg)
    if problem:
        raise RunNotFound(f"{run_dir / CFG_FILE}: {problem}")
    for name, tensor in state.items():
        state[name] = tensor.float()
    _centre_input_(cfg, state)
    arch = SAELENS_READ[cfg["architecture"]]
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
