"""The inner loop: K steps of any optax rule on the adapted parameters, inside ``lax.scan``.

One compiled function serves every step count: the scan always runs a static ``max_steps``
K_max, and a traced ``num_steps`` k masks steps ``k..K_max-1`` out. Optional per-step weights
w_k scale each applied update (psi_{k+1} = psi_k + w_k * u_k), which is what soft depth
controllers need. The loop is differentiable end to end (second order: the meta-gradient flows
through every inner gradient) unless ``first_order`` stops the inner gradients.

Non-finite steps. A step whose loss, gradient or update is not finite is skipped: parameters and
optimizer state stay as they were and the step is counted in ``num_skipped``. The test is one
reduction per step (:func:`nonfinite_probe`: the sum of every entry times 0 over one concatenated
vector, 0 or NaN), so XLA adds a concatenation and one reduction rather than a reduction per leaf.
It tests entries, not norms: a finite gradient whose norm overflows the float type is applied,
except with ``clip_norm``, where the norm is computed anyway and an infinite one skips the step
too. The applied update is ``p + where(active, u, 0)`` with a custom VJP whose backward keeps the
scalar ``active`` (the identity for ``p``, the masked cotangent for ``u``), so the parameter path's
derivative is the identity and no broadcast mask is stored for the backward pass. Masking the
update is not enough for second order, because the backward pass of the masked step still
multiplies a zero cotangent by the step's NaN intermediates (0 * NaN = NaN). The per-step
value-and-grad is therefore wrapped in a ``custom_vjp`` whose backward zeroes every cotangent of a
non-finite step before it reaches the inputs -- the "double where" applied where the NaN is made --
and, in second order, the gradient itself is sanitised before the optimizer sees it (the
optimizer's own backward would meet it). Under ``first_order`` the gradient is a constant of the
outer derivative, so a non-finite one needs no sanitising: its update and optimizer state are
discarded by the mask, and nothing differentiates through them; the gradient and the update are
then tested together in one probe. With :func:`sgd` (``u = -lr * g``, ``|lr| <= 1``) and no
step weights a finite gradient gives a finite update, so only the gradient is probed. With
either rule the update is tested, not the new parameters: a finite update whose sum p + u
overflows (float16 near its maximum) is applied.

Numerically safe forms for second order: global norms use a safe square root (finite
derivative at zero), and differentiating through Adam needs ``optax.adam(..., eps_root>0)``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metattt.params import merge, split

PyTree = Any
LossFn = Callable[[PyTree, Any], Any]

_TINY = 1e-30


class InnerConfig(NamedTuple):
    """The static choices of an inner loop; ``adapt(..., **cfg._asdict())`` applies them.

    Attributes:
        opt: the optax rule applied to the adapted parameters.
        max_steps: K_max, the static length of the scan.
        clip_norm: clip each step's gradient to this global norm (None: no clipping).
        first_order: stop gradients through the inner gradients (FOMAML-style).
        remat: ``jax.checkpoint`` each step (recompute in the backward pass, less memory).
        skip_nonfinite: guard against non-finite steps (see :func:`adapt`); False compiles the
            guard out for speed where the data cannot produce a NaN or an overflow.
    """

    opt: optax.GradientTransformation
    max_steps: int
    clip_norm: float | None = None
    first_order: bool = False
    remat: bool = False
    skip_nonfinite: bool = True


class InnerResult(NamedTuple):
    """What an inner loop returns. Per-step arrays have shape (K_max,).

    Attributes:
        params: the adapted (fast) parameters psi_K.
        opt_state: the optimizer state after the last applied step.
        losses: loss at psi_k, before step k is applied (the loss at the returned psi_K is not
            computed; evaluate ``loss_fn(result.params, batch)`` where it is needed).
        grad_norms: global norm of step k's raw (unclipped) gradient.
        update_norms: ||Delta psi_k|| actually applied (0 for masked or skipped steps).
        active: whether step k was applied (within ``num_steps`` and finite).
        num_skipped: number of steps within ``num_steps`` skipped as non-finite (int32).
        aux: per-step auxiliary outputs of the loss (stacked), or None.
    """

    params: PyTree
    opt_state: PyTree
    losses: jax.Array
    grad_norms: jax.Array
    update_norms: jax.Array
    active: jax.Array
    num_skipped: jax.Array
    aux: PyTree = None


def check_clip_norm(clip_norm: float | None) -> None:
    """Raises ValueError unless ``clip_norm`` is None (no clipping) or finite and positive."""
    if clip_norm is not None and not (
        isinstance(clip_norm, numbers.Real)
        and not isinstance(clip_norm, bool)
        and math.isfinite(clip_norm)
        and clip_norm > 0
    ):
        raise ValueError(
            f"clip_norm must be a finite positive number or None (no clipping), got {clip_norm!r}"
        )


def safe_global_norm(tree: PyTree) -> jax.Array:
    """Global L2 norm with a finite derivative at zero (plain sqrt has an infinite one).

    A NaN or infinite entry gives a NaN or infinite norm (it is not hidden as 0), so the norm
    doubles as the tree's finiteness test.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.result_type(jnp.float32, *leaves)
    flat = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])
    sq = jnp.sum(jnp.square(flat))  # one reduction for the whole tree (see nonfinite_probe)
    nonzero = sq > _TINY
    norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
    return norm + jnp.where(jnp.isfinite(sq), 0.0, sq)  # NaN stays NaN (NaN > tiny is False)


