"""``python -m build`` gives a wheel and an sdist holding every file of the three packages.

A user installs with ``pip install .`` (or the wheel) without the Makefile; this checks what
that installs: each package's files (modules and any data file the code reads), one version
(``metattt.__version__``) and the SPDX licence, with no packaging deprecation warning.
"""

import email.parser
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

import metattt

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("metattt", "attd", "kernels_pallas")


def _package_files() -> list[str]:
    """Every file under the packages in this checkout (not caches), relative to the root."""
    return sorted(
        p.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for p in (ROOT / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the dev extra's setuptools and build, no download during the tests.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


@pytest.mark.slow
def test_wheel_holds_every_package_file_and_nothing_else(dist):
    out, log = dist
    version = metattt.__version__
    (wheel,) = out.glob("*.whl")
    assert wheel.name == f"metattt-{version}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    info = f"metattt-{version}.dist-info"
    assert sorted(n for n in names if not n.startswith(info)) == _package_files()
    metadata = email.parser.Parser().parsestr(
        zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    )
    assert metadata["Version"] == version
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "deprecated" not in log.lower(), log


@pytest.mark.slow
def test_sdist_holds_the_sources_and_the_project_file(dist):
    out, _ = dist
    (sdist,) = out.glob("*.tar.gz")
    top = f"metattt-{metattt.__version__}/"
    names = {n.removeprefix(top) for n in tarfile.open(sdist).getnames()}
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= names
    missing = [f for f in _package_files() if f not in names]
    assert not missing, missing
