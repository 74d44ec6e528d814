"""Where evaluation reads what it needs from a run's training store: that store, another store with the same
hook and text (``saeforge eval --store``), or the run's cfg.json alone.

Splicing an SAE back into the LM needs, from the store it was trained on: the text rules (to regenerate the
held-out windows and the positions a splice replaces: :class:`provenance.TextProvenance`), the model and its
harvest dtype, the hook's width and mean (mean ablation), and what identifies the store (eval.json is current
only for the same one: ``eval_files.run_identity``). A run's cfg.json records all of it
(``trainer/rundir.py: store_info``), so a run is evaluated from, in this order:

1. the store given with ``--store``: it must hold the run's hook at the run's width and, when the run records
   its training text, cut the same text by the same rules (its files may live elsewhere);
2. the store at the path cfg.json records, while it is there (what eval did before cfg.json recorded more); a
   different store found there (other text or rules, other statistics at the run's hook) is refused;
3. cfg.json's ``store_info``: the store may be gone; the text must still be readable (or in the token cache).

Runs that read the same store, or the same recorded provenance, are evaluated together (one LM, shared
forward passes).
"""
from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np

from saeforge.pipeline.errors import EvalError
from saeforge.pipeline.provenance import Provenance


class EvalSource(NamedTuple):
    """What one group of runs is evaluated with."""

    where: str
    """``store PATH`` or ``RUN/cfg.json``, for messages."""
    store: str | None
    """Path or URL of the store read (recorded in eval.json); None when everything came from cfg.json."""
    provenance: Provenance
    dims: dict[str, int]
    """Hook -> width, for the hooks of this group's runs."""
    means: dict[str, np.ndarray]
    """Hook -> (d,) float64 mean of the store's rows (mean ablation)."""
    store_attrs: dict | None
    """The store's attributes as stored (what eval.json's identity digests); None for a cfg.json source."""
    stats: dict | None = None
    """Hook -> the store's HookStats (mean, E||x||^2, E||x||, scale); None for a cfg.json source."""

    def identity_doc(self, info) -> dict:
        """What identifies the store a run is evaluated against: the store's attributes, or cfg.json's record."""
        if self.store_attrs is not None:
            return self.store_attrs
        return {"store_info": info.cfg.get("saeforge", {}).get("store_info")}


def _from_store(path: str, store) -> EvalSource:
    prov = Provenance.from_json(store.provenance, where=f"store {path}")
    stats = {h: store.stats(h) for h in store.hooks}
    return EvalSource(f"store {path}", str(path), prov, {h: store.d(h) for h in store.hooks},
                      {h: st.mean for h, st in stats.items()}, store.attrs.to_json(), stats)


def _from_cfg(info, recorded) -> EvalSource:
    where = f"{info.run_dir}/cfg.json"
    prov = Provenance.from_json(recorded.provenance, where=where)
    return EvalSource(where, None, prov, {recorded.hook: recorded.d_in}, {recorded.hook: recorded.stats.mean}, None)


def _check_text(info, source: EvalSource, recorded) -> None:
    """A store given with --store must cut the run's training text by the same rules."""
    if recorded is None or not recorded.provenance:
        return
    diff = Provenance.from_json(recorded.provenance, where=f"{info.run_dir}/cfg.json").text.differences(
        source.provenance.text)
    if diff:
        raise EvalError(f"run {info.run_dir} was trained on other text than {source.where} holds "
                        f"({'; '.join(diff[:3])}); give a store harvested from the same text and rules")


