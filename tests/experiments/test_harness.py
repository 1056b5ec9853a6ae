"""The experiment harness: cells computed once and read back, atomic records, workdir owners."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import harness
from metattt import multihost
from tests.experiments.entry import run_cli

#: The configs whose experiments can run on several processes (a ``distributed`` section).
DISTRIBUTED_CONFIGS = (
    "sinusoid",
    "selective_copy",
    "drift_adapters",
    "tta_protocol",
    "energy_moe",
    "energy_moe_digits",
    "attd_lra",
    "attd_dynamics",
    "forecasting",
)


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


def test_a_params_cell_killed_before_its_record_is_computed_again(tmp_path):
    """A kill between the parameter save and info.json leaves a checkpoint without its record:
    the next call computes the cell again and its new checkpoint replaces the old one."""
    template = {"w": np.zeros(3, np.float32)}
    first = {"w": np.random.default_rng(1).normal(size=3).astype(np.float32)}
    harness.params_cell(tmp_path / "c", template, lambda run_dir: (first, {"n": 1}))
    os.remove(tmp_path / "c" / "info.json")
    second = {"w": first["w"] + 1.0}
    got, info = harness.params_cell(tmp_path / "c", template, lambda run_dir: (second, {"n": 2}))
    assert info == {"n": 2} and os.listdir(tmp_path / "c" / "params") == ["1"]
    again, info = harness.params_cell(tmp_path / "c", template, pytest.fail)
    np.testing.assert_array_equal(np.asarray(again["w"]), second["w"])
    assert info == {"n": 2}


def _files(root):
    return sorted(os.path.relpath(os.path.join(r, n), root) for r, _, f in os.walk(root) for n in f)


def test_cells_on_a_process_other_than_0_compute_the_same_and_write_no_record(
    tmp_path, monkeypatch
):
    """Process 1 of a multi-process run: its cells return what process 0's return, write no
    JSON record and no timing (process 0 does); the checkpoint is orbax's collective save."""
    rng = np.random.default_rng(2)
    value = {"r2": rng.normal(size=3).tolist()}
    params = {"w": rng.normal(size=4).astype(np.float32)}
    template = {"w": np.zeros(4, np.float32)}
    on_0 = tmp_path / "process_0"
    want_json = harness.json_cell(on_0 / "cell.json", lambda: value)
    want_params, want_info = harness.params_cell(on_0 / "p", template, lambda d: (params, {"a": 1}))

    monkeypatch.setattr(multihost, "is_primary", lambda: False)
    on_1 = tmp_path / "process_1"
    on_1.mkdir()
    assert harness.json_cell(on_1 / "cell.json", lambda: value) == want_json
    got, info = harness.params_cell(on_1 / "p", template, lambda d: (params, {"a": 1}))
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want_params["w"]))
    assert info == want_info
    written = _files(on_1)
    assert written and all(name.startswith(os.path.join("p", "params", "")) for name in written)
    assert not any(name.endswith("manifest.sha256.json") for name in written)  # process 0 seals
    assert "cell.json" in _files(on_0) and "cell.json.seconds" in _files(on_0)


def test_a_cell_is_a_hit_only_when_it_is_one_on_every_process(tmp_path, monkeypatch):
    """A record that another process cannot read (``any_process`` says someone lacks it) makes
    every process compute the cell: a hit on one process and a computation on another would
    leave the other waiting in the computation's collectives."""
    calls = []

    def compute():
        calls.append(1)
        return {"loss": 0.25}

    path = tmp_path / "cell.json"
    harness.json_cell(path, compute)
    harness.json_cell(path, compute)
    assert calls == [1]
    asked = []

    def another_lacks_it(flag):
        asked.append(flag)
        return True

    monkeypatch.setattr(multihost, "any_process", another_lacks_it)
    assert harness.json_cell(path, compute) == {"loss": 0.25}
    assert calls == [1, 1] and asked == [False]  # this process had it; it computed anyway


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("initialization_timeout", 0, "distributed.initialization_timeout must be a positive int"),
        ("initialization_timeout", -5, "distributed.initialization_timeout must be a positive"),
        ("initialization_timeout", True, "distributed.initialization_timeout must be a positive"),
        ("num_processes", 0, "config.distributed.num_processes must be a positive int, got 0"),
        ("process_id", 2, "config.distributed.process_id must be an int >= 0 below num_proc"),
        ("process_id", -1, "config.distributed.process_id must be an int >= 0"),
        ("coordinator_address", "localhost", "coordinator_address must be HOST:PORT"),
        ("coordinator_address", "h:99999", "coordinator_address must be HOST:PORT"),
    ],
)
def test_a_bad_distributed_section_is_refused_in_one_line(key, value, message):
    from configs import selective_copy as selective_copy_config
    from configs import sinusoid as sinusoid_config

    for get_config in (sinusoid_config.get_config, selective_copy_config.get_config):
        cfg = get_config("tiny")
        harness.check_config(cfg)  # the default section passes: JAX's 300 s wait down to 120 s
        assert cfg.distributed.initialization_timeout == 120
        cfg.distributed.num_processes, cfg.distributed.process_id = 2, 1
        cfg.distributed.coordinator_address = "10.0.0.1:1234"
        harness.check_config(cfg)
        setattr(cfg.distributed, key, value)
        with pytest.raises(ValueError, match=message) as error:
            harness.check_config(cfg)
        assert "\n" not in str(error.value)


def test_validating_a_config_with_a_distributed_section_starts_no_jax_backend():
    """``experiments.run`` validates a config before ``jax.distributed.initialize``, which
    refuses to run once any JAX computation has started a backend: a ``validate`` that
    initialises parameters would fail every multi-process launch (energy_moe's did). Every
    config with a ``distributed`` section, validated in a fresh process."""
    code = (
        "import importlib\n"
        "from jax._src import xla_bridge\n"
        "from experiments import harness\n"
        "names = []\n"
        f"for name in {DISTRIBUTED_CONFIGS!r}:\n"
        "    cfg = importlib.import_module('configs.' + name).get_config('tiny')\n"
        "    assert 'distributed' in cfg, name\n"
        "    harness.check_config(cfg)\n"
        "    importlib.import_module('experiments.' + cfg.experiment).validate(cfg)\n"
        "    if xla_bridge.backends_are_initialized():\n"
        "        names.append(name)\n"
        "        break\n"
        "print(names)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "[]", run.stdout


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
    proc = run_cli("--config", "configs/sinusoid.py:tiny", "--workdir", str(tmp_path))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert "holds a run of experiment 'forecasting'" in lines[0]
    proc = run_cli("--config", "configs/sinusoid.py:tiny", "--workdir", "")
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
