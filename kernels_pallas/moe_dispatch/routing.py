"""Routing for MoE expert dispatch: top-k selection, capacity, drop priority, sort by expert.

Dimension names: T tokens, D model width, E experts, K experts per token (top-k), N = T·K
(token, slot) *assignments*, C capacity (assignments one expert may process).

Routing (Switch / GShard / Mixtral style, softmax first)::

    p_t        = softmax(router_logits_t)               (T, E), in float32 (float64 if given)
    S_t        = the K experts of largest p_t           (T, K) ``expert_ids``, best first
    g_t,k      = p_t[S_t,k]                             (T, K) ``gates``
    g_t,k     /= Σ_k' g_t,k'                            (with ``renormalize``)

An assignment whose gate is exactly 0 is *not routed*: it would add nothing to the output, and
this is how a pruned expert (router logit -inf, so p = 0) drops out of the dispatch even when
K exceeds the number of enabled experts.

Capacity and drop priority. With a capacity factor c, each expert processes at most
C = min(T, ceil(c·T·K/E)) assignments; dropless mode (c = None) is C = T, which no expert can
exceed because the K experts of one token are distinct. When more assignments reach an expert,
the ones processed are the first C in a global *priority order* over all N assignments:

* ``"score"`` (default; Batch Prioritized Routing, Riquelme et al. 2021, "Scaling Vision with
  Sparse Mixture of Experts"): by gate, largest first; equal gates by flat index t·K + k.
* ``"position"`` (GShard, Lepikhin et al. 2020; Switch): slot-major -- every token's first
  choice in token order, then every token's second choice, and so on (order by (k, t)).

The drop decision is discrete and carries no gradient. Because tokens compete for capacity
across the whole batch, capacity dropping is not causal; dropless routing is.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

DROP_PRIORITIES = ("score", "position")


class Routing(NamedTuple):
    """Top-k routing decisions.

    Attributes:
        expert_ids: (T, K) int32, the chosen experts of each token, best first.
        gates: (T, K) the combine weights (router probabilities, renormalised if asked).
        probs: (T, E) the full router softmax.
    """

    expert_ids: jax.Array
    gates: jax.Array
    probs: jax.Array


class ExpertSort(NamedTuple):
    """Assignments grouped by expert.

    Attributes:
        order: (N,) int32 flat assignment indices sorted by expert id (stable); invalid
            assignments come last.
        group_sizes: (E,) int32 number of valid assignments per expert; they fill
            ``order[:sum(group_sizes)]`` group after group.
        inverse: (N,) int32 the inverse permutation: ``order[inverse[i]] == i``.
    """

    order: jax.Array
    group_sizes: jax.Array
    inverse: jax.Array


class Slots(NamedTuple):
    """Where each assignment lands in its expert's buffer.

    Attributes:
        keep: (T, K) bool, routed (gate > 0) and within capacity.
        position: (T, K) int32, rank of the assignment among those routed to the same expert
            in the priority order (0-based; in flat order when C >= T, where nothing drops);
            ``keep == routed & (position < C)``; 0 for assignments not routed.
    """

    keep: jax.Array
    position: jax.Array


def _float_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.dtype(jnp.float64 if jnp.result_type(x) == jnp.float64 else jnp.float32)


def top_k_routing(router_logits: jax.Array, top_k: int, *, renormalize: bool = False) -> Routing:
    """Softmax over experts, then the ``top_k`` largest probabilities of each token.

    Shapes: router_logits (T, E) -> expert_ids (T, K), gates (T, K), probs (T, E).

    Args:
        router_logits: raw router scores; -inf disables an expert for that token.
        top_k: K, experts per token, 1 <= K <= E.
        renormalize: divide each token's K gates by their sum (Mixtral); otherwise the gates
            are the router probabilities themselves (Switch, GShard).

    Raises:
        ValueError: ``router_logits`` is not 2-D floating, or ``top_k`` is out of range.
    """
    if jnp.ndim(router_logits) != 2:
        raise ValueError(f"router_logits must have shape (T, E), got {jnp.shape(router_logits)}")
    if not jnp.issubdtype(jnp.result_type(router_logits), jnp.floating):
        raise ValueError(f"router_logits must be floating, got {jnp.result_type(router_logits)}")
    num_experts = jnp.shape(router_logits)[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, E={num_experts}], got {top_k!r}")
    probs = jax.nn.softmax(router_logits.astype(_float_dtype(router_logits)), axis=-1)
    # Softmax is monotone, so the top-k of probs is the top-k of the logits; lax.top_k breaks
    # ties by the lower index, like a stable descending sort.
    _, expert_ids = jax.lax.top_k(jax.lax.stop_gradient(probs), top_k)
    expert_ids = expert_ids.astype(jnp.int32)
    gates = jnp.take_along_axis(probs, expert_ids, axis=-1)
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return Routing(expert_ids, gates, probs)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """C = min(T, ceil(c·T·K/E)) assignments per expert; ``None`` (dropless) gives T.

    The product is rounded to 9 decimals before the ceiling so that float noise
    (1.1·10·2/4 = 5.500000000000001) does not add a slot.

    Raises:
        ValueError: a non-positive ``capacity_factor``.
    """
    if capacity_factor is None:
        return int(num_tokens)
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor!r}")
    slots = math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9))
    return int(max(1, min(slots, num_tokens)))


def sort_by_expert(
    expert_ids: jax.Array, num_experts: int, valid: jax.Array | None = None
) -> ExpertSort:
    """Group assignments by expert: the permutation, group sizes and inverse permutation.

    Shapes: expert_ids (...,) any shape, flattened to (N,); valid same shape or None.
    Invalid assignments (``valid`` False) sort after every group and count in no group.
    """
    flat = jnp.reshape(expert_ids, (-1,)).astype(jnp.int32)
    key = flat if valid is None else jnp.where(jnp.reshape(valid, (-1,)), flat, num_experts)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros((num_experts + 1,), jnp.int32).at[key].add(1)[:num_experts]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    return ExpertSort(order, group_sizes, inverse)


def priority_order(gates: jax.Array, drop_priority: str) -> jax.Array:
    """(N,) flat assignment indices, highest priority first (see the module docstring).

    Shapes: gates (T, K) -> (T·K,) int32.
    """
    num_tokens, top_k = jnp.shape(gates)
    if drop_priority == "score":
        neg = -jax.lax.stop_gradient(gates).reshape(-1)
        return jnp.argsort(neg, stable=True).astype(jnp.int32)
    if drop_priority == "position":
        flat = jnp.arange(num_tokens * top_k, dtype=jnp.int32).reshape(num_tokens, top_k)
        return flat.T.reshape(-1)
    raise ValueError(f"drop_priority must be one of {DROP_PRIORITIES}, got {drop_priority!r}")


def assign_slots(
    expert_ids: jax.Array,
    gates: jax.Array,
    num_experts: int,
    capacity: int,
    drop_priority: str = "score",
) -> Slots:
    """Rank every routed assignment within its expert by priority and keep the first C.

    Shapes: expert_ids, gates (T, K) -> Slots of (T, K).

    The priority order lists the assignments; a stable sort of that list by expert id then
    puts each expert's assignments together *in priority order*, so an assignment's rank in
    its expert is its index in the sorted list minus the start of its group. When no expert
    can overflow (C >= T, e.g. dropless) the priority sort is skipped and ranks follow the
    flat order t·K + k: every routed assignment is kept either way.
    """
    if drop_priority not in DROP_PRIORITIES:
        raise ValueError(f"drop_priority must be one of {DROP_PRIORITIES}, got {drop_priority!r}")
    num_tokens, top_k = jnp.shape(expert_ids)
    routed = (jax.lax.stop_gradient(gates) > 0).reshape(-1)
    if capacity >= num_tokens:
        order = jnp.arange(num_tokens * top_k, dtype=jnp.int32)
    else:
        order = priority_order(gates, drop_priority)
    ids_in_order = expert_ids.reshape(-1)[order]
    grouped = sort_by_expert(ids_in_order, num_experts, valid=routed[order])
    starts = jnp.cumsum(grouped.group_sizes) - grouped.group_sizes
    rank_in_order = grouped.inverse - starts[jnp.clip(ids_in_order, 0, num_experts - 1)]
    position = jnp.zeros((num_tokens * top_k,), jnp.int32).at[order].set(rank_in_order)
    keep = routed & (position < capacity)
    shape = (num_tokens, top_k)
    return Slots(keep.reshape(shape), jnp.where(routed, position, 0).reshape(shape))
