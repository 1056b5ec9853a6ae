"""Workdir ownership: one experiment and one resolved config per workdir.

A run resumes from what its workdir holds, so the workdir must hold the same experiment with
the same config: results computed under another config would be mixed in silently. On first
use :func:`claim_workdir` records the experiment's name and a digest of its resolved config in
``workdir/owner.json``; a later run with another experiment or another config is refused with a
one-line :class:`WorkdirMismatch` that says how to proceed. Keys that only choose what is
printed (``report``) or where the run executes (``distributed``: the coordinator, the process
count and each process's id) are left out of the digest, so that every process of a
multi-process run, and a restart on other hosts, claims the same workdir.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from metattt import atomic

__all__ = ["WorkdirMismatch", "claim_workdir", "config_digest"]

OWNER_FILE = "owner.json"
_NOT_RESULTS = ("report", "distributed")


class WorkdirMismatch(ValueError):
    """The workdir holds a run of another experiment or another config."""


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of the resolved config (keys sorted; ``report`` and ``distributed`` left out),
    as hex."""
    data = {k: v for k, v in config.items() if k not in _NOT_RESULTS}
    text = json.dumps(data, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def claim_workdir(workdir: str | os.PathLike[str], experiment: str, config: Mapping[str, Any]):
    """Records or checks the owner of ``workdir``.

    Args:
      workdir: the run's directory (created if missing).
      experiment: the experiment's name.
      config: the resolved config as a plain mapping (``ConfigDict.to_dict()``).

    Raises:
      WorkdirMismatch: ``workdir`` belongs to another experiment or config.
      NotADirectoryError, PermissionError: ``workdir`` is a file or is not writable (one line).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory")
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK):
        raise PermissionError(f"--workdir {workdir} is not writable")
    path = os.path.join(workdir, OWNER_FILE)
    digest = config_digest(config)
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
    except FileNotFoundError:
        atomic.write_json(path, {"experiment": experiment, "config_sha256": digest})
        return
    except ValueError:
        raise WorkdirMismatch(
            f"--workdir {workdir}: its {OWNER_FILE} is unreadable; delete it to claim the workdir"
        ) from None
    if owner.get("experiment") != experiment:
        raise WorkdirMismatch(
            f"--workdir {workdir} holds a run of experiment {owner.get('experiment')!r}, not "
            f"{experiment!r}; pass another --workdir"
        )
    if owner.get("config_sha256") != digest:
        raise WorkdirMismatch(
            f"--workdir {workdir} holds a run of {experiment!r} with another config (sha256 "
            f"{str(owner.get('config_sha256'))[:12]}…, this one {digest[:12]}…); pass another "
            "--workdir, or delete this one to start over"
        )