def nonfinite_probe(*trees: PyTree) -> jax.Array:
    """0 when every inexact entry of ``trees`` is finite, NaN otherwise.

    One reduction over all leaves at once, ``sum(concat(leaves) * 0)`` (inf * 0 and NaN * 0 are
    NaN; a finite entry gives exactly 0, so nothing can overflow and the size does not matter):
    XLA:CPU pays per operation at small sizes, and a reduction per leaf costs more than the
    step's own update. The sum is written as a dot with ones: inside a vmapped loop XLA:CPU
    hands a float sum reduction to a YNNPACK fusion, with which the first-order S = 5 step of
    ``experiments/bench/meta_overhead.py`` measured 1.3-1.4x plain JAX against 1.1x with the
    dot (2026-12-07, 2-core EPYC). Add it to a scalar (e.g. the loss) to fold that scalar into
    the same test.
    """
    leaves = [
        jnp.ravel(x)
        for t in trees
        for x in jax.tree.leaves(t)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.result_type(*leaves)
    flat = jax.lax.stop_gradient(jnp.concatenate([x.astype(dtype) for x in leaves]))
    return jnp.dot(flat * jnp.zeros((), dtype), jnp.ones(flat.shape, dtype))


def tree_all_finite(tree: PyTree) -> jax.Array:
    """True when every inexact leaf of ``tree`` is finite (one reduction, see
    :func:`nonfinite_probe`)."""
    return jnp.isfinite(nonfinite_probe(tree))


@jax.custom_vjp
def _add_if(active: jax.Array, p: jax.Array, u: jax.Array) -> jax.Array:
    """``p + where(active, u, 0)``; the VJP keeps only the scalar ``active`` as residual (a
    plain ``where`` would store its broadcast mask for every step of the scan). The forward
    selects between ``p + u`` and ``p``: a zeros operand would be a constant XLA hoists out
    of the scan and carries through it, one extra buffer per leaf."""
    return jnp.where(active, p + u, p)


def _add_if_fwd(active, p, u):
    return _add_if(active, p, u), active


def _add_if_bwd(active, ct):
    return None, ct, jnp.where(active, ct, jnp.zeros_like(ct))


_add_if.defvjp(_add_if_fwd, _add_if_bwd)


@jax.custom_vjp
def _keep_if(ok: jax.Array, x: jax.Array) -> jax.Array:
    """``where(ok, x, 0)``; the VJP keeps only the scalar ``ok`` as residual."""
    return jnp.where(ok, x, jnp.zeros_like(x))


def _keep_if_fwd(ok, x):
    return _keep_if(ok, x), ok


def _keep_if_bwd(ok, ct):
    return None, jnp.where(ok, ct, jnp.zeros_like(ct))


_keep_if.defvjp(_keep_if_fwd, _keep_if_bwd)


def _zero_if(bad: jax.Array, x: Any) -> Any:
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.where(bad, jnp.zeros_like(x), x)
    return x  # integer inputs carry float0 cotangents: nothing to clean


def value_and_grad_fn(
    loss_fn: LossFn,
    *,
    has_aux: bool = False,
    skip_nonfinite: bool = True,
    first_order: bool = False,
) -> Callable:
    """``(fast, slow, batch) -> (value, grads)``: what one step of :func:`adapt` evaluates
    (wrt ``fast``; NaN-safe backward when ``skip_nonfinite``). A caller that needs the loss
    at psi_0 before the loop passes the pair back as ``adapt(..., first_value_and_grad=)``
    (with the same ``first_order``)."""
    if skip_nonfinite:
        return _guarded_value_and_grad(loss_fn, has_aux, first_order)
    return jax.value_and_grad(lambda f, s, b: loss_fn(merge(f, s), b), has_aux=has_aux)


def _guarded_value_and_grad(loss_fn: LossFn, has_aux: bool, first_order: bool) -> Callable:
    """``value_and_grad`` of ``loss(fast, slow, batch)`` wrt ``fast`` whose VJP is NaN-safe.

    The forward is the plain value-and-grad. The backward (used when an outer ``jax.grad``
    differentiates through this step) applies the saved VJP and zeroes all cotangents when the
    step's outputs were not finite, so a skipped step cannot poison a meta-gradient.

    Under ``first_order`` (without ``has_aux``) the gradient is a constant of the outer
    derivative (its cotangent is zero: :func:`adapt` stops it), so only the loss value is
    differentiated: the forward keeps the loss's own pullback, whose cotangent-1 call is the
    gradient, and the backward applies it to the value's cotangent. That is one forward and
    two backward passes of the loss, where the general rule keeps the residuals of the
    gradient's own derivative and runs a second-order backward pass on a zero cotangent.
    """

    def inner_loss(fast, slow, batch):
        return loss_fn(merge(fast, slow), batch)

    vg = jax.value_and_grad(inner_loss, has_aux=has_aux)

    @jax.custom_vjp
    def guarded(fast, slow, batch):
        return vg(fast, slow, batch)

    cheap = first_order and not has_aux  # an aux output keeps the general rule

    def fwd(fast, slow, batch):
        if cheap:
            value, pullback = jax.vjp(inner_loss, fast, slow, batch)
            out = (value, pullback(jnp.ones_like(value))[0])
        else:
            out, pullback = jax.vjp(vg, fast, slow, batch)
        (value, grads) = out
        loss = value[0] if has_aux else value
        ok = jnp.isfinite(loss + nonfinite_probe(grads))
        return out, (pullback, ok)

    def bwd(res, cotangent):
        pullback, ok = res
        if cheap:  # the gradient's cotangent is zero: only the value's reaches the inputs
            cot = _zero_if(~ok, cotangent[0])
        else:
            cot = jax.tree.map(lambda c: _zero_if(~ok, c), cotangent)
        return jax.tree.map(lambda c: _zero_if(~ok, c), pullback(cot))

    guarded.defvjp(fwd, bwd)
    return guarded


def adapt(
    loss_fn: LossFn,
    fast: PyTree,
    slow: PyTree,
    batch: Any,
    *,
    opt: optax.GradientTransformation,
    max_steps: int,
    num_steps: int | jax.Array | None = None,
    step_weights: jax.Array | None = None,
    clip_norm: float | None = None,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    opt_state: PyTree = None,
    skip_nonfinite: bool = True,
    first_value_and_grad: tuple[Any, PyTree] | None = None,
) -> InnerResult:
    """Run up to ``max_steps`` steps of ``opt`` on ``loss_fn`` over the fast parameters.

    psi_{k+1} = psi_k + w_k * u_k for k < num_steps, where u_k = opt.update(clip(g_k)) and
    g_k = grad_psi loss_fn(merge(psi_k, slow), batch).

    Args:
        loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
        fast: the adapted parameters psi_0 (a pytree; ``None`` leaves are frozen slots).
        slow: the frozen parameters, merged with ``fast`` for every loss evaluation.
        batch: the data the inner loss sees (any pytree; the same batch every step).
        opt: the optax rule.
        max_steps: K_max, static.
        num_steps: k in [0, K_max]; None means K_max. A Python int outside the range is a
            ValueError; a traced k is clamped into it (steps ``min(max(k, 0), K_max)`` run),
            as a shape-static scan cannot raise on a traced value.
        step_weights: (K_max,) weights w_k, may be traced and differentiated; None means 1.
        clip_norm: clip each gradient to this global norm before the optimizer.
        first_order: stop gradients through the inner gradients.
        remat: checkpoint each step.
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        opt_state: initial optimizer state (default: ``opt.init(fast)``).
        skip_nonfinite: static. True: a step whose loss, gradient or update is not finite is
            skipped and counted, and its backward pass is zeroed (safe meta-gradients). False:
            the guard is compiled out (no finiteness tests, no custom VJP); with neither a
            traced ``num_steps`` nor ``step_weights`` the steps are then plain optimizer steps
            with no masking at all. A NaN then propagates, as in plain JAX.
        first_value_and_grad: ``(value, grads)`` at ``fast``, already computed by the caller
            with :func:`value_and_grad_fn` (same ``loss_fn``, ``has_aux`` and
            ``skip_nonfinite``), e.g. because the loss at psi_0 was needed first to choose
            ``num_steps``: step 0 uses them instead of evaluating the loss again.

    Returns:
        An :class:`InnerResult`.

    Raises:
        ValueError: bad ``max_steps`` or ``step_weights`` shape.
    """
    if not isinstance(max_steps, int) or max_steps < 0:
        hint = (
            " (under jax.jit it must be static: fix it with functools.partial, or use "
            "metattt.make_adapt_fn)"
            if isinstance(max_steps, jax.core.Tracer)
            else ""
        )
        raise ValueError(f"max_steps must be a non-negative Python int, got {max_steps!r}{hint}")
    if step_weights is not None and jnp.shape(step_weights) != (max_steps,):
        raise ValueError(
            f"step_weights must have shape (max_steps,) = ({max_steps},), "
            f"got {jnp.shape(step_weights)}"
        )
    if isinstance(num_steps, int) and not 0 <= num_steps <= max_steps:
        raise ValueError(f"num_steps must be in [0, max_steps={max_steps}], got {num_steps}")
    check_clip_norm(clip_norm)
    if not jax.tree.leaves(fast):
        raise ValueError("adapt() got no fast parameters to adapt")
    if not isinstance(jnp.zeros(()), jax.core.Tracer):  # no jit trace (fast may be a constant)
        _warn_eager_once()
    if opt_state is None:
        opt_state = opt.init(fast)
    limit = max_steps if num_steps is None else num_steps
    weights = jnp.ones((max_steps,), jnp.float32) if step_weights is None else step_weights
    value_and_grad = value_and_grad_fn(
        loss_fn, has_aux=has_aux, skip_nonfinite=skip_nonfinite, first_order=first_order
    )
    masked = skip_nonfinite or num_steps is not None

    def apply_step(carry, k, w, value, grads):
        """Step k from its loss and gradient at the carried parameters."""
        params, state = carry
        loss, aux = value if has_aux else (value, None)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        # |u| <= |g| entrywise: a finite gradient has a finite update (see BoundedSGD). Weights
        # may scale it up, and a gradient of another dtype than its parameter is cast down.
        probe_update = not (
            isinstance(opt, BoundedSGD)
            and step_weights is None
            and all(
                jnp.result_type(g) == jnp.result_type(p)
                for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True)
            )
        )
        grad_norm = safe_global_norm(grads)  # reported; XLA drops it when nothing reads it
        norm = grad_norm
        # Clipping computes the norm anyway: then an overflowing one skips the step too.
        tested = loss if clip_norm is None else loss + grad_norm
        if skip_nonfinite and not first_order:  # the optimizer's backward would meet a NaN
            finite = jnp.isfinite(tested + nonfinite_probe(grads))
            grads = jax.tree.map(lambda g: _keep_if(finite, g), grads)
            norm = jnp.where(finite, grad_norm, 0.0)
        if clip_norm is not None:  # a NaN norm gives scale 1, an infinite one NaN: skipped
            scale = jnp.where(norm > clip_norm, clip_norm / jnp.maximum(norm, _TINY), 1.0)
            grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        updates, new_state = opt.update(grads, state, params)
        updates = jax.tree.map(lambda u, p: (w * u).astype(p.dtype), updates, params)
        update_norm = safe_global_norm(updates)
        if not skip_nonfinite:
            finite = jnp.array(True)
        elif first_order:  # loss, gradient and update in one probe
            finite = jnp.isfinite(tested + nonfinite_probe(grads, updates if probe_update else ()))
        elif probe_update:  # an update can overflow where the gradient did not (float16 Adam)
            finite = finite & jnp.isfinite(nonfinite_probe(updates))
        active = (k < limit) & finite
        if masked:
            new_state = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_state, state)
            update_norm = jnp.where(active, update_norm, 0.0)
        if skip_nonfinite:
            new_params = jax.tree.map(lambda p, u: _add_if(active, p, u), params, updates)
        elif masked:
            updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), updates)
            new_params = jax.tree.map(jnp.add, params, updates)
        else:
            new_params = jax.tree.map(jnp.add, params, updates)
        return (new_params, new_state), (loss, grad_norm, update_norm, active, aux)

    def step(carry, xs):
        k, w = xs
        return apply_step(carry, k, w, *value_and_grad(carry[0], slow, batch))

    if remat:
        step = jax.checkpoint(step)
    carry = (fast, opt_state)
    first = 0
    if first_value_and_grad is not None and max_steps > 0:
        carry, out0 = apply_step(carry, jnp.asarray(0), weights[0], *first_value_and_grad)
        first = 1
    (params, state), outs = jax.lax.scan(
        step, carry, (jnp.arange(first, max_steps), weights[first:]), length=max_steps - first
    )
    if first:
        outs = jax.tree.map(
            lambda a, b: jnp.concatenate([jnp.asarray(a)[None].astype(b.dtype), b]), out0, outs
        )
    losses, grad_norms, update_norms, active, aux = outs
    # Counted after the loop from the stored masks: one operation per call, not per step.
    in_range = jnp.arange(max_steps) < limit
    skipped = jnp.sum(in_range & ~active, dtype=jnp.int32)
    return InnerResult(params, state, losses, grad_norms, update_norms, active, skipped, aux)


