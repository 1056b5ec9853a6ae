"""LoRA adapters whose rank is allocated, grown, shrunk and freed at run time, at fixed shapes.

A LoRA adapter (Hu et al., 2021) adds a low-rank term to a frozen linear map W (D_in, D_out):

    y = x W + s * ((x A) * m) B,    A: (D_in, R_max),  B: (R_max, D_out),  m in {0, 1}^R_max

The rank is dynamic but the shapes are not: the factors live in a static max-rank buffer and
the rank mask m switches components on (the first ``rank`` entries are 1). Every function here
is pure and jittable with the rank as a *traced* value, so one compiled adaptation step serves
every rank and allocations never recompile anything.

Invariant. Inactive components are exactly zero: the columns of A, the rows of B and the
optimizer statistics that belong to them. The mask enters the forward pass, so inactive
components receive exactly zero gradient, and :func:`make_step` also projects gradients and
updates onto the active components, so no optimizer term (weight decay, noise) can move them.
The statistics stay exactly zero for every rule whose statistic of a zero gradient is zero
(Adam, momentum, RMSProp, Lion); adafactor adds epsilon1 = 1e-30 to every squared gradient, so
an idle component holds 1e-30 there until :func:`realloc` resets it, on growth, to the 0 of a
fresh optimizer.

Operations (each returns the new ``(lora, opt_state)``):

* :func:`alloc` -- a fresh adapter of the given rank: :func:`free`, then grow from rank 0.
* :func:`realloc` -- grow or shrink to ``new_rank``. Growing keeps the active components and
  their optimizer statistics bit for bit (Adam's mu and nu, and its step count) and starts
  the new ones the standard LoRA way -- A columns random, B rows zero -- so their added term
  is exactly zero and the output does not jump. Shrinking drops the highest-index (most
  recently added) components, zeroing their weights and statistics; the output changes by
  exactly their contribution.
* :func:`free` -- zero the adapter and its optimizer statistics; ``reset_count`` (default)
  also sets the optimizer's integer step counters back to 0.

Adam's step count. optax keeps one step count t per optimizer state, shared by every
parameter, and uses it in the bias corrections 1 - beta^t. Growing keeps it (the kept
components' moments are calibrated to it); a consequence is that the new components start
with zero moments under a large t, so their first updates are not bias-corrected: Adam's
ratio m / sqrt(v) then starts near (1 - beta1) / sqrt(1 - beta2) (about 3 for the usual
betas) instead of 1, and settles as the moments fill. Freeing resets t to 0 so that the next
allocation starts exactly like a freshly initialised optimizer (the state equals
``opt.init`` of zero factors); this also restarts any schedule that reads the same counter.
If the optimizer state also holds parameters other than the adapter, pass
``reset_count=False`` to keep their bias corrections.

The scale s is a constant, not alpha / rank: dividing by the active rank would rescale the
kept components at every reallocation and make the output jump. Use ``scale=alpha / R_max``
for the usual normalisation at full rank.

Optimizer-state contract. The factors are a :class:`LoRAFactors` node, and optax builds its
per-parameter statistics with ``jax.tree.map`` over the parameters, so every statistic of the
factors (Adam's mu and nu, momentum traces, MultiSteps accumulators, ...) is again a
:class:`LoRAFactors` node somewhere in the state -- inside a dict of other parameters, inside
``chain``, ``inject_hyperparams``, ``masked`` or ``MultiSteps``. The surgery walks the state,
and in each :class:`LoRAFactors` node zeroes the inactive columns of the leaf shaped like A
and the inactive rows of the leaf shaped like B; non-array leaves (``optax.MaskedNode``) and
leaves of size <= 1 (optax scalar stand-ins) are left alone. Everything outside such nodes is left
alone too, except that ``free(..., reset_count=True)`` zeroes integer scalar leaves (step
counters). A leaf inside a :class:`LoRAFactors` node of any other shape -- a factored second
moment, e.g. adafactor on factors with both dimensions >= 128 -- has no per-component
meaning and raises ``ValueError``, as does a state that holds arrays shaped like A or B but
no :class:`LoRAFactors` node (built over another container, it would be missed silently).
One adapter per optimizer state, or adapters of different shapes: the surgery edits every
node whose shapes match.

Example:
    >>> lora = lora_init(128, 10, max_rank=8)
    >>> opt = optax.adam(1e-3)
    >>> opt_state = opt.init(lora.factors)
    >>> step = jax.jit(make_step(loss_fn, opt))   # loss_fn(lora, batch) -> scalar
    >>> lora, opt_state = jax.jit(alloc)(lora, opt_state, 2, key)
    >>> lora, opt_state, loss = step(lora, opt_state, batch)
    >>> lora, opt_state = jax.jit(realloc)(lora, opt_state, 4, key2)   # same compiled step
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "LoRA",
    "LoRAFactors",
    "active_params",
    "alloc",
    "free",
    "lora_apply",
    "lora_delta",
    "lora_init",
    "make_step",
    "project",
    "rank",
    "realloc",
]

PyTree = Any


class LoRAFactors(NamedTuple):
    """The trainable factors: a (D_in, R_max) and b (R_max, D_out)."""

    a: jax.Array
    b: jax.Array


class LoRA(NamedTuple):
    """A dynamic-rank LoRA adapter.

    Attributes:
        factors: the trainable :class:`LoRAFactors` (the only part an optimizer sees).
        mask: (R_max,) float 0/1 rank mask, in the factors' dtype; active entries come first.
        scale: () the constant scale s of the low-rank term.
    """

    factors: LoRAFactors
    mask: jax.Array
    scale: jax.Array


def _dims(lora: LoRA) -> tuple[int, int, int]:
    a, b = lora.factors
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"lora factors must be a (D_in, R_max) and b (R_max, D_out), got {a.shape}, {b.shape}"
        )
    if lora.mask.shape != (a.shape[1],):
        raise ValueError(
            f"lora.mask must have shape (R_max,) = ({a.shape[1]},), got {lora.mask.shape}"
        )
    return a.shape[0], a.shape[1], b.shape[1]


def lora_init(
    d_in: int, d_out: int, max_rank: int, *, scale: float = 1.0, dtype: Any = jnp.float32
) -> LoRA:
    """An empty adapter (rank 0, all zeros) with a max-rank buffer of ``max_rank`` components.

    Raises:
        ValueError: a non-positive dimension.
    """
    for name, value in (("d_in", d_in), ("d_out", d_out), ("max_rank", max_rank)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    factors = LoRAFactors(jnp.zeros((d_in, max_rank), dtype), jnp.zeros((max_rank, d_out), dtype))
    return LoRA(factors, jnp.zeros((max_rank,), dtype), jnp.asarray(scale, dtype))


def rank(lora: LoRA) -> jax.Array:
    """The active rank r = sum(mask), int32 (traceable)."""
    return jnp.sum(lora.mask > 0).astype(jnp.int32)


def active_params(lora: LoRA) -> jax.Array:
    """r * (D_in + D_out): the parameters a real rank-r allocation would hold, int32."""
    d_in, _, d_out = _dims(lora)
    return rank(lora) * (d_in + d_out)


def _check_x(x: jax.Array, d_in: int) -> None:
    if jnp.shape(x)[-1:] != (d_in,):
        raise ValueError(f"x must have shape (..., D_in) = (..., {d_in}), got {jnp.shape(x)}")


def lora_delta(x: jax.Array, lora: LoRA) -> jax.Array:
    """The low-rank term s * ((x A) * m) B; x (..., D_in) -> (..., D_out).

    Raises:
        ValueError: ``x``'s last dimension is not D_in.
    """
    _check_x(x, _dims(lora)[0])
    a, b = lora.factors
    return lora.scale * (((x @ a) * lora.mask) @ b)


def lora_apply(
    x: jax.Array, base_kernel: jax.Array, lora: LoRA, base_bias: jax.Array | None = None
) -> jax.Array:
    """x W (+ bias) + s * ((x A) * m) B; x (..., D_in), W (D_in, D_out) -> (..., D_out).

    Raises:
        ValueError: ``x``, ``base_kernel`` or ``base_bias`` does not match the adapter's shapes.
    """
    d_in, _, d_out = _dims(lora)
    _check_x(x, d_in)
    if jnp.shape(base_kernel) != (d_in, d_out):
        raise ValueError(
            f"base_kernel must have shape (D_in, D_out) = ({d_in}, {d_out}), "
            f"got {jnp.shape(base_kernel)}"
        )
    y = x @ base_kernel
    if base_bias is not None:
        if jnp.shape(base_bias) != (d_out,):
            raise ValueError(f"base_bias must have shape ({d_out},), got {jnp.shape(base_bias)}")
        y = y + base_bias
    return y + lora_delta(x, lora)


def _is_factors(node: Any) -> bool:
    return isinstance(node, LoRAFactors)


def _edit_leaf(leaf: Any, shape: tuple[int, int], keep: jax.Array, where: str) -> Any:
    if not hasattr(leaf, "shape") or int(np.prod(leaf.shape)) <= 1:
        return leaf  # MaskedNode, None, optax scalar stand-ins
    if tuple(leaf.shape) != shape:
        raise ValueError(
            f"opt_state has a LoRAFactors node whose {where} leaf has shape {tuple(leaf.shape)}, "
            f"not the factor's {shape} (a factored statistic?); its per-component surgery is "
            "undefined -- use an optimizer with per-entry statistics"
        )
    return jnp.where(keep, leaf, jnp.zeros_like(leaf))


def _edit_tree(
    tree: PyTree, lora: LoRA, keep: jax.Array, *, reset_count: bool, name: str
) -> PyTree:
    """Zero the components where ``keep`` is False in every LoRAFactors node of ``tree``."""
    d_in, r_max, d_out = _dims(lora)
    keep_a, keep_b = keep[None, :], keep[:, None]
    found = []

    def edit(node):
        if _is_factors(node):
            found.append(True)
            return LoRAFactors(
                _edit_leaf(node.a, (d_in, r_max), keep_a, "a"),
                _edit_leaf(node.b, (r_max, d_out), keep_b, "b"),
            )
        if (
            reset_count
            and hasattr(node, "dtype")
            and jnp.ndim(node) == 0
            and jnp.issubdtype(node.dtype, jnp.integer)
        ):
            return jnp.zeros_like(node)
        return node

    out = jax.tree.map(edit, tree, is_leaf=_is_factors)
    if not found:
        shapes = {(d_in, r_max), (r_max, d_out)}
        if any(tuple(np.shape(x)) in shapes for x in jax.tree.leaves(tree)):
            raise ValueError(
                f"{name} holds arrays shaped like the LoRA factors but no LoRAFactors node; "
                "build it from the adapter itself, e.g. opt.init(lora.factors)"
            )
    return out


def project(tree: PyTree, lora: LoRA) -> PyTree:
    """Zero the inactive components of every :class:`LoRAFactors` node in ``tree``.

    Applied to gradients and updates (see :func:`make_step`) it keeps the invariant that
    inactive components and their optimizer statistics stay exactly zero.
    """
    return _edit_tree(tree, lora, lora.mask > 0, reset_count=False, name="tree")


def _rank_mask(new_rank: int | jax.Array, r_max: int, dtype: Any) -> jax.Array:
    if jnp.ndim(new_rank) != 0:
        raise ValueError(f"rank must be a scalar, got shape {jnp.shape(new_rank)}")
    try:
        concrete = int(new_rank)
    except (jax.errors.ConcretizationTypeError, TypeError):
        concrete = None  # traced: clipped below
    if concrete is not None and not 0 <= concrete <= r_max:
        raise ValueError(f"rank must be in [0, R_max] = [0, {r_max}], got {concrete}")
    r = jnp.clip(jnp.asarray(new_rank, jnp.int32), 0, r_max)
    return (jnp.arange(r_max) < r).astype(dtype)


def realloc(
    lora: LoRA, opt_state: PyTree, new_rank: int | jax.Array, key: jax.Array
) -> tuple[LoRA, PyTree]:
    """Grow or shrink the adapter to ``new_rank`` active components (traceable).

    Kept components (active before and after) and their optimizer statistics are unchanged,
    bit for bit; the step count is kept. New components get A columns drawn from
    U(-1/sqrt(D_in), 1/sqrt(D_in)) (PyTorch's and PEFT's default LoRA init) and zero B rows,
    so the adapter's output does not change. Dropped components (the highest indices) are
    zeroed with their statistics.

    Args:
        lora: the adapter.
        opt_state: the optimizer state of a tree holding ``lora.factors`` (module docstring).
        new_rank: target rank in [0, R_max]; may be traced (then clipped into the range).
        key: PRNG key for the new A columns.

    Returns:
        ``(lora, opt_state)`` with the new mask.

    Raises:
        ValueError: a concrete ``new_rank`` outside [0, R_max], or an ``opt_state`` that
            breaks the contract.
    """
    d_in, r_max, _ = _dims(lora)
    a, b = lora.factors
    new_mask = _rank_mask(new_rank, r_max, lora.mask.dtype)
    old_on, new_on = lora.mask > 0, new_mask > 0
    grown = new_on & ~old_on
    kept = new_on & old_on
    bound = 1.0 / math.sqrt(d_in)
    fresh = jax.random.uniform(key, a.shape, jnp.float32, -bound, bound).astype(a.dtype)
    a = jnp.where(grown[None, :], fresh, jnp.where(kept[None, :], a, jnp.zeros_like(a)))
    b = jnp.where(kept[:, None], b, jnp.zeros_like(b))
    opt_state = _edit_tree(opt_state, lora, kept, reset_count=False, name="opt_state")
    return LoRA(LoRAFactors(a, b), new_mask, lora.scale), opt_state


def free(lora: LoRA, opt_state: PyTree, *, reset_count: bool = True) -> tuple[LoRA, PyTree]:
    """Zero the adapter (rank 0) and its optimizer statistics.

    Args:
        lora: the adapter.
        opt_state: the optimizer state of a tree holding ``lora.factors``.
        reset_count: also zero the integer scalar leaves of ``opt_state`` (Adam's step count,
            schedule counters), so a later allocation starts like a fresh optimizer. Keep it
            False when the state also serves other parameters (module docstring).

    Returns:
        ``(lora, opt_state)``, rank 0.
    """
    _, r_max, _ = _dims(lora)
    off = jnp.zeros((r_max,), jnp.bool_)
    factors = jax.tree.map(jnp.zeros_like, lora.factors)
    opt_state = _edit_tree(opt_state, lora, off, reset_count=reset_count, name="opt_state")
    return LoRA(factors, jnp.zeros_like(lora.mask), lora.scale), opt_state


def alloc(
    lora: LoRA,
    opt_state: PyTree,
    rank: int | jax.Array,
    key: jax.Array,
    *,
    reset_count: bool = True,
) -> tuple[LoRA, PyTree]:
    """A fresh adapter of ``rank`` components: :func:`free`, then :func:`realloc` from 0.

    Whatever the adapter held before is discarded. ``rank`` may be traced.

    Raises:
        ValueError: a concrete ``rank`` outside [0, R_max].
    """
    lora, opt_state = free(lora, opt_state, reset_count=reset_count)
    return realloc(lora, opt_state, rank, key)


def make_step(
    loss_fn: Callable[[LoRA, Any], jax.Array], opt: optax.GradientTransformation
) -> Callable[[LoRA, PyTree, Any], tuple[LoRA, PyTree, jax.Array]]:
    """One optimizer step on the adapter's factors, for every rank (the mask is data).

    g = P(grad_factors loss_fn(lora, batch)); u, state = opt.update(g, state, factors);
    factors = factors + P(u), with P = :func:`project` onto the active components.

    Args:
        loss_fn: ``loss_fn(lora, batch) -> scalar``; it typically calls :func:`lora_apply`.
        opt: the optax rule; its state is ``opt.init(lora.factors)``.

    Returns:
        ``step(lora, opt_state, batch) -> (lora, opt_state, loss)``, pure and jittable.
    """

    def step(lora: LoRA, opt_state: PyTree, batch: Any) -> tuple[LoRA, PyTree, jax.Array]:
        loss, grads = jax.value_and_grad(lambda f: loss_fn(lora._replace(factors=f), batch))(
            lora.factors
        )
        grads = project(grads, lora)
        updates, opt_state = opt.update(grads, opt_state, lora.factors)
        factors = optax.apply_updates(lora.factors, project(updates, lora))
        return lora._replace(factors=factors), opt_state, loss

    return step
