"""saeforge: activation stores and a decoupled trainer for baseline and Gated sparse autoencoders
(Rajamanoharan et al. 2024, arXiv 2404.16014).

The notebook API, one import per stage (each name is imported on first use, so `import saeforge` is cheap):

    import saeforge
    saeforge.harvest(saeforge.HarvestConfig(out="acts/l10", layers=(10,), sites=("resid_post",), tokens=10**6))
    store = saeforge.open_store("acts/l10")                      # typed attributes, stats, provenance
    x = store.to_dask("blocks.10.hook_resid_post")               # float values, also for bf16 stores
    saeforge.train("acts/l10", [saeforge.SAEConfig(arch="gated", l1_coefficient=3e-3)],
                   saeforge.TrainConfig(hook="blocks.10.hook_resid_post", steps=20_000), "runs/g1")
    sae, info = saeforge.load_sae("runs/g1")                     # raw-scale SAE; info carries cfg.json
    saeforge.evaluate(["runs/g1"], saeforge.EvalConfig(tokens=2**17))

This package lives in `pipeline/api/` (the repository's top level holds only `stores/`, `trainer/` and
`pipeline/`, installed as `saeforge.stores`, `saeforge.trainer` and `saeforge.pipeline`).
"""
from __future__ import annotations

import importlib
import importlib.metadata

__version__ = importlib.metadata.version("saeforge")

_EXPORTS = {
    "open_store": "saeforge.stores",
    "Store": "saeforge.stores",
    "StoreLoader": "saeforge.stores",
    "verify_store": "saeforge.stores",
    "SAEConfig": "saeforge.trainer.config",
    "TrainConfig": "saeforge.trainer.config",
    "train": ("saeforge.trainer.run", "train_from_store"),
    "load_sae": ("saeforge.trainer.saelens_files", "load_sae"),
    "HarvestConfig": "saeforge.pipeline.harvest",
    "harvest": "saeforge.pipeline.harvest",
    "EvalConfig": "saeforge.pipeline.evaluate",
    "evaluate": ("saeforge.pipeline.evaluate", "evaluate_runs"),
    "run_demo": "saeforge.pipeline.demo",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'saeforge' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(module), attr)


def __dir__():
    return sorted(__all__)
