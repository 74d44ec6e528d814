"""``saeforge store import-saelens``: a SAELens activation cache becomes a saeforge store, without the LM.

The cache is what SAELens 6's ``CacheActivationsRunner`` writes (``sae_lens/cache_activations_runner.py``): a
``datasets`` folder saved with ``save_to_disk`` (``dataset_info.json``, ``state.json``, ``data-*.arrow``), one row
per context window, an ``Array2D`` column of shape (pos, d_in) per hook name, and ``token_ids``
(``Sequence(int32, length=pos)``). A cache pushed to the hub keeps the runner's config beside it as
``cache_activations_runner_cfg.json``; when that file is in the folder, the store's provenance records it.

Every (cache row, position) becomes one store row: ``seq_idx`` is the cache row, ``pos`` the position in the
model's context (``seqpos_slice`` of the config applied), ``token_ids`` the cache's. Rows go to
``StoreWriter`` in cache order, ``batch_rows`` cache rows at a time from the memory-mapped arrow files (memory
stays bounded whatever the cache size); the writer shuffles them globally, checksums and describes them. The
rerun rule of every stage holds: the same command on a complete store does nothing, on an interrupted one
resumes (the rows it staged are skipped without reading their activations), on another store refuses.
"""
from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, NamedTuple

import click
import numpy as np

from saeforge.pipeline.errors import ConfigError, PipelineError
from saeforge.stores.cli import STORAGE_OPTIONS_HELP, UserPath, common_options, echo_json, storage_options_option
from saeforge.trainer.fields import dtype_spellings
from saeforge.trainer.options import DTYPE_HELP, DtypeChoice, list_option

CFG_FILE = "cache_activations_runner_cfg.json"
"""The runner's config, as SAELens uploads it beside a cache it pushes to the hub."""
SOURCE = "SAELens activation cache"
"""The store provenance's ``imported_from``: what the rows came from (no held-out text, no LM run here)."""


class CacheImportError(PipelineError):
    """A cache that cannot be imported, or an output that holds another store (the message says which)."""


@dataclass(frozen=True, kw_only=True)
class ImportConfig:
    """What ``saeforge store import-saelens`` needs; the store's provenance records it."""

    cache: str
    """The SAELens cache folder (``CacheActivationsRunnerConfig.new_cached_activations_path``)."""

    out: str
    """Store path or fsspec URL. Rerunning with the same config resumes an interrupted import there."""

    hooks: tuple[str, ...] = ()
    """Hook columns to import; empty: every activation (``Array2D``) column of the cache."""

    store_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    """dtype of the stored activations."""

    seed: int = 0
    """Seed of the store's shuffle."""

    skip_token_ids: tuple[int, ...] = ()
    """Positions holding one of these token ids are not imported (SAELens caches keep BOS; harvest drops it)."""

    batch_rows: int = 0
    """Cache rows (windows) read at a time; 0: as many as fit in 64 MiB."""

    writer_memory_bytes: int = 1 << 30
    """Memory bound of the shuffling writer, in bytes."""

    def __post_init__(self):
        problems = [(name, "must not be empty") for name in ("cache", "out") if getattr(self, name) == ""]
        problems += [(name, f"must be >= 1, got {getattr(self, name)!r}") for name in ("writer_memory_bytes",)
                     if getattr(self, name) < 1]
        if self.batch_rows < 0:
            problems.append(("batch_rows", f"must be >= 0, got {self.batch_rows!r}"))
        if not 0 <= self.seed < 1 << 63:
            problems.append(("seed", f"must be in [0, 2**63), got {self.seed!r}"))
        if problems:
            raise ConfigError.of(problems)


class Cache(NamedTuple):
    """An opened SAELens activation cache."""

    path: Path
    dataset: object
    """The ``datasets.Dataset``, memory-mapped."""
    hooks: dict[str, int]
    """Every activation column -> d_in."""
    n_pos: int
    """Positions per cache row (the context size, after ``seqpos_slice``)."""
    cfg: dict | None
    """The runner's config (``CFG_FILE``), when it is in the folder."""


