"""The pure-``jnp`` forms of MoE expert dispatch, and a plain loop over experts for tests.

Dimension names: T tokens, D model width, F expert hidden width, E experts, K experts per
token, C capacity. Every expert is a SwiGLU MLP (Shazeer 2020, "GLU Variants Improve
Transformer")::

    expert_e(x) = (silu(x · W_gate[e]) ⊙ (x · W_up[e])) · W_down[e]
    W_gate, W_up: (E, D, F)      W_down: (E, F, D)

and the layer output is the gate-weighted sum over each token's kept assignments::

    y_t = Σ_k keep_t,k · g_t,k · expert_{S_t,k}(x_t)

Forms (same inputs, same result):

* :func:`dispatch_dense` -- GShard's capacity-padded einsum. A one-hot dispatch tensor
  (T, E, C) gathers each expert's tokens into a (E, C, D) buffer (empty slots are zero rows),
  three batched matmuls run every expert on its buffer, and the combine tensor (dispatch
  weighted by the gates) scatters back. Cost O(T·E·C·D) for the one-hot products plus
  E·C·(6·D·F) for the experts, padded slots included.
* :func:`dispatch_ragged` -- sort the kept assignments by expert, run the three matmuls as
  grouped matmuls over the variable-size groups (:func:`.grouped.gmm` on
  ``jax.lax.ragged_dot``: no padding), and un-permute with the inverse permutation. Rows past
  the last group (dropped assignments) come out of the grouped matmul as zeros (optionally on
  tokamax's ``ragged_dot`` kernels instead: backend ``"tokamax"``). It vmaps
  (shared or per-member weights) and differentiates to any order in reverse mode; forward
  mode (``jax.jvp``) is refused, as for every ``custom_vjp``.
* :func:`dispatch_loop` -- a Python loop over experts that runs each expert on every token and
  masks; with its own Python implementation of the drop rule. The independent test oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.moe_dispatch.grouped import gmm
from kernels_pallas.moe_dispatch.routing import DROP_PRIORITIES, sort_by_expert


def swiglu(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, precision=None
) -> jax.Array:
    """One SwiGLU expert: (silu(x W_gate) ⊙ x W_up) W_down. x (..., D) -> (..., D)."""
    gate = jnp.matmul(x, w_gate, precision=precision)
    up = jnp.matmul(x, w_up, precision=precision)
    return jnp.matmul(jax.nn.silu(gate) * up, w_down, precision=precision)


def dispatch_dense(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    expert_ids: jax.Array,
    gates: jax.Array,
    keep: jax.Array,
    position: jax.Array,
    capacity: int,
    precision=None,
) -> jax.Array:
    """Capacity-padded einsum dispatch and combine.

    Shapes: x (T, D); w_gate, w_up (E, D, F); w_down (E, F, D); expert_ids, gates, keep,
    position (T, K); capacity C (static int) -> (T, D).
    """
    num_experts = w_gate.shape[0]
    num_tokens = x.shape[0]
    # slot[t, k, e·C + c] = 1 iff assignment (t, k) is kept at slot c of expert e.
    slot_index = expert_ids * capacity + jnp.clip(position, 0, capacity - 1)
    slot = jax.nn.one_hot(slot_index, num_experts * capacity, dtype=x.dtype)
    slot = slot * keep[..., None].astype(x.dtype)
    dispatch = jnp.sum(slot, axis=1).reshape(num_tokens, num_experts, capacity)
    combine = jnp.sum(slot * gates[..., None].astype(x.dtype), axis=1)
    combine = combine.reshape(num_tokens, num_experts, capacity)
    # buffers[e, c] = x_t of the token in slot c of expert e (zero rows for empty slots).
    buffers = jnp.einsum("tec,td->ecd", dispatch, x, precision=precision)
    gate = jnp.einsum("ecd,edf->ecf", buffers, w_gate, precision=precision)
    up = jnp.einsum("ecd,edf->ecf", buffers, w_up, precision=precision)
    out = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down, precision=precision)
    return jnp.einsum("tec,ecd->td", combine, out, precision=precision)


def dispatch_ragged(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    expert_ids: jax.Array,
    gates: jax.Array,
    keep: jax.Array,
    precision=None,
    tokamax_impl: tuple[str, ...] | None = None,
) -> jax.Array:
    """Sort by expert, grouped matmuls with ``jax.lax.ragged_dot``, un-permute, combine.

    Shapes: x (T, D); w_gate, w_up (E, D, F); w_down (E, F, D); expert_ids, gates, keep (T, K)
    -> (T, D). ``tokamax_impl``: the grouped matmuls on ``tokamax.ragged_dot`` with these
    implementations instead (:func:`.grouped.gmm`).
    """
    num_tokens, top_k = expert_ids.shape
    num_experts = w_gate.shape[0]
    grouped = sort_by_expert(expert_ids, num_experts, valid=keep)
    rows = x[grouped.order // top_k]  # (N, D): assignment i reads token i // K
    sizes = grouped.group_sizes
    gate = gmm(rows, w_gate, sizes, precision, tokamax_impl)
    up = gmm(rows, w_up, sizes, precision, tokamax_impl)
    out = gmm(jax.nn.silu(gate) * up, w_down, sizes, precision, tokamax_impl)
    per_slot = out[grouped.inverse].reshape(num_tokens, top_k, -1)  # back to (t, k) order
    weights = jnp.where(keep, gates, 0).astype(x.dtype)
    return jnp.einsum("tk,tkd->td", weights, per_slot, precision=precision)


def loop_keep(
    expert_ids, scores, num_experts: int, capacity: int | None, drop_priority: str = "score"
) -> np.ndarray:
    """The drop rule in plain Python (independent of :func:`routing.assign_slots`).

    Shapes: expert_ids, scores (T, K) concrete arrays -> keep (T, K) bool.
    """
    if drop_priority not in DROP_PRIORITIES:
        raise ValueError(f"drop_priority must be one of {DROP_PRIORITIES}, got {drop_priority!r}")
    ids = np.asarray(expert_ids)
    score = np.asarray(scores)
    num_tokens, top_k = ids.shape
    limit = num_tokens if capacity is None else capacity
    routed = [(t, k) for t in range(num_tokens) for k in range(top_k) if score[t, k] > 0]
    if drop_priority == "score":
        routed.sort(key=lambda tk: (-score[tk], tk[0] * top_k + tk[1]))
    else:
        routed.sort(key=lambda tk: (tk[1], tk[0]))
    used = [0] * num_experts
    keep = np.zeros((num_tokens, top_k), bool)
    for t, k in routed:
        e = int(ids[t, k])
        if used[e] < limit:
            keep[t, k] = True
            used[e] += 1
    return keep


def dispatch_loop(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    expert_ids,
    gates: jax.Array,
    *,
    capacity: int | None = None,
    drop_priority: str = "score",
    scores=None,
    precision=None,
) -> tuple[jax.Array, np.ndarray]:
    """Reference by brute force: run every expert on every token, mask, weight and sum.

    Shapes: x (T, D); w_gate, w_up (E, D, F); w_down (E, F, D); expert_ids (T, K) concrete;
    gates (T, K) -> (out (T, D), keep (T, K) numpy bool).

    Differentiable in ``x``, the weights and ``gates``. The drop rule needs concrete numbers:
    under ``jax.grad`` pass the gate values as ``scores`` (any concrete array).

    Args:
        capacity: C, assignments per expert (None: dropless).
        drop_priority: ``"score"`` or ``"position"``.
        scores: concrete values ranking assignments (default: ``gates``, which must then be
            concrete); an assignment with score 0 is not routed.
    """
    ids = np.asarray(expert_ids)
    if scores is None:
        if isinstance(gates, jax.core.Tracer):
            raise ValueError("gates is traced: pass its concrete values as scores")
        scores = gates
    num_experts = w_gate.shape[0]
    keep = loop_keep(ids, scores, num_experts, capacity, drop_priority)
    out = jnp.zeros_like(x)
    for e in range(num_experts):
        weight = jnp.sum(jnp.where(jnp.asarray((ids == e) & keep), gates, 0), axis=1)
        y = swiglu(x, w_gate[e], w_up[e], w_down[e], precision=precision)
        out = out + weight[:, None].astype(x.dtype) * y
    return out, keep
