"""The sinusoid experiment end to end (tiny config) and the entry point's error messages."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import sinusoid as sinusoid_config
from experiments import sinusoid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_tiny_config_adapted_beats_unadapted(tmp_path):
    cfg = sinusoid_config.get_config("tiny")
    results = sinusoid.run(cfg, str(tmp_path))
    maml, pretrained = results["maml"]["curve_mean"], results["pretrained"]["curve_mean"]
    assert maml[1] < maml[0] and maml[10] < maml[0]  # adaptation helps the meta-learned model
    assert maml[1] < pretrained[1]  # and it beats the baseline after one step
    assert os.path.getsize(tmp_path / "sinusoid_curves.png") > 1000
    assert (tmp_path / "maml" / "seed_0" / "metrics.jsonl").read_text().count("meta_loss") >= 2


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.train.num_stepz=5"], "unknown config key 'num_stepz'"),
        (["--config.train.num_steps=abc"], "invalid literal for int()"),
        (["--config.methods=('mamll',)"], "unknown sinusoid method 'mamll'"),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, args, message):
    proc = _run_cli("--config", "configs/sinusoid.py:tiny", *args, "--workdir", str(tmp_path))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_missing_config_file_is_a_one_line_error(tmp_path):
    proc = _run_cli("--config", "configs/no_such.py", "--workdir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config file not found: configs/no_such.py"


def test_distributed_initialisation_follows_the_config(monkeypatch):
    import jax

    from experiments import run

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    cfg = sinusoid_config.get_config("tiny")
    run.init_distributed(cfg)
    assert calls == []
    cfg.distributed.enabled = True
    cfg.distributed.coordinator_address = "10.0.0.1:1234"
    cfg.distributed.num_processes = 4
    cfg.distributed.process_id = 2
    run.init_distributed(cfg)
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_results(tmp_path):
    args = [
        "--config=configs/sinusoid.py:tiny",
        "--config.methods=('maml',)",
        "--config.train.num_steps=1500",
        "--config.train.checkpoint_every=150",
    ]
    reference = _run_cli(*args, "--workdir", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *args, "--workdir", str(killed)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = killed / "maml" / "seed_0" / "ckpt" / "300"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, the lock file stays behind
    assert proc.wait() == -signal.SIGKILL
    assert (killed / "maml" / "seed_0" / "fit.lock").exists()
    resumed = _run_cli(*args, "--workdir", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stderr and "Taking over the lock" in resumed.stderr
    want = json.loads((tmp_path / "ref" / "results.json").read_text())["maml"]
    got = json.loads((killed / "results.json").read_text())["maml"]
    for key in ("curve_mean", "curve_ci", "seed_means"):
        assert got[key] == want[key], key  # bit-identical: the same program resumed