_warned_eager = False


def _warn_eager_once() -> None:
    """Warn (once per process) that an eager ``adapt`` compiles its scan on every call."""
    global _warned_eager
    if not _warned_eager:
        _warned_eager = True
        warnings.warn(
            "metattt.adapt ran outside jax.jit: it traces and compiles its loop on every call. "
            "Use metattt.make_adapt_fn(loss_fn, opt, max_steps=..., selector=...), or call adapt "
            "inside your own jitted function (jax.jit(metattt.adapt) cannot take the loss "
            "function: jit a functools.partial that fixes it).",
            stacklevel=3,
        )


class BoundedSGD(optax.GradientTransformation):
    """Plain SGD, ``u = -lr * g``, with a constant rate ``|lr| <= 1``: made by :func:`sgd`.

    Entrywise ``|u| <= |g|`` (also after rounding, in the gradient's own dtype), so a finite
    gradient gives a finite update: :func:`adapt`'s guard then tests the gradient alone and
    skips its per-step test of the update (one reduction over every update entry, which also
    keeps the update out of the fused parameter step). The guard takes the shortcut only for
    this class, and only :func:`sgd`, which checks the rate, should construct it.
    """

    __slots__ = ()


def sgd(learning_rate: float) -> BoundedSGD:
    """SGD with a constant learning rate, ``|learning_rate| <= 1`` (negative: gradient ascent).

    The same steps as ``optax.sgd(learning_rate)``; the non-finite guard of :func:`adapt` is
    cheaper with it (see :class:`BoundedSGD`). Use ``optax.sgd`` for a larger rate or a
    schedule.
    """
    if not (
        isinstance(learning_rate, numbers.Real)
        and not isinstance(learning_rate, bool)
        and math.isfinite(learning_rate)
        and 0 < abs(learning_rate) <= 1
    ):
        raise ValueError(
            "learning_rate must be a number with 0 < |learning_rate| <= 1 (optax.sgd takes "
            f"others), got {learning_rate!r}"
        )
    rate = float(learning_rate)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: -rate * g, updates), state

    return BoundedSGD(init_fn, update_fn)


