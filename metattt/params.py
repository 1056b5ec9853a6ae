"""Which parameter leaves adapt: select, split, merge and count by path pattern or preset.

A parameter pytree is partitioned by a boolean *mask* tree into a ``fast`` part (the leaves that
adapt at test time) and a ``slow`` part (the frozen rest). Unselected leaves are ``None`` in
``fast`` and selected leaves are ``None`` in ``slow``, so both halves are ordinary pytrees that
optax, ``jax.grad`` and ``jax.vmap`` accept, and ``merge`` puts them back together.

Naming contract
---------------
Selection works on the ``/``-joined path of each leaf, lower-cased (``"encoder/ln_1/scale"``).
Flax NNX ``State`` trees (the trailing ``.value`` of a Variable is dropped), Flax linen variable
dicts (``params/LayerNorm_0/scale``) and plain nested dicts all give such paths. The presets
rely on these names, which are Flax's defaults or the names our models use:

============  ==========================================================================
preset        selects leaves whose path ...
============  ==========================================================================
layernorm     has a module named like a norm (``*norm*``, ``ln``, ``ln_*``, ``ln1``) and the
              leaf is ``scale`` or ``bias`` -- LayerNorm, RMSNorm, GroupNorm, linen or NNX.
bias          ends in ``bias`` (any module).
attn_proj     has an attention module (``*attn*``, ``*attention*``) whose output projection is
              ``out``, ``out_proj``, ``o_proj``, ``proj`` or ``wo`` (linen/NNX name it ``out``).
mlp_out       has an MLP module (``*mlp*``, ``*ffn*``, ``feed_forward``, ``*expert*``) whose output
              layer is ``out``, ``down``, ``down_proj``, ``fc2``, ``wo``, ``w2`` or ``out_proj``,
              or a module literally named ``mlp_out``.
emb           has a component containing ``emb`` (``embedding``, ``unit_emb``, ...).
router        has a component containing ``router`` (MoE gates).
lora          has a component containing ``lora``.
============  ==========================================================================

A selector is a preset name, ``re:<regex>`` (searched in the path), a ``+``-joined string of
those (``"layernorm+attn_proj"``), a sequence of selectors, or a callable ``(path, leaf) -> bool``.
An unknown preset, or a selector that selects nothing, raises ``ValueError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

PyTree = Any
Selector = str | Callable[[str, Any], bool] | Sequence[Any]

_NORM = r"(?:[^/]*norm[^/]*|ln|ln_[^/]*|ln\d+)"
_ATTN = r"[^/]*(?:attn|attention)[^/]*"
_MLP = r"(?:[^/]*(?:mlp|ffn|expert)[^/]*|feed_forward)"

PRESETS: dict[str, str] = {
    "layernorm": rf"(?:^|/){_NORM}/(?:scale|bias)$",
    "bias": r"(?:^|/)bias$",
    "attn_proj": rf"(?:^|/){_ATTN}/(?:out|out_proj|o_proj|proj|wo)(?:/|$)",
    "mlp_out": rf"(?:(?:^|/){_MLP}/(?:[^/]+/)*(?:out|down|down_proj|fc2|wo|w2|out_proj)(?:/|$)"
    r"|(?:^|/)mlp_out(?:/|$))",
    "emb": r"(?:^|/)[^/]*emb[^/]*(?:/|$)",
    "router": r"(?:^|/)[^/]*router[^/]*(?:/|$)",
    "lora": r"(?:^|/)[^/]*lora[^/]*(?:/|$)",
}


def _key_name(key: Any) -> str | None:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """The ``/``-joined, lower-cased name of a leaf path (an NNX Variable's ``value`` dropped)."""
    names = [_key_name(k) for k in path]
    if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return "/".join(n for n in names if n is not None).lower()


def leaf_paths(tree: PyTree) -> list[str]:
    """Paths of every leaf, in ``jax.tree.leaves`` order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _term_predicate(term: str) -> Callable[[str, Any], bool]:
    if term.startswith("re:"):
        pattern = re.compile(term[3:])
    elif term in PRESETS:
        pattern = re.compile(PRESETS[term])
    else:
        raise ValueError(
            f"unknown parameter preset {term!r}; known presets: {sorted(PRESETS)} "
            "(or 're:<regex>' for a path pattern)"
        )
    return lambda path, leaf: pattern.search(path) is not None


def _predicate(selector: Selector) -> Callable[[str, Any], bool]:
    if callable(selector):
        return selector
    if isinstance(selector, str):
        terms = (
            [t.strip() for t in selector.split("+")]
            if not selector.startswith("re:")
            else [selector]
        )
        if not terms or any(not t for t in terms):
            raise ValueError(f"empty term in parameter selector {selector!r}")
        preds = [_term_predicate(t) for t in terms]
    elif isinstance(selector, Sequence):
        if len(selector) == 0:
            raise ValueError("empty parameter selector")
        preds = [_predicate(s) for s in selector]
    else:
        raise TypeError(f"parameter selector must be str, callable or sequence, got {selector!r}")
    return lambda path, leaf: any(p(path, leaf) for p in preds)


def select(tree: PyTree, selector: Selector) -> PyTree:
    """A boolean pytree (same structure as ``tree``): ``True`` where the leaf adapts.

    Example:
        >>> mask = select(params, "layernorm+attn_proj")

    Raises:
        ValueError: the selector names an unknown preset or selects no leaf.
    """
    pred = _predicate(selector)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        raise ValueError("cannot select parameters from an empty pytree")
    picks = [bool(pred(path_str(p), leaf)) for p, leaf in flat]
    if not any(picks):
        examples = ", ".join(path_str(p) for p, _ in flat[:6])
        raise ValueError(
            f"parameter selector {selector!r} selects no leaf; paths look like: {examples}, ..."
        )
    return jax.tree_util.tree_unflatten(treedef, picks)


def _mask_leaves(tree: PyTree, mask: PyTree) -> tuple[list, list, Any]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    mask_leaves = jax.tree_util.tree_leaves(mask)
    if len(mask_leaves) != len(leaves):
        raise ValueError(
            f"mask has {len(mask_leaves)} leaves but the parameter tree has {len(leaves)}; "
            "build the mask with select() on the same tree"
        )
    return leaves, [bool(m) for m in mask_leaves], treedef


def split(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """Partition ``tree`` into ``(fast, slow)``; the other side's leaves are ``None``."""
    leaves, picks, treedef = _mask_leaves(tree, mask)
    fast = [x if m else None for x, m in zip(leaves, picks, strict=True)]
    slow = [None if m else x for x, m in zip(leaves, picks, strict=True)]
    return treedef.unflatten(fast), treedef.unflatten(slow)


def merge(fast: PyTree, slow: PyTree) -> PyTree:
    """Inverse of :func:`split`: take each leaf from whichever side holds it."""
    is_none = lambda x: x is None
    fast_leaves, treedef = jax.tree_util.tree_flatten(fast, is_leaf=is_none)
    try:
        slow_leaves = treedef.flatten_up_to(slow)
    except (ValueError, TypeError):
        raise ValueError(
            "fast and slow are not two halves of one tree (their structures differ); did you "
            "mean fast, slow = metattt.split(params, mask)?"
        ) from None
    for f, s in zip(fast_leaves, slow_leaves, strict=True):
        if (f is None) == (s is None):
            raise ValueError(
                "fast and slow must hold complementary leaves (each leaf in exactly one of "
                f"them), but a leaf is {'in both' if f is not None else 'in neither'}; did "
                "you mean fast, slow = metattt.split(params, mask)?"
            )
    return treedef.unflatten(
        [s if f is None else f for f, s in zip(fast_leaves, slow_leaves, strict=True)]
    )


class ParamCount(NamedTuple):
    """Trainable and total parameter counts (numbers of scalars) and the trainable share."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count(tree: PyTree, mask: PyTree | None = None) -> ParamCount:
    """Count scalars in ``tree`` and in its selected part (all of it when ``mask`` is None)."""
    leaves = jax.tree_util.tree_leaves(tree)
    sizes = [int(np.prod(np.shape(x))) for x in leaves]
    total = sum(sizes)
    if mask is None:
        return ParamCount(total, total)
    _, picks, _ = _mask_leaves(tree, mask)
    return ParamCount(sum(s for s, m in zip(sizes, picks, strict=True) if m), total)


def selected_paths(tree: PyTree, mask: PyTree) -> list[str]:
    """Paths of the selected leaves: what a run should log so its adapted set is on record."""
    _, picks, _ = _mask_leaves(tree, mask)
    return [p for p, m in zip(leaf_paths(tree), picks, strict=True) if m]
