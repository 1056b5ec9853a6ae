"""Test-time objectives: prediction entropy (TENT), MSE, next-token CE, masked reconstruction,
and the consistency (symmetric KL) of the predictions on two augmentations of a batch.

Every objective returns a scalar mean over the valid entries; an optional ``mask`` (1 = count)
excludes padding. Shapes: ``...`` leading batch/time axes, V classes or vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    mask = jnp.broadcast_to(mask, values.shape).astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _compute_dtype(x: jax.Array):
    """At least float32 (bf16 logits are upcast), float64 kept (finite-difference checks)."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _check_rank(name: str, x: jax.Array, min_ndim: int) -> None:
    if jnp.ndim(x) < min_ndim:
        raise ValueError(f"{name} needs at least {min_ndim} dims, got shape {jnp.shape(x)}")


def entropy(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean Shannon entropy H(softmax(logits)) in nats, over ``logits[..., V]`` (TENT's loss)."""
    _check_rank("logits", logits, 1)
    logp = jax.nn.log_softmax(logits.astype(_compute_dtype(logits)), axis=-1)
    return _masked_mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1), mask)


def mse(prediction: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error over all (unmasked) entries; shapes must match exactly."""
    if jnp.shape(prediction) != jnp.shape(target):
        raise ValueError(
            f"prediction shape {jnp.shape(prediction)} != target shape {jnp.shape(target)}"
        )
    dtype = jnp.promote_types(_compute_dtype(prediction), _compute_dtype(target))
    err = jnp.square(prediction.astype(dtype) - target.astype(dtype))
    return _masked_mean(err, mask)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None):
    """Mean softmax cross-entropy of integer ``labels[...]`` under ``logits[..., V]``."""
    _check_rank("logits", logits, 1)
    if jnp.shape(logits)[:-1] != jnp.shape(labels):
        raise ValueError(
            f"labels shape {jnp.shape(labels)} must equal logits shape without the class axis "
            f"{jnp.shape(logits)[:-1]}"
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got {jnp.result_type(labels)}")
    logp = jax.nn.log_softmax(logits.astype(_compute_dtype(logits)), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _masked_mean(nll, mask)


def next_token_cross_entropy(
    logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Causal LM loss: ``logits[..., t, :]`` predicts ``tokens[..., t + 1]``.

    Args:
        logits: (..., L, V) outputs of a causal model run on ``tokens``.
        tokens: (..., L) integer tokens.
        mask: optional (..., L) validity of each token; a pair counts if its target is valid.
    """
    _check_rank("logits", logits, 2)
    if jnp.shape(tokens) != jnp.shape(logits)[:-1]:
        raise ValueError(
            f"tokens shape {jnp.shape(tokens)} must equal logits shape without the vocabulary "
            f"axis {jnp.shape(logits)[:-1]}"
        )
    target_mask = None if mask is None else mask[..., 1:]
    return cross_entropy(logits[..., :-1, :], tokens[..., 1:], target_mask)


def masked_reconstruction(logits: jax.Array, tokens: jax.Array, masked: jax.Array) -> jax.Array:
    """Cross-entropy on the masked positions only (BERT-style reconstruction).

    Args:
        logits: (..., L, V) outputs of a model that saw ``tokens`` with ``masked`` positions hidden.
        tokens: (..., L) the original tokens.
        masked: (..., L) 1 where a token was hidden and must be reconstructed.
    """
    if jnp.shape(masked) != jnp.shape(tokens):
        raise ValueError(f"masked shape {jnp.shape(masked)} != tokens shape {jnp.shape(tokens)}")
    return cross_entropy(logits, tokens, masked)


def kl_divergence(
    logits_p: jax.Array, logits_q: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean KL(p || q) = Σ_v p_v (log p_v - log q_v), p = softmax(logits_p), q likewise,
    over ``logits[..., V]`` (shapes must match)."""
    _check_rank("logits_p", logits_p, 1)
    if jnp.shape(logits_p) != jnp.shape(logits_q):
        raise ValueError(
            f"logits_p shape {jnp.shape(logits_p)} != logits_q shape {jnp.shape(logits_q)}"
        )
    dtype = jnp.promote_types(_compute_dtype(logits_p), _compute_dtype(logits_q))
    logp = jax.nn.log_softmax(logits_p.astype(dtype), axis=-1)
    logq = jax.nn.log_softmax(logits_q.astype(dtype), axis=-1)
    return _masked_mean(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1), mask)


def consistency(
    logits_a: jax.Array, logits_b: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Symmetric KL ½·(KL(a || b) + KL(b || a)) between the predictions on two random
    augmentations of the same inputs; both branches get gradients (neither is the teacher).

    Shapes: ``logits_a``, ``logits_b`` (..., V), ``mask`` (...) -> scalar.
    """
    return 0.5 * (kl_divergence(logits_a, logits_b, mask) + kl_divergence(logits_b, logits_a, mask))


def random_token_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean mask with each position hidden independently with probability ``rate``."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"mask rate must be in (0, 1), got {rate}")
    return jax.random.bernoulli(key, rate, shape)
