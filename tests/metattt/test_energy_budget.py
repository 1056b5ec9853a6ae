"""The power-budget ladder: λ controller, triggers, pruning, degradation, and a closed loop.

The unit tests are pure numbers; the closed loop serves a tiny untrained MoE (one layer, E = 4
experts of widths 4, 8, 16, 32, top-2) on a simulated device at a fixed token rate and adapts
its router with energy-aware TENT whenever the trigger fires.
"""

import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metattt.energy import (
    SimulatedDevice,
    SimulatedMonitor,
    degrade,
    energy_per_token_budget,
    energy_tent,
    lambda_controller,
    power_budget,
    predicted_energy_per_token,
    proxy_costs,
    prune_experts,
    trigger,
)
from metattt.models.moe import MoEConfig, expert_token_costs, expert_work, init_moe

COSTS = np.array([1.0, 4.0, 2.0, 8.0])  # J per token per layer; expert 3 costliest, then 1


# --- the λ controller -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["multiplicative", "pi"])
def test_controller_raises_lambda_over_budget_and_lowers_it_under(mode):
    ctl = lambda_controller(100.0, lam_init=1.0, mode=mode)
    state = ctl.init()
    assert float(ctl.update(state, 130.0).lam) > 1.0
    assert float(ctl.update(state, 70.0).lam) < 1.0
    assert float(ctl.update(state, 100.0).lam) == pytest.approx(1.0)
    # Clipped to [lam_min, lam_max] however far off the power is.
    for _ in range(200):
        state = ctl.update(state, 1e4)
    assert float(state.lam) == pytest.approx(ctl.lam_max)
    for _ in range(400):
        state = ctl.update(state, 0.0)
    assert float(state.lam) == pytest.approx(ctl.lam_min)


@pytest.mark.parametrize("mode", ["multiplicative", "pi"])
def test_controller_converges_on_a_linear_plant(mode):
    """Power = p0 - k·λ with p0 = 200 W, k = 50 W: the budget 150 W needs λ* = 1."""
    ctl = lambda_controller(150.0, lam_init=0.1, mode=mode, gain=1.0, kp=0.5, ki=1.0)
    state, plant = ctl.init(), lambda lam: 200.0 - 50.0 * lam
    update = jax.jit(ctl.update)
    powers = []
    for _ in range(60):
        powers.append(plant(float(state.lam)))
        state = update(state, powers[-1])
    assert float(state.lam) == pytest.approx(1.0, abs=1e-3)
    assert powers[-1] == pytest.approx(150.0, abs=0.1)
    assert powers[0] > 190.0


def test_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode"):
        lambda_controller(100.0, mode="bang-bang")
    with pytest.raises(ValueError, match="lam_min > 0"):
        lambda_controller(100.0, lam_min=0.0)
    with pytest.raises(ValueError, match="lam_min <= lam_init"):
        lambda_controller(100.0, lam_init=20.0)


# --- triggers ---------------------------------------------------------------------------------


def test_power_trigger_has_hysteresis():
    trig = trigger(power_on_w=100.0, hysteresis_w=10.0)
    state, seen = trig.init(), []
    for power in (80, 101, 95, 91, 89, 95, 100, 100.5):
        state = trig.update(state, power, 40.0)
        seen.append(bool(state.active))
    assert seen == [False, True, True, True, False, False, False, True]


def test_temperature_trigger_and_either_limit():
    trig = trigger(power_on_w=100.0, temperature_on_c=80.0, hysteresis_w=5.0, hysteresis_c=3.0)
    state = trig.update(trig.init(), 50.0, 81.0)  # hot at low power: on
    assert bool(state.active)
    assert bool(trig.update(state, 50.0, 78.0).active)  # within the temperature hysteresis
    assert not bool(trig.update(state, 50.0, 76.0).active)
    assert not bool(trig.update(state, 94.0, 76.0).active)  # both below limit - hysteresis
    assert bool(trig.update(state, 97.0, 76.0).active)  # power within its hysteresis band
    assert not bool(trig.update(trig.init(), 97.0, 79.0).active)  # below both limits: stays off
    with pytest.raises(ValueError, match="needs"):
        trigger()


# --- pruning ----------------------------------------------------------------------------------


def test_worst_case_prediction_is_the_k_costliest_enabled_experts():
    for bits in itertools.product([False, True], repeat=4):
        mask = np.array(bits)
        enabled = sorted(COSTS[mask], reverse=True)
        want = 3 * sum(enabled[:2])
        got = predicted_energy_per_token(COSTS, mask, 2, num_layers=3)
        assert float(got) == pytest.approx(want)


