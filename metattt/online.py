"""Online adaptation on a stream whose labels arrive H steps late.

At time t the model predicts from input x_t; only then does the target of the input seen at
t - H arrive, and the adapted parameters take a few optimizer steps on that pair. The stream
is re-indexed before the scan so that step t receives ``(x_t, y_{t-H})`` and nothing newer: a
prediction can never see its own target or any later one, by construction rather than by
care. Inputs wait in a ring buffer of H slots until their target arrives.

With H = 0 the target of x_t arrives right after its prediction. With a replay window of M
pairs the update at t fits the last M pairs that have arrived (those of x_{t-H-M+1} .. x_{t-H}),
the mean of their losses, rather than the newest alone: more data per update on a stream whose
elements are small. A stream element may itself be a batch (x_t of shape (B, ...)): ``loss_fn``
sees it whole; independent streams run side by side under ``jax.vmap``.
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


class OnlineResult(NamedTuple):
    """Outputs of :func:`online_adapt`. Arrays have a leading time axis T.

    Attributes:
        params: the fast parameters at the end of the stream.
        opt_state: the optimizer state at the end.
        predictions: ``predict_fn`` output at each t, made before any update at t.
        update_losses: (T,) loss of the arrived pair before the update at t (NaN-free: 0 when
            no target arrived yet).
        updated: (T,) whether a target arrived (t >= H) and an update ran.
        num_skipped: (T,) inner steps skipped at t because their loss, gradient or update was
            not finite (the parameters stay as they were; see :func:`metattt.inner.adapt`).
    """

    params: PyTree
    opt_state: PyTree
    predictions: Any
    update_losses: jax.Array
    updated: jax.Array
    num_skipped: jax.Array


def delay_targets(targets: Any, delay: int) -> tuple[Any, jax.Array]:
    """Shift a target stream by ``delay``: entry t holds y_{t-delay}, plus its validity mask."""
    length = jax.tree.leaves(targets)[0].shape[0]

    def shift(y):
        if delay == 0:
            return y
        pad = jnp.zeros((delay,) + y.shape[1:], y.dtype)
        return jnp.concatenate([pad, y[: length - delay]], axis=0)

    return jax.tree.map(shift, targets), jnp.arange(length) >= delay


def online_adapt(
    loss_fn: Callable[[PyTree, tuple[Any, Any]], jax.Array],
    predict_fn: Callable[[PyTree, Any], Any],
    fast: PyTree,
    slow: PyTree,
    inputs: Any,
    targets: Any,
    *,
    delay: int,
    opt: optax.GradientTransformation,
    steps_per_update: int = 1,
    clip_norm: float | None = None,
    opt_state: PyTree = None,
    replay: int = 1,
) -> OnlineResult:
    """Predict-then-update over a stream with targets that arrive ``delay`` steps late.

    Args:
        loss_fn: ``loss_fn(params, (x, y)) -> scalar`` for one arrived pair.
        predict_fn: ``predict_fn(params, x) -> prediction``.
        fast, slow: adapted and frozen parameters (see :mod:`metattt.params`).
        inputs: pytree with leading time axis T (x_0 .. x_{T-1}).
        targets: pytree with leading time axis T; y_t belongs to x_t.
        delay: H >= 0, static.
        opt: optax rule for the updates.
        steps_per_update: inner steps taken on each arrived pair.
        clip_norm: per-step gradient clipping.
        opt_state: initial optimizer state (default ``opt.init(fast)``), carried along the stream.
        replay: M >= 1, static: each update fits the mean loss of the last M arrived pairs
            (fewer while fewer have arrived). A non-finite pair skips the updates of the M
            steps whose window holds it (counted in ``num_skipped``).

    Returns:
        An :class:`OnlineResult` (``update_losses`` is the window's mean loss when M > 1).
    """
    lengths = {x.shape[0] for x in jax.tree.leaves(inputs)} | {
        y.shape[0] for y in jax.tree.leaves(targets)
    }
    if len(lengths) != 1:
        raise ValueError(f"inputs and targets need one common time length, got {sorted(lengths)}")
    length = lengths.pop()
    if not isinstance(delay, int) or not 0 <= delay < length:
        raise ValueError(f"delay must be an int in [0, T={length}), got {delay!r}")
    if not isinstance(replay, int) or replay < 1:
        raise ValueError(f"replay must be an int >= 1 (pairs per update), got {replay!r}")
    if opt_state is None:
        opt_state = opt.init(fast)
    arrived, valid = delay_targets(targets, delay)
    slots = max(delay, 1)
    buffer = jax.tree.map(lambda x: jnp.zeros((slots,) + x.shape[1:], x.dtype), inputs)
    window = (
        jax.tree.map(lambda x: jnp.zeros((replay,) + x.shape[1:], x.dtype), (inputs, targets)),
        jnp.zeros((replay,), bool),
    )

    def window_loss(params, pairs):
        (xs, ys), ok = pairs
        losses = jax.vmap(lambda x, y: loss_fn(params, (x, y)))(xs, ys)
        return jnp.sum(jnp.where(ok, losses, 0.0)) / jnp.maximum(jnp.sum(ok), 1)

    def step(carry, xs):
        params, state, buf, win = carry
        t, x_t, y_old, has_target = xs
        prediction = predict_fn(merge(params, slow), x_t)
        slot = t % slots
        if delay == 0:
            x_old = x_t
        else:
            x_old = jax.tree.map(lambda b: b[slot], buf)
            buf = jax.tree.map(lambda b, x: b.at[slot].set(x), buf, x_t)
        if replay == 1:
            fit_loss, data = loss_fn, (x_old, y_old)
        else:  # the arrived pair joins the window in the slot of the oldest one
            (wx, wy), ok = win
            put = jnp.where(has_target, t % replay, replay)  # out of range: dropped
            win = (
                jax.tree.map(lambda w, v: w.at[put].set(v, mode="drop"), (wx, wy), (x_old, y_old)),
                ok.at[put].set(True, mode="drop"),
            )
            fit_loss, data = window_loss, win
        result = adapt(
            fit_loss,
            params,
            slow,
            data,
            opt=opt,
            max_steps=steps_per_update,
            num_steps=jnp.where(has_target, steps_per_update, 0),
            clip_norm=clip_norm,
            opt_state=state,
        )
        update_loss = jnp.where(has_target, result.losses[0], 0.0)
        outs = (prediction, update_loss, result.num_skipped)
        return (result.params, result.opt_state, buf, win), outs

    (params, state, *_), (predictions, update_losses, skipped) = jax.lax.scan(
        step, (fast, opt_state, buffer, window), (jnp.arange(length), inputs, arrived, valid)
    )
    return OnlineResult(params, state, predictions, update_losses, valid, skipped)
