"""A synthetic controlled system with regime shifts, and its trajectory windows and clips.

System. A nonlinear controlled system with regime parameters theta = (rho, omega, gain,
action_angle, offset) and a fixed random coupling (W_z, U) per system seed:

    z_{t+1} = rho R(omega) z_t + gain * tanh(W_z z_t + U G(action_angle) a_t) + offset

R(omega) rotates each pair of state coordinates (pair i by (i + 1) omega), G rotates the action
plane. A predictor is trained on a source regime and tested on shifted regimes made of two
sub-populations that move theta in opposite directions (clips alternate between them), so
the best adaptation of one sub-population is the worst for the other:

- ``offset``: offset = +/- m u (a fixed unit vector u): an additive drift of the state, which
  the final norm's bias can absorb (a non-representational shift).
- ``representational``: action_angle = +/- m pi / 3 with the gain multiplied, respectively
  divided, by 1 + m / 2: the action acts through different directions and strengths inside
  the nonlinearity, so the features that mix state and action have to change.

Shapes: W history window, H horizon, Z state dim, A action dim, B windows, C clips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

SHIFT_KINDS = ("offset", "representational")


class Trajectories(NamedTuple):
    """Trajectory windows of W + H steps: states ``z`` (..., W+H, Z), actions ``a`` (..., W+H, A).

    The first W steps are the history; the targets are ``z[..., W:, :]``; the action at step t
    drives the transition t -> t + 1 (``a[..., W+H-1, :]`` is never used).
    """

    z: jax.Array
    a: jax.Array


class Clip(NamedTuple):
    """One test clip: windows to adapt on and later windows of the same trajectory to score.

    ``adapt``: :class:`Trajectories` (Ba, W+H, .); ``eval``: (Be, W+H, .), after the adapt windows.
    """

    adapt: Trajectories
    eval: Trajectories


class DynamicsSystem(NamedTuple):
    """The fixed part of a system: coupling ``w_z`` (Z, Z), ``u`` (Z, A), offset direction (Z,)."""

    w_z: jax.Array
    u: jax.Array
    offset_dir: jax.Array


class Regime(NamedTuple):
    """Regime parameters theta (scalars except ``offset``, (Z,)); a pytree, so vmappable."""

    rho: jax.Array
    omega: jax.Array
    gain: jax.Array
    action_angle: jax.Array
    offset: jax.Array


def make_system(seed: int, state_dim: int = 4, action_dim: int = 2) -> DynamicsSystem:
    """A random system: ``w_z`` ~ 1.5 N(0, 1/Z), ``u`` ~ N(0, 1), a unit offset direction."""
    if state_dim % 2 or action_dim != 2:
        raise ValueError(
            f"the system needs an even state_dim and action_dim == 2 (rotations act on pairs), "
            f"got state_dim={state_dim}, action_dim={action_dim}"
        )
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w_z = 1.5 * jax.random.normal(k1, (state_dim, state_dim)) / math.sqrt(state_dim)
    u = jax.random.normal(k2, (state_dim, action_dim))
    d = jax.random.normal(k3, (state_dim,))
    return DynamicsSystem(w_z, u, d / jnp.linalg.norm(d))


def source_regime(state_dim: int = 4) -> Regime:
    """The training regime: rho 0.9, omega 0.3, gain 0.5, no action rotation, no offset."""
    f = lambda x: jnp.asarray(x, jnp.float32)
    return Regime(f(0.9), f(0.3), f(0.5), f(0.0), jnp.zeros((state_dim,), jnp.float32))


def shifted_regimes(
    system: DynamicsSystem, kind: str, magnitude: float = 1.0
) -> tuple[Regime, Regime]:
    """The two opposite sub-populations of a shift ``kind`` (see the module docstring).

    Raises:
        ValueError: unknown ``kind``.
    """
    src = source_regime(system.w_z.shape[0])
    if kind == "offset":
        shift = 0.15 * magnitude * system.offset_dir
        return src._replace(offset=shift), src._replace(offset=-shift)
    if kind == "representational":
        angle, gain = magnitude * math.pi / 3, 1.0 + magnitude / 2
        return (
            src._replace(action_angle=src.action_angle + angle, gain=src.gain * gain),
            src._replace(action_angle=src.action_angle - angle, gain=src.gain / gain),
        )
    raise ValueError(f"unknown shift kind {kind!r}; known: {SHIFT_KINDS}")


def _step(system: DynamicsSystem, regime: Regime, z: jax.Array, a: jax.Array) -> jax.Array:
    pairs = z.reshape(-1, 2)
    angles = regime.omega * jnp.arange(1, pairs.shape[0] + 1, dtype=z.dtype)
    cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
    rotated = jnp.concatenate(
        [cos * pairs[:, :1] - sin * pairs[:, 1:], sin * pairs[:, :1] + cos * pairs[:, 1:]], axis=1
    ).reshape(-1)
    c, s = jnp.cos(regime.action_angle), jnp.sin(regime.action_angle)
    a_rot = jnp.stack([c * a[0] - s * a[1], s * a[0] + c * a[1]])
    drive = jnp.tanh(system.w_z @ z + system.u @ a_rot)
    return regime.rho * rotated + regime.gain * drive + regime.offset


def simulate(system: DynamicsSystem, regime: Regime, z0: jax.Array, actions: jax.Array):
    """States z_0..z_T under actions a_0..a_{T-1}: (Z,), (T, A) -> (T+1, Z)."""

    def step(z, a):
        nxt = _step(system, regime, z, a)
        return nxt, nxt

    _, zs = jax.lax.scan(step, z0, actions)
    return jnp.concatenate([z0[None], zs], axis=0)


def _trajectory(key, system, regime, length: int, burn_in: int) -> Trajectories:
    """One trajectory of ``length`` steps after ``burn_in`` steps from z_0 ~ N(0, 0.5^2)."""
    kz, ka = jax.random.split(key)
    z_dim = system.w_z.shape[0]
    z0 = 0.5 * jax.random.normal(kz, (z_dim,))
    actions = jax.random.uniform(ka, (burn_in + length, system.u.shape[1]), minval=-1, maxval=1)
    zs = simulate(system, regime, z0, actions)[:-1]
    return Trajectories(zs[burn_in:], actions[burn_in:])


def sample_windows(
    key: jax.Array,
    system: DynamicsSystem,
    regime: Regime,
    num: int,
    length: int,
    *,
    burn_in: int = 20,
) -> Trajectories:
    """``num`` independent windows of ``length`` = W + H steps: z (B, W+H, Z), a (B, W+H, A)."""
    keys = jax.random.split(key, num)
    return jax.vmap(lambda k: _trajectory(k, system, regime, length, burn_in))(keys)


def sample_clips(
    key: jax.Array,
    system: DynamicsSystem,
    regimes: Sequence[Regime],
    num_clips: int,
    *,
    num_adapt: int,
    num_eval: int,
    length: int,
    burn_in: int = 20,
) -> Clip:
    """``num_clips`` clips; clip c follows ``regimes[c % len(regimes)]`` (sub-populations).

    Each clip is one trajectory of (num_adapt + num_eval) * length steps cut into consecutive
    windows: the first ``num_adapt`` to adapt on, the last ``num_eval`` (later in time) to score.

    Returns:
        A :class:`Clip` with leaves (C, Ba or Be, W+H, .).
    """
    if not regimes:
        raise ValueError("sample_clips needs at least one regime")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *regimes)
    which = jnp.arange(num_clips) % len(regimes)
    keys = jax.random.split(key, num_clips)
    total = num_adapt + num_eval

    def one(k, r):
        regime = jax.tree.map(lambda x: x[r], stacked)
        traj = _trajectory(k, system, regime, total * length, burn_in)
        cut = jax.tree.map(lambda x: x.reshape((total, length) + x.shape[1:]), traj)
        return Clip(
            jax.tree.map(lambda x: x[:num_adapt], cut), jax.tree.map(lambda x: x[num_adapt:], cut)
        )

    return jax.vmap(one)(keys, which)