def open_cache(path: str) -> Cache:
    """The cache at ``path``; CacheImportError naming the path and what is missing when it is none."""
    import datasets

    root = Path(path).expanduser()
    missing = [n for n in ("state.json", "dataset_info.json") if not (root / n).is_file()]
    if missing:
        raise CacheImportError(f"{path} is not a SAELens activation cache: no {' or '.join(missing)} there (a cache "
                               "is the save_to_disk folder CacheActivationsRunner writes)")
    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:  # noqa: BLE001 (datasets raises many types for a damaged folder)
        raise CacheImportError(f"{path} is not a readable save_to_disk folder ({str(e).splitlines()[0]})") from None
    shapes = {k: f.shape for k, f in ds.features.items() if isinstance(f, datasets.Array2D)}
    if not shapes:
        raise CacheImportError(f"{path} is a datasets folder without activation columns (Array2D of shape "
                               f"(pos, d_in)); it has {', '.join(ds.column_names)}")
    if len({s[0] for s in shapes.values()}) != 1:
        raise CacheImportError(f"{path}: activation columns of different context sizes {shapes}")
    return Cache(root.resolve(), ds, {k: int(s[1]) for k, s in shapes.items()}, int(next(iter(shapes.values()))[0]),
                 _read_cfg(root / CFG_FILE))


