"""The API reference builds offline without a warning, and lists every public module."""

import pathlib
import pkgutil
import subprocess
import sys

import pytest

import attd
import kernels_pallas
import metattt

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"


def test_every_module_has_its_entry():
    text = "".join(p.read_text() for p in API.glob("*.rst"))
    for package in (metattt, attd, kernels_pallas):
        names = [package.__name__]
        modules = pkgutil.walk_packages(package.__path__, package.__name__ + ".")
        names += [m.name for m in modules if "._" not in m.name]  # private ones are not API
        missing = [n for n in names if f".. automodule:: {n}\n" not in text]
        assert not missing, f"docs/api lacks {missing}"


@pytest.mark.slow
def test_the_reference_builds_with_warnings_as_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html",
         str(API), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "metattt.html").stat().st_size > 10_000
