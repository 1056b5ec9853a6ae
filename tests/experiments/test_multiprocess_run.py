"""A multi-process run launched from a config: two processes of ``experiments.run``, killed and
resumed, equal one process's run, and only process 0 writes files.

Two processes (two CPU devices each, a localhost coordinator, gloo collectives) run the
selective-copying config with its batches sharded over the 4 devices: a parameter cell around
:func:`metattt.train.fit`, then a JSON score cell. The pair is killed with SIGKILL after its
first checkpoint and started again; it must resume there and end with the parameters and score
of a one-device run of the same config in this process, within float32 rounding. Process 1
runs with the file-creation mask 077, process 0 with 022, so any file or folder outside the
collectively written checkpoints that process 1 created would be unreadable to others.

The meta-step across two processes is proven in ``tests/metattt/test_multiprocess.py``, and the
sinusoid run's sharded meta-batch against its one-device run in
``tests/experiments/test_sinusoid_experiment.py`` (in one process: the sharded program is the
same whether its devices belong to one process or two).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from attd.mamba import init_mamba
from configs import selective_copy as selective_copy_config
from experiments import selective_copy
from metattt.ckpt import Checkpointer
from tests.metattt.test_multiprocess import ROOT, child_env, free_port, start_pair, tail, wait_pair

TIMEOUT_S = 300  # each launch normally ends in 20-80 s on 2 busy cores


def launch(workdir, logs, config_file, overrides):
    """Starts the pair on ``workdir``: process 0 with umask 022, process 1 with 077."""
    flags = [f"--config.{k}={v!r}" for k, v in overrides.items()]

    def command(i, port):
        return [
            "experiments.run",
            f"--config={config_file}",
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
    """Every file and folder but the checkpoints: ``fit``'s ``ckpt/``, a cell's ``params/``."""
    for root, dirs, files in os.walk(workdir):
        dirs[:] = [d for d in dirs if not d.startswith(("ckpt", "params"))]
        yield from (os.path.join(root, name) for name in dirs + files)


def kill_pair_after(pair, marker, logs):
    """SIGKILLs both processes once ``marker`` (a checkpoint folder) exists."""
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists() and time.monotonic() < deadline:
        if any(p.poll() is not None for p in pair):
            pytest.fail(f"ended before a checkpoint: {tail(logs / 'process_0.log')}")
        time.sleep(0.02)
    for p in pair:
        p.kill()
    assert [p.wait() for p in pair] == [-signal.SIGKILL] * 2


def by_process_1(workdir):
    """What process 1 (umask 077) created outside the checkpoints."""
    written = sorted(files_outside_checkpoints(workdir))
    return written, [p for p in written if not os.stat(p).st_mode & stat.S_IROTH]


OVERRIDES = {"variants": ("selective",)}  # the tiny config: batch 16, 128 test examples
PARAMS_RTOL, PARAMS_ATOL, ACCURACY_ATOL = 1e-4, 1e-5, 0.01


def trained_params(workdir, cfg):
    """The trained parameters of the selective model's cell (seed 0) in ``workdir``."""
    _, template = init_mamba(selective_copy.model_config("selective", cfg), seed=0)
    folder = workdir / "selective" / "seed_0" / "params"
    return Checkpointer(folder).restore(template)


