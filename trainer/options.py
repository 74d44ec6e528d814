"""One config path for every stage: config dataclasses <-> TOML file <-> click options.

One file layout serves `harvest`, `train`, `sweep`, `eval` and `demo`, so one file can describe a whole
experiment; every command checks the whole file and reads the tables it needs:

    store = "acts/l10"          # the store harvest writes and train / sweep read (a local path or an fsspec URL)
    out = "runs/sw"             # train: the run; sweep: the sweep; eval: what it evaluates; demo: its folder
    storage_options = {key = "...", secret = "..."}   # the store's fsspec options, when it lives at a URL

    [harvest]                   # HarvestConfig
    layers = [10]
    sites = ["resid_post", "mlp_out"]

    [train]                     # TrainConfig
    hook = "blocks.10.hook_resid_post"

    [sae]                       # SAEConfig: train's one SAE, and the base every SAE of a sweep starts from
    arch = "gated"
    l1_coefficient = 3e-3

    [grid]                      # sweep only: lists of hook, arch, d_sae, l1_coefficient, seed;
    arch = ["gated", "baseline"]  # l1_coefficient_baseline (baselines' lambdas); equal_compute
    equal_compute = true

    [[saes]]                    # sweep only: explicit SAEs, each [sae] with these keys replaced
    hook = "blocks.10.hook_mlp_out"

    [eval]                      # EvalConfig
    tokens = 262144

    [demo]                      # DemoConfig (pipeline/cli_demo.py)

Precedence: dataclass defaults < file < flags. Every key is type-checked against its field's annotation and
an unknown key is an error that names the closest valid one. The click options are generated from the same
dataclass fields (`table_options`): `--field-name` plus the CLI's older spelling, help = the docstring under
the field, default None, so an unset flag never overrides the file. A dict field is one JSON object on the command
line (`--storage-options '{"anon": true}'`, `stores/cli.py: JsonObject`) and a TOML table in the file.
"""
from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import click

from saeforge.stores.cli import STORAGE_OPTIONS_HELP, JsonObject, UserPath, storage_options_option
from saeforge.stores.files import expand_path
from saeforge.trainer.errors import ConfigError  # a config file that cannot be used: one line
from saeforge.trainer.fields import (DTYPE_ALIASES, MISSING, FieldSpec, Mismatch, check, config_fields, dtype_spellings,
                                     dtype_value, list_items, show)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class Table(NamedTuple):
    """A `[name]` table of the file: the config dataclass it fills, named by module path and read from its
    source (`trainer/fields.py`), never imported here; so the trainer names pipeline's configs without
    importing upwards. Moving a config class means updating its entry (tests/test_config.py checks them all)."""

    module: str
    cls: str
    flags: dict[str, tuple[str, ...]] = {}
    """Extra flag spellings per field (the CLI's names from before the options were generated)."""
    words: dict[str, str] = {}
    """Other names a user may write for a field; only used to suggest the right key."""
    elsewhere: dict[str, str] = {}
    """Fields the table does not take, and where they go instead."""
    paths: tuple[str, ...] = ()
    """Fields that hold local paths (or names, or URLs): `~` is expanded in them, from a flag or the file."""


TABLES = {
    "harvest": Table("saeforge.pipeline.harvest", "HarvestConfig",
                     flags={"lm_dtype": ("--dtype",), "prepend_bos": ("--bos/--no-bos",),
                            "special_token_rule": ("--special-tokens",)},
                     words={"writer_memory_mb": "writer_memory_bytes"},
                     elsewhere={"out": "the store harvest writes is the top-level `store`",
                                "storage_options": "a store's options are the top-level `storage_options` table "
                                                   "(beside `store`, above every [table])"},
                     paths=("out", "model", "dataset", "data_files")),
    "train": Table("saeforge.trainer.config", "TrainConfig", paths=("log_dir",)),
    "sae": Table("saeforge.trainer.config", "SAEConfig", flags={"l1_coefficient": ("--l1",)},
                 words={"lambda": "l1_coefficient"}),
    "eval": Table("saeforge.pipeline.evaluate", "EvalConfig", paths=("model", "cache_dir")),
    "demo": Table("saeforge.pipeline.cli_demo", "DemoConfig", flags={"plot_format": ("--format",)},
                  paths=("model", "dataset")),
}
TOP_LEVEL = {"store": str, "out": str, "storage_options": dict}
"""The file's top-level keys: the store harvest writes and train / sweep / eval read; the run, sweep or demo
folder; the store's fsspec options (credentials, endpoint) when it lives at a URL."""
GRID_AXES = ("hook", "arch", "d_sae", "l1_coefficient", "seed")  # trainer/grid.py: GRID_LISTS
GRID_EXTRA = {"l1_coefficient_baseline": list[float], "equal_compute": bool}
CONFIG_HELP = ("TOML file (tables [harvest], [train], [sae], [grid], [[saes]], [eval], [demo]; top-level store, "
               "out, storage_options); flags override it.")
