"""A resumable training loop: step a pure function, log, checkpoint, and pick up after a crash.

:func:`fit` is the edge of a run, where the side effects live. The arithmetic is the caller's
``step_fn(state, batch) -> (state, metrics)``, usually jitted; the data is the caller's
``batch_fn(step) -> batch``, a pure function of the step number (the seed bound in by the
caller, e.g. ``jax.random.fold_in(jax.random.key(seed), step)``). Because nothing else carries
over from one step to the next, a run that is interrupted and resumed from its last checkpoint
computes bit-for-bit the same final state as a run that never stopped.

Step numbering: steps ``0 .. num_steps - 1`` are run; after step ``i`` the run has *done*
``i + 1`` steps, and that count numbers the checkpoint (``workdir/ckpt/<done>/``), the logged
metrics and the progress bar. The checkpoint holds ``{"state": state, "step": done}``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from metattt import ckpt as ckpt_lib
from metattt import runlog

__all__ = ["fit"]

logger = logging.getLogger(__name__)

S = TypeVar("S")
B = TypeVar("B")


def _mean_metrics(buffer: list[Mapping[str, Any]]) -> dict[str, float]:
    """Means of each metric over a logging interval, with one device-to-host transfer."""
    host = jax.device_get(buffer)
    return {k: float(np.mean([np.asarray(m[k], np.float64) for m in host])) for k in host[0]}


def fit(
    step_fn: Callable[[S, B], tuple[S, Mapping[str, Any]]],
    state: S,
    batch_fn: Callable[[int], B],
    *,
    num_steps: int,
    workdir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 100,
    writer: runlog.MetricWriter | None = None,
    show_progress: bool = True,
    max_to_keep: int = 2,
) -> S:
    """Runs ``num_steps`` training steps, resuming from ``workdir``'s latest checkpoint if any.

    Each step is ``state, metrics = step_fn(state, batch_fn(step))``. Every ``log_every`` done
    steps the metrics' means over the interval go to ``writer`` (and the progress bar), fetched
    from the device once per interval, not per step; a shorter last interval is logged at the
    end. With a ``workdir``, the state is checkpointed every ``checkpoint_every`` done steps and
    after the last step; a later call on the same ``workdir`` restores the latest checkpoint
    (with ``state`` as the template) and continues from the step after it. Steps run after the
    last checkpoint of an interrupted run are run, and logged, again.

    Args:
      step_fn: ``(state, batch) -> (state, metrics)``, metrics a flat dict of scalars.
      state: the initial state (any pytree: parameters, optax state, typed PRNG keys); on
        resume it is only the template the checkpoint is restored into.
      batch_fn: ``step -> batch``; must be a pure function of ``step`` for resumption to be
        exact.
      num_steps: the total number of steps of the run, counting those done before a resume.
      workdir: where checkpoints go (``workdir/ckpt``); None disables checkpointing.
      checkpoint_every: save after every this many done steps.
      log_every: log the metrics' means after every this many done steps.
      writer: where metrics go; None logs nothing. It is flushed, not closed.
      show_progress: show a progress bar (``METATTT_NO_PROGRESS=1`` hides it anyway).
      max_to_keep: how many checkpoints to keep.

    Returns:
      The state after ``num_steps`` steps.

    Raises:
      ValueError: a non-positive interval, a negative ``num_steps``, or a checkpoint in
        ``workdir`` that is already past ``num_steps``.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if checkpoint_every < 1 or log_every < 1:
        raise ValueError(
            f"checkpoint_every and log_every must be >= 1, got {checkpoint_every}, {log_every}"
        )

    checkpointer = None
    last_saved = None  # the step of the newest checkpoint, to never save one step twice
    start = 0
    if workdir is not None:
        checkpointer = ckpt_lib.Checkpointer(
            os.path.join(os.path.abspath(os.fspath(workdir)), "ckpt"), max_to_keep=max_to_keep
        )
        latest = checkpointer.latest_step()
        if latest is not None:
            template = {"state": state, "step": np.asarray(0, np.int64)}
            restored = checkpointer.restore(template, step=latest)
            state, start = restored["state"], int(restored["step"])
            last_saved = latest
            if start > num_steps:
                checkpointer.close()
                raise ValueError(
                    f"{checkpointer.directory} holds a checkpoint at step {start}, past "
                    f"num_steps={num_steps}"
                )
            logger.info(
                "Resumed from %s at step %d of %d.", checkpointer.directory, start, num_steps
            )

    buffer: list[Mapping[str, Any]] = []
    bar = runlog.progress(total=num_steps, initial=start, desc="fit", disable=not show_progress)

    def log(done: int) -> None:
        means = _mean_metrics(buffer)
        buffer.clear()
        if writer is not None:
            writer.write_scalars(done, means)
        bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)

    def save(done: int) -> None:
        nonlocal last_saved
        payload = {"state": state, "step": np.asarray(done, np.int64)}
        checkpointer.save(done, payload, force=True)
        last_saved = done

    try:
        for step in range(start, num_steps):
            state, metrics = step_fn(state, batch_fn(step))
            done = step + 1
            buffer.append(metrics)
            if done % log_every == 0:
                log(done)
            if checkpointer is not None and done % checkpoint_every == 0:
                save(done)
            bar.update(1)
        if buffer:
            log(num_steps)
        if checkpointer is not None and last_saved != num_steps:
            save(num_steps)
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.close()  # waits: the last started save is complete even on an error
        if writer is not None:
            writer.flush()
    return state
