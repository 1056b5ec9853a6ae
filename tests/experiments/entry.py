"""The command-line entry point called in this process: ``experiments.run.cli(argv)`` from the
repository root, its exit code and standard error captured. A refusal needs no new Python
process (each costs ~2 s of CPU for imports); ``python -m experiments.run`` itself is what the
kill tests start."""

import contextlib
import io
import pathlib
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Exit(NamedTuple):
    returncode: int
    stderr: str


def run_cli(*args: str) -> Exit:
    """``python -m experiments.run ARGS`` as a call; meant for arguments it refuses."""
    from experiments import run

    err = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stderr(err):
        try:
            run.cli(["experiments.run", *args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return Exit(code, err.getvalue())
