"""Which parameter leaves adapt: select, split, merge and count by path pattern or preset.

A parameter pytree is partitioned by a boolean *mask* tree into a ``fast`` part (the leaves that
adapt at test time) and a ``slow`` part (the frozen rest). Unselected leaves are ``None`` in
``fast`` and selected leaves are ``None`` in ``slow``, so both halves are ordinary pytrees that
optax, ``jax.grad`` and ``jax.vmap`` accept, and ``merge`` puts them back together.

Naming contract
---------------
Selection works on the ``/``-joined path of each leaf, lower-cased (``"encoder/ln_1/scale"``).
Flax NNX ``State`` trees (the trailing ``.value`` of a Variable is dropped), Flax linen variable
dicts (``params/LayerNorm_0/scale``) and plain nested dicts all give such paths. A path carries
module *names*, never module types, so the presets read the names: Flax's defaults (linen's
``LayerNorm_0``, ``RMSNorm_0``, ``GroupNorm_0``, ``BatchNorm_0``), the usual hand-chosen names
and the ones our models use. A *token* below is a name or an ``_``-separated part of it,
optionally followed by digits (``enc_ln``, ``ln1``, ``ln_f``, ``bn2``).

============  ==========================================================================
preset        selects leaves whose path ...
============  ==========================================================================
layernorm     ends in ``<module>/scale`` or ``<module>/bias``, the module named like a
              LayerNorm (``*layernorm*``, ``*layer_norm*``, token ``ln``, ``lnf``) or a norm of
              no stated kind (``*norm*`` without ``rms``, ``group`` or ``batch``: ``norm``,
              ``norm1``, ``norm_f``, ``final_norm``).
rmsnorm       the same, module named ``*rmsnorm*``, ``*rms_norm*`` or token ``rms``.
groupnorm     the same, module named ``*groupnorm*``, ``*group_norm*`` or token ``gn``.
batchnorm     the same, module named ``*batchnorm*``, ``*batch_norm*`` or token ``bn``.
norm          any of the four above, and ``<i>/scale``, ``<i>/bias`` of an unnamed layer ``<i>``
              (a digit: an ``nnx.Sequential`` or list index) that has a ``scale`` leaf.
bias          ends in ``bias`` (any module).
attn_proj     has an attention module (``*attn*``, ``*attention*``) whose output projection is
              ``out``, ``out_proj``, ``o_proj``, ``proj`` or ``wo`` (linen/NNX name it ``out``).
mlp_out       has an MLP module (``*mlp*``, ``*ffn*``, ``feed_forward``, ``*expert*``) whose output
              layer is ``out``, ``down``, ``down_proj``, ``fc2``, ``wo``, ``w2`` or ``out_proj``,
              or a module literally named ``mlp_out``.
emb           has a component containing ``emb`` (``embedding``, ``unit_emb``, ...).
router        has a component containing ``router`` (MoE gates).
lora          has a component containing ``lora``.
fast          has a component named ``fast`` (fast-weight experts' slow projections).
============  ==========================================================================

What names cannot tell: a norm named without its kind (``norm1``) is taken by ``layernorm``
(and ``norm``) whatever its type -- an RMSNorm or BatchNorm called ``norm`` included; an
``nnx.Sequential`` layer is only an index (``layers/1/scale``), so only ``norm`` takes it, by
its ``scale`` leaf (which Flax's Linear, Conv, Embed and attention do not have) without knowing
its kind. :func:`of_type` selects by module type from an NNX module itself, and :func:`explain`
shows what a selector took and what it left.

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


def _token(word: str) -> str:
    """A path component holding ``word`` as a token: ``ln``, ``ln1``, ``enc_ln``, ``ln_f``."""
    return rf"(?:[^/]*_)?{word}\d*(?:_[^/]*)?"


# One path component naming a norm of each kind; a generic ``*norm*`` name counts as LayerNorm.
_NORM_NAMES = {
    "layernorm": rf"(?:[^/]*layer_?norm[^/]*|{_token('ln')}|lnf"
    r"|(?![^/]*(?:rms|group|batch))[^/]*norm[^/]*)",
    "rmsnorm": rf"(?:[^/]*rms_?norm[^/]*|{_token('rms')})",
    "groupnorm": rf"(?:[^/]*group_?norm[^/]*|{_token('gn')})",
    "batchnorm": rf"(?:[^/]*batch_?norm[^/]*|{_token('bn')})",
}
_NORM_LEAF = r"/(?:scale|bias)$"
_ATTN = r"[^/]*(?:attn|attention)[^/]*"
_MLP = r"(?:[^/]*(?:mlp|ffn|expert)[^/]*|feed_forward)"

# Each preset's path pattern; ``norm`` also takes the indexed norms of ``_INDEXED_NORM``, which
# need the other leaves' paths (``_term_predicate``).
PRESETS: dict[str, str] = {
    **{kind: rf"(?:^|/){name}{_NORM_LEAF}" for kind, name in _NORM_NAMES.items()},
    "norm": rf"(?:^|/)(?:{'|'.join(_NORM_NAMES.values())}){_NORM_LEAF}",
    "bias": r"(?:^|/)bias$",
    "attn_proj": rf"(?:^|/){_ATTN}/(?:out|out_proj|o_proj|proj|wo)(?:/|$)",
    "mlp_out": rf"(?:(?:^|/){_MLP}/(?:[^/]+/)*(?:out|down|down_proj|fc2|wo|w2|out_proj)(?:/|$)"
    r"|(?:^|/)mlp_out(?:/|$))",
    "emb": r"(?:^|/)[^/]*emb[^/]*(?:/|$)",
    "router": r"(?:^|/)[^/]*router[^/]*(?:/|$)",
    "lora": r"(?:^|/)[^/]*lora[^/]*(?:/|$)",
    "fast": r"(?:^|/)fast(?:/|$)",
}
_INDEXED_NORM = re.compile(r"^((?:.*/)?\d+)/(?:scale|bias)$")  # an unnamed layer's scale or bias


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


def _indexed_norms(paths: Sequence[str]) -> frozenset[str]:
    """Unnamed layers (a Sequential index) that have a ``scale`` leaf: norms by structure."""
    known = set(paths)
    return frozenset(
        m[1] for p in known if (m := _INDEXED_NORM.match(p)) and f"{m[1]}/scale" in known
    )


def _term_predicate(term: str, paths: Sequence[str]) -> Callable[[str, Any], bool]:
    if term == "norm":
        pattern, indexed = re.compile(PRESETS[term]), _indexed_norms(paths)

        def is_norm(path, leaf):
            m = _INDEXED_NORM.match(path)
            return pattern.search(path) is not None or (m is not None and m[1] in indexed)

        return is_norm
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


def _predicate(selector: Selector, paths: Sequence[str]) -> Callable[[str, Any], bool]:
    """``(path, leaf) -> bool`` for ``selector`` on a tree whose leaf paths are ``paths``."""
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
        preds = [_term_predicate(t, paths) for t in terms]
    elif isinstance(selector, Sequence):
        if len(selector) == 0:
            raise ValueError("empty parameter selector")
        preds = [_predicate(s, paths) for s in selector]
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
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        raise ValueError("cannot select parameters from an empty pytree")
    paths = [path_str(p) for p, _ in flat]
    pred = _predicate(selector, paths)
    picks = [bool(pred(path, leaf)) for path, (_, leaf) in zip(paths, flat, strict=True)]
    if not any(picks):
        examples = ", ".join(paths[:6])
        hint = (
            "; presets go by names: for your own names select by layer type with "
            "metattt.params.of_type(model, nnx.LayerNorm, ...) or by a 're:' pattern"
            if isinstance(selector, str) and not selector.startswith("re:")
            else ""
        )
        raise ValueError(
            f"parameter selector {selector!r} selects no leaf; paths look like: {examples}, "
            f"...{hint}"
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


def of_type(module: Any, *types: type) -> Callable[[str, Any], bool]:
    """A selector taking every leaf inside a submodule of ``module`` that is one of ``types``.

    For trees whose paths carry no module type: ``nnx.state(module)``, ``nnx.split(module, ...)``
    and ``functionalize(module).params`` of an NNX module (a LayerNorm inside an
    ``nnx.Sequential`` is ``layers/1``). Linen variables carry no types; their default names do
    (``LayerNorm_0``), which the presets read.

    Example:
        >>> mask = select(nnx.state(model, nnx.Param), of_type(model, nnx.LayerNorm))

    Raises:
        TypeError: ``module`` is not an NNX module or ``types`` is empty.
    """
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"of_type needs an nnx.Module, got {type(module).__name__}; for linen variables "
            "use a preset (linen's default names say the type) or a 're:' pattern"
        )
    if not types:
        raise TypeError("of_type needs at least one module type, e.g. nnx.LayerNorm")
    prefixes = tuple(
        "/".join(str(k) for k in path).lower() + "/"
        for path, node in nnx.iter_graph(module)
        if isinstance(node, types)
    )

    def inside(path: str, leaf: Any) -> bool:
        return (path + "/").startswith(prefixes)

    inside.__name__ = f"of_type({', '.join(t.__name__ for t in types)})"
    return inside


def _describe(selector: Selector) -> str:
    if isinstance(selector, str):
        return repr(selector)
    if callable(selector):
        return getattr(selector, "__name__", type(selector).__name__)
    return "[" + ", ".join(_describe(s) for s in selector) + "]"


def _group_lines(groups: dict[str, list[tuple[str, int]]]) -> list[str]:
    """One line per module path: its leaf names, leaf count and parameter count."""
    if not groups:
        return ["  (none)"]
    width = max(len(m or "(top level)") for m in groups)
    lines = []
    for module in sorted(groups):
        leaves = sorted(groups[module])
        n, size = len(leaves), sum(s for _, s in leaves)
        names = ", ".join(name for name, _ in leaves)
        lines.append(
            f"  {module or '(top level)':<{width}}  {names}  "
            f"({n} {'leaf' if n == 1 else 'leaves'}, {size:,} parameter{'' if size == 1 else 's'})"
        )
    return lines


def explain(tree: PyTree, selector: Selector) -> str:
    """What ``selector`` takes from ``tree`` and what it leaves, grouped by module path.

    A readable check before adapting: one line per module (the leaf's path without its last
    name) under ``selected:`` and ``not selected:``, sorted by path, with leaf and parameter
    counts, so that a norm the preset did not recognise (``enc_ln``, ``layers/1``) shows up.
    Unlike :func:`select` it does not raise when nothing is selected.

    Example:
        >>> print(explain(params, "layernorm"))
        selector 'layernorm': 2 of 4 leaves, 10 of 52 parameters (19.23%)
        selected:
          ln  bias, scale  (2 leaves, 10 parameters)
        not selected:
          dense  bias, kernel  (2 leaves, 42 parameters)

    Raises:
        ValueError: the selector names an unknown preset.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [path_str(p) for p, _ in flat]
    pred = _predicate(selector, paths)
    groups: tuple[dict, dict] = ({}, {})  # (not selected, selected): module -> [(leaf, size)]
    for path, (_, leaf) in zip(paths, flat, strict=True):
        module, _, name = path.rpartition("/")
        size = int(np.prod(np.shape(leaf)))
        groups[bool(pred(path, leaf))].setdefault(module, []).append((name, size))
    sizes = [[s for leaves in g.values() for _, s in leaves] for g in groups]
    picked, total = sum(sizes[1]), sum(sizes[0]) + sum(sizes[1])
    share = 100.0 * picked / total if total else 0.0
    head = (
        f"selector {_describe(selector)}: {len(sizes[1])} of {len(paths)} leaves, "
        f"{picked:,} of {total:,} parameters ({share:.2f}%)"
    )
    return "\n".join(
        [head, "selected:", *_group_lines(groups[1]), "not selected:", *_group_lines(groups[0])]
    )
