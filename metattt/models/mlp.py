"""A small multilayer perceptron (Flax NNX), the model of the sinusoid and toy experiments."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from metattt.models.functional import Functional, functionalize


class MLP(nnx.Module):
    """``sizes[0] -> ... -> sizes[-1]`` with ReLU between layers and an optional LayerNorm.

    Parameter names follow the naming contract of :mod:`metattt.params`: ``layers/i/kernel``,
    ``layers/i/bias`` and, with ``norm``, ``norm/scale`` / ``norm/bias`` after the first layer.
    """

    def __init__(self, sizes: Sequence[int], *, norm: bool = False, rngs: nnx.Rngs):
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"MLP sizes need >= 2 positive entries, got {list(sizes)}")
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.norm = nnx.LayerNorm(sizes[1], rngs=rngs) if norm and len(sizes) > 2 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., sizes[0]) -> (..., sizes[-1])."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0 and self.norm is not None:
                x = self.norm(x)
            if i < last:
                x = jax.nn.relu(x)
        return x


def mlp(sizes: Sequence[int], *, seed: int = 0, norm: bool = False) -> Functional:
    """A functionalised :class:`MLP`: ``(apply(params, x), params)``."""
    return functionalize(MLP(sizes, norm=norm, rngs=nnx.Rngs(seed)))
