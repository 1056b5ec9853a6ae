"""Depth controllers: how many test-time steps K each input gets from its ponder signal s.

A controller is a factory's :class:`Controller` of pure functions over its own parameter pytree
(learned in the outer loop with everything else). All share one interface, so ATTD and its
baselines run the same code path:

==========================  ==================================  ==========================
controller                  hard K (evaluation)                 parameters
==========================  ==================================  ==========================
``threshold_controller``    K = Σᵢ 1(s > tᵢ), i = 1..K_max      K_max ordered thresholds
``gate_controller``         K = K_full · 1(s > t)                one threshold
``fixed_controller``        K = K_fixed for every input          none (full TTT; K = 0 is
                                                                 the plain model)
==========================  ==================================  ==========================

Ordered thresholds by construction: raw parameters ρ ∈ R^K_max map to
t₁ = ρ₁, t_k = t₁ + Σ_{j=2..k} (softplus(ρ_j) + min_gap), so t₁ < t₂ < … < t_Kmax for any ρ
(strictly, up to float resolution) and the hard count is monotone in s.

Relaxation (training). Step k is applied when s > t_k, i.e. its hard weight is 1(s > t_k);
the relaxed weight is w_k = σ((s − t_k) / τ). Given ordered thresholds w₁ ≥ w₂ ≥ … (a soft
"first K steps" mask), each w_k is increasing in s, w_k → 1(s > t_k) as τ → 0, and
E[K] := Σ_k w_k is the soft step count the cost term charges. The inner loop applies
ψ_{k+1} = ψ_k + w_k u_k (the core's ``step_weights``), so ∂L_task/∂t_k exists (through w_k)
even with a first-order inner loop, and it trades the task gain of step k against its cost.

Why this estimator: it is deterministic and low-variance (no sampling, unlike REINFORCE on a
stochastic K), and it needs no extra forward passes. Its bias is that training sees fractional
steps while evaluation uses the hard count; τ bounds the gap (only inputs with ``|s − t_k|`` ≲ τ
see a fractional step k). The straight-through alternative (forward the hard 1(s > t_k),
backward σ'((s − t_k)/τ)/τ) removes the train/test mismatch in the forward pass but its
gradient is then the relaxed one evaluated at the wrong point (a step that was not taken gets
credit for the update it would have made); it is available as ``straight_through=True`` for
comparison, and the relaxed form is the default.

Shapes: s is a scalar or (B,); weights are (..., K_max); hard counts are int32 of s's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class Controller(NamedTuple):
    """A depth controller: pure functions of ``(params, s)``.

    Attributes:
        init: ``init(thresholds=None) -> params``; ``thresholds`` (any array-like of the
            controller's threshold count, increasing) sets the starting thresholds.
        thresholds: ``thresholds(params) -> (T,)`` the effective, ordered thresholds.
        hard_steps: ``hard_steps(params, s) -> K`` int32, the evaluation count.
        step_weights: ``step_weights(params, s, straight_through=False) -> (..., K_max)``.
        max_steps: K_max, the static length of the inner loop.
        name: a short label for tables.
    """

    init: Callable[..., PyTree]
    thresholds: Callable[[PyTree], jax.Array]
    hard_steps: Callable[[PyTree, jax.Array], jax.Array]
    step_weights: Callable[..., jax.Array]
    max_steps: int
    name: str


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def ordered_thresholds(raw: jax.Array, min_gap: float = 1e-3) -> jax.Array:
    """t₁ = raw₁, t_k = t₁ + Σ_{j=2..k} (softplus(raw_j) + min_gap): (T,) -> (T,) increasing."""
    gaps = jax.nn.softplus(raw[1:]) + min_gap
    return jnp.concatenate([raw[:1], raw[:1] + jnp.cumsum(gaps)])


def raw_thresholds(thresholds: Any, min_gap: float = 1e-3) -> jax.Array:
    """Inverse of :func:`ordered_thresholds`: the raw parameters giving ``thresholds`` (T,).

    Raises:
        ValueError: thresholds not 1-D or not increasing by more than ``min_gap``.
    """
    t = jnp.asarray(thresholds, jnp.float32)
    if t.ndim != 1 or t.shape[0] < 1:
        raise ValueError(f"thresholds must be a non-empty 1-D array, got shape {t.shape}")
    gaps = jnp.diff(t) - min_gap
    if bool(jnp.any(gaps <= 0)):
        raise ValueError(f"thresholds must increase by more than min_gap={min_gap}, got {t}")
    inv_softplus = gaps + jnp.log(-jnp.expm1(-gaps))  # softplus⁻¹(g) = g + log(1 − e^{−g})
    return jnp.concatenate([t[:1], inv_softplus])


def _relaxed(s: jax.Array, t: jax.Array, temperature: float, straight_through: bool):
    """σ((s − t)/τ) over the last axis t (T,); straight-through forwards 1(s > t)."""
    s = jnp.asarray(s)[..., None]
    soft = jax.nn.sigmoid((s - t) / temperature)
    if not straight_through:
        return soft
    hard = (s > t).astype(soft.dtype)
    return soft + jax.lax.stop_gradient(hard - soft)


def threshold_controller(
    max_steps: int,
    *,
    temperature: float = 0.1,
    init_first: float = 1.0,
    init_gap: float = 0.5,
    min_gap: float = 1e-3,
) -> Controller:
    """ATTD's monotone controller: K = Σᵢ 1(s > tᵢ) over K_max ordered learnable thresholds.

    Args:
        max_steps: K_max ≥ 1.
        temperature: τ of the relaxation w_k = σ((s − t_k)/τ), in units of s.
        init_first: default t₁.
        init_gap: default spacing t_{k+1} − t_k.
        min_gap: smallest spacing, whatever the raw parameters.

    Returns:
        A :class:`Controller` whose parameters are ``{"raw": (K_max,)}``.

    Example:
        >>> ctrl = threshold_controller(3)
        >>> p = ctrl.init(jnp.array([1.0, 2.0, 3.0]))
        >>> ctrl.hard_steps(p, jnp.array([0.5, 2.5, 9.0]))  # [0, 2, 3]
    """
    _positive_int("max_steps", max_steps)
    _positive("temperature", temperature)
    _positive("init_gap", init_gap)
    if not 0 <= min_gap < init_gap:
        raise ValueError(f"min_gap must be in [0, init_gap={init_gap}), got {min_gap}")

    def init(thresholds=None):
        if thresholds is None:
            thresholds = init_first + init_gap * jnp.arange(max_steps, dtype=jnp.float32)
        if jnp.shape(thresholds) != (max_steps,):
            raise ValueError(
                f"thresholds must have shape (K_max,) = ({max_steps},), got {jnp.shape(thresholds)}"
            )
        return {"raw": raw_thresholds(thresholds, min_gap)}

    def thresholds(params):
        return ordered_thresholds(params["raw"], min_gap)

    def hard_steps(params, s):
        s = jnp.asarray(s)[..., None]
        return jnp.sum(s > thresholds(params), axis=-1).astype(jnp.int32)

    def step_weights(params, s, straight_through=False):
        return _relaxed(s, thresholds(params), temperature, straight_through)

    return Controller(init, thresholds, hard_steps, step_weights, max_steps, "attd")


def gate_controller(
    full_steps: int, *, temperature: float = 0.1, init_threshold: float = 1.0
) -> Controller:
    """Ponder-or-not: K = K_full · 1(s > t) with one learnable threshold t.

    The relaxation gives every one of the K_full steps the same weight σ((s − t)/τ).

    Args:
        full_steps: K_full ≥ 1 (also K_max).
        temperature: τ, in units of s.
        init_threshold: default t.

    Returns:
        A :class:`Controller` whose parameters are ``{"raw": (1,)}``.
    """
    _positive_int("full_steps", full_steps)
    _positive("temperature", temperature)

    def init(thresholds=None):
        t = jnp.full((1,), init_threshold, jnp.float32) if thresholds is None else thresholds
        t = jnp.asarray(t, jnp.float32)
        if t.shape != (1,):
            raise ValueError(f"thresholds must have shape (1,), got {t.shape}")
        return {"raw": t}

    def thresholds(params):
        return params["raw"]

    def hard_steps(params, s):
        s = jnp.asarray(s)
        return jnp.where(s > params["raw"][0], full_steps, 0).astype(jnp.int32)

    def step_weights(params, s, straight_through=False):
        gate = _relaxed(s, params["raw"], temperature, straight_through)  # (..., 1)
        return jnp.broadcast_to(gate, gate.shape[:-1] + (full_steps,))

    return Controller(init, thresholds, hard_steps, step_weights, full_steps, "gate")


def fixed_controller(num_steps: int) -> Controller:
    """The same K for every input: full TTT (K ≥ 1) or the plain model (K = 0).

    Its weights are exactly the hard mask (all ones), it has no parameters (an empty dict)
    and no thresholds.
    """
    _positive_int("num_steps", num_steps, allow_zero=True)

    def init(thresholds=None):
        if thresholds is not None and jnp.size(thresholds) != 0:
            raise ValueError("fixed_controller has no thresholds")
        return {}

    def thresholds(params):
        del params
        return jnp.zeros((0,), jnp.float32)

    def hard_steps(params, s):
        del params
        return jnp.full(jnp.shape(s), num_steps, jnp.int32)

    def step_weights(params, s, straight_through=False):
        del params, straight_through
        return jnp.ones(jnp.shape(s) + (num_steps,), jnp.float32)

    name = "fixed" if num_steps == 0 else f"ttt{num_steps}"
    return Controller(init, thresholds, hard_steps, step_weights, num_steps, name)


def quantile_thresholds(signal: Any, max_steps: int, min_gap: float = 1e-2) -> np.ndarray:
    """Starting thresholds that spread K evenly over 0..K_max on a sample of the signal.

    t_k is the k / (K_max + 1) quantile of ``signal`` (k = 1..K_max), raised where needed so
    that t_{k+1} >= t_k + ``min_gap`` (above the controller's own ``min_gap``): then each K has
    about 1 / (K_max + 1) of the sample. A gate (K_max = 1) gets the median.

    Args:
        signal: (N,) values of the ponder signal s on training inputs.
        max_steps: K_max >= 1.
        min_gap: the smallest spacing kept between thresholds.

    Returns:
        (K_max,) float32, strictly increasing; pass to ``controller.init``.
    """
    _positive_int("max_steps", max_steps)
    signal = np.asarray(signal, np.float64).ravel()
    if signal.size == 0 or not np.all(np.isfinite(signal)):
        raise ValueError("signal must be a non-empty array of finite values")
    t = np.quantile(signal, np.arange(1, max_steps + 1) / (max_steps + 1))
    for i in range(1, max_steps):
        t[i] = max(t[i], t[i - 1] + min_gap)
    return t.astype(np.float32)
