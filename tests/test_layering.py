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


def test_modules_are_imported_when_first_used():
    """Every process that imports metattt pays only for what it uses (PEP 562 exports, see
    metattt/_lazy.py): the MAML core needs neither flax, scipy nor the model, data and energy
    packages (orbax comes with the training contract's checkpoints); and all of metattt's
    packages together, attd and the experiments' harness leave the slow scipy modules
    (~0.2-0.8 s each) to the functions that need them. A resume or CLI test's subprocess starts
    ~1 s of CPU sooner."""
    heavy = ("flax", "scipy", "metattt.models", "metattt.energy", "metattt.data")
    slow = ("scipy.signal", "scipy.stats", "scipy.ndimage", "scipy.optimize")
    code = (
        "import sys\n"
        "loaded = lambda names: sorted(n for n in names if n in sys.modules)\n"
        "import metattt, metattt.inner, metattt.meta\n"
        f"print(loaded({heavy!r}))\n"
        "_ = metattt.data, metattt.energy, metattt.models, metattt.fit, metattt.functionalize\n"
        "import attd, experiments.harness\n"
        f"print(loaded({slow!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout


@pytest.mark.parametrize("name", ["metattt", "metattt.models", "metattt.data"])
def test_lazy_exports_match_what_static_tools_see(name):
    """A lazily exported package's ``__all__``, the names its ``__getattr__`` serves and the
    imports under its ``if TYPE_CHECKING:`` block (what an IDE and a type checker read) are
    one list."""
    package = importlib.import_module(name)
    tree = ast.parse(pathlib.Path(package.__file__).read_text())
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    )
    static = {a.asname or a.name for n in block.body for a in n.names}
    assert static == set(package.__all__) <= set(dir(package))
    for n in package.__all__:
        assert getattr(package, n) is getattr(importlib.import_module(name), n)
