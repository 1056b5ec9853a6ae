"""The digits backbone: an MLP 64 -> 128 -> 10 whose normalisation statistics are explicit.

The network is ``logits = relu(BN(x W_1 + b_1)) W_2 + b_2`` with a batch-normalisation layer
BN(z) = scale * (z - mu) / sqrt(var + eps) + bias on the 128 hidden units. Its statistics
(mu, var) are not hidden module state: :func:`digits_net`'s ``apply`` takes them as an input
and returns them as an output, so the three ways of using them are plain function calls --

* source model (inference): ``batch_stats=False`` normalises with the running statistics
  learnt in training and returns them unchanged;
* training, and normalisation-statistics adaptation at test time (Schneider et al., 2020;
  the "BN" baseline of TENT, Wang et al., 2021): ``batch_stats=True`` normalises with the
  batch's own mean and (biased) variance and returns the running statistics updated by
  ``stats' = momentum * stats + (1 - momentum) * batch`` (unbiased batch variance, as PyTorch
  does);
* TENT: ``batch_stats=True`` and gradients of the prediction entropy with respect to the
  normalisation layer's affine parameters ``norm/scale`` and ``norm/bias`` (the ``"norm"``
  preset of :mod:`metattt.params` selects exactly these; its name does not say "batch").

Parameters are a nested dict ``{"hidden": {"kernel", "bias"}, "norm": {"scale", "bias"},
"head": {"kernel", "bias"}}``, following the naming contract of :mod:`metattt.params`. The
classifier head (128 -> 10) is separate so that an adapter can be put on it:
``features`` returns the head's input h (B, 128) and ``head`` maps it to logits.

Shapes: B batch, D_in = 64 pixels (an (..., 8, 8) image is flattened), H = 128 hidden units,
V = 10 classes.

Example:
    >>> net = digits_net()
    >>> params, stats = net.init(jax.random.key(0))
    >>> logits, stats = net.apply(params, stats, x, batch_stats=True)    # training step
    >>> logits, _ = net.apply(params, stats, x_test, batch_stats=False)  # source model
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["DigitsNet", "NormStats", "digits_net"]

PyTree = Any


class NormStats(NamedTuple):
    """Running statistics of the normalisation layer: mean (H,) and variance (H,)."""

    mean: jax.Array
    var: jax.Array


class DigitsNet(NamedTuple):
    """The backbone as pure functions.

    Attributes:
        init: ``key -> (params, NormStats)``.
        features: ``(params, stats, x, *, batch_stats) -> (h, stats)``; x (..., D_in) or
            (..., 8, 8) with one leading batch axis B, h (B, H) the head's input.
        head: ``(params, h) -> logits`` (B, V).
        apply: ``(params, stats, x, *, batch_stats) -> (logits, stats)``.
    """

    init: Callable[[jax.Array], tuple[PyTree, NormStats]]
    features: Callable[..., tuple[jax.Array, NormStats]]
    head: Callable[[PyTree, jax.Array], jax.Array]
    apply: Callable[..., tuple[jax.Array, NormStats]]


def _dense_init(key: jax.Array, d_in: int, d_out: int) -> dict[str, jax.Array]:
    # LeCun-normal kernel (Flax's nnx.Linear default), zero bias.
    kernel = jax.random.normal(key, (d_in, d_out), jnp.float32) / math.sqrt(d_in)
    return {"kernel": kernel, "bias": jnp.zeros((d_out,), jnp.float32)}


def digits_net(
    d_in: int = 64,
    hidden: int = 128,
    num_classes: int = 10,
    *,
    momentum: float = 0.9,
    eps: float = 1e-5,
) -> DigitsNet:
    """The backbone MLP D_in -> H -> V with batch normalisation on the hidden layer.

    Args:
        d_in: input size (64 for 8x8 digits).
        hidden: H, the hidden width (the head's input size).
        num_classes: V.
        momentum: rate of the running statistics' update when ``batch_stats=True``.
        eps: added to the variance before the square root.

    Returns:
        A :class:`DigitsNet`.

    Raises:
        ValueError: a non-positive size, ``momentum`` outside [0, 1) or ``eps <= 0``.
    """
    for name, value in (("d_in", d_in), ("hidden", hidden), ("num_classes", num_classes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")

    def init(key: jax.Array) -> tuple[PyTree, NormStats]:
        k_hidden, k_head = jax.random.split(key)
        params = {
            "hidden": _dense_init(k_hidden, d_in, hidden),
            "norm": {
                "scale": jnp.ones((hidden,), jnp.float32),
                "bias": jnp.zeros((hidden,), jnp.float32),
            },
            "head": _dense_init(k_head, hidden, num_classes),
        }
        stats = NormStats(jnp.zeros((hidden,), jnp.float32), jnp.ones((hidden,), jnp.float32))
        return params, stats

    def _flatten(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim == 3 and x.shape[1] * x.shape[2] == d_in:
            x = x.reshape(x.shape[0], d_in)
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(
                f"x must have shape (B, {d_in}) or (B, H, W) with H * W = {d_in}, got {x.shape}"
            )
        return x

    def features(
        params: PyTree, stats: NormStats, x: jax.Array, *, batch_stats: bool
    ) -> tuple[jax.Array, NormStats]:
        x = _flatten(x)
        z = x @ params["hidden"]["kernel"] + params["hidden"]["bias"]
        if batch_stats:
            mean = jnp.mean(z, axis=0)
            var = jnp.var(z, axis=0)
            n = z.shape[0]
            unbiased = var * (n / max(n - 1, 1))
            new_stats = NormStats(
                momentum * stats.mean + (1.0 - momentum) * mean,
                momentum * stats.var + (1.0 - momentum) * unbiased,
            )
        else:
            mean, var = stats.mean, stats.var
            new_stats = stats
        z = (z - mean) * jax.lax.rsqrt(var + eps)
        z = z * params["norm"]["scale"] + params["norm"]["bias"]
        return jax.nn.relu(z), new_stats

    def head(params: PyTree, h: jax.Array) -> jax.Array:
        return h @ params["head"]["kernel"] + params["head"]["bias"]

    def apply(
        params: PyTree, stats: NormStats, x: jax.Array, *, batch_stats: bool
    ) -> tuple[jax.Array, NormStats]:
        h, stats = features(params, stats, x, batch_stats=batch_stats)
        return head(params, h), stats

    return DigitsNet(init, features, head, apply)
