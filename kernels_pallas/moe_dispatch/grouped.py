"""Grouped matrix multiplies over ``jax.lax.ragged_dot`` that vmap and differentiate to any order.

Dimension names: M rows (assignments sorted by group), K and N feature widths, G groups
(experts), B a vmapped batch. Rows of group g are the contiguous block after the rows of
groups 0..g-1; rows past Σ group_sizes belong to no group. The two products (the names of
MegaBlocks / megablox)::

    gmm(lhs (M, K), rhs (G, K, N), sizes (G,)) -> (M, N):     out[m] = lhs[m] · rhs[g(m)]
                                                              (0 for rows in no group)
    tgmm(lhs (M, K), rhs (M, N), sizes (G,)) -> (G, K, N):    out[g] = Σ_{m in g} lhs[m]ᵀ rhs[m]

Why not call ``jax.lax.ragged_dot`` directly. In the installed JAX (0.10) its batching rule
refuses operands that are not all batched on axis 0 ("ragged_dot vmap over any dim but 0 -
NYI"), which is what ``jax.vmap`` of a model with shared expert weights produces, and its
transpose rule has no second derivative with respect to the weights ("Unimplemented
grad_y_dims ... RAGGED_CONTRACTING"), which MAML through expert weights or expert LoRA needs.
So here:

* each product is a ``jax.custom_vjp`` whose backward is written with the two products
  themselves (d lhs = gmm(g, rhsᵀ), d rhs = tgmm(lhs, g) for gmm; d lhs = gmm(rhs, hᵀ),
  d rhs = gmm(lhs, h) for tgmm), and whose forward calls the product again, so every order of
  reverse-mode differentiation works (forward mode does not: ``jvp`` of a ``custom_vjp``);
* the primitive call inside is a ``jax.custom_batching.custom_vmap`` whose rule batches it
  properly: gmm with a shared ``rhs`` becomes one bigger gmm (rows of all batch members
  re-sorted group-major, sizes summed over the batch, no copy of the weights); every other
  case broadcasts the unbatched operands and folds the batch into the groups.

The raw products can also be tokamax's ``ragged_dot`` kernels (``tokamax_impl``, see
:mod:`.tokamax_ops`), under the same wrappers: tokamax's own ``ragged_dot`` has the two gaps
above too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import custom_batching

from kernels_pallas.moe_dispatch import tokamax_ops

_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def _broadcast(a: jax.Array, batched: bool, size: int) -> jax.Array:
    return a if batched else jnp.broadcast_to(a, (size, *a.shape))


def _fold(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _lax_products(precision) -> tuple:
    """(raw_gmm, raw_tgmm) on ``jax.lax.ragged_dot`` / ``ragged_dot_general``."""

    def raw_gmm(lhs, rhs, sizes):
        return jax.lax.ragged_dot(lhs, rhs, sizes, precision=precision)

    def raw_tgmm(lhs, rhs, sizes):
        return jax.lax.ragged_dot_general(lhs, rhs, sizes, _TGMM_DIMS, precision=precision)

    return raw_gmm, raw_tgmm


@functools.cache
def _ops(precision, tokamax_impl: tuple[str, ...] | None) -> tuple:
    """(gmm, tgmm) for one ``precision`` (a hashable ``lax.Precision`` value or None), on
    ``jax.lax.ragged_dot`` (``tokamax_impl=None``) or on tokamax's implementations."""
    if tokamax_impl is None:
        raw_gmm, raw_tgmm = _lax_products(precision)
    else:
        raw_gmm, raw_tgmm = tokamax_ops.products(precision, tokamax_impl)

    # --- batched forms: every operand carries a leading batch axis B ---------------------------

    @custom_batching.custom_vmap
    def gmm_batched(lhs, rhs, sizes):  # (B, M, K), (B, G, K, N), (B, G) -> (B, M, N)
        return jax.vmap(raw_gmm)(lhs, rhs, sizes)

    @gmm_batched.def_vmap
    def _gmm_batched_rule(axis_size, in_batched, lhs, rhs, sizes):
        # One more batch level A: fold (A, B) into A·B problems.
        lhs, rhs, sizes = (
            _broadcast(a, b, axis_size) for a, b in zip((lhs, rhs, sizes), in_batched, strict=True)
        )
        out = gmm_batched(_fold(lhs), _fold(rhs), _fold(sizes))
        return out.reshape(axis_size, -1, *out.shape[1:]), True

    @custom_batching.custom_vmap
    def tgmm_batched(lhs, rhs, sizes):  # (B, M, K), (B, M, N), (B, G) -> (B, G, K, N)
        return jax.vmap(raw_tgmm)(lhs, rhs, sizes)

    @tgmm_batched.def_vmap
    def _tgmm_batched_rule(axis_size, in_batched, lhs, rhs, sizes):
        lhs, rhs, sizes = (
            _broadcast(a, b, axis_size) for a, b in zip((lhs, rhs, sizes), in_batched, strict=True)
        )
        out = tgmm_batched(_fold(lhs), _fold(rhs), _fold(sizes))
        return out.reshape(axis_size, -1, *out.shape[1:]), True

    # --- single forms --------------------------------------------------------------------------

    @custom_batching.custom_vmap
    def gmm_single(lhs, rhs, sizes):
        return raw_gmm(lhs, rhs, sizes)

    @gmm_single.def_vmap
    def _gmm_single_rule(axis_size, in_batched, lhs, rhs, sizes):
        lhs_b, rhs_b, sizes_b = in_batched
        if not rhs_b:
            # Shared weights: sort the rows of all B members group-major (group, then member),
            # run one gmm with the summed sizes, and put the rows back.
            lhs = _broadcast(lhs, lhs_b, axis_size)
            sizes = _broadcast(sizes, sizes_b, axis_size)
            rows, groups = lhs.shape[1], sizes.shape[1]
            ends = jnp.cumsum(sizes, axis=1)
            group_of_row = jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(rows), side="right"))(
                ends
            )  # (B, M); == G past the last group
            member = jnp.arange(axis_size)[:, None]
            key = (jnp.minimum(group_of_row, groups) * axis_size + member).reshape(-1)
            order = jnp.argsort(key, stable=True)
            out = gmm_single(_fold(lhs)[order], rhs, jnp.sum(sizes, axis=0))
            inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
            return out[inverse].reshape(axis_size, rows, -1), True
        lhs, rhs, sizes = (
            _broadcast(a, b, axis_size) for a, b in zip((lhs, rhs, sizes), in_batched, strict=True)
        )
        return gmm_batched(lhs, rhs, sizes), True

    @custom_batching.custom_vmap
    def tgmm_single(lhs, rhs, sizes):
        return raw_tgmm(lhs, rhs, sizes)

    @tgmm_single.def_vmap
    def _tgmm_single_rule(axis_size, in_batched, lhs, rhs, sizes):
        lhs, rhs, sizes = (
            _broadcast(a, b, axis_size) for a, b in zip((lhs, rhs, sizes), in_batched, strict=True)
        )
        return tgmm_batched(lhs, rhs, sizes), True

    # --- differentiable wrappers ---------------------------------------------------------------

    @jax.custom_vjp
    def gmm(lhs, rhs, sizes):
        return gmm_single(lhs, rhs, sizes)

    def gmm_fwd(lhs, rhs, sizes):
        return gmm(lhs, rhs, sizes), (lhs, rhs, sizes)

    def gmm_bwd(res, g):
        lhs, rhs, sizes = res
        d_lhs = gmm(g.astype(rhs.dtype), jnp.swapaxes(rhs, 1, 2), sizes)
        d_rhs = tgmm(lhs, g.astype(lhs.dtype), sizes)
        return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None

    gmm.defvjp(gmm_fwd, gmm_bwd)

    @jax.custom_vjp
    def tgmm(lhs, rhs, sizes):
        return tgmm_single(lhs, rhs, sizes)

    def tgmm_fwd(lhs, rhs, sizes):
        return tgmm(lhs, rhs, sizes), (lhs, rhs, sizes)

    def tgmm_bwd(res, h):
        lhs, rhs, sizes = res
        d_lhs = gmm(rhs, jnp.swapaxes(h, 1, 2).astype(rhs.dtype), sizes)
        d_rhs = gmm(lhs, h.astype(lhs.dtype), sizes)
        return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None

    tgmm.defvjp(tgmm_fwd, tgmm_bwd)
    return gmm, tgmm


