"""The experiment harness: cells computed once and read back, atomic records, workdir owners."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import harness
from tests.experiments.test_sinusoid_experiment import _run_cli


def test_json_cell_computes_once_and_survives_torn_writes(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"r2": [0.1, 0.2]}

    path = tmp_path / "cell.json"
    (tmp_path / "cell.json.tmp.999").write_text('{"r2": [0.')  # a write killed half way
    assert harness.json_cell(path, compute) == {"r2": [0.1, 0.2]}
    assert harness.json_cell(path, compute) == {"r2": [0.1, 0.2]}
    assert calls == [1]
    path.write_text('{"r2": [0.')  # a record damaged on disk is computed again, not fatal
    assert harness.json_cell(path, compute) == {"r2": [0.1, 0.2]} and calls == [1, 1]
    assert harness.cell_seconds(tmp_path) >= 0.0
    assert len(list(tmp_path.glob("*.seconds"))) == 1


def test_params_cell_restores_its_checkpoint_and_recomputes_a_damaged_one(tmp_path):
    template = {"w": np.zeros(5, np.float32)}
    params = {"w": np.random.default_rng(0).normal(size=5).astype(np.float32)}
    runs = []

    def compute(run_dir):
        runs.append(run_dir)
        return params, {"loss": 0.5}

    got, info = harness.params_cell(tmp_path / "c", template, compute)
    np.testing.assert_array_equal(np.asarray(got["w"]), params["w"])
    assert info == {"loss": 0.5} and runs == [os.path.join(tmp_path / "c", "run")]
    again, info = harness.params_cell(tmp_path / "c", template, compute)
    np.testing.assert_array_equal(np.asarray(again["w"]), params["w"])
    assert len(runs) == 1
    for data in (tmp_path / "c" / "params" / "0").rglob("*"):
        if data.is_file() and data.parent.name == "d":
            data.write_bytes(b"")
    again, _ = harness.params_cell(tmp_path / "c", template, compute)
    assert len(runs) == 2
    np.testing.assert_array_equal(np.asarray(jax.device_get(again["w"])), params["w"])


def test_a_workdir_belongs_to_one_experiment_and_config(tmp_path):
    config = {"seeds": [0, 1], "train": {"lr": 0.1}, "report": False}
    harness.claim_workdir(tmp_path, "sinusoid", config)
    harness.claim_workdir(tmp_path, "sinusoid", {**config, "report": True})  # report: no matter
    for where in ({"process_id": 1, "num_processes": 2}, {"coordinator_address": "h:1"}):
        # where a run executes is no matter: every process of a launch, and a restart elsewhere
        harness.claim_workdir(tmp_path, "sinusoid", {**config, "distributed": where})
    with pytest.raises(harness.WorkdirMismatch, match="with another config") as info:
        harness.claim_workdir(tmp_path, "sinusoid", {**config, "train": {"lr": 0.2}})
    assert "\n" not in str(info.value) and "another --workdir" in str(info.value)
    with pytest.raises(harness.WorkdirMismatch, match="experiment 'sinusoid', not 'energy_moe'"):
        harness.claim_workdir(tmp_path, "energy_moe", config)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        harness.claim_workdir(tmp_path / "file", "sinusoid", config)


def test_the_entry_point_refuses_a_foreign_workdir_and_an_empty_one(tmp_path):
    (tmp_path / "owner.json").write_text(json.dumps({"experiment": "forecasting"}))
    proc = _run_cli("--config", "configs/sinusoid.py:tiny", "--workdir", str(tmp_path))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert "holds a run of experiment 'forecasting'" in lines[0]
    proc = _run_cli("--config", "configs/sinusoid.py:tiny", "--workdir", "")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --workdir is empty: name a directory for the run's results"
    )


def test_section_to_reads_the_fields_it_knows_keeps_defaults_and_validates():
    import dataclasses

    import ml_collections

    @dataclasses.dataclass(frozen=True)
    class Sizes:
        width: int = 4
        depth: int = 2
        name: str = "net"

        def validate(self):
            if self.width <= 0:
                raise ValueError(f"width must be positive, got {self.width}")
            return self

    section = ml_collections.ConfigDict({"width": 7, "depth": 3, "unrelated": 1.5})
    assert harness.section_to(Sizes, section) == Sizes(width=7, depth=3)
    assert harness.section_to(Sizes, section, depth=9, name="x") == Sizes(7, 9, "x")
    with pytest.raises(ValueError, match="width must be positive, got -1"):
        harness.section_to(Sizes, {"width": -1})
