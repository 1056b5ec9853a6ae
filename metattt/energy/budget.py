"""Power budgets for energy-aware TTT: the λ controller, triggers, expert pruning, degradation.

Everything here is a pure function over small ``NamedTuple`` states (jittable, no monitor
inside); the experiment loop reads the monitor and feeds the readings in. The ladder, from the
gentlest to the hardest measure:

1. **Soft budget -- the λ_energy controller** (:func:`lambda_controller`). The energy term of
   :mod:`metattt.energy.adapt` is weighted by λ; the controller raises λ while the measured
   power P is over the budget B and lowers it while under, clipped to [λ_min, λ_max]. With the
   relative error e = (P - B) / B:

   * ``"multiplicative"``: λ ← clip(λ · exp(g·e)) (scale-free; needs λ_min > 0);
   * ``"pi"``: I ← I + e (not while saturated in the direction of e: anti-windup),
     λ ← clip(λ_0 + k_p·e + k_i·I).

2. **Triggers** (:func:`trigger`): adaptation switches on when the power or the temperature
   crosses its limit and off only once both are below limit - hysteresis (no chattering).

3. **Hard budget -- pruning** (:func:`prune_experts`): mask the costliest experts until the
   predicted energy per token fits, never keeping fewer than ``top_k`` experts (with fewer,
   top-k routing would still dispatch to pruned experts at zero gate and do their work). The
   prediction is the *worst case* over routings (the K costliest enabled experts, per layer) --
   a guarantee whatever the router does -- or, given router probabilities, the hard top-k
   energy of those routings restricted to the enabled experts.

4. **Graceful degradation** (:func:`degrade`): when even the ``top_k`` cheapest experts do not
   fit, the documented fallback is a smaller top-k: K' = top_k - 1, ..., ``min_top_k`` (default
   1), each with its own pruning, run with the same parameters (a MoE's parameter shapes do not
   depend on K: rebuild ``apply`` with ``config._replace(top_k=K')``). The first K' that fits
   is returned with ``budget_met=True``; if none does, the cheapest configuration (K' =
   ``min_top_k`` on the cheapest experts) with ``budget_met=False`` and its predicted energy --
   the loop reports the power actually achieved.

:func:`power_budget` composes 1-4 into one policy step. A power budget becomes an energy per
token through the serving rate: P = P_idle + r·E_token at r tokens/s
(:func:`energy_per_token_budget`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metattt.energy.costs import expected_energy

CONTROLLER_MODES = ("multiplicative", "pi")


# --- 1. the λ controller ----------------------------------------------------------------------


class ControllerState(NamedTuple):
    """λ_energy and the integral of the relative power error (PI mode). Both () float32."""

    lam: jax.Array
    integral: jax.Array


class LambdaController(NamedTuple):
    """``init() -> ControllerState``; ``update(state, power_w) -> ControllerState``; the range."""

    init: Callable[[], ControllerState]
    update: Callable[[ControllerState, Any], ControllerState]
    lam_min: float
    lam_max: float


def lambda_controller(
    budget_w: float,
    *,
    lam_init: float = 0.1,
    lam_min: float = 1e-3,
    lam_max: float = 10.0,
    mode: str = "multiplicative",
    gain: float = 1.0,
    kp: float = 0.5,
    ki: float = 0.5,
) -> LambdaController:
    """A controller that steers the measured power to ``budget_w`` by adjusting λ_energy.

    Args:
        budget_w: B, the power budget (W, > 0).
        lam_init: λ_0, the initial λ (and the PI offset).
        lam_min, lam_max: the clip range of λ (multiplicative mode needs lam_min > 0).
        mode: ``"multiplicative"`` or ``"pi"`` (see the module docstring).
        gain: g of the multiplicative update.
        kp, ki: PI gains.

    Raises:
        ValueError: a bad mode, budget or range.

    Example:
        >>> ctl = lambda_controller(150.0)
        >>> state = ctl.update(ctl.init(), measured_power_w)   # λ up if over budget
    """
    if mode not in CONTROLLER_MODES:
        raise ValueError(f"mode must be one of {CONTROLLER_MODES}, got {mode!r}")
    if not budget_w > 0:
        raise ValueError(f"budget_w must be > 0, got {budget_w!r}")
    if not 0 <= lam_min <= lam_init <= lam_max:
        raise ValueError(
            f"need 0 <= lam_min <= lam_init <= lam_max, got {lam_min, lam_init, lam_max}"
        )
    if mode == "multiplicative" and not lam_min > 0:
        raise ValueError("the multiplicative controller needs lam_min > 0 (0 is absorbing)")

    def init() -> ControllerState:
        return ControllerState(jnp.float32(lam_init), jnp.float32(0.0))

    def update(state: ControllerState, power_w: Any) -> ControllerState:
        err = (jnp.asarray(power_w, jnp.float32) - budget_w) / budget_w
        if mode == "multiplicative":
            lam = jnp.clip(state.lam * jnp.exp(gain * err), lam_min, lam_max)
            return ControllerState(lam.astype(jnp.float32), state.integral)
        # Anti-windup: stop integrating while λ sits at a bound and the error pushes past it.
        saturated = ((state.lam >= lam_max) & (err > 0)) | ((state.lam <= lam_min) & (err < 0))
        integral = jnp.where(saturated, state.integral, state.integral + err)
        lam = jnp.clip(lam_init + kp * err + ki * integral, lam_min, lam_max)
        return ControllerState(lam.astype(jnp.float32), integral.astype(jnp.float32))

    return LambdaController(init, update, float(lam_min), float(lam_max))


# --- 2. triggers ------------------------------------------------------------------------------


class TriggerState(NamedTuple):
    """Whether adaptation is on: () bool."""

    active: jax.Array


class Trigger(NamedTuple):
    """``init() -> TriggerState``; ``update(state, power_w, temperature_c) -> TriggerState``."""

    init: Callable[[], TriggerState]
    update: Callable[[TriggerState, Any, Any], TriggerState]


def trigger(
    *,
    power_on_w: float | None = None,
    temperature_on_c: float | None = None,
    hysteresis_w: float = 0.0,
    hysteresis_c: float = 0.0,
    initially_active: bool = False,
) -> Trigger:
    """Switch adaptation on when power or temperature exceeds its limit, off with hysteresis.

    on:  P > power_on  or  T > temperature_on;
    off: P < power_on - hysteresis_w  and  T < temperature_on - hysteresis_c; else unchanged.
    A limit left as None never fires (and never holds the trigger on).

    Raises:
        ValueError: no limit at all, or a negative hysteresis.
    """
    if power_on_w is None and temperature_on_c is None:
        raise ValueError("trigger needs power_on_w or temperature_on_c")
    if hysteresis_w < 0 or hysteresis_c < 0:
        raise ValueError("hysteresis must be >= 0")
    p_on = np.inf if power_on_w is None else float(power_on_w)
    t_on = np.inf if temperature_on_c is None else float(temperature_on_c)

    def init() -> TriggerState:
        return TriggerState(jnp.asarray(initially_active))

    def update(state: TriggerState, power_w: Any, temperature_c: Any) -> TriggerState:
        power = jnp.asarray(power_w, jnp.float32)
        temp = jnp.asarray(temperature_c, jnp.float32)
        over = (power > p_on) | (temp > t_on)
        under = (power < p_on - hysteresis_w) & (temp < t_on - hysteresis_c)
        return TriggerState(jnp.where(state.active, ~under, over))

    return Trigger(init, update)


# --- 3. pruning -------------------------------------------------------------------------------


def energy_per_token_budget(budget_w: float, *, idle_power_w: float, tokens_per_s: float) -> float:
    """The energy per token (summed over layers) that keeps P_idle + r·E_token <= B."""
    if not tokens_per_s > 0:
        raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s!r}")
    return (budget_w - idle_power_w) / tokens_per_s


def predicted_energy_per_token(
    costs: Any,
    expert_mask: Any,
    top_k: int,
    *,
    router_probs: jax.Array | None = None,
    num_layers: int = 1,
) -> jax.Array:
    """Energy per token (all layers) of routing with only the ``expert_mask`` experts.

    Without ``router_probs``: the worst case, num_layers · (sum of the ``top_k`` largest enabled
    costs). With ``router_probs`` (layers, ..., E): the hard top-k energy of those routings
    restricted to the enabled experts (masking the logits to -inf renormalises the softmax over
    the enabled experts, which keeps the order), per token. Fewer than ``top_k`` enabled
    experts count only the enabled ones.

    Shapes: costs (E,), expert_mask (E,) bool -> () float32.
    """
    c = jnp.asarray(costs, jnp.float32)
    mask = jnp.asarray(expert_mask, bool)
    if router_probs is None:
        enabled = jnp.where(mask, c, -jnp.inf)
        top, _ = jax.lax.top_k(enabled, top_k)
        return num_layers * jnp.sum(jnp.where(jnp.isfinite(top), top, 0.0))
    probs = jnp.where(mask, router_probs.astype(jnp.float32), 0.0)
    num_tokens = int(np.prod(probs.shape[1:-1])) if probs.ndim > 2 else probs.shape[0]
    return jax.lax.stop_gradient(expected_energy(probs, c, top_k)) / num_tokens


class PruneResult(NamedTuple):
    """What :func:`prune_experts` chose.

    Attributes:
        expert_mask: (E,) bool, False for pruned experts.
        predicted_j_per_token: () predicted energy per token with that mask.
        fits: () bool, predicted <= budget.
        num_pruned: () int32.
    """

    expert_mask: jax.Array
    predicted_j_per_token: jax.Array
    fits: jax.Array
    num_pruned: jax.Array


def prune_experts(
    costs: Any,
    budget_j_per_token: Any,
    top_k: int,
    *,
    router_probs: jax.Array | None = None,
    num_layers: int = 1,
    min_active: int | None = None,
) -> PruneResult:
    """Mask the costliest experts, one at a time, until the predicted energy fits the budget.

    Candidate n prunes the n costliest experts (ties: the higher index first), n = 0 .. E -
    ``min_active`` (default ``top_k``: never fewer active experts than the routing picks). The
    smallest fitting n is returned; if none fits, the largest (most pruning), ``fits=False``.
    Jittable (E is static).

    Shapes: costs (E,) -> PruneResult with expert_mask (E,).

    Raises:
        ValueError: ``top_k``/``min_active`` out of range.
    """
    c = np.asarray(costs, np.float64) if not isinstance(costs, jax.Array) else costs
    num_experts = int(np.shape(c)[0])
    min_active = top_k if min_active is None else min_active
    if not 1 <= top_k <= num_experts or not 1 <= min_active <= num_experts:
        raise ValueError(f"need 1 <= top_k, min_active <= E={num_experts}, got {top_k, min_active}")
    c = jnp.asarray(c, jnp.float32)
    # Descending cost order, ties broken towards the higher index (a stable sort of the
    # reversed costs), and rank[e] = position of expert e in that order.
    order = num_experts - 1 - jnp.argsort(-c[::-1], stable=True)
    rank = jnp.zeros((num_experts,), jnp.int32).at[order].set(jnp.arange(num_experts))
    candidates = np.arange(num_experts - min_active + 1)
    masks = jnp.stack([rank >= n for n in candidates])
    predicted = jnp.stack(
        [
            predicted_energy_per_token(
                c, m, top_k, router_probs=router_probs, num_layers=num_layers
            )
            for m in masks
        ]
    )
    fits = predicted <= jnp.asarray(budget_j_per_token, jnp.float32)
    pick = jnp.where(jnp.any(fits), jnp.argmax(fits), len(candidates) - 1)
    return PruneResult(masks[pick], predicted[pick], fits[pick], pick.astype(jnp.int32))


# --- 4. graceful degradation ------------------------------------------------------------------


class Degradation(NamedTuple):
    """The configuration :func:`degrade` settles on.

    Attributes:
        top_k: K' to run with (Python int: it selects which compiled ``apply`` to use).
        expert_mask: (E,) bool.
        predicted_j_per_token: predicted energy per token (float).
        budget_met: whether the prediction fits the budget.
        level: 0 nothing needed, 1 pruning at the full top-k, 2 smaller top-k (degraded).
    """

    top_k: int
    expert_mask: np.ndarray
    predicted_j_per_token: float
    budget_met: bool
    level: int


def degrade(
    costs: Any,
    budget_j_per_token: float,
    top_k: int,
    *,
    num_layers: int = 1,
    min_top_k: int = 1,
    router_probs: jax.Array | None = None,
) -> Degradation:
    """The least degraded configuration that meets a hard energy-per-token budget (host side).

    Tries K' = ``top_k``, ``top_k`` - 1, ..., ``min_top_k``, each with :func:`prune_experts`
    (at least K' experts kept); returns the first that fits. If none fits, returns K' =
    ``min_top_k`` on the cheapest experts with ``budget_met=False`` (the best that can be done).

    Raises:
        ValueError: ``min_top_k`` not in [1, top_k].
    """
    if not 1 <= min_top_k <= top_k:
        raise ValueError(f"min_top_k must be in [1, top_k={top_k}], got {min_top_k}")
    result = None
    for k in range(top_k, min_top_k - 1, -1):
        res = prune_experts(
            costs, budget_j_per_token, k, router_probs=router_probs, num_layers=num_layers
        )
        if bool(res.fits) or k == min_top_k:
            result = (k, res)
            if bool(res.fits):
                break
    k, res = result
    pruned = int(res.num_pruned) > 0
    level = 0 if k == top_k and not pruned else (1 if k == top_k else 2)
    return Degradation(
        k, np.asarray(res.expert_mask), float(res.predicted_j_per_token), bool(res.fits), level
    )


# --- the composed policy ----------------------------------------------------------------------


class BudgetState(NamedTuple):
    """State of :func:`power_budget`: the controller, the trigger and the escalation flag."""

    controller: ControllerState
    trigger: TriggerState
    over_at_max: jax.Array  # () int32, consecutive readings over budget with λ at λ_max


class BudgetDecision(NamedTuple):
    """What to run next.

    Attributes:
        lambda_energy: λ for the next adaptation.
        adapt: whether to adapt (trigger on; never at level 2, where the degraded model is
            served as it is -- adaptation costs energy too, and its compiled step is for the
            full top-k).
        top_k: K' of the routing.
        expert_mask: (E,) bool.
        level: 0 soft (λ only), 1 pruned, 2 degraded top-k.
        predicted_power_w: predicted power with the hard plan (the worst case), or NaN at level 0.
        budget_met: False only when even the most degraded plan is predicted over budget.
    """

    lambda_energy: float
    adapt: bool
    top_k: int
    expert_mask: np.ndarray
    level: int
    predicted_power_w: float
    budget_met: bool


class PowerBudget(NamedTuple):
    """``init() -> BudgetState``; ``update(state, power_w, temperature_c) -> (state, decision)``."""

    init: Callable[[], BudgetState]
    update: Callable[[BudgetState, float, float], tuple[BudgetState, BudgetDecision]]


def power_budget(
    budget_w: float,
    costs: Any,
    *,
    top_k: int,
    num_layers: int,
    idle_power_w: float,
    tokens_per_s: float,
    controller: LambdaController | None = None,
    trigger_fn: Trigger | None = None,
    patience: int = 3,
    min_top_k: int = 1,
) -> PowerBudget:
    """The budget ladder of the module docstring as one host-side policy step.

    Each reading (measured window power and temperature) updates the trigger and the λ
    controller. Once the power has been over budget with λ at λ_max for ``patience``
    consecutive readings, the hard plan (:func:`degrade` on the worst-case energy per token
    for the budget) is switched on and stays on (escalation is one-way; build a new policy to
    relax a budget). At level 2 (a smaller top-k) adaptation stops and the loop serves
    ``config._replace(top_k=decision.top_k)`` with the same parameters.

    Args:
        budget_w: the power budget B (W).
        costs: (E,) joules per token per expert and layer (a profile's ``values()``).
        top_k, num_layers: of the model.
        idle_power_w, tokens_per_s: the serving point that turns W into J/token.
        controller: default ``lambda_controller(budget_w)``.
        trigger_fn: default: on above the budget, off 5% below it.
        patience: readings over budget at λ_max before the hard plan engages.
        min_top_k: the smallest K' degradation may use.
    """
    ctl = lambda_controller(budget_w) if controller is None else controller
    trig = (
        trigger(power_on_w=budget_w, hysteresis_w=0.05 * budget_w)
        if trigger_fn is None
        else trigger_fn
    )
    c = np.asarray(costs, np.float64)
    num_experts = c.shape[0]
    lam_max = float(np.float32(ctl.lam_max))
    per_token = energy_per_token_budget(
        budget_w, idle_power_w=idle_power_w, tokens_per_s=tokens_per_s
    )
    plan = degrade(c, per_token, top_k, num_layers=num_layers, min_top_k=min_top_k)

    def init() -> BudgetState:
        return BudgetState(ctl.init(), trig.init(), jnp.int32(0))

    def update(state: BudgetState, power_w: float, temperature_c: float):
        trig_state = trig.update(state.trigger, power_w, temperature_c)
        ctl_state = ctl.update(state.controller, power_w)
        saturated_over = (power_w > budget_w) and float(state.controller.lam) >= lam_max
        if int(state.over_at_max) >= patience:
            count = int(state.over_at_max)
        else:
            count = int(state.over_at_max) + 1 if saturated_over else 0
        new = BudgetState(ctl_state, trig_state, jnp.int32(count))
        lam = float(ctl_state.lam)
        if count >= patience:
            decision = BudgetDecision(
                lam,
                bool(trig_state.active) and plan.level < 2,
                plan.top_k,
                plan.expert_mask,
                max(plan.level, 1),
                idle_power_w + tokens_per_s * plan.predicted_j_per_token,
                plan.budget_met,
            )
        else:
            decision = BudgetDecision(
                lam,
                bool(trig_state.active),
                top_k,
                np.ones((num_experts,), bool),
                0,
                float("nan"),
                True,
            )
        return new, decision

    return PowerBudget(init, update)