def _read_cfg(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheImportError(f"{path}: not JSON ({e}); fix or remove it") from None
    if not isinstance(cfg, dict):
        raise CacheImportError(f"{path}: not a JSON object")
    return cfg


def chosen_hooks(cache: Cache, cfg: ImportConfig) -> dict[str, int]:
    """The hooks to import -> d_in (all of the cache's when ``cfg.hooks`` is empty); CacheImportError when the
    request does not fit the cache."""
    wanted = cfg.hooks
    if cfg.skip_token_ids and "token_ids" not in cache.dataset.column_names:
        raise CacheImportError(f"{cache.path} has no token_ids column, so no position can be skipped by its "
                               "token id")
    missing = [h for h in wanted if h not in cache.hooks]
    if missing:
        raise CacheImportError(f"hook {missing[0]!r} is not in the cache {cache.path} (it has "
                               f"{', '.join(cache.hooks)})")
    return {h: cache.hooks[h] for h in (wanted or cache.hooks)}


def positions(cache: Cache) -> np.ndarray:
    """(pos,) position in the model's context of each cache position: the config's ``seqpos_slice`` of
    ``range(context_size)`` when it gives the cache's length, else 0..pos-1."""
    cfg = cache.cfg or {}
    ctx, sl = cfg.get("context_size"), cfg.get("seqpos_slice")
    if isinstance(ctx, int) and ctx > 0 and isinstance(sl, list) and 1 <= len(sl) <= 3:
        try:
            pos = np.arange(ctx)[slice(*sl)]
        except (TypeError, ValueError):
            pos = np.zeros(0)
        if len(pos) == cache.n_pos:
            return pos
    return np.arange(cache.n_pos)


def provenance(cache: Cache, cfg: ImportConfig, hooks: dict[str, int]) -> dict:
    """The store's provenance: where the rows came from (the cache, its runner config when present)."""
    state = json.loads((cache.path / "state.json").read_text())
    files = [{"name": f["filename"], "bytes": (cache.path / f["filename"]).stat().st_size}
             for f in state.get("_data_files", [])]
    run = cache.cfg or {}
    return {"imported_from": SOURCE, "model": run.get("model_name"), "hooks": list(hooks),
            "context_size": run.get("context_size", cache.n_pos), "prepend_bos": run.get("prepend_bos"),
            "dataset": {"kind": "saelens_cache", "path": str(cache.path), "fingerprint": state.get("_fingerprint"),
                        "files": files, "rows": len(cache.dataset), "positions_per_row": cache.n_pos,
                        "token_ids": "token_ids" in cache.dataset.column_names,
                        "source_dataset": run.get("dataset_path")},
            "saelens_cfg": cache.cfg,
            "special_token_rule": "exclude" if cfg.skip_token_ids else "keep",
            "special_token_ids": sorted(set(cfg.skip_token_ids)), "seed": cfg.seed,
            "row_order": "cache row, then position; positions holding special_token_ids skipped",
            "saeforge_version": importlib.metadata.version("saeforge")}


class Rows(NamedTuple):
    """The store rows of some cache rows, in stream order."""

    acts: dict
    """hook -> (rows, d_in) activations."""
    token_ids: np.ndarray | None
    seq_idx: np.ndarray
    pos: np.ndarray


def cache_rows(cache: Cache, hooks: dict[str, int], cfg: ImportConfig, skip: int = 0) -> Iterator[Rows]:
    """The store rows of the whole cache in stream order (cache row, then position), ``cfg.batch_rows`` cache
    rows per item, less the first ``skip`` (staged by an interrupted run: their activations are not read)."""
    ds, n_pos, has_ids = cache.dataset, cache.n_pos, "token_ids" in cache.dataset.column_names
    step = cfg.batch_rows or max(1, (64 << 20) // (n_pos * 4 * sum(cache.hooks[h] for h in hooks)))
    ids_ds = ds.select_columns(["token_ids"]).with_format("numpy") if has_ids else None
    acts_ds = ds.select_columns(list(hooks)).with_format("numpy")
    pos_P, row = positions(cache), 0
    for lo in range(0, len(ds), step):
        hi = min(lo + step, len(ds))
        ids_N = ids_ds[lo:hi]["token_ids"].reshape(-1).astype(np.int64) if has_ids else None
        keep_N = ~np.isin(ids_N, cfg.skip_token_ids) if has_ids else np.ones((hi - lo) * n_pos, dtype=bool)
        n = int(keep_N.sum())
        if row + n > skip:
            if row < skip:  # the first rows of this batch were staged by the interrupted run
                keep_N[np.flatnonzero(keep_N)[:skip - row]] = False
            batch = acts_ds[lo:hi]
            yield Rows({h: batch[h].reshape(-1, d)[keep_N] for h, d in hooks.items()},
                       None if ids_N is None else ids_N[keep_N],
                       np.repeat(np.arange(lo, hi), n_pos)[keep_N], np.tile(pos_P, hi - lo)[keep_N])
        row += n


class ImportResult(NamedTuple):
    store: str
    rows: int
    """Rows in the finished store."""
    rows_resumed: int
    """Rows an interrupted earlier run had staged (skipped here)."""
    cache_rows: int
    """Windows in the cache."""
    hooks: list
    wall_s: float
    already_complete: bool
    """The store was this import's, complete: nothing was done."""


def import_saelens(cfg: ImportConfig, *, progress: bool = True, storage_options: dict | None = None
                   ) -> ImportResult:
    """Write the store ``cfg.out`` from the cache ``cfg.cache``; does nothing when that store is already complete
    with the same provenance, resumes it when incomplete, refuses (CacheImportError) when it is another store.
    ``storage_options``: of the fsspec filesystem of an OUT at a URL (never recorded in the store)."""
    from saeforge.stores import InvalidInput, StoreWriter, open_store
    from saeforge.stores.progress import progress_bar

    t0 = time.perf_counter()
    cache = open_cache(cfg.cache)
    hooks = chosen_hooks(cache, cfg)
    prov = provenance(cache, cfg, hooks)
    if _existing_is_complete(cfg, prov, hooks, storage_options):
        store = open_store(cfg.out, storage_options)
        return ImportResult(store.path, store.n_rows, store.n_rows, len(cache.dataset), list(hooks),
                            time.perf_counter() - t0, already_complete=True)
    try:
        writer = StoreWriter(cfg.out, hooks=hooks, dtype=cfg.store_dtype, seed=cfg.seed,
                             expected_rows=len(cache.dataset) * cache.n_pos, provenance=prov,
                             memory_limit_bytes=cfg.writer_memory_bytes, progress=progress,
                             storage_options=storage_options)
    except InvalidInput as e:
        raise CacheImportError(f"{e}; raise --writer-memory-mb" if "memory_limit_bytes" in str(e) else str(e)) from None
    with writer as w:
        skip = w.rows_staged
        with progress_bar(len(cache.dataset) * cache.n_pos, desc="import", unit="row", enabled=progress,
                          initial=skip, unit_scale=True) as bar:
            for rows in cache_rows(cache, hooks, cfg, skip=skip):
                w.append(rows.acts, token_ids=rows.token_ids, seq_idx=rows.seq_idx, pos=rows.pos)
                bar.update(len(rows.seq_idx))
    store = open_store(cfg.out, storage_options)
    return ImportResult(store.path, store.n_rows, skip, len(cache.dataset), list(hooks), time.perf_counter() - t0,
                        already_complete=False)


def _existing_is_complete(cfg: ImportConfig, prov: dict, hooks: dict[str, int], storage_options: dict | None
                          ) -> bool:
    """Whether ``cfg.out`` already is this import's complete store (False: nothing there, or this import's
    incomplete store); CacheImportError naming the difference when it holds another store."""
    from saeforge.stores import StoreNotFound
    from saeforge.stores.reader import read_attrs

    try:
        _, attrs = read_attrs(cfg.out, require_complete=False, storage_options=storage_options)
    except StoreNotFound:
        return False
    mine = {"provenance": json.loads(json.dumps(prov)), "hooks": hooks, "dtype": cfg.store_dtype}
    theirs = {"provenance": attrs.provenance, "hooks": attrs.hooks, "dtype": attrs.dtype}
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        detail = "; ".join(f"{k}: store has {_short(theirs[k])}, this import has {_short(mine[k])}" for k in diff)
        raise CacheImportError(f"{cfg.out} holds another store ({detail}); choose another OUT")
    return attrs.is_complete


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


# ------------------------------------------------------------------ the command (registered on `saeforge store`)


@click.command("import-saelens")
@click.argument("cache_dir", type=UserPath())
@click.argument("out", type=UserPath(url_ok=True))
@list_option("--hook", "hooks", tp=tuple[str, ...],
             help="Hook columns to import (a comma list, repeatable)  [default: every one]")
@click.option("--dtype", "store_dtype", type=DtypeChoice(dtype_spellings(Literal["float32", "bfloat16", "float16"])),
              default="bfloat16", show_default=True, help="dtype of the stored activations" + DTYPE_HELP + ".")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the store's shuffle.")
@list_option("--skip-token-id", "skip_token_ids", tp=tuple[int, ...],
             help="Do not import positions holding these token ids (a comma list, repeatable; e.g. BOS, which "
                  "harvest drops).")
@click.option("--writer-memory-mb", type=int, default=1024, show_default=True,
              help="Memory bound of the shuffling writer, in MiB.")
@storage_options_option(STORAGE_OPTIONS_HELP + " For OUT at a URL.")
@common_options()
def import_saelens_command(cache_dir, out, hooks, store_dtype, seed, skip_token_ids, writer_memory_mb,
                           storage_options, as_json, quiet):
    """Turn the SAELens activation cache CACHE_DIR into a saeforge store at OUT, without running the LM.

    CACHE_DIR is the save_to_disk folder SAELens's CacheActivationsRunner writes (one Array2D column per hook,
    token_ids). Every (window, position) becomes a row; the store is globally shuffled, checksummed and records
    the cache (and the runner's config, when cache_activations_runner_cfg.json is there) as its provenance.
    OUT may be an fsspec URL (--storage-options). Interrupted? Rerun the same command: it resumes; on a complete
    store it does nothing. Example:

    \b
        saeforge store import-saelens activations/gpt2/blocks.8.hook_resid_pre stores/gpt2-l8
    """
    from saeforge.pipeline.cli_common import one_line
    from saeforge.pipeline.errors import domain_errors

    if writer_memory_mb < 1:
        raise click.ClickException(f"--writer-memory-mb must be >= 1, got {writer_memory_mb}")
    try:
        cfg = ImportConfig(cache=cache_dir, out=out, hooks=hooks or (), store_dtype=store_dtype, seed=seed,
                           skip_token_ids=skip_token_ids or (), writer_memory_bytes=writer_memory_mb << 20)
        result = import_saelens(cfg, progress=not quiet, storage_options=storage_options)
    except domain_errors() as e:
        raise one_line(e) from None
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted: {out} is incomplete; rerun the same command to resume") from None
    if as_json:
        echo_json(result._asdict())
    elif result.already_complete:
        click.echo(f"ok: {result.store} is already this import's complete store ({result.rows:,} rows); nothing to do")
    else:
        resumed = f" ({result.rows_resumed:,} resumed from an earlier run)" if result.rows_resumed else ""
        click.echo(f"ok: {result.store}: {result.rows:,} rows{resumed} from {result.cache_rows:,} cache windows, "
                   f"hooks {', '.join(result.hooks)}, in {result.wall_s:.1f} s")
