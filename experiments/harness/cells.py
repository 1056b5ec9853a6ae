"""Cells: results computed once per (seed, cell) and read back when a run is restarted.

A cell is complete when its record is on disk, and a record is written atomically (a temporary
file, then ``os.replace``), so a run killed at any point leaves either no record (the cell is
computed again, resuming from its own checkpoints where it has some) or a whole one, never a
torn file that wedges the workdir. Each computed cell also writes its wall time beside it
(``<record>.seconds``), which :func:`cell_seconds` sums.

In a multi-process run (``jax.distributed``) every process calls every cell with the same
arguments, and the workdir is one folder that all of them see (a shared file system, as
``experiments.run`` requires). Each process reads the record; the cell is a hit only when it is
one on every process (:func:`metattt.multihost.any_process`), otherwise all compute it together
(the computation is SPMD: its collectives need every process). Process 0 alone writes the
records and the ``.seconds`` files; a parameter cell's checkpoint is the collective orbax save
that :func:`metattt.train.fit` uses, made by all processes. In one process all of this is the
plain local behaviour.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from metattt import atomic, multihost
from metattt.ckpt import Checkpointer

__all__ = ["cell_seconds", "json_cell", "params_cell"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _timed(path: str, compute: Callable[[], T]) -> T:
    start = time.perf_counter()
    value = compute()
    if multihost.is_primary():
        atomic.write_text(path + ".seconds", f"{time.perf_counter() - start:.3f}\n")
    return value


def _read_json(path: str) -> tuple[bool, Any]:
    """``(True, value)`` for a readable record on every process, ``(False, None)`` otherwise
    (no record or a bad one on at least one process: a collective call)."""
    try:
        with open(path, encoding="utf-8") as f:
            found, value = True, json.load(f)
    except FileNotFoundError:
        found, value = False, None
    except (OSError, ValueError) as error:
        logger.warning("Cell record %s is unreadable (%s); computing it again.", path, error)
        found, value = False, None
    if multihost.any_process(not found):
        return False, None
    return True, value


def _write_json(path: str, value: Any) -> None:
    if multihost.is_primary():
        atomic.write_text(path, json.dumps(value))


def json_cell(path: str | os.PathLike[str], compute: Callable[[], Any]) -> Any:
    """``compute()`` once: its JSON value is stored at ``path`` and read back on later calls.

    Every process of a multi-process run calls it; they all compute, or all read (see the
    module docstring), and process 0 writes the record.
    """
    path = os.fspath(path)
    found, value = _read_json(path)
    if found:
        return value
    value = _timed(path, compute)
    _write_json(path, value)
    return value


def params_cell(
    directory: str | os.PathLike[str],
    template: Any,
    compute: Callable[[str], tuple[Any, dict[str, Any]]],
) -> tuple[Any, dict[str, Any]]:
    """``(params, info)`` computed once; parameters in a verified checkpoint, info as JSON.

    Args:
      directory: the cell's folder: ``params/`` (the checkpoint), ``info.json`` (written last:
        the cell's commit record) and ``run/``, handed to ``compute`` for its own checkpoints
        (pass it to :func:`metattt.train.fit` so that a killed cell resumes mid-training).
      template: a pytree like the parameters (the restore target; in a multi-process run with
        the parameters' global shardings).
      compute: ``run_dir -> (params, info)``, ``info`` a JSON-able dict.

    Returns:
      ``(params, info)``, restored when the cell was complete, computed otherwise (also when
      its checkpoint fails verification: then with a warning).
    """
    directory = os.fspath(directory)
    info_path = os.path.join(directory, "info.json")
    with Checkpointer(os.path.join(directory, "params"), max_to_keep=1) as ckpt:
        found, info = _read_json(info_path)
        if found:
            found = ckpt.restore_verified(template)  # collective: all processes take one answer
            if found is not None:
                return found[1], info
            logger.warning("Cell %s has no usable parameters; computing it again.", directory)
        params, info = _timed(
            os.path.join(directory, "params"), lambda: compute(os.path.join(directory, "run"))
        )
        # A run killed between this save and info.json leaves a checkpoint without its record:
        # the new one goes after it (orbax never overwrites a step) and replaces it (max 1 kept).
        latest = ckpt.latest_step()
        ckpt.save(0 if latest is None else latest + 1, params, force=True)
    _write_json(info_path, info)
    return params, info


def cell_seconds(workdir: str | os.PathLike[str]) -> float:
    """Total wall time of every cell computed in ``workdir`` (over all invocations)."""
    total = 0.0
    for root, _, files in os.walk(workdir):
        for name in files:
            if name.endswith(".seconds"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    total += float(f.read())
    return total
