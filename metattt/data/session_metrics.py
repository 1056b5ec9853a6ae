"""Forecast quality on a session's query windows, and how fast an adaptation curve gets there.

A forecast of W query windows (W, N, P) is scored per neuron by its sum of squared errors
(:func:`neuron_sse`, jittable, so a compiled adaptation loop can score every step). What else
the metrics need of the query set is computed once on the host (:func:`query_stats`), and
:func:`forecast_metrics` turns per-neuron errors into

* MSE over the real neurons' W * P values,
* R², 1 - SSE_n / SST_n per real neuron n (SST about the neuron's own target mean), averaged,
* POCO's score 1 - SSE / SSE_copy, against copying each window's last context frame.

:func:`steps_to_fraction` and :func:`steps_to_level` read an adaptation curve (a metric per
step, step 0 before any update).

Shapes: W windows, N (padded) neurons, P horizon, C context, K steps.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metattt.data.sessions import WindowBatch

__all__ = [
    "QueryStats",
    "forecast_metrics",
    "neuron_sse",
    "query_stats",
    "steps_to_fraction",
    "steps_to_level",
]


def neuron_sse(prediction: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-neuron sum of squared errors over windows and horizon, 0 for padded neurons.

    Args:
        prediction, target: (W, N, P).
        mask: (W, N) bool, real neurons.

    Returns:
        (N,) float32.
    """
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.sum(jnp.where(mask[..., None], err, 0.0), axis=(0, 2))


class QueryStats(NamedTuple):
    """What the metrics need of a query set besides the model's errors.

    Attributes:
        sst: (N,) sum of squares of each neuron's targets about its mean.
        copy_sse: squared error of copying the last context frame, over the real neurons.
        mask: (N,) bool, real neurons.
        count: W * P, values per neuron.
    """

    sst: np.ndarray
    copy_sse: float
    mask: np.ndarray
    count: int


def query_stats(query: WindowBatch) -> QueryStats:
    """Target spread per neuron and the copy-last-frame error of a query batch (float64).

    The neuron mask is the first window's (a batch holds one session)."""
    target = np.asarray(query.target, np.float64)  # (W, N, P)
    mask = np.asarray(query.mask[0], bool)
    flat = target.transpose(1, 0, 2).reshape(target.shape[1], -1)
    sst = np.sum(np.square(flat - flat.mean(axis=1, keepdims=True)), axis=1)
    copy = np.asarray(query.context, np.float64)[..., -1:]
    copy_sse = float(np.sum(np.square(target - copy)[:, mask]))
    return QueryStats(sst, copy_sse, mask, target.shape[0] * target.shape[2])


def forecast_metrics(sse: np.ndarray, stats: QueryStats) -> dict[str, np.ndarray]:
    """MSE, mean per-neuron R² and POCO score from per-neuron errors.

    Args:
        sse: (..., N) per-neuron SSE (:func:`neuron_sse`), e.g. (K + 1, N) along a curve.
        stats: the query set's :class:`QueryStats`.

    Returns:
        ``{"mse", "r2", "poco"}``, each of shape (...) (float64).
    """
    sse = np.asarray(sse, np.float64)[..., stats.mask]
    total = sse.sum(-1)
    return {
        "mse": total / (stats.mask.sum() * stats.count),
        "r2": np.mean(1.0 - sse / stats.sst[stats.mask], axis=-1),
        "poco": 1.0 - total / stats.copy_sse,
    }


def steps_to_fraction(curve: np.ndarray, fraction: float = 0.95) -> int:
    """First step whose gain over ``curve[0]`` reaches ``fraction`` of the final gain.

    0 when the curve ends no higher than it starts (there is no gain to reach).
    """
    curve = np.asarray(curve)
    gain = curve[-1] - curve[0]
    if not gain > 0:
        return 0
    return int(np.argmax(curve - curve[0] >= fraction * gain))


def steps_to_level(curve: np.ndarray, level: float) -> int:
    """First step at which ``curve`` reaches ``level`` (its length when it never does)."""
    hit = np.flatnonzero(np.asarray(curve) >= level)
    return int(hit[0]) if hit.size else len(curve)
