"""The fields of a config dataclass, read from its source, and the type check of a value against a field.

`saeforge --help` must stay instant, yet `HarvestConfig` and `EvalConfig` live in modules that import torch;
so the CLI reads every config class statically (`ast`, nothing imported): each field's name, annotation,
default and the docstring under it (the docstring is the help text). Annotations and defaults are evaluated
from literals, arithmetic, `typing` constructs and names defined or imported in the module; imports from
other saeforge modules are followed by reading those modules the same way. `tests/test_config.py` checks
the result against the imported dataclasses.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import operator
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple

MISSING = dataclasses.MISSING
_BUILTINS = {"int", "float", "str", "bool", "tuple", "list", "dict", "frozenset", "set", "None", "Ellipsis"}
_IMPORTABLE = {"typing", "typing_extensions", "collections.abc"}  # light modules evaluated for real
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.LShift: operator.lshift,
        ast.BitOr: operator.or_, ast.USub: operator.neg, ast.UAdd: operator.pos}


class FieldSpec(NamedTuple):
    """One dataclass field as its source declares it."""

    name: str
    type: Any
    """The evaluated annotation (`int`, `Literal["a", "b"]`, `tuple[float, float]`, `str | None`, ...)."""
    default: Any
    """The default value, or `MISSING` for a required field."""
    doc: str
    """The docstring under the field, on one line."""


class StaticError(LookupError):
    """A name or expression that cannot be evaluated without importing a module."""


@functools.lru_cache(maxsize=None)
def config_fields(module: str, cls: str) -> tuple[FieldSpec, ...]:
    """The fields of dataclass `module.cls`, in declaration order, without importing `module`."""
    node = _source(module).defs.get(cls)
    if node is None or node[0] != "class":
        raise StaticError(f"{module} defines no class {cls}")
    src, body, specs = _source(module), node[1].body, []
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        tp = src.eval(stmt.annotation)
        if typing.get_origin(tp) is typing.ClassVar:
            continue
        after = body[i + 1] if i + 1 < len(body) else None
        doc = after.value.value if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                                    and isinstance(after.value.value, str)) else ""
        default = MISSING if stmt.value is None else src.default(stmt.value)
        specs.append(FieldSpec(stmt.target.id, tp, default, " ".join(inspect.cleandoc(doc).split())))
    return tuple(specs)


@functools.lru_cache(maxsize=None)
def _source(module: str) -> _Source:
    try:
        spec = importlib.util.find_spec(module)  # imports only the parent packages (light __init__ files)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not (spec.origin or "").endswith(".py"):
        raise StaticError(f"no Python source for module {module} (moved? update trainer/options.py: TABLES)")
    return _Source(module, ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin),
                   spec.submodule_search_locations is not None)


class _Source:
    """A module's top-level definitions (assignments, imports, classes), evaluated on demand."""

    def __init__(self, name: str, tree: ast.Module, is_package: bool):
        self.name, self.defs = name, {}
        package = name if is_package else name.rpartition(".")[0]
        for stmt in _top_level(tree.body):
            if isinstance(stmt, ast.Assign):
                self.defs.update({t.id: ("expr", stmt.value) for t in stmt.targets if isinstance(t, ast.Name)})
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.target, ast.Name):
                self.defs[stmt.target.id] = ("expr", stmt.value)
            elif isinstance(stmt, ast.Import):
                self.defs.update({a.asname or a.name.split(".")[0]: ("module", a.name if a.asname else
                                                                     a.name.split(".")[0]) for a in stmt.names})
            elif isinstance(stmt, ast.ImportFrom):
                base = stmt.module or ""
                if stmt.level:  # relative: `from . import x` in package a.b is `a.b.x`
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - stmt.level + 1] + ([base] if base else []))
                self.defs.update({a.asname or a.name: ("from", base, a.name) for a in stmt.names})
            elif isinstance(stmt, ast.ClassDef):
                self.defs[stmt.name] = ("class", stmt)

    def lookup(self, name: str) -> Any:
        kind, *rest = self.defs.get(name, ("builtin",))
        if kind == "expr":
            return self.eval(rest[0])
        if kind == "module":
            return _module_ref(rest[0])
        if kind == "from":
            return _attribute(_module_ref(rest[0]), rest[1])
        if kind == "builtin" and name in _BUILTINS:
            return getattr(builtins, name, None)
        raise StaticError(f"{self.name}: cannot evaluate {name!r} without importing the module")

    def eval(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Attribute):
            return _attribute(self.eval(node.value), node.attr)
        if isinstance(node, ast.Subscript):
            return self.eval(node.value)[self.eval(node.slice)]
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.eval(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](self.eval(node.operand))
        raise StaticError(f"{self.name}: cannot evaluate {ast.unparse(node)!r} statically")

    def default(self, node: ast.expr) -> Any:
        """A field's default: an expression, or `field(default=...)` / `field(default_factory=tuple|list|dict)`."""
        if not (isinstance(node, ast.Call) and ast.unparse(node.func) in ("field", "dataclasses.field")):
            return self.eval(node)
        kw = {k.arg: k.value for k in node.keywords}
        if "default" in kw:
            return self.eval(kw["default"])
        if "default_factory" in kw and ast.unparse(kw["default_factory"]) in ("tuple", "list", "dict"):
            return self.eval(kw["default_factory"])()
        return MISSING


