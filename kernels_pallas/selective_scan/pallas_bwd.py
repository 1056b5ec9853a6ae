"""The selective scan's backward as Pallas kernels, inside a ``custom_vjp`` with a ``jnp`` backward.

The core recurrence (Δ, bias and softplus already applied; no D skip or z gate), with
a_t = exp(Δ_t A) and h_{-1} = 0::

    h_t = a_t ⊙ h_{t-1} + (Δ_t x_t) ⊗ B_t,        y_t[d] = Σ_n C_t[n] h_t[d, n]

has the adjoint of :mod:`.lean` (g_t the total cotangent of h_t, walked from t = L-1 down)::

    g_t = ḡy_t ⊗ C_t + a_{t+1} ⊙ g_{t+1},          g_{L-1} += ḡh_last
    C̄_t = Σ_d ḡy_t[d] h_t[d, ·]          B̄_t = Σ_d g_t[d, ·] Δ_t[d] x_t[d]
    x̄_t = Δ_t Σ_n g_t B_t                 Δ̄_t = Σ_n g_t a_t h_{t-1} A + x_t Σ_n g_t B_t
    Ā = Σ_{b,t} g_t a_t h_{t-1} Δ_t

Two kernels, each with the forward kernel's grid (batch row, block of ``block_d`` channels):

* ``checkpoints``: runs the recurrence and writes the state entering each chunk of ``chunk``
  steps, (B, L/T, D, N) in float32: L/T of the L states, never the whole history;
* ``backward``: walks the chunks in reverse carrying g and Ā in registers. Per chunk it reloads
  the entry state, recomputes the T states and transitions in an unrolled loop (kept in
  registers: 2·T tiles of (block_d, N)), then runs the T adjoint steps backwards, writing x̄ and
  Δ̄ rows and this channel block's share of B̄ and C̄ (summed over the blocks afterwards, as Ā
  is over the batch).

L is padded to a multiple of T with Δ = x = B = C = 0 (identity steps; their gradients are
sliced away), D to a multiple of ``block_d`` and N to a power of two as in the forward kernel.

Differentiation. :func:`core_grads` (the five input gradients from the inputs and the output
cotangents) is a ``jax.custom_vjp`` whose own backward is ``jax.vjp`` of the ``jnp`` form of
the same gradients (:func:`.lean.lean_scan_states` differentiated), so a second derivative works
(reverse over reverse, as everywhere in this package); its forward rule calls the
``custom_vjp`` function itself, for nested differentiation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels_pallas.selective_scan.lean import lean_scan_states


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _pad(a: jax.Array, axis: int, padded: int) -> jax.Array:
    if a.shape[axis] == padded:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, padded - a.shape[axis])
    return jnp.pad(a, widths)


def _checkpoint_kernel(x_ref, d_ref, A_ref, B_ref, ckpt_ref, *, chunk, num_chunks):
    """States entering each chunk. Refs: x, d (L, bd); A (bd, N); B (L, N); ckpt (L/T, bd, N)."""
    A = A_ref[...]

    def chunk_body(c, h):
        ckpt_ref[c, :, :] = h
        for i in range(chunk):  # unrolled: Triton lowers only fori_loops with unroll=1
            t = c * chunk + i
            d_t = d_ref[t, :]
            h = jnp.exp(d_t[:, None] * A) * h + (d_t * x_ref[t, :])[:, None] * B_ref[t, :][None, :]
        return h

    lax.fori_loop(0, num_chunks, chunk_body, jnp.zeros(A.shape, A.dtype))


def _backward_kernel(
    x_ref, d_ref, A_ref, B_ref, C_ref, dy_ref, dh_ref, ckpt_ref,
    dx_ref, dd_ref, dA_ref, dB_ref, dC_ref, *, chunk, num_chunks,
):  # fmt: skip
    """Refs: x, d, dy (L, bd); A, dh (bd, N); B, C (L, N); ckpt (L/T, bd, N); outputs dx, dd
    (L, bd), dA (bd, N), dB, dC (L, N) (this channel block's share)."""
    A = A_ref[...]

    def chunk_body(k, carry):
        g, dA = carry
        c = num_chunks - 1 - k
        states, decays = [ckpt_ref[c, :, :]], []  # h_{t-1} for the chunk's first step, a_t
        for i in range(chunk):
            t = c * chunk + i
            d_t = d_ref[t, :]
            decays.append(jnp.exp(d_t[:, None] * A))
            inject = (d_t * x_ref[t, :])[:, None] * B_ref[t, :][None, :]
            states.append(decays[-1] * states[-1] + inject)
        for i in reversed(range(chunk)):
            t = c * chunk + i
            x_t, d_t, dy_t = x_ref[t, :], d_ref[t, :], dy_ref[t, :]
            B_t, C_t = B_ref[t, :], C_ref[t, :]
            g = g + dy_t[:, None] * C_t[None, :]  # now the total cotangent of h_t
            dC_ref[t, :] = jnp.sum(dy_t[:, None] * states[i + 1], axis=0)
            dB_ref[t, :] = jnp.sum(g * (d_t * x_t)[:, None], axis=0)
            g_b = jnp.sum(g * B_t[None, :], axis=1)
            dx_ref[t, :] = d_t * g_b
            g_ah = g * decays[i] * states[i]  # ∂/∂(Δ_t A) of a_t ⊙ h_{t-1}, times g
            dd_ref[t, :] = jnp.sum(g_ah * A, axis=1) + x_t * g_b
            dA = dA + d_t[:, None] * g_ah
            g = g * decays[i]  # to h_{t-1}
        return g, dA

    g0 = dh_ref[...]
    _, dA = lax.fori_loop(0, num_chunks, chunk_body, (g0, jnp.zeros_like(g0)))
    dA_ref[...] = dA


def core_grads_kernel(x, d, A, B, C, dy, dh, *, chunk, block_d, num_warps, interpret):
    """The bare kernels: (x̄, Δ̄, Ā, B̄, C̄) of the core recurrence, in the compute dtype.

    Shapes: x, d, dy (B, L, D); A (D, N); B, C (B, L, N); dh (B, D, N), all in one float dtype
    (float32 or float64) -> (B, L, D), (B, L, D), (D, N), (B, L, N), (B, L, N).
    """
    batch, length, dim = x.shape
    state = A.shape[1]
    chunk = max(1, min(chunk, length))
    block_d = min(block_d, _next_power_of_2(dim))
    num_chunks = -(-length // chunk)
    rows, cols, state_p = num_chunks * chunk, -(-dim // block_d) * block_d, _next_power_of_2(state)
    x, d, dy = (_pad(_pad(a, 1, rows), 2, cols) for a in (x, d, dy))
    B, C = (_pad(_pad(a, 1, rows), 2, state_p) for a in (B, C))
    A, dh = _pad(_pad(A, 0, cols), 1, state_p), _pad(_pad(dh, 1, cols), 2, state_p)
    grid = (batch, cols // block_d)
    seq = pl.BlockSpec((None, rows, block_d), lambda b, j: (b, 0, j))
    per_step = pl.BlockSpec((None, rows, state_p), lambda b, j: (b, 0, 0))
    table = pl.BlockSpec((block_d, state_p), lambda b, j: (j, 0))
    per_row_table = pl.BlockSpec((None, block_d, state_p), lambda b, j: (b, j, 0))
    ckpt_spec = pl.BlockSpec((None, num_chunks, block_d, state_p), lambda b, j: (b, 0, j, 0))
    block_share = pl.BlockSpec((None, None, rows, state_p), lambda b, j: (b, j, 0, 0))
    params = None if interpret else pl_triton.CompilerParams(num_warps=num_warps)
    static = dict(chunk=chunk, num_chunks=num_chunks)
    ckpt = pl.pallas_call(
        functools.partial(_checkpoint_kernel, **static),
        out_shape=jax.ShapeDtypeStruct((batch, num_chunks, cols, state_p), x.dtype),
        grid=grid,
        in_specs=[seq, seq, table, per_step],
        out_specs=ckpt_spec,
        interpret=interpret,
        compiler_params=params,
        name="selective_scan_checkpoints",
    )(x, d, A, B)
    shapes = [
        (batch, rows, cols), (batch, rows, cols), (batch, cols, state_p),
        (batch, cols // block_d, rows, state_p), (batch, cols // block_d, rows, state_p),
    ]  # fmt: skip
    dx, dd, dA, dB, dC = pl.pallas_call(
        functools.partial(_backward_kernel, **static),
        out_shape=[jax.ShapeDtypeStruct(s, x.dtype) for s in shapes],
        grid=grid,
        in_specs=[seq, seq, table, per_step, per_step, seq, per_row_table, ckpt_spec],
        out_specs=[seq, seq, per_row_table, block_share, block_share],
        interpret=interpret,
        compiler_params=params,
        name="selective_scan_bwd",
    )(x, d, A, B, C, dy, dh, ckpt)
    return (
        dx[:, :length, :dim],
        dd[:, :length, :dim],
        jnp.sum(dA, axis=0)[:dim, :state],
        jnp.sum(dB, axis=1)[:, :length, :state],
        jnp.sum(dC, axis=1)[:, :length, :state],
    )


def _jnp_core_grads(x, d, A, B, C, dy, dh):
    """The same gradients by ``jax.vjp`` of the ``jnp`` lean scan (differentiable again)."""
    _, vjp = jax.vjp(lambda *a: lean_scan_states(*a, chunk_size=None), x, d, A, B, C)
    return vjp((dy, dh))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def core_grads(x, d, A, B, C, dy, dh, chunk, block_d, num_warps, interpret):
    """(x̄, Δ̄, Ā, B̄, C̄) of the core recurrence by the kernels; reverse mode to any order."""
    return core_grads_kernel(
        x, d, A, B, C, dy, dh,
        chunk=chunk, block_d=block_d, num_warps=num_warps, interpret=interpret,
    )  # fmt: skip


def _core_grads_fwd(x, d, A, B, C, dy, dh, chunk, block_d, num_warps, interpret):
    out = core_grads(x, d, A, B, C, dy, dh, chunk, block_d, num_warps, interpret)
    return out, (x, d, A, B, C, dy, dh)


def _core_grads_bwd(chunk, block_d, num_warps, interpret, residuals, cotangents):
    del chunk, block_d, num_warps, interpret
    _, vjp = jax.vjp(_jnp_core_grads, *residuals)
    return vjp(tuple(cotangents))


core_grads.defvjp(_core_grads_fwd, _core_grads_bwd)
