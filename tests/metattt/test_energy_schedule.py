"""When to adapt (metattt.energy.schedule): signals against NumPy, schedules against hand-worked
sequences."""

import numpy as np
import pytest

from metattt.energy import schedule


def _run(sched, signals):
    state, out = sched.init(), []
    for s in signals:
        state, adapt = sched.update(state, s)
        out.append(adapt)
    return out


def test_prediction_entropy_and_router_margin_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.mean(-np.sum(p * np.log(p), -1))
    np.testing.assert_allclose(schedule.prediction_entropy(logits), expected, rtol=1e-5)
    probs = rng.dirichlet(np.ones(6), size=(2, 4, 9)).astype(np.float32)
    top = np.sort(probs, -1)
    np.testing.assert_allclose(
        schedule.router_margin(probs), np.mean(top[..., -1] - top[..., -2]), rtol=1e-5
    )
    with pytest.raises(ValueError, match="at least 2 experts"):
        schedule.router_margin(probs[..., :1])


def test_calibrated_threshold_lets_the_chosen_share_of_in_distribution_batches_through():
    signals = np.random.default_rng(1).gamma(2.0, size=2000)
    t = schedule.calibrate_threshold(signals, 0.9)
    assert np.mean(signals > t) == pytest.approx(0.1, abs=0.002)
    margin = np.random.default_rng(2).uniform(size=2000)  # low margin = hard
    t = schedule.calibrate_threshold(margin, 0.9, higher_is_harder=False)
    assert np.mean(margin < t) == pytest.approx(0.1, abs=0.002)
    assert schedule.calibrate_threshold([1.0, np.nan, 3.0], 0.5) == 2.0
    with pytest.raises(ValueError, match="quantile must be in"):
        schedule.calibrate_threshold(signals, 1.0)
    with pytest.raises(ValueError, match="at least one finite signal"):
        schedule.calibrate_threshold([np.nan], 0.5)


def test_periodic_adapts_like_serve_streams_adapt_every():
    assert _run(schedule.periodic(3), np.zeros(8)) == [t % 3 == 0 for t in range(8)]
    with pytest.raises(ValueError, match="every must be a positive int"):
        schedule.periodic(0)


def test_on_difficulty_adapts_exactly_on_hard_batches_and_never_on_nan():
    signals = [0.1, 2.0, 0.5, 3.0, np.nan, 1.5]
    assert _run(schedule.on_difficulty(1.0), signals) == [False, True, False, True, False, True]
    low_is_hard = schedule.on_difficulty(0.2, higher_is_harder=False)
    assert _run(low_is_hard, [0.5, 0.1, 0.3, 0.05]) == [False, True, False, True]


def test_adaptive_period_halves_on_hard_batches_and_doubles_on_easy_ones():
    sched = schedule.adaptive_period(1.0, min_every=1, max_every=8)
    # Easy start: period 8, adapt once every 8 batches.
    easy = _run(sched, [0.0] * 16)
    assert easy == [(t + 1) % 8 == 0 for t in range(16)]
    # Hard from batch 2 on: the period falls 8 -> 4 -> 2 -> 1, then every batch adapts.
    signals = [0.0, 0.0] + [5.0] * 8
    got = _run(sched, signals)
    # batch: since/every -> 0:1/8, 1:2/8, 2:3/4, 3:4/2 adapt, 4:1/1 adapt, then every batch
    assert got == [False, False, False, True, True, True, True, True, True, True]
    with pytest.raises(ValueError, match="min_every <= start_every <= max_every"):
        schedule.adaptive_period(1.0, min_every=4, max_every=2)