def _impl_key(tokamax_impl) -> tuple[str, ...] | None:
    return None if tokamax_impl is None else tuple(tokamax_impl)


def gmm(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, precision=None, tokamax_impl=None
) -> jax.Array:
    """Grouped matmul: ``out[m] = lhs[m] · rhs[g(m)]``; rows in no group give 0.

    Shapes: lhs (M, K), rhs (G, K, N), group_sizes (G,) int32 -> (M, N) in lhs's dtype.
    ``tokamax_impl``: None for ``jax.lax.ragged_dot``, or a tuple of tokamax implementations
    (:mod:`.tokamax_ops`) for ``tokamax.ragged_dot``.
    """
    return _ops(precision, _impl_key(tokamax_impl))[0](lhs, rhs, group_sizes.astype(jnp.int32))


def tgmm(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, precision=None, tokamax_impl=None
) -> jax.Array:
    """Transposed grouped matmul: ``out[g] = Σ_{m in g} lhs[m]ᵀ rhs[m]`` (the weight gradient).

    Shapes: lhs (M, K), rhs (M, N), group_sizes (G,) int32 -> (G, K, N). ``tokamax_impl`` as
    in :func:`gmm`.
    """
    return _ops(precision, _impl_key(tokamax_impl))[1](lhs, rhs, group_sizes.astype(jnp.int32))
