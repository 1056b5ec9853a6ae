"""Adapter ranks from the hardware's headroom: the policy against a plain loop on random
readings, on simulated power / temperature / memory traces, and applied through the jitted
per-expert ``lora_realloc`` without tracing again."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metattt.energy import (
    RankLimits,
    SimulatedDevice,
    SimulatedMonitor,
    adapter_ranks,
    fill_ranks,
    rank_units,
)
from metattt.models import moe

LIMITS = RankLimits(
    power_budget_w=150.0,
    power_margin_w=40.0,
    temperature_limit_c=80.0,
    temperature_margin_c=15.0,
    memory_reserve_bytes=1e6,
    bytes_per_unit=2e5,
)


def _reference(power, temp, free, usage, max_rank, lim):
    """The module docstring's policy, written out step by step."""
    h = 1.0
    bands = (
        (power, lim.power_budget_w, lim.power_margin_w),
        (temp, lim.temperature_limit_c, lim.temperature_margin_c),
    )
    for x, limit, margin in bands:
        if math.isnan(x) or math.isinf(limit):
            continue
        if x >= limit:
            h = 0.0
        elif x > limit - margin:
            h = min(h, (limit - x) / margin)
    units = int(math.floor(h * max_rank * len(usage) + 1e-9))
    if not math.isnan(free):
        spare = 0
        while free - lim.memory_reserve_bytes >= (spare + 1) * lim.bytes_per_unit:
            spare += 1
        units = min(units, spare)
    ranks = [0] * len(usage)
    for _ in range(units):  # one unit at a time to the busiest expert with room
        open_ = [e for e in range(len(usage)) if ranks[e] < max_rank]
        if not open_:
            break
        e = max(
            open_,
            key=lambda e: (
                usage[e]
                if ranks[e] > 0 or all(ranks[o] in (0, max_rank) for o in range(len(usage)))
                else -1,
                -e,
            ),
        )
        ranks[e] += 1
    return ranks


@pytest.mark.parametrize("seed", range(3))
def test_ranks_match_a_loop_on_random_readings(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        power = float(rng.uniform(90, 160))
        temp = float(rng.choice([rng.uniform(55, 85), math.nan]))
        free = float(rng.choice([rng.uniform(0, 4e6), math.nan]))
        usage = rng.integers(0, 50, size=5)
        got = adapter_ranks(power, temp, free, usage=usage, max_rank=4, limits=LIMITS)
        assert got.tolist() == _reference(power, temp, free, usage.tolist(), 4, LIMITS)
        assert got.dtype == np.int32 and got.min() >= 0 and got.max() <= 4


def test_fill_and_units_by_hand():
    assert fill_ranks(7, [3, 9, 9, 1], 4).tolist() == [0, 4, 3, 0]  # tie: lower index first
    assert fill_ranks(99, [1, 2], 4).tolist() == [4, 4]
    full = dict(num_experts=4, max_rank=4, limits=LIMITS)
    assert rank_units(100.0, 60.0, math.nan, **full) == 16  # below both bands: everything
    assert rank_units(130.0, 60.0, math.nan, **full) == 8  # half the power band left
    assert rank_units(100.0, 71.0, math.nan, **full) == 9  # 9/15 of the thermal band
    assert rank_units(150.0, math.nan, math.nan, **full) == 0  # at the budget
    assert rank_units(100.0, 60.0, 1e6 + 5.5e5, **full) == 2  # memory: 2 units above reserve
    with pytest.raises(ValueError, match="bytes_per_unit must be > 0"):
        rank_units(
            1.0, 1.0, 1.0, num_experts=2, max_rank=2, limits=LIMITS._replace(bytes_per_unit=0)
        )
    with pytest.raises(ValueError, match="usage must be"):
        fill_ranks(3, np.zeros((2, 2)), 4)


def _trace():
    """Per window of a simulated device, (mean power, peak temperature, free bytes): its work
    ramps up for 40 windows (power and heat rise), then it idles and cools for 20, then memory
    runs short for 10 windows (3.5 units above the reserve), then all is clear."""
    device = SimulatedDevice(time_constant_s=3.0, thermal_resistance_c_per_w=0.35)
    monitor = SimulatedMonitor(device)
    out = []
    for t in range(80):
        with monitor.measure() as w:
            if t < 40:
                monitor.record_work((0.3 + t / 40) * 2e13, 1e9)  # 0.06 .. 0.26 s busy
            monitor.idle(0.3)
        free = LIMITS.memory_reserve_bytes + 3.5 * LIMITS.bytes_per_unit if 60 <= t < 70 else 8e6
        out.append((w.record.mean_power_w, w.record.max_temperature_c, free))
    monitor.close()
    return out


def test_ranks_follow_simulated_power_temperature_and_memory_traces():
    trace = _trace()
    usage = np.array([5, 20, 10, 1])
    ranks = [adapter_ranks(*r, usage=usage, max_rank=4, limits=LIMITS) for r in trace]
    totals = [int(r.sum()) for r in ranks]
    for r, (power, temp, free) in zip(ranks, trace, strict=True):
        assert r.tolist() == _reference(power, temp, free, usage.tolist(), 4, LIMITS)
        assert r[1] >= r[2] >= r[0] >= r[3]  # the busiest experts keep adapters longest
    assert totals[0] == 16 and totals[36] == 0  # room at first; none at the power budget
    assert all(np.diff(totals[:40]) <= 0)  # shrinking as the work ramps up
    # idle but still hot: the temperature alone holds the ranks down, then they grow back
    assert trace[40][0] < 100 and trace[40][1] > 75 and totals[40] <= 4
    assert all(np.diff(totals[40:60]) >= 0) and totals[59] == 16
    assert totals[60:70] == [3] * 10 and totals[70:] == [16] * 10  # memory, then clear


def test_policy_ranks_go_through_realloc_without_retracing():
    cfg = moe.MoEConfig(vocab_size=8, d_model=8, num_heads=2, num_layers=1, num_experts=4,
                        d_ff=8, lora_rank=4, backend="reference")  # fmt: skip
    params = moe.with_lora(moe.init_moe(cfg._replace(lora_rank=0)).params, cfg)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def realloc(p, ranks, key):
        return moe.lora_realloc(p, cfg, ranks, key)

    chex.clear_trace_counter()
    usage = np.array([5, 20, 10, 1])
    previous = np.zeros(4, np.int32)
    for t, reading in enumerate(_trace()[::3]):
        ranks = adapter_ranks(*reading, usage=usage, max_rank=4, limits=LIMITS)
        before = params["blocks"]["0"]["ffn"]["experts"]["lora_up_a"]
        params = realloc(params, jnp.asarray(ranks[None]), jax.random.key(t))
        experts = params["blocks"]["0"]["ffn"]["experts"]
        np.testing.assert_array_equal(moe.lora_ranks(params, cfg)[0], ranks)
        a = np.asarray(experts["lora_up_a"])
        for e in range(4):
            kept = min(ranks[e], previous[e])
            np.testing.assert_array_equal(a[e, :, :kept], np.asarray(before)[e, :, :kept])
            assert np.all(a[e, :, ranks[e] :] == 0)  # freed components are zero
        previous = ranks
