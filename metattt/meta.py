"""Meta-learning as meta-losses over the inner loop, and the meta-step over a task batch.

A meta-loss is a function of the initial parameters, so ``jax.grad`` of it is the
meta-gradient. Each method is a short composition of :func:`metattt.inner.adapt`:

* MAML (Finn et al., 2017): query loss after K inner steps, differentiated through them.
* FOMAML: the same with the inner gradients stopped (``first_order=True``).
* End-to-end TTT: query loss after adaptation plus the mean of the applied inner losses.
* Meta-SGD (Li et al., 2017): MAML whose inner rule is SGD with a learned learning rate per
  parameter entry; the meta-parameters are ``MetaSGDParams(params, learning_rates)``.

:func:`make_meta_step` vmaps a meta-loss over a batch of tasks, averages, and applies any optax
outer optimizer; with a ``mesh`` the task batch is sharded over its devices, and with
``micro_batches`` > 1 the meta-gradient is accumulated over task micro-batches in a ``lax.scan``
(the same mean gradient with the activation memory of one micro-batch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from metattt.inner import (
    InnerConfig,
    adapt_merged,
    adaptation_curve,
    check_clip_norm,
    per_param_sgd,
    safe_global_norm,
)
from metattt.params import split
from metattt.sharding import shard_step
from metattt.stats import MeanCI, mean_ci
from metattt.train import Step, TrainState, apply_if_finite

PyTree = Any


class Task(NamedTuple):
    """One task: the support batch adapts, the query batch scores the adapted parameters."""

    support: Any
    query: Any


class MetaAux(NamedTuple):
    """Per-task diagnostics of a meta-loss (scalars; inner arrays have shape (K_max,))."""

    query_loss: jax.Array
    inner_losses: jax.Array
    num_skipped: jax.Array


class MetaSGDParams(NamedTuple):
    """Meta-SGD's meta-parameters: the initialisation and one learning rate per adapted entry."""

    params: PyTree
    learning_rates: PyTree


def _adapt_task(loss_fn, params, task, mask, inner: InnerConfig, num_steps, opt=None):
    cfg = inner._asdict()
    if opt is not None:
        cfg["opt"] = opt
    return adapt_merged(loss_fn, params, mask, task.support, num_steps=num_steps, **cfg)


def maml_loss(
    loss_fn: Callable,
    params: PyTree,
    task: Task,
    *,
    mask: PyTree,
    inner: InnerConfig,
    num_steps: int | jax.Array | None = None,
    query_loss_fn: Callable | None = None,
) -> tuple[jax.Array, MetaAux]:
    """Query loss after adapting the masked parameters on the support set.

    Second order unless ``inner.first_order`` (then it is FOMAML; see :func:`fomaml_loss`).

    Args:
        loss_fn: inner loss ``loss_fn(params, batch) -> scalar``.
        params: the initial parameters (the meta-parameters).
        task: a :class:`Task`.
        mask: boolean pytree from :func:`metattt.params.select`: which leaves adapt.
        inner: the inner loop's static configuration.
        num_steps: traced inner step count (default ``inner.max_steps``).
        query_loss_fn: loss on the query set (default ``loss_fn``).

    Returns:
        ``(query_loss, MetaAux)``.
    """
    adapted, result = _adapt_task(loss_fn, params, task, mask, inner, num_steps)
    query = (query_loss_fn or loss_fn)(adapted, task.query)
    return query, MetaAux(query, result.losses, result.num_skipped)


def fomaml_loss(loss_fn, params, task, *, mask, inner: InnerConfig, **kwargs):
    """First-order MAML: :func:`maml_loss` with the inner gradients stopped."""
    return maml_loss(
        loss_fn, params, task, mask=mask, inner=inner._replace(first_order=True), **kwargs
    )


def e2e_ttt_loss(
    loss_fn: Callable,
    params: PyTree,
    task: Task,
    *,
    mask: PyTree,
    inner: InnerConfig,
    num_steps: int | jax.Array | None = None,
    query_loss_fn: Callable | None = None,
) -> tuple[jax.Array, MetaAux]:
    """End-to-end TTT meta-loss: query loss after adaptation + mean of the applied inner losses.

    The inner-loss term trains the initialisation to be good before adaptation too, and gives
    every inner step a direct learning signal.
    """
    adapted, result = _adapt_task(loss_fn, params, task, mask, inner, num_steps)
    query = (query_loss_fn or loss_fn)(adapted, task.query)
    applied = result.active.astype(result.losses.dtype)
    inner_mean = jnp.sum(jnp.where(result.active, result.losses, 0.0)) / jnp.maximum(
        jnp.sum(applied), 1.0
    )
    return query + inner_mean, MetaAux(query, result.losses, result.num_skipped)


