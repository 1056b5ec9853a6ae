"""Generated sessions made ready for meta-learning: padded recordings, their tasks, task batches.

:func:`make_recordings` turns sessions of :func:`metattt.data.sessions.generate_sessions` into
:class:`Recording` s: each padded to N_max neurons with a mask, given global unit ids (its rows
in a forecaster's unit-embedding table) and cut into a support/query :class:`~metattt.meta.Task`
(support windows before a time cut, query windows after it; no shared time step).

A meta-step draws a few sessions and a few windows of each: :func:`sample_tasks` does it on the
host from a PRNG key (so that a step's batch is a pure function of the step, as
:func:`metattt.train.fit` needs to resume exactly) and gives each task the key of its fresh
embedding rows (:class:`ResetTask`). :func:`stack_tasks` and :func:`concat_windows` put tasks
or window batches of several sessions side by side.

Shapes: S sessions, N_max padded neurons, T time steps, W windows, C context, P horizon.

Example:
    >>> cfg = SessionConfig(num_steps=96, min_neurons=5, max_neurons=7)
    >>> train = make_recordings(cfg, 3, seed=0, max_neurons=7, context=6, horizon=2, stride=4)
    >>> tasks = stack_tasks([r.task for r in train])          # leaves (3, W, ...)
    >>> batch = sample_tasks(jax.random.key(1), tasks, 2, support=4, query=4)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from metattt.data.sessions import (
    SessionConfig,
    WindowBatch,
    assign_unit_ids,
    generate_sessions,
    pad_sessions,
    session_task,
)
from metattt.meta import Task

__all__ = [
    "Recording",
    "ResetTask",
    "concat_windows",
    "make_recordings",
    "sample_tasks",
    "stack_tasks",
]


class Recording(NamedTuple):
    """One padded session, its unit ids and its support/query task.

    Attributes:
        data: (N_max, T) float32 recording, 0 in padded rows.
        mask: (N_max,) bool, real (True) or padded neuron.
        unit_ids: (N_max,) int32 global unit ids (0 in padded rows).
        session_id: the session's id (its row in the session-embedding table).
        task: ``Task(support, query)`` of :class:`~metattt.data.sessions.WindowBatch` es:
            support windows end at or before the time cut, query windows start at or after it.
    """

    data: np.ndarray
    mask: np.ndarray
    unit_ids: np.ndarray
    session_id: int
    task: Task


def make_recordings(
    config: SessionConfig,
    count: int,
    seed: int,
    *,
    max_neurons: int,
    context: int,
    horizon: int,
    stride: int,
    support_fraction: float = 0.5,
    first_session_id: int = 0,
) -> list[Recording]:
    """Sessions ``first_session_id .. first_session_id + count - 1`` of ``seed``'s system.

    Unit ids start at ``first_session_id * max_neurons``: sessions generated in separate calls
    (training sessions from id 0, held-out ones after them) never share a unit id, so
    registering a held-out session never touches a training session's rows.

    Args:
        config: the generator's :class:`~metattt.data.sessions.SessionConfig`.
        count: S, sessions to generate.
        seed: the system's seed.
        max_neurons: N_max, the padded neuron count (at least ``config.max_neurons``).
        context, horizon: C and P of the windows.
        stride: steps between window starts.
        support_fraction: where time is cut between support and query windows.
        first_session_id: id of the first session.

    Returns:
        S :class:`Recording` s in session order.
    """
    sessions = generate_sessions(count, seed, config, first_session_id=first_session_id)
    padded = pad_sessions(sessions, max_neurons=max_neurons)
    ids = assign_unit_ids(
        [s.meta["num_neurons"] for s in sessions],
        max_neurons,
        start=first_session_id * max_neurons,
    )
    out = []
    for i in range(count):
        session_id = first_session_id + i
        task = session_task(
            padded.data[i],
            context=context,
            horizon=horizon,
            support_fraction=support_fraction,
            stride=stride,
            mask=padded.mask[i],
            unit_ids=ids[i],
            session_id=session_id,
        )
        out.append(Recording(padded.data[i], padded.mask[i], ids[i], session_id, task))
    return out


def concat_windows(batches: Sequence[WindowBatch]) -> WindowBatch:
    """Window batches of one padded width, concatenated along the window axis W."""
    return WindowBatch(*(np.concatenate(f) for f in zip(*batches, strict=True)))


def stack_tasks(tasks: Sequence[Any]) -> Any:
    """Pytrees of equal structure and shapes stacked on a new leading axis S (NumPy)."""
    return jax.tree.map(lambda *x: np.stack(x), *tasks)


class ResetTask(NamedTuple):
    """A meta-training task and the PRNG key data of its session's fresh embedding rows.

    Attributes:
        support, query: :class:`~metattt.data.sessions.WindowBatch` es.
        key: raw key data (``jax.random.key_data``) the reset draws the fresh rows from.
    """

    support: WindowBatch
    query: WindowBatch
    key: jax.Array


def sample_tasks(key: jax.Array, tasks: Task, num: int, support: int, query: int) -> ResetTask:
    """``num`` distinct sessions of stacked tasks, ``support`` / ``query`` windows of each.

    Sessions and windows are drawn without replacement by a NumPy generator seeded with the
    key's data (host-side indices: no compilation per draw); every task also gets the key data
    of its fresh embedding rows, ``split(key, num)[i]``.

    Args:
        key: a typed PRNG key.
        tasks: a ``Task`` whose leaves are stacked on a leading session axis S
            (:func:`stack_tasks`), support windows W_s and query windows W_q per session.
        num: tasks to draw (<= S).
        support, query: windows to draw per task (<= W_s, <= W_q).

    Returns:
        A :class:`ResetTask` with leaves (num, support | query, ...) and keys (num, ...).
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    s, ws = tasks.support.context.shape[:2]
    wq = tasks.query.context.shape[1]
    chosen = rng.choice(s, num, replace=False)
    sup = np.stack([rng.choice(ws, support, replace=False) for _ in chosen])
    qry = np.stack([rng.choice(wq, query, replace=False) for _ in chosen])

    def pick(batch, idx):
        return jax.tree.map(lambda x: x[chosen[:, None], idx], batch)

    keys = jax.random.split(key, num)
    return ResetTask(pick(tasks.support, sup), pick(tasks.query, qry), jax.random.key_data(keys))
