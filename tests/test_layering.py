"""The packages import each other in one direction only (see shared/design.md).

kernels_pallas -> metattt -> attd -> experiments: an arrow means "is imported by". Library code
never reads a config object (ml_collections belongs to configs/ and experiments/).
"""

import ast
import importlib
import pathlib

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
