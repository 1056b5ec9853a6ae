"""Sinusoid regression tasks of MAML (Finn et al., 2017, section 5.1).

A task is y = A sin(x - phi) with A ~ U[0.1, 5.0], phi ~ U[0, pi], x ~ U[-5, 5]. Every draw is
a pure function of a PRNG key, so a run's data is fixed by (seed, step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metattt.meta import Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


class SineParams(NamedTuple):
    """Amplitude and phase of a batch of tasks, shape (B,) each."""

    amplitude: jax.Array
    phase: jax.Array


def sample_params(key: jax.Array, num_tasks: int) -> SineParams:
    """Draw ``num_tasks`` (A, phi) pairs."""
    ka, kp = jax.random.split(key)
    return SineParams(
        jax.random.uniform(ka, (num_tasks,), minval=AMPLITUDE[0], maxval=AMPLITUDE[1]),
        jax.random.uniform(kp, (num_tasks,), minval=PHASE[0], maxval=PHASE[1]),
    )


def evaluate(params: SineParams, x: jax.Array) -> jax.Array:
    """y = A sin(x - phi); x: (B, N, 1) -> (B, N, 1)."""
    return params.amplitude[:, None, None] * jnp.sin(x - params.phase[:, None, None])


def sample_tasks(key: jax.Array, num_tasks: int, num_support: int, num_query: int) -> Task:
    """A batch of tasks: support (x, y) of shape (B, K, 1) and query of shape (B, Q, 1)."""
    kp, ks, kq = jax.random.split(key, 3)
    params = sample_params(kp, num_tasks)

    def draw(k, n):
        x = jax.random.uniform(k, (num_tasks, n, 1), minval=X_RANGE[0], maxval=X_RANGE[1])
        return x, evaluate(params, x)

    return Task(draw(ks, num_support), draw(kq, num_query))