def _check_same_store(info, source: EvalSource, recorded) -> None:
    """The store found where cfg.json says the run's training store was must be that store: the same text cut
    by the same rules, and the run's hook with the statistics it trained on (another harvest written to the same
    path differs in one or the other)."""
    if recorded is None or not recorded.provenance:
        return  # a run saved without store_info: nothing to compare with
    diff = Provenance.from_json(recorded.provenance, where=f"{info.run_dir}/cfg.json").text.differences(
        source.provenance.text)
    hook, stats = recorded.hook, (source.stats or {}).get(recorded.hook)
    if stats is None:
        diff.append(f"no hook {hook} (it holds {', '.join(source.dims)})")
    elif source.dims[hook] != recorded.d_in:
        diff.append(f"{hook} is {source.dims[hook]} wide, not {recorded.d_in}")
    elif stats.to_json() != recorded.stats.to_json():
        diff.append(f"{hook} statistics differ (E||x||^2 {recorded.stats.mean_sq_norm:.6g} when trained, "
                    f"{stats.mean_sq_norm:.6g} now)")
    if diff:
        raise EvalError(f"{info.run_dir}/cfg.json records its training store at {recorded.path}, but "
                        f"{source.where} is another store ({'; '.join(diff[:3])}); put the training store back, "
                        "or pass --store with a store of the same text and hook")


def _source_of(info, store_override: str | None, opened: dict,
               storage_options: dict | None = None) -> tuple[str, EvalSource]:
    """(group key, source) of one run; ``opened`` memoises stores by path; a store at a URL is opened with
    ``storage_options``."""
    from saeforge.stores import StoreNotFound, open_store
    from saeforge.trainer.rundir import read_store_info

    recorded = read_store_info(info.run_dir)
    path = store_override or info.store
    if path is None and recorded is None:
        what = ("is an SAE SAELens wrote (cfg.json has no saeforge record)" if "saeforge" not in info.cfg else
                "records no training store in cfg.json")
        raise EvalError(f"{info.run_dir} {what}, so there is no held-out text to use; pass --store with a store "
                        f"that holds its hook {info.hook_name}")
    if path is not None:
        try:
            if path not in opened:
                opened[path] = _from_store(path, open_store(path, storage_options))
            if store_override:
                _check_text(info, opened[path], recorded)
            else:
                _check_same_store(info, opened[path], recorded)
            return f"store:{path}", opened[path]
        except StoreNotFound as e:
            if store_override or recorded is None:
                hint = "" if store_override else "; cfg.json records no store_info to evaluate without it"
                raise EvalError(f"run {info.run_dir}: {e}{hint}") from None
    source = _from_cfg(info, recorded)
    return "cfg:" + json.dumps(recorded.provenance, sort_keys=True), source


def group_runs(runs, store_override: str | None = None,
               storage_options: dict | None = None) -> list[tuple[EvalSource, list]]:
    """[(source, [(sae, info), ...])] in the order runs are first seen; a group shares one source. Stores at URLs
    (``store_override``, or what cfg.json records) are opened with ``storage_options``."""
    opened: dict = {}
    groups: dict[str, tuple[EvalSource, list]] = {}
    for sae, info in runs:
        key, source = _source_of(info, store_override, opened, storage_options)
        if key not in groups:
            groups[key] = (source, [])
        else:  # same recorded provenance: merge the hooks each run brings
            known = groups[key][0]
            groups[key] = (known._replace(dims={**source.dims, **known.dims}, means={**source.means, **known.means}),
                           groups[key][1])
        groups[key][1].append((sae, info))
    return list(groups.values())


def check_runs(runs, source: EvalSource, lm, spec: str) -> None:
    """Every run's hook exists on the model and in the source, at the run's width."""
    for _, info in runs:
        where = f"run {info.run_dir}"
        if info.hook_name not in lm.bridge.hook_dict:
            raise EvalError(f"{where}: hook {info.hook_name!r} does not exist on model {spec!r}")
        if info.hook_name not in source.dims:
            raise EvalError(f"{where}: hook {info.hook_name!r} is not in {source.where} "
                            f"(it holds {', '.join(source.dims)})")
        if source.dims[info.hook_name] != info.d_in:
            raise EvalError(f"{where}: d_in {info.d_in} but {info.hook_name} is {source.dims[info.hook_name]} wide "
                            f"in {source.where}")
