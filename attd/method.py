"""ATTD: ponder signal, per-input adaptive inner loop on ψ, joint objective, baselines.

For one input x (tokens (L,), validity mask (L,)) and outer parameters (θ, ψ₀, controller)::

    s      = L_int(x; θ, ψ₀)                         the ponder signal (no gradient by default)
    K, w   = controller(s)                           hard count (eval) / relaxed weights (train)
    ψ_K    = inner.adapt(L_int(x; θ, ·), ψ₀, K or w) θ frozen; only ψ moves
    logits = Mamba(x; edit(θ, ψ_K))                  classification with the adapted dynamics

ψ belongs to an adapter family of :mod:`attd.dynamics` (``edit`` adds it to θ): by default the
low-rank ψ = (U, V) on A_log (``A_log += U Vᵀ``), or per-channel shifts of A_log, of Δ's bias
or (a control that is not dynamics) of the D skip.

L_int is ``"next_token"`` (next-token cross-entropy through the tied LM head) or ``"masked"``
(a seeded, input-independent set of positions is replaced by ``mask_token`` and the LM head's
output at each hidden position must name the original token; the model is causal, so that is
reconstruction from the left context). The batch is ``vmap`` over inputs of that function.

Training minimises (Graves 2016-style ponder cost, plus an update penalty)::

    L_total = E[L_task] + λ · E[Cost(K)] + β · E[Σ_k ‖Δψ_k‖²] + μ · E[s]

with K = Σ_k w_k the soft count of the relaxed weights, Cost(K) = K (``"linear"``) or K²
(``"quadratic"``), ‖Δψ_k‖ the core's ``update_norms`` and μ (``int_weight``, default 0) the
weight of the self-supervised loss itself (joint training, as in Sun et al. 2020). The outer
step learns θ, ψ₀ and the thresholds jointly (optax), first order (inner gradients stopped;
∂/∂w_k still flows) or second order through the inner loop (``first_order=False``).

Baselines are controllers in the same code path (:mod:`attd.controller`): the fixed Mamba
(``fixed_controller(0)``), full TTT (``fixed_controller(K)``), ponder-or-not
(``gate_controller(K)``) and ATTD (``threshold_controller(K_max)``).

Two evaluation paths give the same predictions: :meth:`ATTD.predict` runs the K_max-step scan
with steps ≥ K masked (compute K_max for every input, one compilation), and
:meth:`ATTD.predict_grouped` groups inputs by their hard K and runs each group's scan with
exactly K static steps (groups padded to a power of two, so compilations stay few), so its
compute follows K. :func:`benchmark_eval_paths` times both. On the masked and training paths
s is computed with its gradient, which the inner loop's step 0 reuses (L_int at ψ₀ is
evaluated once, not twice); the grouped path computes s alone (no gradient for inputs that
get K = 0), so an adapted group evaluates L_int at ψ₀ again in its step 0.

Shapes: B batch, L length, C classes, K_max steps; ψ's shapes are its family's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attd.controller import Controller
from attd.dynamics import Adapter, make_adapter, max_transition
from attd.mamba import MambaConfig
from metattt import inner, objectives, train

PyTree = Any
OBJECTIVES = ("next_token", "masked")
COSTS = {"linear": lambda k: k, "quadratic": lambda k: jnp.square(k)}


class ATTDParams(NamedTuple):
    """Everything the outer loop learns.

    Attributes:
        theta: the Mamba parameter dict θ_base (frozen during the inner loop).
        psi: ψ₀, the adapter every input starts from.
        controller: the controller's parameters (thresholds).
    """

    theta: PyTree
    psi: PyTree
    controller: PyTree


class Outputs(NamedTuple):
    """Per-input results of a forward pass (leading axis B).

    Attributes:
        logits: (B, C) task logits with the adapted dynamics.
        signal: (B,) ponder signal s = L_int at ψ₀.
        steps: (B,) step count charged by the cost: Σ_k w_k (train) or the hard K (eval).
        hard_steps: (B,) int32 hard count K = controller.hard_steps(s).
        update_sq: (B,) Σ_k ‖Δψ_k‖² of the applied updates.
        inner_losses: (B, K_max) L_int before each step.
        psi: the adapted ψ_K of each input (leaves with a leading B axis).
    """

    logits: jax.Array
    signal: jax.Array
    steps: jax.Array
    hard_steps: jax.Array
    update_sq: jax.Array
    inner_losses: jax.Array
    psi: PyTree


class Metrics(NamedTuple):
    """Scalar summaries of one batch (means over B)."""

    loss: jax.Array
    task_loss: jax.Array
    cost: jax.Array
    update_penalty: jax.Array
    accuracy: jax.Array
    mean_steps: jax.Array
    mean_hard_steps: jax.Array
    mean_signal: jax.Array


class GroupedOutputs(NamedTuple):
    """The compute-follows-K evaluation path's results (host NumPy arrays).

    Attributes:
        logits: (B, C).
        hard_steps: (B,) the K each input got.
        inner_steps: Σ_i K_i, the inner steps the inputs needed.
        executed_steps: inner steps actually run, counting group padding (≥ ``inner_steps``).
        masked_steps: B · K_max, what the masked path runs.
    """

    logits: np.ndarray
    hard_steps: np.ndarray
    inner_steps: int
    executed_steps: int
    masked_steps: int


class ATTD(NamedTuple):
    """A configured ATTD method (or baseline): pure functions over :class:`ATTDParams`.

    Attributes:
        init: ``init(theta, psi, thresholds=None) -> ATTDParams``.
        signal: ``signal(params, tokens, mask) -> (B,)``.
        forward: ``forward(params, tokens, mask, *, train) -> Outputs``.
        loss: ``loss(params, batch) -> (L_total, Metrics)``, batch = (tokens, mask, labels).
        evaluate: ``evaluate(params, batch) -> (Outputs, Metrics)`` on the hard (masked) path.
        predict: ``predict(params, tokens, mask) -> Outputs``, the masked path, jitted once.
        train_step: ``train_step(optimizer) -> metattt.train.Step``, the outer step over
            batches ``(tokens, mask, labels)``: ``update(state, batch) -> (state, metrics)``
            with the fields of :class:`Metrics` and ``grad_norm`` (jitted).
        predict_grouped: ``predict_grouped(params, tokens, mask) -> GroupedOutputs`` (host).
        transition_radius: ``(params, tokens, psi) -> (B,)`` ρ(Ā) of each input under its ψ.
        classify: ``classify(params, tokens, mask) -> (B, C)`` task logits with ψ₀, no inner
            step (what K = 0 gives): the reference an adapted input's gain is measured from.
        controller: the :class:`Controller`.
    """

    init: Callable[..., ATTDParams]
    signal: Callable[..., jax.Array]
    forward: Callable[..., Outputs]
    loss: Callable[..., tuple[jax.Array, Metrics]]
    evaluate: Callable[..., tuple[Outputs, Metrics]]
    predict: Callable[..., Outputs]
    train_step: Callable[[optax.GradientTransformation], train.Step]
    predict_grouped: Callable[..., GroupedOutputs]
    transition_radius: Callable[..., jax.Array]
    classify: Callable[..., jax.Array]
    controller: Controller


def _check_batch(tokens, mask) -> None:
    if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(
            f"tokens must be integers of shape (B, L), got {jnp.result_type(tokens)} "
            f"{jnp.shape(tokens)}"
        )
    if jnp.shape(mask) != jnp.shape(tokens):
        raise ValueError(f"mask must have shape {jnp.shape(tokens)}, got {jnp.shape(mask)}")


def _bucket(n: int, limit: int) -> int:
    """The smallest power of two ≥ n, capped at ``limit`` (group padding)."""
    return min(1 << max(n - 1, 0).bit_length(), limit)


def make_attd(
    apply: Callable,
    config: MambaConfig,
    controller: Controller,
    *,
    objective: str = "next_token",
    inner_lr: float = 0.1,
    inner_opt: optax.GradientTransformation | None = None,
    clip_norm: float | None = None,
    first_order: bool = True,
    remat: bool = False,
    cost: str | Callable[[jax.Array], jax.Array] = "linear",
    lam: float = 0.01,
    beta: float = 0.0,
    int_weight: float = 0.0,
    adapter: Adapter | None = None,
    straight_through: bool = False,
    signal_grad: bool = False,
    mask_token: int = 0,
    mask_rate: float = 0.15,
    mask_seed: int = 0,
) -> ATTD:
    """Build ATTD (or a baseline, by the controller) on a functional Mamba.

    Args:
        apply: ``apply(params, tokens, *, mask, a_log_delta, head)`` of
            :func:`attd.mamba.init_mamba`.
        config: the model's config (needs ``num_classes``).
        controller: from :mod:`attd.controller`; its ``max_steps`` is K_max.
        objective: L_int, ``"next_token"`` or ``"masked"``.
        inner_lr: learning rate of the default inner rule, SGD.
        inner_opt: any optax rule on ψ instead of SGD(``inner_lr``).
        clip_norm: clip each inner gradient to this global norm.
        first_order: stop the gradients through the inner gradients (default; cheaper).
        remat: checkpoint each inner step.
        cost: ``"linear"`` (K), ``"quadratic"`` (K²) or a callable on the (B,) soft counts.
        lam: λ, weight of E[Cost(K)].
        beta: β, weight of E[Σ_k ‖Δψ_k‖²].
        int_weight: μ, weight of E[L_int(x; θ, ψ₀)] = E[s] added to the outer objective: joint
            training of the task and the self-supervised loss (as in Sun et al. 2020's TTT),
            so outer training cannot make θ a worse model of its inputs and leave L_int (the
            ponder signal and the inner loop's only information) uninformative. 0: off.
        adapter: the family ψ belongs to (:func:`attd.dynamics.make_adapter`; only its
            ``edit`` is used here); default: the low-rank ψ = (U, V) on A_log.
        straight_through: train with the straight-through weights instead of the relaxed ones.
        signal_grad: let the outer gradient reach θ and ψ₀ through s (default: s is a signal,
            detached, so the model cannot lower its cost by distorting its own ponder signal).
        mask_token: the id that hides a token (``"masked"``).
        mask_rate: the share of hidden positions (``"masked"``).
        mask_seed: seed of the hidden positions, the same for every input (``"masked"``).

    Returns:
        An :class:`ATTD`.

    Raises:
        ValueError: unknown objective or cost, no classification head, bad mask settings,
            negative weights.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if config.num_classes is None:
        raise ValueError("make_attd needs MambaConfig.num_classes (the task head)")
    if isinstance(cost, str):
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {tuple(COSTS)} or a callable, got {cost!r}")
        cost_fn = COSTS[cost]
    else:
        cost_fn = cost
    for name, weight in (("lam", lam), ("beta", beta), ("int_weight", int_weight)):
        if not weight >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {weight}")
    if objective == "masked":
        if not 0 <= mask_token < config.vocab_size:
            raise ValueError(f"mask_token must be a token id < {config.vocab_size}")
        if not 0.0 < mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}")
    opt = optax.sgd(inner_lr) if inner_opt is None else inner_opt
    k_max = controller.max_steps
    edit = (make_adapter("low_rank", config) if adapter is None else adapter).edit

    def internal_loss(theta, psi, x, m):
        """L_int of one input: x, m (L,) -> scalar."""
        theta = edit(theta, psi)
        if objective == "next_token":
            logits = apply(theta, x[None], head="lm")[0]
            return objectives.next_token_cross_entropy(logits, x, m)
        hidden = objectives.random_token_mask(jax.random.key(mask_seed), x.shape, mask_rate)
        hidden = hidden & m.astype(bool)
        corrupted = jnp.where(hidden, jnp.asarray(mask_token, x.dtype), x)
        logits = apply(theta, corrupted[None], head="lm")[0]
        return objectives.masked_reconstruction(logits, x, hidden)

    def inner_loss(psi, batch):
        theta, x, m = batch
        return internal_loss(theta, psi, x, m)

    def classify(theta, psi, x, m):
        return apply(edit(theta, psi), x[None], mask=m[None], head="classify")[0]

    no_slow = lambda psi: jax.tree.map(lambda _: None, psi)
    value_and_grad = inner.value_and_grad_fn(inner_loss, first_order=first_order)

    def adapt_one(theta, psi0, x, m, num_steps, weights, max_steps, first=None):
        """Adapt ψ on one input, then classify: returns (logits, InnerResult). ``first``:
        L_int and its gradient at ψ₀ when the caller has them (step 0 reuses them)."""
        result = inner.adapt(
            inner_loss,
            psi0,
            no_slow(psi0),
            (theta, x, m),
            opt=opt,
            max_steps=max_steps,
            num_steps=num_steps,
            step_weights=weights,
            clip_norm=clip_norm,
            first_order=first_order,
            remat=remat,
            first_value_and_grad=first,
        )
        return classify(theta, result.params, x, m), result

    def init(theta, psi, thresholds=None):
        return ATTDParams(theta, psi, controller.init(thresholds))

    def signal(params, tokens, mask):
        _check_batch(tokens, mask)
        per_input = lambda x, m: internal_loss(params.theta, params.psi, x, m)
        return jax.vmap(per_input)(tokens, mask)

    def forward(params, tokens, mask, *, train):
        batch = tokens.shape[0]
        if k_max == 0:
            s = signal(params, tokens, mask)
            hard = controller.hard_steps(params.controller, jax.lax.stop_gradient(s))
            logits = classify_unadapted(params, tokens, mask)
            zeros = jnp.zeros((batch,), logits.dtype)
            psi = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), params.psi)
            return Outputs(logits, s, zeros, hard, zeros, jnp.zeros((batch, 0), logits.dtype), psi)
        # s = L_int at ψ₀ comes with its gradient: the inner loop's step 0 reuses both.
        first = lambda x, m: value_and_grad(params.psi, no_slow(params.psi), (params.theta, x, m))
        s, g0 = jax.vmap(first)(tokens, mask)
        s_ctrl = s if signal_grad else jax.lax.stop_gradient(s)
        hard = controller.hard_steps(params.controller, s_ctrl)
        if train:
            weights = controller.step_weights(params.controller, s_ctrl, straight_through)
            run = lambda x, m, w, f: adapt_one(params.theta, params.psi, x, m, None, w, k_max, f)
            logits, res = jax.vmap(run)(tokens, mask, weights, (s, g0))
            steps = jnp.sum(weights, axis=-1)
        else:
            run = lambda x, m, k, f: adapt_one(params.theta, params.psi, x, m, k, None, k_max, f)
            logits, res = jax.vmap(run)(tokens, mask, hard, (s, g0))
            steps = hard.astype(logits.dtype)
        update_sq = jnp.sum(jnp.square(res.update_norms), axis=-1)
        return Outputs(logits, s, steps, hard, update_sq, res.losses, res.params)

    def metrics(out, labels):
        if jnp.shape(labels) != jnp.shape(out.logits)[:1]:
            raise ValueError(f"labels must have shape (B,), got {jnp.shape(labels)}")
        task = objectives.cross_entropy(out.logits, labels)
        step_cost = jnp.mean(cost_fn(out.steps))
        penalty = jnp.mean(out.update_sq)
        total = task + lam * step_cost + beta * penalty + int_weight * jnp.mean(out.signal)
        accuracy = jnp.mean(jnp.argmax(out.logits, axis=-1) == labels)
        return Metrics(
            total,
            task,
            step_cost,
            penalty,
            accuracy,
            jnp.mean(out.steps),
            jnp.mean(out.hard_steps.astype(out.logits.dtype)),
            jnp.mean(out.signal),
        )

    def loss(params, batch):
        tokens, mask, labels = batch
        out = forward(params, tokens, mask, train=True)
        m = metrics(out, labels)
        return m.loss, m

    def evaluate(params, batch):
        tokens, mask, labels = batch
        out = forward(params, tokens, mask, train=False)
        return out, metrics(out, labels)

    predict = jax.jit(functools.partial(forward, train=False))

    def train_step(optimizer: optax.GradientTransformation) -> train.Step:
        # The outer step differentiates through inner loops that may diverge on some batch
        # (a large inner rate): such a step is skipped and counted, not applied as NaN.
        return train.supervised(loss, optimizer, has_aux=True, skip_nonfinite=True)

    @jax.jit
    def _signal_and_steps(params, tokens, mask):
        s = signal(params, tokens, mask)
        return s, controller.hard_steps(params.controller, s)

    @functools.partial(jax.jit, static_argnums=0)
    def _group_logits(num_steps, params, tokens, mask):
        if num_steps == 0:
            run = lambda x, m: classify(params.theta, params.psi, x, m)
        else:
            run = lambda x, m: adapt_one(params.theta, params.psi, x, m, None, None, num_steps)[0]
        return jax.vmap(run)(tokens, mask)

    def predict_grouped(params, tokens, mask):
        _check_batch(tokens, mask)
        _, hard = _signal_and_steps(params, tokens, mask)
        hard, tokens, mask = np.asarray(hard), np.asarray(tokens), np.asarray(mask)
        batch = hard.shape[0]
        logits, executed = None, 0
        for k in np.unique(hard):
            idx = np.flatnonzero(hard == k)
            size = _bucket(idx.size, batch)
            padded = np.concatenate([idx, np.full(size - idx.size, idx[0])])
            group = np.asarray(_group_logits(int(k), params, tokens[padded], mask[padded]))
            if logits is None:
                logits = np.zeros((batch,) + group.shape[1:], group.dtype)
            logits[idx] = group[: idx.size]
            executed += int(k) * size
        return GroupedOutputs(logits, hard, int(hard.sum()), executed, batch * k_max)

    def classify_unadapted(params, tokens, mask):
        _check_batch(tokens, mask)
        return jax.vmap(lambda x, m: classify(params.theta, params.psi, x, m))(tokens, mask)

    def transition_radius(params, tokens, psi):
        one = lambda x, p: max_transition(config, edit(params.theta, p), None, x[None])
        return jax.vmap(one)(tokens, psi)

    return ATTD(
        init,
        signal,
        forward,
        loss,
        evaluate,
        predict,
        train_step,
        predict_grouped,
        transition_radius,
        classify_unadapted,
        controller,
    )


