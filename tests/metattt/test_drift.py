"""Drift detectors: exact agreement with plain-Python references, and their statistical targets.

The targets (issue 6): alarm within 50 steps of a one-standard-deviation mean shift (median and
95th percentile of the delay over 200 simulated streams, shifts up and down) and at most one
false alarm per 10,000 stationary steps (20 streams x 10,000 N(0, 1) steps after the warm-up).
Measured with the default thresholds and these seeds (printed by the tests with ``-s``):

============  ==================  ======================  ================================
detector      false alarms / 2e5  delay median / 95th pc  settings (the defaults)
============  ==================  ======================  ================================
page_hinkley  7 (0.35 / 10k)      19 / 40                 warmup 300, delta 0.5, lambda 11
ema_zscore    4 (0.20 / 10k)      19 / 39                 warmup 300, beta 0.05, z 3.5, m 3
============  ==================  ======================  ================================

Over 1e7 stationary steps (50 groups of 20 streams) the rates were 0.14 and 0.22 per 10k, with
at most 7 and 9 false alarms in any group of 20 streams; over 10 x 200 shifted streams the
95th percentile of the delay stayed at or below 43 and 41 steps.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metattt import drift as D

WARMUP = 300
DETECTORS = {"page_hinkley": D.page_hinkley, "ema_zscore": D.ema_zscore}


def ph_reference(xs, warmup, delta, threshold):
    """Two-sided Page-Hinkley with the min-tracking form m_t - min m, in float64."""
    seen, alarms, stats = [], [], []
    m_up = m_down = 0.0
    min_up = min_down = 0.0
    for x in xs:
        if not math.isfinite(x):
            alarms.append(False)
            stats.append(0.0)
            continue
        if len(seen) < warmup:
            seen.append(x)
            alarms.append(False)
            stats.append(0.0)
            continue
        mu, sd = float(np.mean(seen)), float(np.std(seen, ddof=1))
        z = (x - mu) / sd
        m_up += z - delta
        m_down += -z - delta
        min_up, min_down = min(min_up, m_up), min(min_down, m_down)
        stat = max(m_up - min_up, m_down - min_down)
        alarm = stat > threshold
        if alarm:
            m_up = m_down = min_up = min_down = 0.0
        alarms.append(alarm)
        stats.append(stat)
    return np.array(alarms), np.array(stats)


def ema_reference(xs, warmup, rate, beta, threshold, consecutive):
    """EMA z-score detector written as a plain loop in float64."""
    n = 0
    mean = var = fast = 0.0
    run = 0
    alarms, stats = [], []
    for x in xs:
        if not math.isfinite(x):
            alarms.append(False)
            stats.append(0.0)
            continue
        ready = n >= warmup
        fast = x if n == 0 else (1 - beta) * fast + beta * x
        sd = math.sqrt(var) * math.sqrt(beta / (2 - beta))
        z = (fast - mean) / sd if n > 0 and sd > 0 else 0.0
        run = run + 1 if ready and abs(z) > threshold else 0
        alarm = run >= consecutive
        n += 1
        w = rate if ready else 1.0 / n
        diff = x - mean
        mean += w * diff
        var = (1 - w) * (var + w * diff * diff)
        if alarm:
            run, fast = 0, mean
        alarms.append(alarm)
        stats.append(abs(z) if ready else 0.0)
    return np.array(alarms), np.array(stats)


def shifted_stream(key, length, shift_at, shift):
    x = np.asarray(jax.random.normal(key, (length,)), np.float64)
    x[shift_at:] += shift
    return x


def test_page_hinkley_matches_reference():
    xs = shifted_stream(jax.random.key(0), 700, 400, 0.8)
    xs[250] = np.nan  # ignored by both
    kw = dict(warmup=50, delta=0.3, threshold=6.0)
    out = jax.jit(lambda s: D.run_detector(D.page_hinkley(**kw), s))(xs)
    alarms, stats = ph_reference(xs.tolist(), **kw)
    assert alarms.sum() >= 2  # the comparison covers alarms and resets
    np.testing.assert_array_equal(np.asarray(out.alarm), alarms)
    np.testing.assert_allclose(np.asarray(out.statistic), stats, rtol=1e-4, atol=1e-4)


def test_ema_zscore_matches_reference():
    xs = shifted_stream(jax.random.key(1), 700, 400, 1.0)
    xs[100] = np.inf
    kw = dict(warmup=50, baseline_rate=0.002, smoothing=0.1, threshold=3.0, consecutive=3)
    out = jax.jit(lambda s: D.run_detector(D.ema_zscore(**kw), s))(xs)
    alarms, stats = ema_reference(
        xs.tolist(), kw["warmup"], kw["baseline_rate"], kw["smoothing"], 3.0, 3
    )
    assert alarms.sum() >= 2
    np.testing.assert_array_equal(np.asarray(out.alarm), alarms)
    np.testing.assert_allclose(np.asarray(out.statistic), stats, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_no_alarm_during_warmup_and_nonfinite_samples_are_skipped(name):
    det = DETECTORS[name](warmup=20)
    wild = jnp.concatenate([jnp.linspace(0.0, 50.0, 20), jnp.zeros(5)])
    assert not bool(D.run_detector(det, wild).alarm[:20].any())
    clean = jax.random.normal(jax.random.key(2), (120,)) + (jnp.arange(120) > 60) * 3.0
    holes = clean.at[jnp.array([5, 30, 70, 71])].set(
        jnp.array([jnp.nan, jnp.inf, -jnp.inf, jnp.nan])
    )
    keep = np.isfinite(np.asarray(holes))
    full = D.run_detector(det, holes)
    ref = D.run_detector(det, jnp.asarray(np.asarray(holes)[keep]))
    np.testing.assert_array_equal(np.asarray(full.alarm)[keep], np.asarray(ref.alarm))
    np.testing.assert_array_equal(np.asarray(full.statistic)[keep], np.asarray(ref.statistic))
    assert not np.asarray(full.alarm)[~keep].any()
    assert bool(ref.alarm.any())


def _alarms(det, x):
    return jax.jit(jax.vmap(lambda s: D.run_detector(det, s).alarm))(x)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detects_one_sigma_shift_within_50_steps(name):
    n, pre, post = 200, 100, 300
    length = WARMUP + pre + post
    x = jax.random.normal(jax.random.key(10), (n, length))
    sign = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    x = x + sign * (jnp.arange(length) >= WARMUP + pre)
    alarms = np.asarray(_alarms(DETECTORS[name](), x))[:, WARMUP + pre :]
    delay = np.where(alarms.any(axis=1), alarms.argmax(axis=1), np.iinfo(np.int32).max)
    median, p95 = float(np.median(delay)), float(np.percentile(delay, 95))
    print(f"{name}: one-sigma shift detection delay median {median}, 95th percentile {p95}")
    assert median <= 50 and p95 <= 50, (median, p95)
    # Both directions are detected.
    assert np.median(delay[0::2]) <= 50 and np.median(delay[1::2]) <= 50


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_at_most_one_false_alarm_per_10k_stationary_steps(name):
    streams, steps = 20, 10_000
    x = jax.random.normal(jax.random.key(20), (streams, WARMUP + steps))
    total = int(_alarms(DETECTORS[name](), x).sum())
    rate = total / (streams * steps) * 10_000
    print(
        f"{name}: {total} false alarms in {streams * steps} stationary steps ({rate:.2f} per 10k)"
    )
    assert total <= streams * steps // 10_000, total


def _scan_monitor(monitor, signal):
    def body(state, x):
        state, flags = monitor.update(state, x)
        return state, (flags, state.detector.mean)

    _, (flags, means) = jax.lax.scan(body, monitor.init(), signal)
    return flags, means


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_stream_monitor_alarms_at_drift_and_recovers_after_it(name):
    n, pre, mid, post = 100, 100, 200, 300
    start, end = WARMUP + pre, WARMUP + pre + mid
    length = end + post
    x = jax.random.normal(jax.random.key(30), (n, length))
    t = jnp.arange(length)
    sign = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    x = x + sign * ((t >= start) & (t < end))
    monitor = D.stream_monitor(DETECTORS[name](), D.recovery_rule())
    flags, means = jax.jit(jax.vmap(lambda s: _scan_monitor(monitor, s)))(x)
    alarm, recovered, drifted = (np.asarray(f) for f in flags[:3])
    means = np.asarray(means)
    # The same flags as the public runner.
    np.testing.assert_array_equal(np.asarray(D.run_stream(monitor, x[0]).alarm), alarm[0])
    first_alarm = np.where(alarm[:, start:].any(1), alarm[:, start:].argmax(1), 10**6)
    first_recovery = np.where(recovered[:, end:].any(1), recovered[:, end:].argmax(1), 10**6)
    assert np.percentile(first_alarm, 95) <= 50
    assert np.percentile(first_recovery, 95) <= 100
    # No recovery is declared while the drift lasts, and none without an alarm before it.
    assert not recovered[:, start:end].any()
    assert (np.cumsum(alarm, 1) >= np.cumsum(recovered, 1)).all()
    # Drifted from the alarm to the recovery; the detector is frozen meanwhile.
    for i in range(n):
        a, r = start + first_alarm[i], end + first_recovery[i]
        if first_alarm[i] < mid and first_recovery[i] < post:
            assert drifted[i, a:r].all() and not drifted[i, r]
            assert np.all(means[i, a:r] == means[i, a])


def test_recovery_rule_counts_consecutive_steps_in_the_band():
    rule = D.recovery_rule(k=1.0, patience=3, smoothing=1.0)
    xs = [0.5, 0.2, 2.0, 0.1, -0.9, 0.3, 0.0, 5.0]
    expected = [False, False, False, False, False, True, True, False]
    state, got = rule.init(), []
    for x in xs:
        state, rec = rule.update(state, jnp.float32(x), jnp.float32(0.0), jnp.float32(1.0))
        got.append(bool(rec))
    assert got == expected
    assert int(rule.reset(state).run) == 0


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="warmup"):
        D.page_hinkley(warmup=1)
    with pytest.raises(ValueError, match="delta"):
        D.page_hinkley(delta=-0.1)
    with pytest.raises(ValueError, match="threshold"):
        D.page_hinkley(threshold=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        D.ema_zscore(smoothing=0.0)
    with pytest.raises(ValueError, match="baseline_rate"):
        D.ema_zscore(baseline_rate=1.5)
    with pytest.raises(ValueError, match="consecutive"):
        D.ema_zscore(consecutive=0)
    with pytest.raises(ValueError, match="patience"):
        D.recovery_rule(patience=0)
    with pytest.raises(ValueError, match="k must"):
        D.recovery_rule(k=-1.0)
    with pytest.raises(ValueError, match="signals"):
        D.run_stream(D.stream_monitor(D.page_hinkley(), D.recovery_rule()), jnp.zeros((3, 4)))