def per_param_sgd(learning_rates: PyTree) -> optax.GradientTransformation:
    """SGD with one (possibly learned) learning rate per parameter entry: u = -alpha * g.

    ``learning_rates`` has the structure of the adapted parameters; it may be traced, which is
    how Meta-SGD learns it.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda a, g: -a * g, learning_rates, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def adapt_merged(
    loss_fn: LossFn, params: PyTree, mask: PyTree, batch: Any, **kwargs: Any
) -> tuple[PyTree, InnerResult]:
    """Split, adapt, merge: the whole tree after adapting the leaves ``mask`` selects.

    ``adapt_merged(loss_fn, params, mask, batch, **kw)`` is
    ``fast, slow = split(params, mask); r = adapt(loss_fn, fast, slow, batch, **kw)`` followed
    by ``merge(r.params, slow)``, the form every caller that wants a usable model needs.

    Args:
        loss_fn: as for :func:`adapt`.
        params: the whole parameter tree.
        mask: boolean pytree from :func:`metattt.params.select`: which leaves adapt.
        batch: the data the inner loss sees.
        **kwargs: :func:`adapt`'s keywords (``opt``, ``max_steps``, ``num_steps``, ...), e.g.
            ``**inner_cfg._asdict()``.

    Returns:
        ``(adapted_params, result)``: the merged tree (same structure as ``params``) and the
        :class:`InnerResult`, whose ``params`` holds the fast half only.
    """
    fast, slow = split(params, mask)
    result = adapt(loss_fn, fast, slow, batch, **kwargs)
    return merge(result.params, slow), result


def adaptation_curve(
    loss_fn: LossFn,
    eval_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    mask: PyTree,
    batch: Any,
    eval_batch: Any,
    **kwargs: Any,
) -> jax.Array:
    """The evaluation loss after 0, 1, ..., K_max inner steps, from one inner loop.

    ``curve[k] = eval_fn(params after k applied steps on batch, eval_batch)``; a skipped
    (non-finite) step leaves the parameters, and so the next point, unchanged.

    Args:
        loss_fn: the inner loss ``loss_fn(params, batch) -> loss`` (no aux).
        eval_fn: ``eval_fn(params, eval_batch) -> scalar``, e.g. a query loss.
        params, mask, batch: as for :func:`adapt_merged`.
        eval_batch: the data ``eval_fn`` scores.
        **kwargs: :func:`adapt`'s keywords; ``max_steps`` sets the curve's length K_max + 1.

    Returns:
        (K_max + 1,) array.
    """
    if kwargs.get("has_aux"):
        raise ValueError("adaptation_curve's loss_fn returns a loss only (has_aux is its own)")

    def loss_and_eval(p, b):
        return loss_fn(p, b), eval_fn(p, eval_batch)

    adapted, result = adapt_merged(loss_and_eval, params, mask, batch, has_aux=True, **kwargs)
    final = eval_fn(adapted, eval_batch)
    return jnp.concatenate([result.aux, jnp.reshape(final, (1,)).astype(result.aux.dtype)])