def test_pruning_removes_the_costliest_first_and_keeps_top_k():
    # Full mask: worst case 8 + 4 = 12. Pruning 3 -> 4 + 2 = 6; pruning 3 and 1 -> 2 + 1 = 3.
    res = prune_experts(COSTS, 12.0, 2)
    assert res.expert_mask.tolist() == [True, True, True, True] and int(res.num_pruned) == 0
    res = prune_experts(COSTS, 7.0, 2)
    assert res.expert_mask.tolist() == [True, True, True, False] and bool(res.fits)
    assert float(res.predicted_j_per_token) == pytest.approx(6.0)
    res = jax.jit(prune_experts, static_argnums=2)(COSTS, 3.0, 2)
    assert res.expert_mask.tolist() == [True, False, True, False] and bool(res.fits)
    # Unreachable: stops at top_k experts, the cheapest ones, and says it does not fit.
    res = prune_experts(COSTS, 1.0, 2)
    assert res.expert_mask.tolist() == [True, False, True, False]
    assert not bool(res.fits) and int(res.num_pruned) == 2
    # Ties: the higher index goes first.
    tied = prune_experts(np.array([5.0, 5.0, 1.0, 1.0]), 6.5, 2)
    assert tied.expert_mask.tolist() == [True, False, True, True]


def test_pruning_with_router_probabilities_uses_the_actual_routings():
    # Two tokens, one layer; both prefer expert 3 then 1 (the costly ones).
    probs = jnp.array([[[0.1, 0.3, 0.2, 0.4], [0.05, 0.25, 0.2, 0.5]]])
    full = predicted_energy_per_token(COSTS, np.ones(4, bool), 2, router_probs=probs)
    assert float(full) == pytest.approx(12.0)
    res = prune_experts(COSTS, 7.0, 2, router_probs=probs)
    # Without 3 the routing is 1 + 2 (4 + 2 = 6) per token.
    assert res.expert_mask.tolist() == [True, True, True, False]
    assert float(res.predicted_j_per_token) == pytest.approx(6.0)


# --- graceful degradation ---------------------------------------------------------------------


def test_degradation_levels():
    assert degrade(COSTS, 12.0, 2).level == 0
    pruned = degrade(COSTS, 6.0, 2)
    assert (pruned.level, pruned.top_k, pruned.budget_met) == (1, 2, True)
    # 2 + 1 = 3 > 2.5: top-2 cannot fit; top-1 on expert 0 (1 J) or 2 (2 J) can.
    smaller = degrade(COSTS, 2.5, 2)
    assert (smaller.level, smaller.top_k, smaller.budget_met) == (2, 1, True)
    assert smaller.expert_mask.tolist() == [True, False, True, False]
    assert smaller.predicted_j_per_token == pytest.approx(2.0)
    # Impossible: the cheapest single expert still costs 1 J; report it honestly.
    hopeless = degrade(COSTS, 0.5, 2)
    assert (hopeless.level, hopeless.top_k, hopeless.budget_met) == (2, 1, False)
    assert hopeless.expert_mask.tolist() == [True, False, False, False]
    assert hopeless.predicted_j_per_token == pytest.approx(1.0)
    # A floor on top-k is honoured.
    floor = degrade(COSTS, 0.5, 2, min_top_k=2)
    assert (floor.top_k, floor.budget_met) == (2, False)


def test_policy_escalates_to_the_hard_plan_after_patience_and_reports_failure():
    # 1 layer, 10 tokens/s, idle 10 W: budget 20 W = 1 J/token -> even top-1 on expert 0 is
    # exactly 1 J, so budget 15 W (0.5 J/token) cannot be met.
    ctl = lambda_controller(15.0, lam_init=1.0, lam_max=2.0, gain=5.0)
    policy = power_budget(
        15.0, COSTS, top_k=2, num_layers=1, idle_power_w=10.0, tokens_per_s=10.0,
        controller=ctl, patience=2,
    )  # fmt: skip
    state, levels = policy.init(), []
    for _ in range(6):
        state, decision = policy.update(state, 80.0, 50.0)
        levels.append(decision.level)
    assert decision.lambda_energy == pytest.approx(2.0) and not decision.adapt  # serve only
    assert levels[0] == 0 and levels[-1] == 2
    assert decision.top_k == 1 and not decision.budget_met
    assert decision.predicted_power_w == pytest.approx(10.0 + 10.0 * 1.0)
    assert energy_per_token_budget(15.0, idle_power_w=10.0, tokens_per_s=10.0) == 0.5


# --- the closed loop --------------------------------------------------------------------------

