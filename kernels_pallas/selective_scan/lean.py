"""A memory-lean ``custom_vjp`` for the ``lax.scan`` form: recompute states chunk by chunk.

Plain autodiff of ``lax.scan`` keeps every step's (B, N, D) intermediates: O(B·L·D·N) memory,
which dominates a Mamba layer's backward (N = 16 times its activations). Here the sequence is
cut into L/T chunks of T steps and

* the forward pass runs the same recurrence (a scan over chunks of a scan over steps) and
  saves only its inputs plus the state entering each chunk: (L/T, B, N, D);
* the backward pass walks the chunks in reverse. For each chunk it computes the T transitions
  Ā_t and inputs B̄x_t at once, recomputes the T states from the saved entry state (a scan of
  multiply-adds), runs the adjoint recurrence g backwards through the chunk (another), and
  then forms every input gradient from the stacked (T, B, N, D) states and adjoints in a few
  chunk-wide ops, so the sequential loops carry only the two recurrences.

A call that is not differentiated runs one flat scan (no entry states). Peak memory of the gradient
is O(B·L·D + (L/T + T)·B·D·N) instead of O(B·L·D·N); T ≈ √L minimises it. Compute is one extra
forward pass. States are kept state-major, (B, N, D), as in
:mod:`~kernels_pallas.selective_scan.reference`. The backward rule is ordinary differentiable
``jnp``/``lax.scan``, so ``jax.grad`` of a function of ``jax.grad`` (second order) works through
it; that outer derivative is plain autodiff of both rules, so it is not memory-lean itself. Forward
mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is refused by any ``custom_vjp``: use the plain
scan (``lean_backward=False``) for it.

Adjoint recurrence. With a_t = exp(Δ_t A), b_t = Δ_t x_t B_t, h_t = a_t h_{t-1} + b_t and
y_t = Σ_n C_t[n] h_t[·, n], write g_t for the total cotangent of h_t:

    g_t  = C_t ⊗ ḡy_t + a_{t+1} ⊙ g_{t+1},     g_{L-1} = C ⊗ ḡy_{L-1} + ḡh_last
    C̄_t[n]   = Σ_d ḡy_t[d] h_t[d, n]
    Δ̄_t[d]   = Σ_n g_t a_t h_{t-1} A  +  x_t Σ_n g_t B_t
    Ā[d, n]  = Σ_{b,t} g_t a_t h_{t-1} Δ_t
    x̄_t[d]   = Δ_t Σ_n g_t B_t
    B̄_t[n]   = Σ_d g_t Δ_t x_t

A length that is not a multiple of T is padded with Δ = 0 (and x = B = C = 0): then a_t = 1 and
b_t = 0, the padded steps are the identity on the state, the last state is unchanged, and their
outputs are sliced away.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.selective_scan.reference import (
    DOT_PRECISION,
    inject,
    readout,
    step,
    transition,
)


def _forward(xs, ds, AT, Bs, Cs):
    """The chunked forward: returns ((y, h_last), h_entry). Inputs (L/T, T, B, ·)."""
    h0 = jnp.zeros((xs.shape[2],) + AT.shape, xs.dtype)

    def body(h, chunk):
        h_exit, y = lax.scan(lambda h, inputs: step(AT, h, *inputs), h, chunk)
        return h_exit, (y, h)

    h_last, (ys, h_entry) = lax.scan(body, h0, (xs, ds, Bs, Cs))
    return (ys, h_last), h_entry


@jax.custom_vjp
def _chunked_scan(xs, ds, AT, Bs, Cs):
    # Not differentiated: no entry states are needed, so run one flat scan over all steps
    # (the same steps in the same order as _forward, without the nested loop's overhead).
    flat = tuple(a.reshape((-1,) + a.shape[2:]) for a in (xs, ds, Bs, Cs))
    h0 = jnp.zeros((xs.shape[2],) + AT.shape, xs.dtype)
    h_last, ys = lax.scan(lambda h, inputs: step(AT, h, *inputs), h0, flat)
    return ys.reshape(xs.shape[:2] + ys.shape[1:]), h_last


def _fwd(xs, ds, AT, Bs, Cs):
    out, h_entry = _forward(xs, ds, AT, Bs, Cs)
    return out, (xs, ds, AT, Bs, Cs, h_entry)


def _chunk_states(h0, a, b):
    """The chunk's T states h_t = a_t h_{t-1} + b_t from its entry state h0, (T, B, N, D)."""

    def body(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    return lax.scan(body, h0, (a, b))[1]


def _chunk_adjoints(g_next, a, Cm, gy):
    """Total cotangents g_t = C_t ⊗ ḡy_t + a_{t+1} g_{t+1} of the chunk's states, (T, B, N, D).

    ``g_next`` is a_{t+1} g_{t+1} arriving from the chunk after this one; returns it for the
    chunk before (a_0 g_0) as well.
    """

    def body(g_next, inputs):
        a_t, C_t, gy_t = inputs
        g = g_next + C_t[:, :, None] * gy_t[:, None, :]
        return a_t * g, g

    return lax.scan(body, g_next, (a, Cm, gy), reverse=True)


def _bwd(residuals, cotangents):
    xs, ds, AT, Bs, Cs, h_entry = residuals
    gys, g_last = cotangents  # (L/T, T, B, D), (B, N, D)

    def chunk_body(carry, chunk):
        g_next, gAT = carry
        h0, x, d, Bm, Cm, gy = chunk
        a = transition(AT, d)  # (T, B, N, D)
        hs = _chunk_states(h0, a, inject(x, d, Bm))
        g_first, gs = _chunk_adjoints(g_next, a, Cm, gy)
        h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
        g_pre = gs * a * h_prev  # cotangent of Δ_t A through a_t
        gB_sum = readout(gs, Bm)  # Σ_n g B_t, (T, B, D)
        gd = jnp.einsum("tbnd,nd->tbd", g_pre, AT, precision=DOT_PRECISION) + gB_sum * x
        gx = gB_sum * d
        gB = jnp.einsum("tbnd,tbd->tbn", gs, d * x, precision=DOT_PRECISION)
        gC = jnp.einsum("tbnd,tbd->tbn", hs, gy, precision=DOT_PRECISION)
        gAT = gAT + jnp.einsum("tbnd,tbd->nd", g_pre, d, precision=DOT_PRECISION)
        return (g_first, gAT), (gx, gd, gB, gC)

    (_, gAT), (gxs, gds, gBs, gCs) = lax.scan(
        chunk_body, (g_last, jnp.zeros_like(AT)), (h_entry, xs, ds, Bs, Cs, gys), reverse=True
    )
    return gxs, gds, gAT, gBs, gCs


_chunked_scan.defvjp(_fwd, _bwd)


def _to_chunks(a: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
    """(B, L, ·) -> (L/T, T, B, ·), zero-padded at the end of L."""
    a = jnp.swapaxes(a, 0, 1)
    pad = num_chunks * chunk - a.shape[0]
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((num_chunks, chunk) + a.shape[1:])


#: Bytes one chunk's (T, B, N, D) block may take when T is chosen automatically.
AUTO_CHUNK_BYTES = 2 << 20


def auto_chunk_size(batch: int, length: int, dim: int, state: int, itemsize: int = 4) -> int:
    """T of the lean backward when none is given: the largest power of two in [8, 64] whose
    (T, B, N, D) block fits in :data:`AUTO_CHUNK_BYTES`, clipped to L.

    The backward keeps about six such blocks per chunk (transitions, states, adjoints and the
    gradient terms); at 2 MiB each they stay in cache. Measured on the 2-core CPU: at
    (B, L, D, N) = (32, 128, 64, 16) T = 64 costs 1.6x the time of T = 16, while at
    (1, 2048, 512, 16) T = 16..64 are within 6%.
    """
    block = max(1, batch * dim * state * itemsize)
    chunk = 64
    while chunk > 8 and chunk * block > AUTO_CHUNK_BYTES:
        chunk //= 2
    return max(1, min(chunk, length))


def lean_scan_states(
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`.reference.scan_states` with the chunk-recomputing backward described above.

    Args:
        x, delta: (B, L, D), delta already the effective Δ; A: (D, N); B, C: (B, L, N); all in
            one floating dtype.
        chunk_size: T, steps per chunk (clipped to L); saved states are (ceil(L/T), B, N, D).
            ``None``: :func:`auto_chunk_size`.

    Returns:
        ``(y, h_last)``: y (B, L, D), h_last (B, D, N); gradients flow into both.
    """
    batch, length, dim = x.shape
    if chunk_size is None:
        chunk_size = auto_chunk_size(batch, length, dim, A.shape[1], x.dtype.itemsize)
    chunk = max(1, min(int(chunk_size), length))
    num_chunks = -(-length // chunk)
    xs, ds, Bs, Cs = (_to_chunks(a, num_chunks, chunk) for a in (x, delta, B, C))
    ys, h_last = _chunked_scan(xs, ds, A.T, Bs, Cs)
    ys = ys.reshape((num_chunks * chunk,) + ys.shape[2:])[:length]
    return jnp.swapaxes(ys, 0, 1), jnp.swapaxes(h_last, 1, 2)
