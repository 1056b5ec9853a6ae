"""metattt.atomic: the target holds the old or the new content, never a torn one."""

import json
import os

import pytest

from metattt import atomic


def test_write_json_round_trips_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "record.json"
    value = {"x": [1.5, 2.0], "name": "ψ", "n": 3}
    atomic.write_json(path, value, indent=1, sort_keys=True)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == value
    assert text.endswith("\n") and text.startswith("{\n")  # indent applied
    assert os.listdir(path.parent) == ["record.json"]  # no temporary left


def test_a_value_json_cannot_hold_leaves_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    atomic.write_json(path, {"v": 1})
    with pytest.raises(ValueError):
        atomic.write_json(path, {"v": float("nan")}, allow_nan=False)
    with pytest.raises(TypeError):
        atomic.write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.txt"
    atomic.write_text(path, "old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.txt"]
