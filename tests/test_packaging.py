"""Every package folder of the tree ships in the wheel, and the notebook API resolves every name it exports."""
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {str(Path(d)) for d in cfg["package-dir"].values()}
    assert set(cfg["packages"]) == set(cfg["package-dir"])
    found = {str(p.parent.relative_to(ROOT)) for top in ("stores", "trainer", "pipeline")
             for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert found == folders, f"package folders not in pyproject.toml: {sorted(found - folders)}"


def test_the_top_level_api_exports_resolve():
    import saeforge

    assert saeforge.__version__
    for name in saeforge.__all__:
        assert getattr(saeforge, name) is not None, name
