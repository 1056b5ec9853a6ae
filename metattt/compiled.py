"""Adaptation compiled once, for notebooks: :func:`make_adapt_fn`.

:func:`metattt.adapt` is a traceable function: it is meant to run inside the caller's
``jax.jit`` (or ``vmap`` / ``grad``), and takes a loss function and an optax rule, which
``jax.jit(metattt.adapt)`` cannot trace. Called eagerly it re-traces and re-compiles its scan on
every call. :func:`make_adapt_fn` closes over the static choices (loss, rule, selector, K_max)
once and returns a jitted ``adapt_fn(params, batch, num_steps=None)`` that splits, adapts and
merges, compiled once per input shape: every step count ``0..K_max`` shares that program (the
count is traced). Keep the returned function (not the loss) across notebook cells: a new
``make_adapt_fn`` call, like a redefined lambda, is a new program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metattt.inner import InnerResult, adapt_merged, check_clip_norm
from metattt.params import Selector, select

PyTree = Any


def make_adapt_fn(
    loss_fn: Callable[[PyTree, Any], Any],
    opt: optax.GradientTransformation,
    *,
    max_steps: int,
    selector: Selector,
    **inner: Any,
) -> Callable[..., tuple[PyTree, InnerResult]]:
    """A jitted ``adapt_fn(params, batch, num_steps=None) -> (adapted_params, InnerResult)``.

    Args:
        loss_fn: the adaptation loss ``loss_fn(params, batch) -> scalar`` on the whole tree.
        opt: the optax rule.
        max_steps: K_max; ``num_steps`` (a Python int or a traced int) picks ``0..K_max``
            steps at call time without recompiling (default K_max).
        selector: which leaves adapt: any selector of :func:`metattt.select` (preset, ``re:``
            pattern, ``+`` combination, callable), resolved on the params of each call.
        **inner: the static keywords of :func:`metattt.adapt`: ``clip_norm``,
            ``first_order``, ``remat``, ``has_aux``, ``skip_nonfinite``.

    Returns:
        The function. Its result's first element is the whole tree with the selected leaves
        adapted; the :class:`InnerResult` holds the per-step diagnostics (and the adapted
        leaves alone in ``params``).

    Raises:
        ValueError: ``max_steps`` is not a non-negative int, a keyword is not one of
            those, or ``clip_norm`` is invalid; at call time, a Python
            ``num_steps`` outside ``[0, max_steps]`` or a selector that selects nothing.
    """
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        raise ValueError(f"max_steps must be a non-negative int, got {max_steps!r}")
    unknown = sorted(set(inner) - _ADAPT_KEYWORDS)
    if unknown:
        raise ValueError(
            f"make_adapt_fn got unknown keyword(s) {unknown}; it takes {sorted(_ADAPT_KEYWORDS)}"
        )
    check_clip_norm(inner.get("clip_norm"))

    @jax.jit
    def run(params, batch, num_steps):
        mask = select(params, selector)
        return adapt_merged(
            loss_fn, params, mask, batch, opt=opt, max_steps=max_steps, num_steps=num_steps, **inner
        )

    def adapt_fn(params: PyTree, batch: Any, num_steps: int | jax.Array | None = None):
        if num_steps is None:
            num_steps = max_steps
        elif isinstance(num_steps, int) and not 0 <= num_steps <= max_steps:
            raise ValueError(f"num_steps must be in [0, max_steps={max_steps}], got {num_steps}")
        return run(params, batch, jnp.asarray(num_steps, jnp.int32))

    adapt_fn.__doc__ = f"Adapt the leaves {selector!r} selects for up to {max_steps} steps."
    return adapt_fn


#: adapt()'s static keywords, which make_adapt_fn fixes once.
_ADAPT_KEYWORDS = frozenset({"clip_norm", "first_order", "remat", "has_aux", "skip_nonfinite"})
