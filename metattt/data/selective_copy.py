"""Selective copying (Gu & Dao, 2023, section 4.1.1): copy the data tokens scattered among noise.

A sequence of length L holds K data tokens (1..vocab-1) at random positions among noise tokens
(0) in its first L-K positions, then K answer markers (``vocab``). At the j-th marker a causal
next-token model must output the j-th data token. Where the data sits changes from sequence to
sequence, so a time-invariant filter cannot pick it out; a selective (input-dependent) scan can.
Every draw is a pure function of a PRNG key, so a run's data is fixed by (seed, step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class CopyBatch(NamedTuple):
    """A batch of selective-copying sequences, each field (B, L).

    ``inputs`` are the tokens; ``targets`` hold the j-th data token at the j-th answer slot
    and noise (0) elsewhere; ``answer`` is True at the K answer slots, the only ones scored.
    """

    inputs: jax.Array
    targets: jax.Array
    answer: jax.Array


def sample(key: jax.Array, batch: int, length: int, num_tokens: int, vocab: int) -> CopyBatch:
    """Draw ``batch`` sequences of ``length`` tokens with ``num_tokens`` tokens to copy.

    The data positions are a uniformly random sorted subset of the first ``length -
    num_tokens`` positions; the data tokens are uniform on 1..vocab-1, drawn independently.

    Raises:
        ValueError: not 0 < ``num_tokens`` <= ``length`` / 2, or ``vocab`` < 2.
    """
    prefix = length - num_tokens
    if not 0 < num_tokens <= prefix:
        raise ValueError(f"num_tokens must be in 1..length/2 = {length // 2}, got {num_tokens}")
    if vocab < 2:
        raise ValueError(f"vocab must be >= 2 (0 is noise, 1..vocab-1 are data), got {vocab}")
    k_pos, k_tok = jax.random.split(key)
    scores = jax.random.uniform(k_pos, (batch, prefix))
    positions = jnp.sort(jnp.argsort(scores, axis=1)[:, :num_tokens], axis=1)
    data = jax.random.randint(k_tok, (batch, num_tokens), 1, vocab)
    noise = jnp.zeros((batch, prefix), jnp.int32)
    scattered = jax.vmap(lambda t, p, d: t.at[p].set(d))(noise, positions, data)
    inputs = jnp.concatenate([scattered, jnp.full((batch, num_tokens), vocab, jnp.int32)], 1)
    targets = jnp.concatenate([noise, data], axis=1)
    answer = jnp.broadcast_to(jnp.arange(length) >= prefix, (batch, length))
    return CopyBatch(inputs, targets, answer)
