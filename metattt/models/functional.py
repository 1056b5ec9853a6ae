"""The pure-function boundary: a Flax NNX module becomes ``apply(params, *args)`` + a params dict.

The core adapts plain nested dicts with string keys (what :mod:`metattt.params` names, optax
updates and orbax saves); :func:`functionalize` splits a module once into its graph definition
and such a dict, and returns an ``apply`` that merges them back inside the traced function.
Non-parameter state (e.g. BatchNorm's running statistics) stays fixed at its value when
functionalised: a layer that updates it in its forward pass updates a copy that each call drops.
So a BatchNorm in training mode normalises with the batch's own statistics (classic TENT), and
one in evaluation mode (``model.eval()`` before functionalising) with the stored ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx

PyTree = Any


class Functional(NamedTuple):
    """A model as a pure function: ``apply(params, *args, **kwargs)`` and its ``params``."""

    apply: Callable[..., Any]
    params: PyTree


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _like(template: Any, tree: Any) -> Any:
    """Re-key ``tree`` (string keys) like ``template`` (NNX keys, some of them ints)."""
    if isinstance(template, dict):
        return {k: _like(v, tree[str(k)]) for k, v in template.items()}
    return tree


def functionalize(module: nnx.Module) -> Functional:
    """Split ``module`` into a pure ``apply(params, *args, **kwargs)`` and a string-keyed
    parameter dict (its ``nnx.Param`` leaves); every other state (batch statistics, RNG
    counters) is fixed at its current value (see the module docstring).

    Example:
        >>> net = functionalize(model)          # model: any nnx.Module
        >>> logits = net.apply(net.params, x)   # pure: jit, grad and vmap it
    """
    graphdef, params_state, rest = nnx.split(module, nnx.Param, ...)
    template = nnx.to_pure_dict(params_state)

    def apply(params: PyTree, *args, **kwargs):
        state = jax.tree.map(lambda v: v, params_state)
        nnx.replace_by_pure_dict(state, _like(template, params))
        # A fresh copy of the other state too: a layer that updates it in its forward pass
        # (BatchNorm in training mode) then writes to this call's copy, which is dropped.
        return nnx.merge(graphdef, state, jax.tree.map(lambda v: v, rest))(*args, **kwargs)

    return Functional(apply, _str_keys(template))