def benchmark_eval_paths(
    method: ATTD, params: ATTDParams, tokens: jax.Array, mask: jax.Array, repeats: int = 3
) -> dict[str, float]:
    """Wall time of the masked and the grouped evaluation paths (after a warm-up call each).

    Host-side (an edge of the system): a warm-up call compiles each path (the masked path once,
    the grouped path once per (K, group size) seen), then the median of ``repeats`` calls.

    Returns:
        ``masked_s``, ``grouped_s`` (median seconds per batch), ``inner_steps`` (Σ K),
        ``executed_steps`` (grouped, with padding), ``masked_steps`` (B · K_max) and
        ``max_abs_diff`` between the two paths' logits.
    """

    def timed(fn):
        fn()  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
        return out, float(np.median(times))

    masked, masked_s = timed(lambda: method.predict(params, tokens, mask))
    grouped, grouped_s = timed(lambda: method.predict_grouped(params, tokens, mask))
    return {
        "masked_s": masked_s,
        "grouped_s": grouped_s,
        "inner_steps": float(grouped.inner_steps),
        "executed_steps": float(grouped.executed_steps),
        "masked_steps": float(grouped.masked_steps),
        "max_abs_diff": float(np.max(np.abs(np.asarray(masked.logits) - grouped.logits))),
    }