def meta_sgd_init(params: PyTree, mask: PyTree, learning_rate: float) -> MetaSGDParams:
    """Meta-SGD meta-parameters: ``params`` and a learning rate ``learning_rate`` per entry."""
    fast, _ = split(params, mask)
    return MetaSGDParams(params, jax.tree.map(lambda p: jnp.full_like(p, learning_rate), fast))


def meta_sgd_loss(
    loss_fn: Callable,
    meta_params: MetaSGDParams,
    task: Task,
    *,
    mask: PyTree,
    inner: InnerConfig,
    num_steps: int | jax.Array | None = None,
    query_loss_fn: Callable | None = None,
) -> tuple[jax.Array, MetaAux]:
    """Meta-SGD: MAML whose inner rule is SGD with learned per-entry rates (ignores inner.opt)."""
    adapted, result = _adapt_task(
        loss_fn,
        meta_params.params,
        task,
        mask,
        inner,
        num_steps,
        opt=per_param_sgd(meta_params.learning_rates),
    )
    query = (query_loss_fn or loss_fn)(adapted, task.query)
    return query, MetaAux(query, result.losses, result.num_skipped)


class MetaMetrics(NamedTuple):
    """What one meta-step reports (means over the task batch).

    ``grad_norm`` is the global norm of the meta-gradient (NaN when it is not finite);
    ``num_skipped`` counts the inner steps skipped over the batch; ``outer_skipped`` is 1 when
    the outer update was not applied because the meta-loss or the meta-gradient was not finite.
    """

    meta_loss: jax.Array
    query_loss: jax.Array
    grad_norm: jax.Array
    num_skipped: jax.Array
    outer_skipped: jax.Array


def batch_meta_loss(meta_loss: Callable, meta_params: PyTree, tasks: Any):
    """Mean of ``meta_loss(meta_params, task)`` over a task batch (leading axis), by ``vmap``."""
    losses, aux = jax.vmap(meta_loss, in_axes=(None, 0))(meta_params, tasks)
    return jnp.mean(losses), aux


def evaluate_after_steps(
    loss_fn: Callable,
    params: PyTree,
    tasks: Task,
    *,
    mask: PyTree,
    inner: InnerConfig,
    steps: Sequence[int],
    query_loss_fn: Callable | None = None,
    confidence: float = 0.95,
) -> dict[int, MeanCI]:
    """A meta-learner's query loss after each of ``steps`` inner steps, mean over tasks with a
    Student-t interval: how good is the initialisation after 0, 1, 5 ... steps?

    One inner loop of ``max(steps)`` steps per task gives every point (the loss after k steps is
    the loss after the first k of them), vmapped over the task batch.

    Args:
        loss_fn: the inner loss, as for :func:`maml_loss`.
        params: the meta-learned parameters.
        tasks: a :class:`Task` whose leaves have a leading task axis (at least 2 tasks for
            an interval).
        mask, inner: which leaves adapt and how (``inner.max_steps`` is replaced by
            ``max(steps)``).
        steps: the step counts to report, each >= 0.
        query_loss_fn: loss on the query set (default ``loss_fn``).
        confidence: the intervals' coverage.

    Returns:
        ``{k: MeanCI}`` over tasks, for each k in ``steps``.
    """
    steps = [int(k) for k in steps]
    if not steps or min(steps) < 0:
        raise ValueError(f"steps must be non-empty step counts >= 0, got {steps}")
    cfg = inner._replace(max_steps=max(steps))._asdict()
    query = query_loss_fn or loss_fn

    @jax.jit
    def curves(p, t):
        return jax.vmap(
            lambda task: adaptation_curve(loss_fn, query, p, mask, task.support, task.query, **cfg)
        )(t)

    per_task = np.asarray(curves(params, tasks))
    return {k: mean_ci(per_task[:, k], confidence) for k in steps}


