"""Random corruptions of token batches for self-supervised test-time objectives.

* :func:`corrupt_tokens` hides a random share of the tokens behind random ones (the input of a
  masked-reconstruction loss, which then predicts the hidden originals);
* :func:`drop_swap` -- byte dropout (a token replaced by a random one) and adjacent swaps: an
  augmentation of text for a consistency loss;
* :func:`grid_noise_shift` -- tokens that are the intensities of a square image: a random
  shift (zero fill) and ±``noise`` integer noise, the augmentation of pixel tokens.

Each is pure and jittable, takes a PRNG key and int tokens (B, L), and keeps shape and dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check(tokens: jax.Array, name: str = "tokens") -> None:
    if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"{name} must be (B, L) integers, got {jnp.shape(tokens)}")


def _check_rate(name: str, rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate}")


def _check_range(low: int, high: int) -> None:
    if not low < high:
        raise ValueError(f"need low < high for the random tokens, got [{low}, {high})")


def corrupt_tokens(
    key: jax.Array, tokens: jax.Array, rate: float, *, low: int, high: int
) -> tuple[jax.Array, jax.Array]:
    """Hide each token with probability ``rate`` behind a uniform random token in [low, high).

    Returns:
        ``(corrupted, hidden)``: the (B, L) corrupted tokens and the (B, L) bool positions
        that were hidden (a hidden token may draw its own value; it still counts as hidden).
    """
    _check(tokens)
    _check_rate("rate", rate)
    _check_range(low, high)
    k_hide, k_fill = jax.random.split(key)
    hidden = jax.random.bernoulli(k_hide, rate, tokens.shape)
    fill = jax.random.randint(k_fill, tokens.shape, low, high, tokens.dtype)
    return jnp.where(hidden, fill, tokens), hidden


def drop_swap(
    key: jax.Array,
    tokens: jax.Array,
    *,
    drop_rate: float,
    swap_rate: float,
    low: int,
    high: int,
) -> jax.Array:
    """Byte dropout then adjacent swaps.

    Each token is replaced by a uniform random token in [low, high) with probability
    ``drop_rate``; then each aligned pair (2i, 2i+1) is swapped with probability ``swap_rate``
    (aligned pairs never overlap, so the swaps commute; an odd last token stays).
    """
    _check(tokens)
    _check_rate("drop_rate", drop_rate)
    _check_rate("swap_rate", swap_rate)
    _check_range(low, high)
    k_drop, k_swap = jax.random.split(key)
    x, _ = corrupt_tokens(k_drop, tokens, drop_rate, low=low, high=high)
    length = tokens.shape[1]
    swap = jax.random.bernoulli(k_swap, swap_rate, (tokens.shape[0], length // 2))
    pos = jnp.arange(length)
    pair = jnp.minimum(pos // 2, max(length // 2 - 1, 0))
    in_pair = pos < 2 * (length // 2)
    partner = jnp.where(pos % 2 == 0, pos + 1, pos - 1)
    swapped = jnp.take_along_axis(swap, jnp.broadcast_to(pair, x.shape), axis=1) & in_pair
    src = jnp.where(swapped, partner, pos)
    return jnp.take_along_axis(x, src, axis=1)


def grid_noise_shift(
    key: jax.Array, tokens: jax.Array, *, levels: int, max_shift: int = 1, noise: int = 1
) -> jax.Array:
    """Shift each (side x side) token image by a random (dy, dx) in [-max_shift, max_shift]²
    (vacated pixels 0), then add integer noise uniform in [-noise, noise] to every pixel and
    clip to [0, levels - 1]. ``tokens`` (B, side²), row-major."""
    _check(tokens)
    batch, length = tokens.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"tokens length must be a square (side² pixels), got {length}")
    if levels < 2 or max_shift < 0 or noise < 0:
        raise ValueError(f"need levels >= 2, max_shift >= 0, noise >= 0; got "
                         f"{levels}, {max_shift}, {noise}")  # fmt: skip
    k_shift, k_noise = jax.random.split(key)
    shift = jax.random.randint(k_shift, (batch, 2), -max_shift, max_shift + 1)
    rows = jnp.arange(side)[None, :, None] - shift[:, 0, None, None]  # source row of each pixel
    cols = jnp.arange(side)[None, None, :] - shift[:, 1, None, None]
    inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
    src = jnp.clip(rows, 0, side - 1) * side + jnp.clip(cols, 0, side - 1)
    moved = jnp.take_along_axis(tokens, src.reshape(batch, length), axis=1)
    moved = jnp.where(inside.reshape(batch, length), moved, 0)
    jitter = jax.random.randint(k_noise, tokens.shape, -noise, noise + 1, tokens.dtype)
    return jnp.clip(moved + jitter, 0, levels - 1).astype(tokens.dtype)
