"""The Hugging Face hub, asked once and never waited on: can it be reached, and is a name in the local cache.

A hub name (``--model gpt2``, ``--dataset NeelNanda/pile-10k``) is checked before anything else runs. Where the
hub cannot be reached, transformers and datasets retry each request with back-off, about 30 s per name before
they give up; so instead the hub is probed once per process with a short timeout (or taken as off when
``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or ``HF_DATASETS_OFFLINE`` says so), and a name the local cache does
not hold then fails at once, in one line. A cached name still works without the hub: the model loads from its
snapshot directory in the cache, the dataset with the libraries' offline flag on (:func:`offline_mode`).
"""
from __future__ import annotations

import functools
import glob
import os
import urllib.error
import urllib.request
from contextlib import contextmanager

PROBE_TIMEOUT_S = 3.0
"""How long the one probe of the hub may take (DNS failure, a refused connection or no route fail far sooner)."""

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


def endpoint() -> str:
    """The hub's address (``HF_ENDPOINT``, default https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_variable() -> str | None:
    """``NAME=value`` of the first variable that turns the hub off, None when none does."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").upper() in _TRUE:
            return f"{name}={os.environ[name]}"
    return None


@functools.cache
def unreachable() -> str | None:
    """Why the hub cannot be used (an offline variable, or what the probe met); None when it answers.

    Asked once per process (``unreachable.cache_clear()`` asks again): any HTTP answer counts as reachable."""
    variable = offline_variable()
    if variable:
        return f"offline mode: {variable}"
    request = urllib.request.Request(endpoint() + "/api/models?limit=1", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered, if only to refuse this request
    except (OSError, ValueError) as e:  # URLError (DNS, refused, no route), a timeout, a malformed HF_ENDPOINT
        reason = getattr(e, "reason", None) or e
        return f"{endpoint()} cannot be reached: {str(reason).splitlines()[0] if str(reason) else type(e).__name__}"
    return None


def cached_model_dir(name: str, revision: str | None = None) -> str | None:
    """The hub cache's snapshot directory of a model whose config.json it holds (what transformers reads first, and
    a local directory loads without asking the hub); None when it holds none."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return os.path.dirname(config) if isinstance(config, str) else None


def dataset_cached(name: str) -> bool:
    """Whether datasets' cache holds a prepared copy of the dataset (what it loads when offline)."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = os.path.join(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE)), "___".join(parts))
    return any(os.path.isdir(p) for p in glob.glob(os.path.join(glob.escape(root), "*", "*", "*")))


@contextmanager
def offline_mode():
    """While inside, datasets and huggingface_hub behave as under ``HF_HUB_OFFLINE=1`` (they read the variable at
    import, so their module flags are switched; restored in ``finally``)."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
