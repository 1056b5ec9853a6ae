"""The pure-function boundary: a Flax NNX module becomes ``apply(params, *args)`` + a params dict.

The core adapts plain nested dicts with string keys (what :mod:`metattt.params` names, optax
updates and orbax saves); :func:`functionalize` splits a module once into its graph definition
and such a dict, and returns an ``apply`` that merges them back inside the traced function.
Non-parameter state (e.g. batch statistics) stays fixed at its value when functionalised.
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
    """Split ``module`` into a pure ``apply`` and a string-keyed parameter dict."""
    graphdef, params_state, rest = nnx.split(module, nnx.Param, ...)
    template = nnx.to_pure_dict(params_state)

    def apply(params: PyTree, *args, **kwargs):
        state = jax.tree.map(lambda v: v, params_state)
        nnx.replace_by_pure_dict(state, _like(template, params))
        return nnx.merge(graphdef, state, rest)(*args, **kwargs)

    return Functional(apply, _str_keys(template))
