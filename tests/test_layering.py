"""Imports flow one way, stores <- trainer <- pipeline; only pipeline touches the LM libraries."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "stores": {"saeforge.trainer", "saeforge.pipeline", "transformer_lens", "datasets", "transformers"},
    "trainer": {"saeforge.pipeline", "transformer_lens", "datasets", "transformers"},
    "pipeline": set(),
}


def imported_modules(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_or_lm_imports(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for mod in imported_modules(path):
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_only_pipeline_lm_imports_transformer_lens():
    users = sorted(str(path.relative_to(ROOT)) for package in FORBIDDEN for path in (ROOT / package).rglob("*.py")
                   if any(m == "transformer_lens" or m.startswith("transformer_lens.") for m in imported_modules(path)))
    assert users == ["pipeline/lm.py"]


def test_every_package_has_modules():
    for package in FORBIDDEN:
        assert (ROOT / package / "__init__.py").exists()
