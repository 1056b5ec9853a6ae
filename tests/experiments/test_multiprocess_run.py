"""A multi-process run launched from a config: two processes of ``experiments.run``, killed and
resumed, equal one process's run, and only process 0 writes files.

Two processes (two CPU devices each, a localhost coordinator, gloo collectives) run the
sinusoid MAML config with its 8-task meta-batch sharded over the 4 devices, through
:func:`metattt.train.fit`. The pair is killed with SIGKILL after its first checkpoint (step
100 of 300) and started again; it must resume from a checkpoint and end with the adaptation
curves of a one-device run of the same config in this process, within float32 rounding: the
sharded meta-gradient sums the tasks in another order, and 300 Adam steps carry that rounding
forward (measured: 3e-6 relative, 2026-12-07; the bound is 1e-4). Process 1 runs with the
file-creation mask 077, process 0 with 022, so any file or folder outside the collectively
written checkpoints that process 1 created would be unreadable to others.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time

import numpy as np
import pytest

from configs import sinusoid as sinusoid_config
from experiments import sinusoid
from tests.metattt.test_multiprocess import start_pair, tail, wait_pair

OVERRIDES = {  # the tiny config, one method, a meta-batch the 4 devices divide
    "methods": ("maml",),
    "train.meta_batch": 8,
    "train.checkpoint_every": 100,
    "eval.num_tasks": 20,
}
RTOL = 1e-4
TIMEOUT_S = 300  # each launch normally ends in 20-80 s on 2 busy cores


def config(mesh_devices: int):
    cfg = sinusoid_config.get_config("tiny")
    for key, value in OVERRIDES.items():
        section, _, name = key.rpartition(".")
        setattr(cfg.get(section) if section else cfg, name, value)
    cfg.train.mesh_devices = mesh_devices
    return cfg


def launch(workdir, logs):
    """Starts the pair on ``workdir``: process 0 with umask 022, process 1 with 077."""
    flags = [f"--config.{k}={v!r}" for k, v in OVERRIDES.items()]

    def command(i, port):
        return [
            "experiments.run",
            "--config=configs/sinusoid.py:tiny",
            *flags,
            "--config.train.mesh_devices=4",
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            f"--workdir={workdir}",
        ]

    logs.mkdir(exist_ok=True)
    return start_pair(logs, command, umasks=(0o022, 0o077))


def files_outside_checkpoints(workdir):
    for root, dirs, files in os.walk(workdir):
        dirs[:] = [d for d in dirs if not d.startswith("ckpt")]
        yield from (os.path.join(root, name) for name in dirs + files)


@pytest.mark.slow
def test_two_processes_killed_and_resumed_equal_one_process(tmp_path):
    workdir, run_dir = tmp_path / "run", tmp_path / "run" / "maml" / "seed_0"
    pair = launch(workdir, tmp_path / "first")
    deadline = time.monotonic() + TIMEOUT_S
    while not (run_dir / "ckpt" / "100").exists() and time.monotonic() < deadline:
        if any(p.poll() is not None for p in pair):
            pytest.fail(f"ended before a checkpoint: {tail(tmp_path / 'first' / 'process_0.log')}")
        time.sleep(0.02)
    for p in pair:
        p.kill()
    assert [p.wait() for p in pair] == [-signal.SIGKILL] * 2
    assert not (workdir / "results.json").exists()

    started, pair = time.monotonic(), launch(workdir, tmp_path / "second")
    # The one-device reference, in this process while the pair resumes.
    reference = sinusoid.run(config(0), str(tmp_path / "reference"))["maml"]
    wait_pair(pair, tmp_path / "second", started, what="the resumed pair", timeout=TIMEOUT_S)
    for i in range(2):
        log = (tmp_path / "second" / f"process_{i}.log").read_text()
        resumed = re.search(r"Resumed from \S+ at step (\d+) of 300", log)
        assert resumed and 100 <= int(resumed[1]) < 300, f"process {i} did not resume: {log[-500:]}"
        assert ("Taking over the lock" in log) == (i == 0)  # the killed launch's, by process 0

    results = json.loads((workdir / "results.json").read_text())["maml"]
    for key in ("curve_mean", "curve_ci", "seed_means"):
        np.testing.assert_allclose(results[key], reference[key], rtol=RTOL, err_msg=key)
    run_info = json.loads((workdir / "run_info.json").read_text())
    assert run_info["config"]["distributed"]["process_id"] == 0  # written by process 0
    assert run_info["devices"]["count"] == 4 and run_info["devices"]["processes"] == 2
    written = sorted(files_outside_checkpoints(workdir))
    for name in ("owner.json", "results.json", "sinusoid_curves.png", "maml/seed_0/metrics.jsonl"):
        assert str(workdir / name) in written, name
    by_process_1 = [p for p in written if not os.stat(p).st_mode & stat.S_IROTH]
    assert not by_process_1, f"process 1 created {by_process_1}"
    assert not (run_dir / "fit.lock").exists()  # released at the end
