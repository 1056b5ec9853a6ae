"""Fast-weight experts: an expert's output modulated by a small network trained at test time.

In the spirit of TTT layers (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with
Expressive Hidden States") and large-chunk TTT (Zhang et al. 2025, "Test-Time Training Done
Right", LaCT), each expert e carries slow projections θ_K, θ_Q, θ_V (D, R) and θ_O (R, D) and a
fast weight W (R, R) that lives only inside a forward pass. Per sequence and expert, the tokens
routed to e are cut into chunks of ``chunk`` positions; chunk j is first read with the current
fast weight, then the fast weight takes ``steps`` gradient steps of the key/value loss on it
("apply, then update", so no position sees a later one -- the model stays causal):

    k_t = normalize(x_t θ_K),  q_t = normalize(x_t θ_Q),  v_t = x_t θ_V
    L_kv(W) = Σ_t a_t ||k_t W − v_t||² / max(Σ_t a_t, 1)     (a_t = 1 if t was routed to e)
    W ← W − η ∇L_kv(W) = W − η · 2 Σ_t a_t k_tᵀ (k_t W − v_t) / max(Σ_t a_t, 1)
    y_t += g_t,e · (q_t W) θ_O                               (g: the routing gate of e)

W starts at zero in every sequence; the keys and queries are unit vectors, so an inner rate
η ≤ 1 never diverges (the key Gram matrix over a chunk has eigenvalues ≤ 1). θ_O starts at
zero, like LoRA's B, so adding fast weights to a trained model leaves its function unchanged;
the slow projections are what a test-time method adapts (the ``fast`` preset of
:mod:`metattt.params`), differentiating through the inner steps. Trainable parameters per
expert: 4·D·R (:func:`fast_param_count`); :func:`matched_rank` gives the R at which they equal a
rank-ρ LoRA on the three SwiGLU matrices, 3·ρ·(D + F). Dimension names: B batch, L length, D
model width, E experts, R fast rank, N tokens.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-6  # inside the key/query normalisation's square root


def kv_loss(w: jax.Array, keys: jax.Array, values: jax.Array, weights: jax.Array) -> jax.Array:
    """The key/value loss Σ_n a_n ||k_n W − v_n||² / max(Σ_n a_n, 1).

    Shapes: w (R, R), keys and values (N, R), weights (N,) -> scalar.
    """
    res = keys @ w - values
    return jnp.sum(weights * jnp.sum(res * res, -1)) / jnp.maximum(jnp.sum(weights), 1.0)


def kv_update(
    w: jax.Array, keys: jax.Array, values: jax.Array, weights: jax.Array, *, lr: float, steps: int
) -> jax.Array:
    """``steps`` (static) gradient steps W ← W − lr·∇L_kv(W) (:func:`kv_loss`). Shapes as
    :func:`kv_loss`; returns the new (R, R) fast weight."""
    grad = jax.grad(kv_loss)
    for _ in range(steps):
        w = w - lr * grad(w, keys, values, weights)
    return w


def chunked_fast_weights(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    weights: jax.Array,
    *,
    chunk: int,
    lr: float,
    steps: int,
) -> jax.Array:
    """One sequence's fast-weight reads: chunk j reads ``q W_j``, then W_{j+1} =
    :func:`kv_update` (W_j, chunk j); W_0 = 0. A last partial chunk is padded with weight-0
    tokens.

    Shapes: queries, keys, values (L, R), weights (L,) -> (L, R).
    """
    length, rank = queries.shape
    num = -(-length // chunk)
    pad = num * chunk - length
    split = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(num, chunk, -1)
    q, k, v, a = split(queries), split(keys), split(values), split(weights)[..., 0]

    def step(w, xs):
        qj, kj, vj, aj = xs
        return kv_update(w, kj, vj, aj, lr=lr, steps=steps), qj @ w

    w0 = jnp.zeros((rank, rank), queries.dtype)
    _, reads = jax.lax.scan(step, w0, (q, k, v, a))
    return reads.reshape(num * chunk, rank)[:length]


def _normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + EPS)


def fast_modulation(
    x: jax.Array,
    theta_k: jax.Array,
    theta_q: jax.Array,
    theta_v: jax.Array,
    theta_o: jax.Array,
    assign: jax.Array,
    combine: jax.Array,
    *,
    chunk: int,
    lr: float,
    steps: int,
) -> jax.Array:
    """The fast-weight term added to a MoE layer's output (see the module docstring).

    Args:
        x: (B, L, D) the tokens the experts read.
        theta_k, theta_q, theta_v: (E, D, R) slow projections; theta_o: (E, R, D).
        assign: (B, L, E) 1 where the token was routed to (and processed by) the expert.
        combine: (B, L, E) the routing gate of each expert (0 where not routed).
        chunk, lr, steps: positions per chunk, inner rate η and steps per chunk (static).

    Returns:
        (B, L, D): Σ_e combine_e · (q_e W_e) θ_O,e, each expert and sequence its own W.
    """
    proj = lambda theta: jnp.einsum("bld,edr->eblr", x, theta)
    k, q, v = _normalize(proj(theta_k)), _normalize(proj(theta_q)), proj(theta_v)
    a = jnp.moveaxis(assign, -1, 0).astype(x.dtype)  # (E, B, L)
    run = partial(chunked_fast_weights, chunk=chunk, lr=lr, steps=steps)
    reads = jax.vmap(jax.vmap(run))(q, k, v, a)  # (E, B, L, R)
    out = jnp.einsum("eblr,erd->ebld", reads, theta_o)
    return jnp.einsum("ebld,ble->bld", out, combine.astype(x.dtype))


def fast_param_count(d_model: int, rank: int) -> int:
    """Trainable parameters of one fast-weight expert: θ_K, θ_Q, θ_V (D·R each) and θ_O (R·D)."""
    return 4 * d_model * rank


def matched_rank(d_model: int, d_ff: int, lora_rank: int) -> int:
    """The fast rank R with 4·D·R = 3·ρ·(D + F), the trainable parameters of a rank-ρ LoRA on
    an expert's gate, up (D, F) and down (F, D) matrices.

    Raises:
        ValueError: no integer R matches exactly (equal parameters are the comparison).
    """
    lora = 3 * lora_rank * (d_model + d_ff)
    if lora_rank < 1 or lora % (4 * d_model):
        raise ValueError(
            f"no fast rank matches LoRA rank {lora_rank} at D={d_model}, F={d_ff}: "
            f"3·ρ·(D + F) = {lora} is not a multiple of 4·D = {4 * d_model}"
        )
    return lora // (4 * d_model)


def fast_work(
    expert_counts: jax.Array,
    d_model: int,
    rank: int,
    steps: int,
    itemsize: int = 4,
    groups: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(FLOPs, bytes) of the fast-weight term per expert in one forward pass, (..., E) each.

    Per assignment (token routed to the expert): the three projections 6·D·R, the two
    normalisations 6·R, the read q·W and its output projection 2·R² + 2·R·D, the gate and add
    2·D, and per inner step k·W 2·R², the residual R and the gradient's outer product 2·R².
    Bytes per assignment: its k, q, v written and read (6·R) and its output (2·D). Per (sequence,
    chunk) that holds tokens of the expert, and per step: the update W − η·G (2·R² FLOPs), W
    and G read and W written (3·R² numbers); there are at most min(n_e, ``groups``) of them
    (``groups``: sequences × chunks of the pass; None charges every token, an upper bound).
    Each used expert's 4·D·R slow weights are read once.
    """
    d, r = d_model, rank
    n = jnp.asarray(expert_counts, jnp.float32)
    chunks = n if groups is None else jnp.minimum(n, float(groups))
    per_flops = 6 * d * r + 6 * r + 2 * r * r + 2 * r * d + 2 * d + steps * (4 * r * r + r)
    per_bytes = (6 * r + 2 * d) * itemsize
    flops = n * per_flops + chunks * steps * 2 * r * r
    nbytes = n * per_bytes + chunks * steps * 3 * r * r * itemsize
    used = (n > 0).astype(jnp.float32)
    return flops, nbytes + used * np.float32(4 * d * r * itemsize)
