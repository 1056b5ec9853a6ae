"""Scale-out, proven on one machine: the sharded meta-step across two JAX processes.

Two processes (``two_process_meta_step.py``) start JAX's distributed runtime on a localhost
coordinator with CPU collectives (gloo), two CPU devices each, and run one meta-step with the
task batch sharded over a mesh of all four devices. Their new parameters and metrics must equal
one process's (one device), and the meta-gradient they imply must equal ``jax.grad`` of the
batch meta-loss, within float32 rounding. A hang or a crash fails in one line with the tail of
each process's log, never wedging the suite.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from metattt import meta
from tests.metattt import two_process_meta_step as helper

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # the pair normally ends in 15-65 s on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """This environment with two CPU devices per process (conftest asks for 8)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=2"])
    return env


def tail(path: pathlib.Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:])


def start_pair(out_dir: pathlib.Path, command=None, *, umasks=(None, None)):
    """Start both processes, ``python -m *command(process_id, port)`` (default: the meta-step
    helper), logs in ``out_dir/process_<i>.log``; ``umasks`` gives each process its
    file-creation mask (None: this one's)."""
    port, env = free_port(), child_env()
    if command is None:

        def command(i, port):
            return ["tests.metattt.two_process_meta_step", str(i), str(port), str(out_dir)]

    procs = []
    for i, umask in zip(range(helper.NUM_PROCESSES), umasks, strict=True):
        with open(out_dir / f"process_{i}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", *command(i, port)],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    umask=-1 if umask is None else umask,  # set in C: no Python in the child
                )
            )
    return procs


def wait_pair(procs, out_dir, started: float, *, what="two-process meta-step", timeout=None):
    """Waits for both processes; fails in one line (exit codes, the logs' last lines) on a
    crash or past ``timeout`` seconds after ``started`` (default TIMEOUT_S)."""
    timeout = timeout or TIMEOUT_S
    deadline = started + timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or any(c not in (None, 0) for c in codes):
                break  # all done, or a crash that leaves the other waiting on it: stop both
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        how = f"timed out after {timeout} s" if time.monotonic() >= deadline else "failed"
        logs = "; ".join(
            f"process {i}: {tail(out_dir / f'process_{i}.log')}" for i in range(len(procs))
        )
        pytest.fail(f"{what} {how} (exit codes {codes}); {logs}", False)


@pytest.mark.slow
def test_meta_step_across_two_processes_equals_one_process(tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    (held / "fit.lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # a live run
    started = time.monotonic()
    procs = start_pair(tmp_path)
    # The one-process reference, while the pair starts up.
    params, tasks, meta_loss = helper.problem()
    single = meta.make_meta_step(meta_loss, optax.sgd(helper.OUTER_LR))
    state, metrics = single.update(single.init(params), tasks)
    grads = jax.jit(jax.grad(lambda p: meta.batch_meta_loss(meta_loss, p, tasks)[0]))(params)
    wait_pair(procs, tmp_path, started)
    results = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(len(procs))]
    want_params, want_grads, before = (helper.flat(t) for t in (state.params, grads, params))
    for result in results:
        np.testing.assert_array_equal(result["devices"], [4, 2, 2])  # global, local, processes
        for name, want in want_params.items():
            np.testing.assert_allclose(result[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
            implied = (before[name] - result[name]) / helper.OUTER_LR  # SGD: the meta-gradient
            scale = np.abs(want_grads[name]).max()
            np.testing.assert_allclose(implied, want_grads[name], atol=1e-5 * scale + 1e-6)
        np.testing.assert_allclose(result["meta_loss"], metrics.meta_loss, rtol=1e-6)
        np.testing.assert_allclose(result["grad_norm"], metrics.grad_norm, rtol=1e-5)
    for name in results[0]:  # the update is replicated: both processes hold the same values
        np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)

    # What they agree on (metattt.multihost): a flag raised by process 1 reaches process 0;
    # process 0 holds the lock for both (the file names it; no process refuses its partner)
    # and releases it; a lock held by a live process refuses both, in one line each; an
    # array sharded over both processes is checkpointed together and restored by both.
    # (The loop reads agreed[0] while checking agreed[1].)
    agreed = [dict(np.load(tmp_path / f"agreement_{i}.npz")) for i in range(len(procs))]
    for i, seen in enumerate(agreed):
        np.testing.assert_array_equal(seen["raised"], [True, False])
        assert str(seen["lock_text"]) == f"{socket.gethostname()} {procs[0].pid}"
        refused = str(seen["refused"])
        assert "\n" not in refused and f"in use by process {os.getpid()}" in refused, refused
        assert refused.startswith("process 0: workdir" if i else "workdir"), refused
        assert int(seen["restored_step"]) == 3 and bool(seen["restored_is_sharded"])
        np.testing.assert_array_equal(
            seen["restored"], np.arange(16, dtype=np.float32).reshape(8, 2) + 0.5
        )
        # A SIGTERM to process 1 alone stops both after the same step, with a checkpoint
        # (process 0 learns of it); resumed, the fit ends where one without a stop ends.
        stopped = "SIGTERM" if i else "a signal to another process"
        assert str(seen["interrupted"]).startswith(f"{stopped}: stopped after step 3 of 6")
        np.testing.assert_allclose(seen["resumed"], seen["straight"], rtol=1e-6)
        np.testing.assert_array_equal(seen["resumed"], agreed[0]["resumed"])
    assert not (tmp_path / "agreement" / "free" / "fit.lock").exists()
    assert (held / "fit.lock").read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert (tmp_path / "agreement" / "ckpt" / "3" / "manifest.sha256.json").exists()  # sealed


def test_a_crash_or_a_hang_of_the_pair_fails_in_one_line(tmp_path, monkeypatch):
    """The waiting logic on stand-in processes: a crash stops the partner at once; a hang is
    killed at the deadline; either failure names the exit codes and the logs' last lines."""

    def pair(*codes_and_sleeps):
        procs = []
        for i, (code, sleep) in enumerate(codes_and_sleeps):
            (tmp_path / f"process_{i}.log").write_text(f"line one\nprocess {i} last words\n")
            script = f"import sys, time; time.sleep({sleep}); sys.exit({code})"
            procs.append(subprocess.Popen([sys.executable, "-c", script]))
        return procs

    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as crash:
        wait_pair(pair((0, 60), (3, 0)), tmp_path, started)
    assert time.monotonic() - started < 30  # the hanging partner was not waited for
    message = str(crash.value)
    assert "\n" not in message and "failed (exit codes [-9, 3])" in message
    assert "process 1: line one | process 1 last words" in message
    monkeypatch.setattr(sys.modules[__name__], "TIMEOUT_S", 1)
    with pytest.raises(
        pytest.fail.Exception, match=r"timed out after 1 s \(exit codes \[-9, -9\]\)"
    ):
        wait_pair(pair((0, 60), (0, 60)), tmp_path, time.monotonic())
