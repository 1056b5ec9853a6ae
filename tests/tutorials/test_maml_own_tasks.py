"""The tutorial runs as written, and what its text claims holds on its numbers."""

import pathlib

import pytest

from tests.tutorials.running import run


@pytest.mark.slow
def test_maml_on_your_own_tasks_with_fit(tmp_path, monkeypatch):
    ns = run("maml_own_tasks", tmp_path, monkeypatch)
    meta, scratch = ns["curves"]["meta-learned"], ns["curves"]["random init"]
    assert meta[1].high < scratch[1].low  # one step from the meta-learned init beats scratch
    assert meta[5].mean < meta[0].mean
    workdir = pathlib.Path(ns["workdir"])
    assert sorted(p.name for p in (workdir / "ckpt").iterdir()) == ["400", "600"]  # resumed
    assert any((workdir / "tb").iterdir())  # TensorBoard events
