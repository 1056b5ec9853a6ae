"""The packages import each other in one direction only (see shared/design.md).

kernels_pallas -> metattt -> attd -> experiments: an arrow means "is imported by". Library code
never reads a config object (ml_collections belongs to configs/ and experiments/).
"""

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BANNED = {
    "kernels_pallas": {"metattt", "attd", "experiments", "configs", "ml_collections"},
    "metattt": {"attd", "experiments", "configs", "ml_collections"},
    "attd": {"experiments", "configs", "ml_collections"},
}


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


@pytest.mark.parametrize("package", sorted(BANNED))
def test_imports_follow_the_dependency_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    bad = [
        f"{f.relative_to(ROOT)}:{line} imports {name}"
        for f in files
        for line, name in _imports(f)
        if name.split(".")[0] in BANNED[package]
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", sorted(BANNED))
def test_packages_import(package):
    importlib.import_module(package)


def test_the_public_api_is_reachable_from_the_top():
    import metattt

    for name in ("adapters", "drift", "train", "stats", "energy", "models", "data", "ckpt"):
        assert hasattr(metattt, name), name
    for package in (metattt, metattt.models, metattt.data, metattt.energy):
        missing = [n for n in package.__all__ if not hasattr(package, n)]
        assert not missing, f"{package.__name__}.__all__ names missing attributes: {missing}"
    # No two public types share a name across the packages a user imports from.
    seen: dict[str, str] = {}
    for package in (metattt, metattt.models, metattt.data, metattt.energy):
        for name in package.__all__:
            obj = getattr(package, name)
            if isinstance(obj, type):
                other = seen.setdefault(name, f"{obj.__module__}.{obj.__qualname__}")
                assert other == f"{obj.__module__}.{obj.__qualname__}", (name, other)


def test_importing_metattt_leaves_the_slow_scipy_modules_for_later():
    """scipy.signal and scipy.stats cost ~1.2 s of every process that imports metattt (every
    subprocess a resume or CLI test starts); the functions that need them import them."""
    slow = "('scipy.signal', 'scipy.stats')"
    code = f"import sys, metattt; print(sorted(m for m in {slow} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