CFG = MoEConfig(
    vocab_size=16, d_model=16, num_heads=2, num_layers=1, num_experts=4, d_ff=32, top_k=2,
    max_len=8, expert_widths=(4, 8, 16, 32), backend="reference",
)  # fmt: skip
DEVICE = SimulatedDevice(
    idle_power_w=10.0, joules_per_flop=1e-6, joules_per_byte=1e-7, peak_flops=1e9,
    bandwidth_bytes_s=1e9,
)  # fmt: skip
BATCH, LENGTH, PERIOD_S = 8, 8, 2e-3  # one batch of 64 tokens every 2 ms


class Loop(NamedTuple):
    """The compiled pieces of the closed loop, shared by its tests."""

    params: dict
    costs: np.ndarray
    adapt: Callable
    counts_of: dict  # top_k -> jitted (params, tokens, mask) -> (layers, E) counts


@pytest.fixture(scope="module")
def loop():
    apply, params = init_moe(CFG, seed=0)
    costs = proxy_costs(CFG.num_experts, *expert_token_costs(CFG), device=DEVICE)
    ttt = energy_tent(apply, costs, top_k=CFG.top_k, params="router", opt=optax.adam(5e-2),
                      max_steps=3)  # fmt: skip
    counts_of = {}
    for k in (1, 2):  # the same parameters serve every top-k
        apply_k = init_moe(CFG._replace(top_k=k)).apply
        counts_of[k] = jax.jit(
            lambda p, t, m, f=apply_k: f(p, t, expert_mask=m).aux["expert_counts"]
        )
    return Loop(params, costs.values(), jax.jit(ttt.adapt), counts_of)


def run_loop(loop, budget_share, steps=12):
    """Serve ``steps`` batches under budget = idle + share·(first power - idle).

    Returns the budget, the first power, and per step (decision, power, power of the
    unadapted full model on the same batch).
    """
    monitor, rng = SimulatedMonitor(DEVICE), np.random.default_rng(0)
    stream = [jnp.asarray(rng.integers(0, 16, (BATCH, LENGTH))) for _ in range(steps + 1)]

    def serve(p, tokens, mask, top_k):
        work = expert_work(loop.counts_of[top_k](p, tokens, mask), CFG)
        with monitor.measure() as window:
            busy = monitor.record_work(float(jnp.sum(work.flops)), float(jnp.sum(work.bytes)))
            monitor.idle(PERIOD_S - busy)
        return window.record

    everything = jnp.ones((CFG.num_experts,), bool)
    first = serve(loop.params, stream[0], everything, CFG.top_k)
    budget = DEVICE.idle_power_w + budget_share * (first.mean_power_w - DEVICE.idle_power_w)
    policy = power_budget(
        budget, loop.costs, top_k=CFG.top_k, num_layers=CFG.num_layers,
        idle_power_w=DEVICE.idle_power_w, tokens_per_s=BATCH * LENGTH / PERIOD_S,
        controller=lambda_controller(budget, lam_init=0.1, gain=2.0),
    )  # fmt: skip
    state, record, p, rows = policy.init(), first, loop.params, []
    for tokens in stream[1:]:
        state, decision = policy.update(state, record.mean_power_w, record.max_temperature_c)
        mask = jnp.asarray(decision.expert_mask)
        if decision.adapt:  # cumulative: the adapted router carries over to the next batch
            p = loop.adapt(p, tokens, decision.lambda_energy, mask).params
        record = serve(p, tokens, mask, decision.top_k)
        static = serve(loop.params, tokens, everything, CFG.top_k)
        rows.append((decision, record.mean_power_w, static.mean_power_w))
    return budget, first.mean_power_w, rows


def test_closed_loop_with_a_simulated_monitor_stays_within_budget(loop):
    budget, first, rows = run_loop(loop, 0.75)
    decisions, powers, static = zip(*rows, strict=True)
    assert first > budget and decisions[0].lambda_energy > 0.1  # over budget: λ went up
    assert all(d.level == 0 and d.budget_met for d in decisions)  # λ alone suffices here
    assert np.mean(powers[-8:]) <= budget and max(powers[-8:]) <= 1.05 * budget
    assert np.mean(static[-8:]) > budget  # without adaptation it would not fit


def test_closed_loop_prunes_and_degrades_when_lambda_cannot_meet_the_budget(loop):
    budget, first, rows = run_loop(loop, 0.35)
    decisions, powers, _ = zip(*rows, strict=True)
    assert decisions[0].level == 0 and decisions[-1].level == 2
    last = decisions[-1]
    assert last.top_k == 1 and last.budget_met and not last.adapt
    assert int(np.sum(last.expert_mask)) >= last.top_k
    assert last.predicted_power_w <= budget
    assert max(powers[-4:]) <= budget < min(powers[:3])
