"""Clip-wise test-time adaptation: adapt on each clip, record how much it helped.

For a sequence of clips (a pytree with a leading clip axis C) the runner, inside one
``lax.scan``, evaluates each clip before adapting (pre-adapt loss), takes N optimizer steps on
that clip, and evaluates again (post-adapt loss). With ``reset_per_clip`` every clip starts from
the source parameters and a fresh optimizer state; otherwise the adapted parameters and the
optimizer state carry forward (cumulative adaptation). Per clip it reports pre, post,
improvement = pre - post, and rolling means of post and improvement over the last W clips.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metattt.inner import adapt
from metattt.params import merge

PyTree = Any


class TTAResult(NamedTuple):
    """Per-clip metrics of :func:`run_clips`; arrays have shape (C,).

    Attributes:
        params: fast parameters after the last clip (the source ones when resetting).
        pre_loss: evaluation loss on clip c before adapting on it.
        post_loss: evaluation loss on clip c after adapting on it.
        improvement: pre_loss - post_loss.
        rolling_post: mean of post_loss over clips max(0, c-W+1)..c.
        rolling_improvement: the same for improvement.
        num_skipped: non-finite inner steps skipped on clip c.
    """

    params: PyTree
    pre_loss: jax.Array
    post_loss: jax.Array
    improvement: jax.Array
    rolling_post: jax.Array
    rolling_improvement: jax.Array
    num_skipped: jax.Array


def rolling_mean(values: jax.Array, window: int) -> jax.Array:
    """Trailing mean over the last ``window`` entries (fewer at the start), along axis 0."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    values = jnp.asarray(values, jnp.float32)
    csum = jnp.cumsum(values, axis=0)
    lagged = jnp.concatenate([jnp.zeros((window,) + values.shape[1:]), csum])[: values.shape[0]]
    counts = jnp.minimum(jnp.arange(1, values.shape[0] + 1), window).astype(jnp.float32)
    return (csum - lagged) / counts.reshape((-1,) + (1,) * (values.ndim - 1))


def run_clips(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    fast: PyTree,
    slow: PyTree,
    clips: Any,
    *,
    opt: optax.GradientTransformation,
    num_steps: int,
    clip_norm: float | None = None,
    reset_per_clip: bool = True,
    window: int = 50,
    eval_fn: Callable[[PyTree, Any], jax.Array] | None = None,
) -> TTAResult:
    """Adapt clip by clip and record pre/post/improvement/rolling metrics.

    Args:
        loss_fn: the adaptation loss ``loss_fn(params, clip) -> scalar``.
        fast, slow: adapted and frozen parameters (see :mod:`metattt.params`).
        clips: pytree with a leading clip axis C.
        opt: optax rule; its state resets with the parameters when ``reset_per_clip``.
        num_steps: N optimizer steps per clip (static; 0 gives the unadapted baseline).
        clip_norm: per-step gradient clipping.
        reset_per_clip: start every clip from the source parameters, or carry forward.
        window: W for the rolling means.
        eval_fn: the reported loss (default ``loss_fn``).

    Returns:
        A :class:`TTAResult`.
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")
    sizes = {x.shape[0] for x in jax.tree.leaves(clips)}
    if len(sizes) != 1:
        raise ValueError(f"every leaf of clips needs the same leading clip axis, got {sizes}")
    evaluate = eval_fn or loss_fn
    source_state = opt.init(fast)

    def one_clip(carry, clip):
        params, state = carry
        start, start_state = (fast, source_state) if reset_per_clip else (params, state)
        pre = evaluate(merge(start, slow), clip)
        result = adapt(
            loss_fn,
            start,
            slow,
            clip,
            opt=opt,
            max_steps=num_steps,
            clip_norm=clip_norm,
            opt_state=start_state,
        )
        post = evaluate(merge(result.params, slow), clip)
        return (result.params, result.opt_state), (pre, post, result.num_skipped)

    (last, _), (pre, post, skipped) = jax.lax.scan(one_clip, (fast, source_state), clips)
    improvement = pre - post
    return TTAResult(
        fast if reset_per_clip else last,
        pre,
        post,
        improvement,
        rolling_mean(post, window),
        rolling_mean(improvement, window),
        skipped,
    )
