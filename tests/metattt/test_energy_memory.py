"""Memory pressure (metattt.energy.memory): readings, XLA-priced serving levels, and the policy
on simulated pressure traces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metattt.energy import memory
from metattt.models import moe

MEMINFO = """MemTotal:       24576000 kB
MemFree:         1000000 kB
MemAvailable:   20480000 kB
Buffers:          123456 kB
"""


def test_host_memory_is_total_minus_available(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    reading = memory.read_host_memory(path)
    assert reading == memory.MemoryReading(1024 * (24576000 - 20480000), 1024 * 24576000, "host")
    assert reading.free_bytes == 1024 * 20480000


@pytest.mark.parametrize(
    "text, message",
    [
        ("MemTotal: 100 kB\n", "no MemAvailable line"),
        ("MemTotal: lots kB\nMemAvailable: 5 kB\n", "MemTotal is 'lots kB', expected"),
        ("MemTotal: 100 MB\nMemAvailable: 5 kB\n", "MemTotal is '100 MB'"),
        ("", "no MemTotal or MemAvailable line"),
    ],
)
def test_a_bad_meminfo_file_is_named_in_one_line(tmp_path, text, message):
    path = tmp_path / "meminfo"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        memory.read_host_memory(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no meminfo file"):
        memory.read_host_memory(tmp_path / "absent")


def test_the_cpu_backend_reports_no_device_memory_so_the_host_is_read():
    assert memory.read_device_memory(jax.devices("cpu")[0]) is None
    reading = memory.read_memory(jax.devices("cpu")[0])
    assert reading.source == "host" and 0 < reading.used_bytes < reading.limit_bytes


def test_peak_bytes_counts_the_arguments_and_outputs_of_the_program():
    x = np.random.default_rng(0).normal(size=(1000,)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(250, 4)).astype(np.float32)
    peak = memory.peak_bytes(lambda a, b: (a[:, None] * b.reshape(-1)[None, :]).sum(0), x, y)
    # arguments (4000 + 4000 bytes) and the (1000,) float32 output are all alive at the end.
    assert peak >= x.nbytes + y.nbytes + 4 * 1000


def test_serving_ladder_changes_the_gentlest_measure_first():
    ladder = memory.serving_ladder(2, capacity_factors=(None, 1.0), chunks=(1, 4))
    L = memory.ServingLevel
    assert ladder == [
        L(None, 2, 1), L(None, 2, 4), L(1.0, 2, 1), L(1.0, 2, 4),
        L(None, 1, 1), L(None, 1, 4), L(1.0, 1, 1), L(1.0, 1, 4),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="chunks must be positive and increasing"):
        memory.serving_ladder(2, chunks=(4, 1))
    with pytest.raises(ValueError, match="min_top_k must be in"):
        memory.serving_ladder(2, min_top_k=3)


NEED = [1000, 700, 400, 200]  # bytes of four levels, full service first
LIMIT = 2000


def _serve(trace, margin=0.0, patience=3):
    """Run the policy over ``trace`` (other tenants' bytes) on a simulated device; returns the
    levels served and whether each fitted."""
    policy = memory.memory_policy(NEED, margin=margin, patience=patience)
    device = memory.SimulatedMemory(LIMIT, trace)
    state = policy.init()
    device.hold(NEED[state.level])
    levels, fits = [], []
    for _ in trace:
        state = policy.update(state, device.read())
        device.hold(NEED[state.level])
        levels.append(state.level)
        fits.append(state.fits)
    return levels, fits


def test_policy_never_serves_a_level_the_headroom_cannot_hold():
    """Random pressure: whenever the decision says it fits, the level's bytes plus the others'
    are within the limit (checked against the trace itself), and when it does not fit, no level
    would have."""
    rng = np.random.default_rng(3)
    trace = rng.integers(0, 2100, size=400)
    levels, fits = _serve(trace, margin=0.05)
    for others, level, fit in zip(trace, levels, fits, strict=True):
        if fit:
            assert NEED[level] <= 0.95 * (LIMIT - others)
        else:
            assert level == len(NEED) - 1 and NEED[-1] > 0.95 * (LIMIT - others)


def test_policy_steps_down_at_once_and_up_one_rung_per_patience_readings():
    # Pressure leaves room for level 2 only (400 <= 2000 - 1500), then goes away.
    trace = [0] * 3 + [1500] * 4 + [0] * 20
    levels, _ = _serve(trace, patience=3)
    assert levels[:3] == [0, 0, 0]
    assert levels[3] == 2  # straight down to the first level that fits
    # Back up: 3 calm readings per rung, 2 rungs.
    assert levels[7:13] == [2, 2, 1, 1, 1, 0]
    assert set(levels[13:]) == {0}


def test_patience_stops_oscillation_on_a_noisy_threshold():
    """Others hover around the level-0 threshold: without patience the level flips often, with
    it far less, and never into a level that does not fit (the previous test's invariant)."""
    rng = np.random.default_rng(4)
    trace = 1000 + rng.integers(-60, 60, size=300)
    changes = lambda levels: int(np.sum(np.diff(levels) != 0))
    eager, _ = _serve(trace, patience=1)
    calm, _ = _serve(trace, patience=5)
    assert changes(calm) < changes(eager) / 2


def test_bad_policy_arguments_are_refused_in_one_line():
    with pytest.raises(ValueError, match="margin must be in"):
        memory.memory_policy(NEED, margin=1.0)
    with pytest.raises(ValueError, match="patience must be a positive int"):
        memory.memory_policy(NEED, patience=0)
    with pytest.raises(ValueError, match="at least one level"):
        memory.memory_policy([])
    with pytest.raises(ValueError, match="non-empty trace"):
        memory.SimulatedMemory(100, [])


def test_a_moe_served_down_the_ladder_under_pressure():
    """A tiny MoE priced by XLA per level: more chunks and a smaller top-k need fewer bytes;
    chunked serving gives the unchunked outputs; under a pressure trace the served level's
    bytes plus the others' stay within the limit."""
    config = moe.MoEConfig(vocab_size=32, d_model=16, num_experts=4, d_ff=32, top_k=2, max_len=16)
    _, params = moe.init_moe(config, seed=0)
    tokens = np.random.default_rng(5).integers(0, 32, size=(8, 16))
    ladder = memory.serving_ladder(2, chunks=(1, 2, 4))
    applies = {}
    for level in ladder:
        key = (level.capacity_factor, level.top_k)
        if key not in applies:
            apply = moe.init_moe(memory.level_config(config, level)).apply
            applies[key] = jax.jit(lambda p, x, apply=apply: apply(p, x).logits)
    logits_of = lambda level: applies[(level.capacity_factor, level.top_k)]
    need = [
        memory.peak_bytes(logits_of(lv), params, jnp.asarray(tokens[: 8 // lv.chunks]))
        for lv in ladder
    ]
    for k in (0, 3):  # within one top-k, more chunks need less
        assert need[k] > need[k + 1] > need[k + 2]
    full = np.asarray(logits_of(ladder[0])(params, tokens))
    np.testing.assert_allclose(
        memory.serve_chunked(logits_of(ladder[2]), params, tokens, 4), full, rtol=1e-5, atol=1e-5
    )
    top1 = memory.serve_chunked(logits_of(ladder[3]), params, tokens, 1)
    assert np.abs(top1 - full).max() > 1e-3  # top-1 routing is another function

    limit = need[0] + 10_000
    trace = [0, 0, limit - need[2] - 1, limit - need[5] - 1] + [0] * 12
    policy = memory.memory_policy(need, margin=0.0, patience=2)
    device = memory.SimulatedMemory(limit, trace)
    state = policy.init()
    served = []
    for others in trace:
        state = policy.update(state, device.read())
        device.hold(need[state.level])
        served.append(state.level)
        assert state.fits and need[state.level] + others <= limit
    assert served[2] == 2 and served[3] == 5 and served[-1] == 0
    with pytest.raises(ValueError, match="does not split into 3 chunks"):
        memory.serve_chunked(logits_of(ladder[0]), params, tokens, 3)