def _top_level(body):
    for stmt in body:
        if isinstance(stmt, ast.Try):  # `try: import tomllib / except ...: import tomli as tomllib`
            yield from _top_level(stmt.body)
        else:
            yield stmt


def _module_ref(module: str):
    if module.split(".")[0] == "saeforge":
        return _source(module)
    if module in _IMPORTABLE:
        return importlib.import_module(module)
    raise StaticError(f"module {module} is not read statically")


def _attribute(obj, attr: str):
    if not isinstance(obj, _Source):
        return getattr(obj, attr)
    if attr in obj.defs:
        return obj.lookup(attr)
    return _source(f"{obj.name}.{attr}")  # a submodule (`from saeforge.pipeline import metrics as M`)


# ------------------------------------------------------------------ type checks


class Mismatch(ValueError):
    """A value that does not fit a field's annotation; the message says what was expected."""


def check(value: Any, tp: Any) -> Any:
    """`value` converted to field type `tp` (ints become floats where a float is expected, lists become tuples),
    or `Mismatch`. Accepts what TOML can spell: no None, so `X | None` expects an X."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return check(value, arg)
            except Mismatch:
                pass
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif origin in (tuple, list) and isinstance(value, (list, tuple)):
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        try:
            if fixed and len(value) != len(args):
                raise Mismatch
            items = [check(v, args[i] if fixed else args[0]) for i, v in enumerate(value)]
        except Mismatch:
            pass  # the message names the whole list
        else:
            return tuple(items) if origin is tuple else items
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp in (str, bool) and isinstance(value, tp):
        return value
    elif (tp is dict or origin is dict) and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)  # a table of options handed on as is (storage_options: the filesystem checks them)
    elif tp is Any:
        return value
    raise Mismatch(f"expected {describe(tp)}, got {show(value)}")


def describe(tp: Any, *, plural: bool = False) -> str:
    """`tp` in words: "an integer", "one of "a", "b"", "a list of 2 numbers", ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a, plural=plural) for a in args if a is not type(None))
    if origin is Literal:
        return ("values among " if plural else "one of ") + ", ".join(show(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(set(args)) == 1:
                return f"a list of {len(args)} {describe(args[0], plural=True)}"
            return "a list [" + ", ".join(describe(a) for a in args) + "]"
        return ("lists" if plural else "a list") + f" of {describe(args[0], plural=True)}"
    words = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
             bool: ("true or false", "booleans"), dict: ("a table", "tables")}
    if origin is dict:
        return words[dict][plural]
    return words[tp][plural] if tp in words else getattr(tp, "__name__", str(tp))


def show(value: Any) -> str:
    """A value as TOML and the help text spell it (`"abc"`, `true`, `[0.0, 0.999]`)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# ------------------------------------------------------------------ dtype names, list items

DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Short dtype names read as the long ones, the only spelling saeforge writes and lists."""
_DTYPE_ORDER = ("store", "auto", "none", "float32", "bfloat16", "float16")


def dtype_spellings(tp: Any) -> dict[str, str] | None:
    """For a `Literal` field of dtype names (`lm_dtype`, `store_dtype`, eval's `dtype`, `autocast`): each name as
    saeforge spells it (float32, bfloat16, float16, in that order after auto/store/none) -> the field's value
    (`autocast` keeps `bf16`); None for any other field."""
    if typing.get_origin(tp) is not Literal:
        return None
    spelled = {DTYPE_ALIASES.get(a, a): a for a in typing.get_args(tp) if isinstance(a, str)}
    if not set(spelled) & {"float32", "bfloat16", "float16"}:
        return None
    order = {name: i for i, name in enumerate(_DTYPE_ORDER)}
    return dict(sorted(spelled.items(), key=lambda kv: order.get(kv[0], len(order))))


def dtype_value(value: Any, tp: Any) -> Any:
    """`value` for dtype field `tp` with a short name (bf16) or the long one read as the field spells it; any other
    value or field: unchanged (the type check judges it)."""
    spelled = dtype_spellings(tp)
    if spelled is None or not isinstance(value, str):
        return value
    return spelled.get(DTYPE_ALIASES.get(value, value), value)


def list_items(items: list[str], tp: Any) -> Any:
    """Strings from a command line (`--layers 6,10 --layers 12`: ["6", "10", "12"]) as tuple field `tp`
    (`tuple[int, ...]`, `tuple[float, float]`); `Mismatch` saying what was expected."""
    args = typing.get_args(tp)
    kinds = [args[0]] * len(items) if args[1:] == (Ellipsis,) else list(args)
    if len(kinds) != len(items):
        raise Mismatch(f"expected {describe(tp)}, got {len(items)} value(s)")
    try:
        values = [k(v) if k in (int, float) else dtype_value(v, k) for v, k in zip(items, kinds)]
    except ValueError:
        raise Mismatch(f"expected {describe(tp)}, got {show(','.join(items))}") from None
    return check(values, tp)