@pytest.mark.slow
def test_an_experiment_with_harness_cells_killed_and_resumed_on_two_processes(tmp_path):
    """Selective copying (a parameter cell around ``fit``, then a JSON score cell) on two
    processes with its batches sharded over their 4 devices: SIGKILL after the step-50
    checkpoint (of 100), a restart whose process 0 takes over the dead pair's lock and resumes
    there, and the trained parameters and score of a
    one-device run in this process. The sharded batch's loss sums in another order; 100 AdamW
    steps carry that rounding into the parameters (measured: 0, bit-equal on this machine,
    2026-12-07, which the test does not require); the bound is 1e-5 absolute + 1e-4 relative,
    and the accuracy, an argmax over 512 answer slots, may differ by a few flipped slots (0.01).
    Process 1 (umask 077) creates nothing outside the checkpoints (``run/ckpt``, ``params``).
    Started once more, the pair reads both cells back on both processes."""
    cfg = selective_copy_config.get_config("tiny")
    cfg.variants = OVERRIDES["variants"]
    workdir = tmp_path / "run"
    run_dir = workdir / "selective" / "seed_0" / "run"
    args = ("configs/selective_copy.py:tiny", OVERRIDES)
    pair = launch(workdir, tmp_path / "first", *args)
    kill_pair_after(pair, run_dir / "ckpt" / str(cfg.train.checkpoint_every), tmp_path / "first")
    assert not (workdir / "selective" / "seed_0" / "info.json").exists()

    started, pair = time.monotonic(), launch(workdir, tmp_path / "second", *args)
    reference = selective_copy.run(cfg, str(tmp_path / "reference"))["selective"]
    wait_pair(pair, tmp_path / "second", started, what="the resumed pair", timeout=TIMEOUT_S)
    for i in range(2):
        log = (tmp_path / "second" / f"process_{i}.log").read_text()
        assert f"at step {cfg.train.checkpoint_every} of {cfg.train.steps}" in log, log[-500:]
        assert ("Taking over the lock" in log) == (i == 0)  # the killed launch's, by process 0

    results = json.loads((workdir / "results.json").read_text())["selective"]
    got, want = trained_params(workdir, cfg), trained_params(tmp_path / "reference", cfg)
    _, initial = init_mamba(selective_copy.model_config("selective", cfg), seed=0)
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(initial), strict=True)
    moved = max(np.abs(g - i).max() for g, i in pairs)
    assert moved > 100 * PARAMS_ATOL  # it trained: the bound is far below what training moves
    leaves = jax.tree_util.tree_leaves_with_path(got)
    for (path, g), w in zip(leaves, jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(
            g, w, rtol=PARAMS_RTOL, atol=PARAMS_ATOL, err_msg=jax.tree_util.keystr(path)
        )
    assert results["accuracy"]["mean"] == pytest.approx(
        reference["accuracy"]["mean"], abs=ACCURACY_ATOL
    )
    run_info = json.loads((workdir / "run_info.json").read_text())
    assert run_info["config"]["distributed"]["process_id"] == 0  # written by process 0
    assert run_info["devices"]["count"] == 4 and run_info["devices"]["processes"] == 2
    assert not (run_dir / "fit.lock").exists()  # released at the end
    written, created = by_process_1(workdir)
    seed_dir = "selective/seed_0"
    for name in (
        "owner.json",
        "run_info.json",
        "results.json",
        f"{seed_dir}/info.json",
        f"{seed_dir}/eval.json",
        f"{seed_dir}/params.seconds",
        f"{seed_dir}/run/metrics.jsonl",
    ):
        assert str(workdir / name) in written, name
    assert not created, f"process 1 created {created}"

    # Started again on the finished workdir, the pair reads both cells back on both processes
    # (the parameters through the collective restore) and computes nothing.
    records = [workdir / seed_dir / name for name in ("info.json", "eval.json", "params.seconds")]
    stamps = [p.stat().st_mtime_ns for p in records]
    started, pair = time.monotonic(), launch(workdir, tmp_path / "third", *args)
    wait_pair(pair, tmp_path / "third", started, what="the finished pair", timeout=TIMEOUT_S)
    assert [p.stat().st_mtime_ns for p in records] == stamps
    assert json.loads((workdir / "results.json").read_text())["selective"] == results
    assert not by_process_1(workdir)[1]


@pytest.mark.slow
def test_a_process_whose_partner_never_starts_gives_up_after_the_initialization_timeout(
    tmp_path,
):
    """Process 0 of two, alone: ``jax.distributed.initialize`` waits the config's
    ``initialization_timeout`` (2 s here, 120 s by default; JAX's own is 300 s), then JAX's
    runtime ends the process (an abort, DEADLINE_EXCEEDED) before anything is written."""
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=configs/selective_copy.py:tiny",
        "--config.distributed.enabled=True",
        f"--config.distributed.coordinator_address=localhost:{free_port()}",
        "--config.distributed.num_processes=2",
        "--config.distributed.process_id=0",
        "--config.distributed.initialization_timeout=2",
        f"--workdir={tmp_path / 'run'}",
    ]
    started = time.monotonic()
    proc = subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "DEADLINE_EXCEEDED" in proc.stderr, proc.stderr[-500:]
    assert time.monotonic() - started < 60  # the timeout, start-up and the abort: not 300 s
    assert not (tmp_path / "run").exists()
