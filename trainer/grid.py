"""Sweep grids: expand a grid (hook x arch x d_sae x lambda x seed) plus explicit `[[sae]]` entries into SAE
configs, and the equal-compute width rule (arXiv 2404.16014 §5.2)."""
from __future__ import annotations

import itertools
from typing import Any

from saeforge.trainer.config import SAE_FIELDS, SAEConfig, build
from saeforge.trainer.errors import ConfigError

GRID_LISTS = ("hook", "arch", "d_sae", "l1_coefficient", "seed")
EQUAL_COMPUTE_FACTOR = 1.5  # a Gated step costs <= 1.5x a same-width baseline step (arXiv 2404.16014 §4.1, fn. 2)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expand_sweep(grid_file: dict[str, Any], grid_flags: dict[str, Any], explicit: list[dict[str, Any]], *,
                 equal_compute: bool = False) -> list[SAEConfig]:
    """SAEs of the grid (hook x arch x d_sae x lambda x seed; flags replace file keys) followed by the explicit
    `[[sae]]` entries. `l1_coefficient_baseline` gives baselines their own lambdas. With `equal_compute`,
    grid baselines get round(1.5 x d_sae)."""
    grid = {**grid_file, **{k: v for k, v in grid_flags.items() if v is not None}}
    allowed = SAE_FIELDS - {"name"} | {"l1_coefficient_baseline"}
    unknown = sorted(set(grid) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) in the sweep grid: {', '.join(unknown)}")
    saes: list[SAEConfig] = []
    if grid or not explicit:
        lists = {k: _as_list(grid.get(k, [SAEConfig.__dataclass_fields__[k].default])) for k in GRID_LISTS}
        baseline_l1 = _as_list(grid.get("l1_coefficient_baseline", lists["l1_coefficient"]))
        fixed = {k: v for k, v in grid.items() if k not in GRID_LISTS and k != "l1_coefficient_baseline"}
        for hook, arch, d_sae, seed in itertools.product(lists["hook"], lists["arch"], lists["d_sae"], lists["seed"]):
            width = round(EQUAL_COMPUTE_FACTOR * d_sae) if equal_compute and arch == "baseline" else d_sae
            for l1 in (baseline_l1 if arch == "baseline" else lists["l1_coefficient"]):
                saes.append(build(SAEConfig, fixed, dict(hook=hook, arch=arch, d_sae=width, l1_coefficient=l1,
                                                         seed=seed), where="the sweep grid"))
    saes += [build(SAEConfig, entry, where="a [[sae]] entry") for entry in explicit]
    if not saes:
        raise ConfigError("the sweep is empty")
    return saes