def make_meta_step(
    meta_loss: Callable[[PyTree, Any], tuple[jax.Array, MetaAux]],
    outer_opt: optax.GradientTransformation,
    *,
    clip_norm: float | None = None,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
    micro_batches: int = 1,
    jit: bool = True,
    skip_nonfinite: bool = True,
    shard_params: bool = False,
) -> Step:
    """Build the meta-training step for ``meta_loss(meta_params, task) -> (loss, MetaAux)``.

    Bind the method's arguments first, e.g.
    ``functools.partial(maml_loss, loss_fn, mask=mask, inner=inner)`` (``params`` and
    ``task`` stay positional).

    Args:
        meta_loss: per-task meta-loss.
        outer_opt: the optax outer optimizer.
        clip_norm: clip the meta-gradient to this global norm first.
        mesh: shard the task batch's leading axis over this mesh (meta-parameters replicated
            unless ``shard_params``; see :func:`metattt.sharding.shard_step`). The result
            equals the single-device one; the batch size must divide evenly.
        axis_name: the mesh axis to shard over (default: the mesh's first axis).
        micro_batches: M; the task batch (size a multiple of M) is cut into M equal
            micro-batches whose gradients are computed one after another and averaged (gradient
            accumulation: the result equals the full batch's, peak memory is one micro-batch's).
            Micro-batch m takes every M-th task from task m, so that with ``mesh`` each one is
            split over all devices when the devices divide the batch's size over M.
        jit: compile the step (turn off only to debug; ``mesh`` needs it, as the sharding
            is the compiled step's).
        skip_nonfinite: static; False compiles the outer guard out (the update is applied
            whatever its value, as in plain JAX). The inner loop has its own switch,
            :attr:`metattt.inner.InnerConfig.skip_nonfinite`.
        shard_params: with ``mesh``, shard the meta-parameters and the outer optimizer's
            state over the mesh axis too (FSDP, :func:`metattt.sharding.param_shardings`).

    Returns:
        A :class:`metattt.train.Step`: ``init(meta_params) -> TrainState`` and
        ``update(state, tasks) -> (state, MetaMetrics)``. An outer update whose meta-loss or
        meta-gradient is not finite is not applied (parameters and optimizer state are kept)
        and is counted in ``MetaMetrics.outer_skipped``.
    """
    check_clip_norm(clip_norm)
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")
    if mesh is not None and not jit:
        raise ValueError("mesh needs jit=True: the batch is sharded by the compiled step")
    if clip_norm is not None:
        outer_opt = optax.chain(optax.clip_by_global_norm(clip_norm), outer_opt)
    value_and_grad = jax.value_and_grad(functools.partial(batch_meta_loss, meta_loss), has_aux=True)

    def accumulated(meta_params, tasks):
        sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(tasks)}
        if len(sizes) != 1 or next(iter(sizes)) % micro_batches:
            raise ValueError(
                f"the task batch's leading axis ({sorted(sizes)}) must be one size divisible "
                f"by micro_batches = {micro_batches}"
            )
        # Micro-batch m holds tasks m, m + M, m + 2M, ...: a batch sharded over a mesh in
        # contiguous blocks then has every micro-batch spread over every device (contiguous
        # micro-batches would each lie on a few devices' blocks and run one after another).
        chunks = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(-1, micro_batches, *x.shape[1:]), 0, 1), tasks
        )

        def body(total, chunk):
            (loss, aux), grads = value_and_grad(meta_params, chunk)
            return jax.tree.map(jnp.add, total, grads), (loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, meta_params)
        total, (losses, aux) = jax.lax.scan(body, zeros, chunks)
        aux = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), aux)
        grads = jax.tree.map(lambda g: g / micro_batches, total)
        return (jnp.mean(losses), aux), grads

    def init(meta_params):
        return TrainState(meta_params, outer_opt.init(meta_params))

    def update(state, tasks):
        meta_params, opt_state = state.params, state.opt_state
        if micro_batches == 1:
            (loss, aux), grads = value_and_grad(meta_params, tasks)
        else:
            (loss, aux), grads = accumulated(meta_params, tasks)
        grad_norm = safe_global_norm(grads)  # one reduction: XLA:CPU pays per operation
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = outer_opt.update(grads, opt_state, meta_params)
        if skip_nonfinite:
            updates, new_opt_state = apply_if_finite(finite, updates, new_opt_state, opt_state)
        state = TrainState(optax.apply_updates(meta_params, updates), new_opt_state)
        metrics = MetaMetrics(
            loss,
            jnp.mean(aux.query_loss),
            grad_norm,
            jnp.sum(aux.num_skipped),
            (~finite if skip_nonfinite else jnp.zeros((), bool)).astype(jnp.int32),
        )
        return state, metrics

    if not jit:
        return Step(init, update)
    if mesh is None:
        return Step(init, jax.jit(update))
    return shard_step(Step(init, update), mesh, axis=axis_name, shard_params=shard_params)
