"""Kill a run of the entry point with SIGKILL once it has written a given checkpoint."""

import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def kill_after(args: list[str], workdir: pathlib.Path, marker: pathlib.Path, timeout: float = 300):
    """Start ``python -m experiments.run ARGS --workdir WORKDIR`` and SIGKILL it as soon as
    ``marker`` (a checkpoint folder) exists: no handler runs, nothing is flushed. Fails if the
    run ends, or ``timeout`` seconds pass, before the marker appears; checks that the killed
    run left no results.json."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *args, "--workdir", str(workdir)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.kill()
    assert proc.wait() == -signal.SIGKILL and alive, "the run ended before it could be killed"
    assert not (workdir / "results.json").exists()