CONFIG_OPTION = click.option("--config", "config_file", type=UserPath(exists=True, dir_okay=False), help=CONFIG_HELP)
"""`--config FILE.toml` of every stage (`~` expanded)."""
STORAGE_OPTIONS = storage_options_option(STORAGE_OPTIONS_HELP + " [the config file's top-level `storage_options`]")
"""`--storage-options JSON`: train, sweep and eval (harvest's is generated from `HarvestConfig.storage_options`)."""


def fields_of(table: str) -> dict[str, FieldSpec]:
    t = TABLES[table]
    return {f.name: f for f in config_fields(t.module, t.cls)}


@dataclass(frozen=True)
class ConfigFile:
    """A checked config file (empty when no file was given)."""

    path: str | None = None
    store: str | None = None
    out: str | None = None
    storage_options: dict | None = None
    """The top-level `storage_options` table: the fsspec options of a store at a URL."""
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    saes: list[dict[str, Any]] = field(default_factory=list)

    def get(self, table: str) -> dict[str, Any]:
        return dict(self.tables.get(table, {}))


def read_config(path: str | Path | None) -> ConfigFile:
    """Parse and check every table of a config file; `ConfigError` on the first problem."""
    if path is None:
        return ConfigFile()
    path = expand_path(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {str(exc).splitlines()[0]}{_bad_line(path, exc)}") from None
    tops, tables, saes = {}, {}, []
    for key, value in doc.items():
        if key in TOP_LEVEL:
            tops[key] = _checked(value, TOP_LEVEL[key], path, key)
            tops[key] = expand_path(tops[key]) if key in ("store", "out") else tops[key]
        elif key == "saes":
            if not (isinstance(value, list) and all(isinstance(e, dict) for e in value)):
                raise ConfigError(f"{path}: saes must be [[saes]] tables (one per SAE), got {show(value)}")
            saes = [_check_table(e, "sae", path, f"saes[{i}]") for i, e in enumerate(value)]
        elif key in TABLES or key == "grid":
            if not isinstance(value, dict):
                hint = " ([[sae]] entries of a sweep are now [[saes]])" if key == "sae" else ""
                raise ConfigError(f"{path}: {key} must be a [{key}] table, got {show(value)}{hint}")
            tables[key] = _check_grid(value, path, key) if key == "grid" else _check_table(value, key, path, key)
        else:
            raise ConfigError(f"{path}: unknown top-level key {key}{_top_hint(key)}")
    return ConfigFile(str(path), tables=tables, saes=saes, **tops)


def _bad_line(path, exc: Exception) -> str:
    """The line a TOML syntax error points at, quoted, and what to do: `; line 3 is 'layers = [1,,2]': fix it`."""
    m = re.search(r"at line (\d+)", str(exc))
    try:
        line = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[int(m[1]) - 1].strip()
    except (TypeError, IndexError, OSError):
        return "; fix the file's syntax (strings in quotes, lists in [...], one key = value per line)"
    return f"; line {m[1]} is {line[:80]!r}: fix its syntax (strings in quotes, lists in [...], one key = value)"


def _checked(value, tp, path, where: str):
    try:
        return check(value, tp)
    except Mismatch as exc:
        raise ConfigError(f"{path}: {where}: {exc}") from None


def _check_table(values: dict, table: str, path, prefix: str) -> dict[str, Any]:
    specs, out = fields_of(table), {}
    for key, value in values.items():
        if key in TABLES[table].elsewhere:
            raise ConfigError(f"{path}: {prefix}.{key} is not a key of [{table}]: {TABLES[table].elsewhere[key]}")
        if key not in specs:
            raise ConfigError(f"{path}: unknown key {prefix}.{key}{_key_hint(key, table)}")
        out[key] = _checked(dtype_value(value, specs[key].type), specs[key].type, path, f"{prefix}.{key}")
        if key in TABLES[table].paths and out[key] is not None:
            out[key] = tuple(map(expand_path, out[key])) if isinstance(out[key], tuple) else expand_path(out[key])
    return out


def _check_grid(values: dict, path, prefix: str) -> dict[str, Any]:
    sae, out = fields_of("sae"), {}
    for key, value in values.items():
        where = f"{prefix}.{key}"
        if key in GRID_AXES:
            out[key] = _checked(value if isinstance(value, list) else [value], list[sae[key].type], path, where)
        elif key in GRID_EXTRA:
            out[key] = _checked(value, GRID_EXTRA[key], path, where)
        elif key in sae:
            raise ConfigError(f"{path}: {where} is not a grid axis ({', '.join(GRID_AXES)}); set it in [sae]")
        else:
            names = {k: k for k in (*GRID_AXES, *GRID_EXTRA)} | {"l1": "l1_coefficient", "lambda": "l1_coefficient",
                                                                 "l1_baseline": "l1_coefficient_baseline"}
            hint = _closest(key, names)
            raise ConfigError(f"{path}: unknown key {where}" + (f" (did you mean {hint}?)" if hint else
                                                                f" (valid: {', '.join(names)})"))
    return out


def _spellings(table: str) -> dict[str, str]:
    """Every name a user may write for a field of `[table]` -> the field: its name, its flags, other words."""
    names = {k: k for k in fields_of(table)} | TABLES[table].words
    return names | {flag.split("/")[0].lstrip("-").replace("-", "_"): k
                    for k, flags in TABLES[table].flags.items() for flag in flags}


def _key_hint(key: str, table: str) -> str:
    if key in TOP_LEVEL:
        return " (it is a top-level key: write it above every [table])"
    hint = _closest(key, _spellings(table))
    if hint:
        return f" (did you mean {hint}?)"
    homes = [t for t in TABLES if t != table and key in fields_of(t)]
    if homes:
        return f" (it belongs in [{homes[0]}])"
    hint = _closest(key, {k: f"{t}.{f}" for t in TABLES if t != table for k, f in _spellings(t).items()})
    return f" (did you mean {hint}?)" if hint else f" (valid: {', '.join(fields_of(table))})"


def _top_hint(key: str) -> str:
    homes = [f"[{t}]" for t in TABLES if key in fields_of(t)] + (["[grid]"] if key in GRID_EXTRA else [])
    if homes:
        return f" (it belongs in {' or '.join(homes)})"
    names = {k: k for k in (*TOP_LEVEL, *TABLES, "grid", "saes")}
    hint = _closest(key, names)
    return f" (did you mean {hint}?)" if hint else f" (valid: {', '.join(names)})"


def _closest(key: str, names: dict[str, str]) -> str | None:
    """The field meant by the spelling closest to `key` (difflib), if any is close."""
    match = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return names[match[0]] if match else None


def build_config(cls, *layers: dict[str, Any]):
    """`cls(**merged)`, later layers winning (defaults < file < flags); None values do not override."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    return cls(**merged)


# ------------------------------------------------------------------ click options


LIST_HELP = " (a comma list, repeatable)"


class CommaList(click.ParamType):
    """One occurrence of a list option: its comma-separated items, as strings. Every list option is repeatable, and
    its occurrences are joined and typed together (`list_option`): `--layers 6,10`, `--layers 6 --layers 10`."""

    name = "list"

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            return tuple(value)
        return tuple(v.strip() for v in str(value).split(",") if v.strip())


def list_option(*decls: str, tp, path: bool = False, **kwargs):
    """A list option of type `tp` (`tuple[int, ...]`, `tuple[float, float]`, `tuple[Literal[...], ...]`): each
    occurrence a comma list, the occurrences joined, the items typed by `fields.list_items`; `path`: items are
    paths (`~` expanded). Not given: None."""
    def joined(ctx, param, value):
        items = [v for occurrence in value or () for v in occurrence]
        if not value:
            return None
        try:
            typed = list_items(items, tp)
        except Mismatch as e:
            raise click.BadParameter(f"{e} (a comma list, or the flag repeated)", ctx, param) from None
        return tuple(expand_path(v) for v in typed) if path else typed

    return click.option(*decls, type=CommaList(), multiple=True, callback=joined, metavar=_list_metavar(tp),
                        **kwargs)


class DtypeChoice(click.Choice):
    """A dtype field's choice, listed as saeforge spells dtypes (float32|bfloat16|float16); the short names fp32,
    bf16, fp16 are read as these; the value is the field's own spelling (`fields.dtype_spellings`)."""

    def __init__(self, spellings: dict[str, str]):
        super().__init__(list(spellings))
        self.spellings = spellings

    def convert(self, value, param, ctx):
        text = DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value
        return self.spellings[super().convert(text, param, ctx)]


DTYPE_HELP = " (fp32, bf16, fp16 are accepted too)"


def table_options(table: str, *, skip: Iterable[str] = (), only: Iterable[str] | None = None,
                  multiple: bool = False, dest: str | None = None) -> list:
    """click option decorators for the fields of `[table]` (minus `skip`, or just `only`); `multiple` makes
    list options of scalar fields (sweep axes). Each option's value arrives as `{dest or table}__{field}`; read the
    set ones with `given`."""
    specs = fields_of(table).values()
    chosen = [s for s in specs if s.name not in set(skip) and (only is None or s.name in set(only))]
    t = TABLES[table]
    return [_option(s, t.flags.get(s.name, ()), f"{dest or table}__{s.name}", multiple, s.name in t.paths)
            for s in chosen]


def _option(spec: FieldSpec, extra: tuple[str, ...], dest: str, multiple: bool, path: bool):
    flag = "--" + spec.name.replace("_", "-")
    tp = _without_none(spec.type)
    if multiple:
        tp = tuple[tp, ...]
    help_ = spec.doc + _default_text(spec.default)
    if typing.get_origin(tp) is tuple:
        help_ = spec.doc + LIST_HELP + _default_text(spec.default)
        return list_option(flag, *extra, dest, tp=tp, path=path, help=help_)
    if tp is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", *extra, dest, default=None, help=help_)
    spelled = dtype_spellings(tp)
    if spelled:
        kind = DtypeChoice(spelled)
        help_ = spec.doc + DTYPE_HELP + _default_text(spec.default)
    elif typing.get_origin(tp) is typing.Literal:
        kind = click.Choice([str(a) for a in typing.get_args(tp)])
    elif tp is dict or typing.get_origin(tp) is dict:
        kind = JsonObject()
    elif path:
        kind = UserPath(url_ok=True, metavar="PATH" if spec.name == "out" else "TEXT")
    else:
        kind = {int: click.INT, float: click.FLOAT, str: click.STRING}[tp]
    return click.option(flag, *extra, dest, type=kind, default=None, help=help_)


def _list_metavar(tp) -> str:
    """`INTEGER,...` (any length), `FLOAT,FLOAT` (fixed), `baseline|gated,...` (choices)."""
    names = {int: "INTEGER", float: "FLOAT", str: "TEXT"}
    args = typing.get_args(tp)
    name = (lambda a: names.get(a) or "|".join(map(str, typing.get_args(a))))
    return f"{name(args[0])},..." if args[1:] == (Ellipsis,) else ",".join(name(a) for a in args)


def _without_none(tp):
    """`X | None` -> X (a flag cannot spell None; unset means "not given")."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _default_text(default) -> str:
    if default is MISSING or default is None or default in ((), "", {}):
        return ""
    text = ",".join(map(str, default)) if isinstance(default, tuple) else show(default).strip('"')
    return f"  [default: {text}]"


def with_options(*groups: list):
    """Apply lists of option decorators in order (the first is listed first in --help)."""
    def apply(fn):
        for deco in reversed([d for g in groups for d in g]):
            fn = deco(fn)
        return fn
    return apply


def given(kwargs: dict[str, Any], table: str) -> dict[str, Any]:
    """Pop the `table__field` values of `kwargs`, keeping only the flags that were set."""
    prefix = f"{table}__"
    values = {k[len(prefix):]: kwargs.pop(k) for k in [k for k in kwargs if k.startswith(prefix)]}
    return {k: v for k, v in values.items() if v is not None and v != ()}
