"""When to adapt while serving: a fixed period, on difficulty, or at an adaptive frequency.

Adaptation costs energy (a backward pass per step), so a server should adapt where it pays. The
signals are label-free and come from the forward pass the server runs anyway:

* :func:`prediction_entropy` -- the mean entropy of the predictive distribution (high on
  inputs the model is unsure about, TENT's own objective);
* :func:`router_margin` -- the mean gap between each token's largest and second-largest router
  probability (small where the router hesitates between experts, e.g. on shifted inputs).

A schedule turns a batch's signal into "adapt on this batch or not" (host side, a small state):

* :func:`periodic` -- every ``every``-th batch (what ``serve_stream``'s ``adapt_every`` does);
* :func:`on_difficulty` -- when the signal crosses a threshold, set as a quantile of the signal
  on in-distribution data (:func:`calibrate_threshold`), never on the stream being scored;
* :func:`adaptive_period` -- a period that halves after a batch over the threshold and doubles
  after one under it, within ``[min_every, max_every]``: frequent adaptation while the input is
  hard, rare once it is not.

For a signal where *low* means hard (the router margin), pass ``higher_is_harder=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "ScheduleState",
    "adaptive_period",
    "calibrate_threshold",
    "on_difficulty",
    "periodic",
    "prediction_entropy",
    "router_margin",
]


def prediction_entropy(logits: jax.Array) -> jax.Array:
    """Mean entropy (nats) of ``softmax(logits)`` over every leading position: (..., C) -> ()."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))


def router_margin(router_probs: jax.Array) -> jax.Array:
    """Mean over tokens (and layers) of p_(1) - p_(2), the gap between each token's two largest
    router probabilities: (..., E) -> (); needs E >= 2."""
    if router_probs.shape[-1] < 2:
        raise ValueError(f"router_margin needs at least 2 experts, got {router_probs.shape[-1]}")
    top2 = jax.lax.top_k(router_probs.astype(jnp.float32), 2)[0]
    return jnp.mean(top2[..., 0] - top2[..., 1])


def calibrate_threshold(signals: Any, quantile: float, *, higher_is_harder: bool = True) -> float:
    """The threshold that the given share of in-distribution batches does *not* cross: the
    ``quantile`` of ``signals`` (or the ``1 - quantile`` one when low means hard).

    Raises:
      ValueError: ``quantile`` outside (0, 1), or no finite signal.
    """
    s = np.asarray(signals, np.float64).ravel()
    s = s[np.isfinite(s)]
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if s.size == 0:
        raise ValueError("calibrate_threshold needs at least one finite signal")
    return float(np.quantile(s, quantile if higher_is_harder else 1 - quantile))


class ScheduleState(NamedTuple):
    """Batches since the last adaptation, and the current period (adaptive schedules)."""

    since: int
    every: int


class Schedule(NamedTuple):
    """``init() -> ScheduleState``; ``update(state, signal) -> (state, adapt: bool)``."""

    init: Callable[[], ScheduleState]
    update: Callable[[ScheduleState, float], tuple[ScheduleState, bool]]


def _hard(signal: float, threshold: float, higher_is_harder: bool) -> bool:
    signal = float(signal)
    if not np.isfinite(signal):
        return False  # a NaN signal never triggers an adaptation
    return signal > threshold if higher_is_harder else signal < threshold


def periodic(every: int) -> Schedule:
    """Adapt on batches 0, every, 2·every, ... (the signal is ignored)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")

    def update(state: ScheduleState, signal: float) -> tuple[ScheduleState, bool]:
        adapt = state.since % every == 0
        return ScheduleState(state.since + 1, every), adapt

    return Schedule(lambda: ScheduleState(0, every), update)


def on_difficulty(threshold: float, *, higher_is_harder: bool = True) -> Schedule:
    """Adapt on exactly the batches whose signal is past ``threshold``."""

    def update(state: ScheduleState, signal: float) -> tuple[ScheduleState, bool]:
        adapt = _hard(signal, threshold, higher_is_harder)
        return ScheduleState(0 if adapt else state.since + 1, 1), adapt

    return Schedule(lambda: ScheduleState(0, 1), update)


def adaptive_period(
    threshold: float,
    *,
    min_every: int = 1,
    max_every: int = 64,
    start_every: int | None = None,
    higher_is_harder: bool = True,
) -> Schedule:
    """Adapt when ``every`` batches have passed since the last adaptation; after each batch the
    period halves if its signal was past ``threshold`` and doubles if not, clipped to
    ``[min_every, max_every]`` (``start_every`` defaults to ``max_every``).

    Raises:
      ValueError: periods that are not positive ints with min_every <= start <= max_every.
    """
    start = max_every if start_every is None else start_every
    ok = all(isinstance(v, int) and v >= 1 for v in (min_every, max_every, start))
    if not ok or not min_every <= start <= max_every:
        raise ValueError(
            f"need positive int periods with min_every <= start_every <= max_every, got "
            f"{min_every}, {start}, {max_every}"
        )

    def update(state: ScheduleState, signal: float) -> tuple[ScheduleState, bool]:
        hard = _hard(signal, threshold, higher_is_harder)
        every = max(min_every, state.every // 2) if hard else min(max_every, 2 * state.every)
        since = state.since + 1
        adapt = since >= every
        return ScheduleState(0 if adapt else since, every), adapt

    return Schedule(lambda: ScheduleState(0, start), update)
