"""The two pure-``jnp`` forms of the selective scan: ``lax.scan`` and ``lax.associative_scan``.

Layout is channels-last. Dimension names: B batch, L length, D channels, N state size.

The Mamba S6 recurrence (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces", Alg. 2; zero-order-hold A, Euler B as in ``selective_scan_ref`` of
``state-spaces/mamba``), for every batch row b and channel d::

    Δ_t      = softplus(delta_t + delta_bias)        (bias and softplus optional)
    Ā_t[d,n] = exp(Δ_t[d] · A[d,n])                  (B, D, N) per step
    B̄x_t     = Δ_t[d] · B_t[n] · x_t[d]              (B, D, N) per step
    h_t      = Ā_t ⊙ h_{t-1} + B̄x_t,   h_{-1} = 0
    y_t[d]   = Σ_n C_t[n] · h_t[d,n]  +  D[d] · x_t[d]
    out_t    = y_t ⊙ silu(z_t)                       (gate optional)

B and C depend on the input (one (N,) vector per batch row and step) and are shared by all
channels, as in Mamba's default (one group). The state equation is split from the rest:
``scan_states`` and ``associative_states`` compute (y_ssm, h_last) from the effective Δ, and
:func:`prepare_delta` / :func:`finish` do the O(B·L·D) work before and after, so every backend
(including the memory-lean ``custom_vjp`` of :mod:`.lean`) shares them.

Arithmetic runs in float32, or float64 when any input is float64; the output comes back in
``x``'s dtype and the last state in the compute dtype (as ``selective_scan_ref`` does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
    """float64 when any given array is float64, float32 otherwise (bf16/f16 are upcast)."""
    wide = any(a is not None and jnp.result_type(a) == jnp.float64 for a in arrays)
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def prepare_delta(
    delta: jax.Array, delta_bias: jax.Array | None, delta_softplus: bool, dtype: jnp.dtype
) -> jax.Array:
    """Effective step size Δ = softplus(delta + delta_bias) (each part optional), in ``dtype``.

    Shapes: delta (B, L, D), delta_bias (D,) -> (B, L, D).
    """
    delta = delta.astype(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(dtype)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    return delta


def finish(
    y: jax.Array,
    x: jax.Array,
    D: jax.Array | None,
    z: jax.Array | None,
    out_dtype: jnp.dtype,
) -> jax.Array:
    """out = (y + D ⊙ x) ⊙ silu(z), cast to ``out_dtype``. Shapes: y, x, z (B, L, D); D (D,)."""
    if D is not None:
        y = y + D.astype(y.dtype) * x.astype(y.dtype)
    if z is not None:
        y = y * jax.nn.silu(z.astype(y.dtype))
    return y.astype(out_dtype)


# The scan forms keep the state state-major, (B, N, D): channels are the contiguous axis, so
# every per-step op is a vector op over D and the read-out over N is a small dot. The
# channels-last (B, D, N) layout with a reduction over N costs about 10x more per step on
# XLA:CPU at B = 1 (that reduction is dispatched to a library call whose fixed cost dominates
# a step); see BENCHMARKS.md, "bench_scan_mambapy".
DOT_PRECISION = lax.Precision.HIGHEST  # full float32 dots on accelerators too (no TF32/bf16)


def transition(AT: jax.Array, d: jax.Array) -> jax.Array:
    """Ā = exp(Δ A), state-major: d (..., B, D), AT = Aᵀ (N, D) -> (..., B, N, D)."""
    return jnp.exp(d[..., None, :] * AT)


def inject(x: jax.Array, d: jax.Array, B: jax.Array) -> jax.Array:
    """B̄x = Δ x B, state-major: x, d (..., B, D), B (..., B, N) -> (..., B, N, D)."""
    return (d * x)[..., None, :] * B[..., :, None]


def readout(h: jax.Array, C: jax.Array) -> jax.Array:
    """y[d] = Σ_n C[n] h[n, d]: h (..., B, N, D), C (..., B, N) -> (..., B, D)."""
    return jnp.einsum("...nd,...n->...d", h, C, precision=DOT_PRECISION)


def step(
    AT: jax.Array,
    h: jax.Array,
    x_t: jax.Array,
    d_t: jax.Array,
    B_t: jax.Array,
    C_t: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One step of the recurrence: h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t; y_t = C_t · h_t.

    State-major shapes: AT = Aᵀ (N, D); h (B, N, D); x_t, d_t (B, D); B_t, C_t (B, N)
    -> (h_t (B, N, D), y_t (B, D)).
    """
    h = transition(AT, d_t) * h + inject(x_t, d_t, B_t)
    return h, readout(h, C_t)


