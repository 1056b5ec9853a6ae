"""Energy-aware TENT: test-time entropy minimisation of a MoE that also makes its routing cheaper.

The adapted loss on an unlabelled test batch is

    L(ψ) = L_task(ψ) + λ_ent · H(ψ) + λ_energy · Ē(ψ)

* L_task: ``"entropy"`` -- the mean prediction entropy H (TENT, Wang et al. 2021, "Tent: Fully
  Test-time Adaptation by Entropy Minimization"); ``"next_token"`` -- the self-supervised
  next-token cross-entropy on the test tokens themselves (a language model sees its labels one
  token late); ``"masked"`` -- masked reconstruction: the model reads the tokens with a random
  share hidden (``corrupt(key, tokens) -> (corrupted, hidden)``) and its next-token logits
  predict each hidden original from the corrupted prefix (a causal model's form of BERT's
  loss); ``"consistency"`` -- the symmetric KL between the predictions (``head``) on two random
  augmentations ``augment(k_a, tokens)``, ``augment(k_b, tokens)`` of the batch, with
  ``k_a, k_b = jax.random.split(key)``; ``"none"``.
* H: mean Shannon entropy of the predictions (LM logits, or the class logits with
  ``head="class"``), weighted by λ_ent (useful on top of ``"next_token"``).
* Ē: the expected energy of the routing decisions per token, summed over layers, under a
  per-expert cost profile c (:func:`metattt.energy.costs.expected_energy`), with the costs
  normalised by their mean so that λ_energy is unitless: Ē ∈ [K·min c / mean c, K·max c / mean c].
  Its value is the hard top-k cost and its gradient the straight-through surrogate through the
  router probabilities, so the router learns to send tokens to cheaper experts. With
  ``"masked"`` it is the corrupted pass's routing, with ``"consistency"`` the mean of the two
  passes' (each step then runs two forward passes: ``expert_counts`` has a pass axis).

ψ is the subset of the parameters chosen by a :mod:`metattt.params` selector (``"router"``,
``"layernorm"``, ``"lora"`` or a combination). The steps are :func:`metattt.inner.adapt` (a
``lax.scan`` of an optax rule), so one compiled :func:`EnergyTTT.adapt` serves every λ_energy
and step count (both traced), is jittable and vmaps over streams.

The model is any ``apply(params, tokens, *, expert_mask=None) -> out`` with ``out.logits``
(B, L, V), ``out.class_logits`` (B, C) and ``out.aux["router_probs"]`` (layers, B, L, E) and
``out.aux["expert_counts"]`` (layers, E), e.g. :func:`metattt.models.moe.init_moe`; this module
imports no model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metattt import inner, objectives
from metattt.energy.costs import CostProfile, expected_energy
from metattt.params import Selector, select

PyTree = Any
TASKS = ("entropy", "next_token", "masked", "consistency", "none")
KEYED = ("masked", "consistency")  # the tasks that draw random corruptions (need a key)
HEADS = ("lm", "class")


class EnergyBatch(NamedTuple):
    """What the energy-aware loss sees; every field may be traced.

    Attributes:
        tokens: (B, L) int test tokens.
        lambda_energy: () float32 weight of the energy term.
        expert_mask: (E,) bool experts allowed (False prunes), or None.
        key: PRNG key of the corruptions (``"masked"``, ``"consistency"``), or None; the
            same corruptions serve every step of one adaptation.
    """

    tokens: jax.Array
    lambda_energy: jax.Array
    expert_mask: jax.Array | None = None
    key: jax.Array | None = None


class RoutingStats(NamedTuple):
    """Prediction and routing statistics of one forward pass (all float32 unless noted).

    Attributes:
        loss: the full adapted loss L at this point (with the batch's λ_energy).
        task_loss: L_task.
        entropy: mean prediction entropy H (nats).
        energy: normalised expected energy per token Ē (the term λ_energy multiplies).
        joules_per_token: expected energy per token in the profile's units (J), all layers.
        expert_counts: (layers, E) int32 assignments each expert processed; (2, layers, E),
            one per forward pass, with ``"consistency"``.
    """

    loss: jax.Array
    task_loss: jax.Array
    entropy: jax.Array
    energy: jax.Array
    joules_per_token: jax.Array
    expert_counts: jax.Array


class EnergyAdaptResult(NamedTuple):
    """What :func:`EnergyTTT.adapt` returns.

    Attributes:
        params: the full adapted parameter tree (fast merged into slow).
        inner: the :class:`metattt.inner.InnerResult` (per-step ``losses``; ``aux`` is the
            per-step :class:`RoutingStats`, stacked: routing convergence curves).
        before: :class:`RoutingStats` before adaptation (None without diagnostics).
        after: :class:`RoutingStats` after adaptation (None without diagnostics).
    """

    params: PyTree
    inner: inner.InnerResult
    before: RoutingStats
    after: RoutingStats


class EnergyTTT(NamedTuple):
    """The pure functions of energy-aware TENT (see :func:`energy_tent`).

    Attributes:
        loss_fn: ``loss_fn(params, batch: EnergyBatch) -> (loss, RoutingStats)``.
        stats: ``stats(params, tokens, lambda_energy=0.0, expert_mask=None, key=None)
            -> RoutingStats``.
        adapt: ``adapt(params, tokens, lambda_energy, expert_mask=None, num_steps=None,
            diagnostics=True, key=None) -> EnergyAdaptResult``; ``diagnostics=False``
            (static) skips the two extra forward passes of ``before`` / ``after``, as serving
            would; ``key`` draws the corruptions of ``"masked"`` and ``"consistency"``.
    """

    loss_fn: Callable[..., tuple[jax.Array, RoutingStats]]
    stats: Callable[..., RoutingStats]
    adapt: Callable[..., EnergyAdaptResult]


def cost_vector(costs: CostProfile | Any) -> np.ndarray:
    """(E,) float64 joules per token from a :class:`CostProfile` or an array-like."""
    values = costs.values("joules_per_token") if isinstance(costs, CostProfile) else costs
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size < 1:
        raise ValueError(f"costs must be a CostProfile or an (E,) array, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or not values.mean() > 0:
        raise ValueError(f"costs must be finite, >= 0 and not all zero, got {values}")
    return values


def energy_tent(
    apply: Callable[..., Any],
    costs: CostProfile | Any,
    *,
    top_k: int,
    params: Selector = "router",
    task: str = "entropy",
    head: str = "lm",
    lambda_ent: float = 0.0,
    opt: optax.GradientTransformation | None = None,
    max_steps: int = 5,
    clip_norm: float | None = 1.0,
    remat: bool = False,
    corrupt: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> EnergyTTT:
    """Build energy-aware TENT for a MoE ``apply`` (see the module docstring for the loss).

    Args:
        apply: ``apply(params, tokens, *, expert_mask=None)`` of the MoE.
        costs: per-expert joules per token: a :class:`CostProfile` (e.g.
            ``proxy_costs(E, *expert_token_costs(config))``) or an (E,) array.
        top_k: K of the model's routing.
        params: which parameters adapt -- a :mod:`metattt.params` selector (``"router"``,
            ``"layernorm"``, ``"lora"``, ``"router+layernorm"``, ...).
        task: ``"entropy"``, ``"next_token"``, ``"masked"``, ``"consistency"`` or ``"none"``
            (L_task).
        head: ``"lm"`` (entropy of the next-token logits) or ``"class"`` (class logits).
        lambda_ent: λ_ent, weight of the extra prediction-entropy term.
        opt: optax rule (default ``optax.adam(1e-2)``).
        max_steps: K_max, static; ``adapt(num_steps=k)`` runs k <= K_max of them.
        clip_norm: per-step gradient clipping (None: none).
        remat: checkpoint each inner step.
        corrupt: ``corrupt(key, tokens) -> (corrupted, hidden)`` (``"masked"``), e.g.
            ``partial(metattt.augment.corrupt_tokens, rate=0.15, low=1, high=V)``.
        augment: ``augment(key, tokens) -> tokens`` (``"consistency"``), e.g.
            ``partial(metattt.augment.drop_swap, ...)``.

    Returns:
        An :class:`EnergyTTT` of pure functions.

    Raises:
        ValueError: unknown ``task``/``head``, bad ``costs``, or ``"masked"`` without
            ``corrupt`` / ``"consistency"`` without ``augment``.

    Example:
        >>> apply, p = init_moe(cfg)
        >>> ttt = energy_tent(apply, proxy_costs(4, *expert_token_costs(cfg)), top_k=cfg.top_k)
        >>> res = jax.jit(ttt.adapt)(p, tokens, 0.5)      # one compilation for every λ
        >>> res.after.entropy, res.after.joules_per_token
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if task == "masked" and corrupt is None:
        raise ValueError("task='masked' needs corrupt(key, tokens) -> (corrupted, hidden)")
    if task == "consistency" and augment is None:
        raise ValueError("task='consistency' needs augment(key, tokens) -> tokens")
    joules = cost_vector(costs)
    normalised = joules / joules.mean()
    opt = optax.adam(1e-2) if opt is None else opt

    def predictions(out):
        pred = out.logits if head == "lm" else out.class_logits
        if pred is None:
            raise ValueError("head='class' needs a model with a classification head")
        return pred

    def loss_fn(p: PyTree, batch: EnergyBatch) -> tuple[jax.Array, RoutingStats]:
        tokens = batch.tokens
        if jnp.ndim(tokens) != 2:
            raise ValueError(f"tokens must have shape (B, L), got {jnp.shape(tokens)}")
        if task in KEYED and batch.key is None:
            raise ValueError(f"task={task!r} draws random corruptions: pass a key")
        run = lambda x: apply(p, x, expert_mask=batch.expert_mask)
        if task == "masked":
            corrupted, hidden = corrupt(batch.key, tokens)
            outs = [run(corrupted)]
            task_loss = objectives.next_token_cross_entropy(outs[0].logits, tokens, hidden)
        elif task == "consistency":
            key_a, key_b = jax.random.split(batch.key)
            outs = [run(augment(key_a, tokens)), run(augment(key_b, tokens))]
            task_loss = objectives.consistency(predictions(outs[0]), predictions(outs[1]))
        else:
            outs = [run(tokens)]
        ent = objectives.entropy(predictions(outs[0]))
        if task == "entropy":
            task_loss = ent
        elif task == "next_token":
            task_loss = objectives.next_token_cross_entropy(outs[0].logits, tokens)
        elif task == "none":
            task_loss = jnp.zeros((), jnp.float32)
        num_tokens = tokens.shape[0] * tokens.shape[1]
        probs = [out.aux["router_probs"] for out in outs]

        def per_token(costs):  # mean over the forward passes
            return sum(expected_energy(q, costs, top_k) for q in probs) / len(probs) / num_tokens

        energy = per_token(normalised)
        lam = jnp.asarray(batch.lambda_energy, jnp.float32)
        loss = task_loss + lambda_ent * ent + lam * energy
        jpt = per_token(joules)
        counts = [out.aux["expert_counts"] for out in outs]
        counts = counts[0] if len(outs) == 1 else jnp.stack(counts)
        stats = RoutingStats(loss, task_loss, ent, energy, jax.lax.stop_gradient(jpt), counts)
        return loss, stats

    def stats(
        p: PyTree,
        tokens: jax.Array,
        lambda_energy: float | jax.Array = 0.0,
        expert_mask: jax.Array | None = None,
        key: jax.Array | None = None,
    ) -> RoutingStats:
        batch = EnergyBatch(tokens, jnp.asarray(lambda_energy, jnp.float32), expert_mask, key)
        return loss_fn(p, batch)[1]

    def adapt(
        p: PyTree,
        tokens: jax.Array,
        lambda_energy: float | jax.Array,
        expert_mask: jax.Array | None = None,
        num_steps: int | jax.Array | None = None,
        diagnostics: bool = True,
        key: jax.Array | None = None,
    ) -> EnergyAdaptResult:
        batch = EnergyBatch(tokens, jnp.asarray(lambda_energy, jnp.float32), expert_mask, key)
        before = loss_fn(p, batch)[1] if diagnostics else None
        adapted, res = inner.adapt_merged(
            loss_fn,
            p,
            select(p, params),
            batch,
            opt=opt,
            max_steps=max_steps,
            num_steps=num_steps,
            clip_norm=clip_norm,
            remat=remat,
            has_aux=True,
        )
        after = loss_fn(adapted, batch)[1] if diagnostics else None
        return EnergyAdaptResult(adapted, res, before, after)

    return EnergyTTT(loss_fn, stats, adapt)