def _time_major(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, 0, 1)


def scan_states(
    x: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The recurrence as a ``lax.scan`` over L: O(B·D·N) live state, L sequential steps.

    Plain autodiff of this form stores each step's (B, N, D) intermediates, i.e. O(B·L·D·N)
    memory in the backward pass; :mod:`.lean` gives the same function a lean backward.

    Args:
        x: (B, L, D) inputs, in the compute dtype.
        delta: (B, L, D) effective step sizes Δ (bias and softplus already applied).
        A: (D, N) continuous-time state matrix (diagonal per channel; negative for stability).
        B: (B, L, N) input matrix per step.
        C: (B, L, N) output matrix per step.

    Returns:
        ``(y, h_last)``: y (B, L, D) = C_t · h_t without the D skip or gate; h_last (B, D, N).
    """
    AT = A.T
    h0 = jnp.zeros((x.shape[0],) + AT.shape, x.dtype)

    def body(h, inputs):
        return step(AT, h, *inputs)

    h_last, ys = lax.scan(body, h0, tuple(_time_major(a) for a in (x, delta, B, C)))
    return _time_major(ys), jnp.swapaxes(h_last, 1, 2)


def associative_states(
    x: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The recurrence as a parallel prefix scan: O(log L) depth, O(B·L·D·N) memory.

    h_t = a_t h_{t-1} + b_t is a composition of affine maps h -> a h + b; composing
    (a1, b1) then (a2, b2) gives (a2 a1, a2 b1 + b2), which is associative, so
    ``lax.associative_scan`` computes every h_t from the per-step (Ā_t, B̄x_t).
    Same arguments and results as :func:`scan_states`.
    """
    a = jnp.exp(delta[..., None] * A)  # (B, L, D, N)
    b = (delta * x)[..., None] * B[:, :, None, :]  # (B, L, D, N)

    def combine(first, second):
        a1, b1 = first
        a2, b2 = second
        return a2 * a1, a2 * b1 + b2

    _, h = lax.associative_scan(combine, (a, b), axis=1)
    y = jnp.sum(h * C[:, :, None, :], axis=-1)
    return y, h[:, -1]


def _full(
    states_fn,
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    z: jax.Array | None,
    delta_bias: jax.Array | None,
    delta_softplus: bool,
    return_last_state: bool,
):
    dtype = compute_dtype(x, delta, A, B, C, D, z, delta_bias)
    d_eff = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    y, h_last = states_fn(x.astype(dtype), d_eff, A.astype(dtype), B.astype(dtype), C.astype(dtype))
    out = finish(y, x, D, z, x.dtype)
    return (out, h_last) if return_last_state else out


def selective_scan_scan(
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    *,
    delta_bias: jax.Array | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Selective scan by ``lax.scan``, differentiated by plain autodiff (no input checks).

    Same arguments and results as :func:`kernels_pallas.selective_scan.selective_scan`.
    """
    return _full(
        scan_states, x, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


def selective_scan_associative(
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    *,
    delta_bias: jax.Array | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Selective scan by ``lax.associative_scan``, plain autodiff (no input checks).

    Same arguments and results as :func:`kernels_pallas.selective_scan.selective_scan`.
    """
    return _full(
        associative_states, x, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )
