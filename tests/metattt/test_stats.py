"""metattt.stats: t-intervals by hand and by coverage, bootstrap, Spearman, seed summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from metattt import stats


def test_mean_ci_matches_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=11)
    for confidence in (0.9, 0.95, 0.99):
        m = stats.mean_ci(x, confidence)
        half = scipy.stats.t.ppf(1 - (1 - confidence) / 2, len(x) - 1) * x.std(ddof=1)
        half /= math.sqrt(len(x))
        assert m.n == 11
        np.testing.assert_allclose(m.mean, x.mean(), rtol=1e-12)
        np.testing.assert_allclose(m.half_width, half, rtol=1e-12)
        np.testing.assert_allclose([m.low, m.high], [x.mean() - half, x.mean() + half], rtol=1e-12)
    # Any array-like is accepted, and a lower confidence gives a narrower interval.
    assert stats.mean_ci(list(x), 0.8).half_width < stats.mean_ci(x, 0.95).half_width


def test_mean_ci_small_n():
    m = stats.mean_ci([0.7])
    assert m.mean == 0.7 and m.n == 1
    assert math.isnan(m.half_width) and math.isnan(m.low) and math.isnan(m.high)
    with pytest.raises(ValueError, match="at least one"):
        stats.mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        stats.mean_ci([1.0, 2.0], confidence=1.5)


@pytest.mark.filterwarnings("error")  # NumPy's "invalid value" warnings fail the test
def test_mean_ci_of_a_diverged_value_is_inf_or_nan_without_a_spread():
    for values, mean in (([1.0, np.inf, 2.0], np.inf), ([np.inf, -np.inf, 0.5], np.nan)):
        m = stats.mean_ci(values)
        np.testing.assert_equal(m.mean, mean)
        assert m.n == 3 and math.isnan(m.half_width) and math.isnan(m.low)
    assert math.isnan(stats.mean_ci([1.0, np.nan]).half_width)


def test_t_interval_coverage():
    rng = np.random.default_rng(1)
    mu = 1.7
    samples = rng.normal(mu, 2.5, size=(2000, 5))
    covered = [(m := stats.mean_ci(s)).low <= mu <= m.high for s in samples]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_format_ci():
    m = stats.MeanCI(mean=0.51234, low=0.478, high=0.546, half_width=0.03412, n=5)
    assert stats.format_ci(m) == "0.512 ± 0.034"
    assert stats.format_ci(m, digits=1) == "0.5 ± 0.0"


def test_bootstrap_contains_true_mean():
    rng = np.random.default_rng(2)
    mu = 0.37
    x = rng.exponential(mu, size=4000)
    est, low, high = stats.bootstrap_ci(x, num_resamples=500, seed=3)
    assert low < est < high
    assert low <= mu <= high
    np.testing.assert_allclose(est, x.mean())
    # Same seed, same interval; another statistic works too.
    assert stats.bootstrap_ci(x, num_resamples=500, seed=3) == (est, low, high)
    med = stats.bootstrap_ci(x, np.median, num_resamples=200)
    assert med.low < med.estimate < med.high


def test_bootstrap_tuple_resamples_pairs_jointly():
    rng = np.random.default_rng(4)
    x = rng.normal(size=300)
    y = 2.0 * x + 0.5 * rng.normal(size=300)

    def paired_only(a, b):
        # Every resampled pair must be one of the original pairs: b - 2a is the original noise.
        noise = b - 2.0 * a
        assert np.isin(noise, y - 2.0 * x).all()
        return scipy.stats.spearmanr(a, b).statistic

    est, low, high = stats.bootstrap_ci((x, y), paired_only, num_resamples=200, seed=0)
    assert 0.8 < low <= est <= high < 1.0

    # A shuffled pairing has a correlation near 0: resampling jointly is what kept it high.
    shuffled = stats.bootstrap_ci((x, rng.permutation(y)), lambda a, b: np.corrcoef(a, b)[0, 1])
    assert shuffled.low < 0.0 < shuffled.high

    with pytest.raises(ValueError, match="equal lengths"):
        stats.bootstrap_ci((x, y[:-1]), paired_only)
    with pytest.raises(ValueError, match="at least one"):
        stats.bootstrap_ci(np.array([]))


def brute_force_spearman(x, y):
    """Pearson correlation of average ranks, with the ranks counted in a Python loop."""

    def ranks(v):
        out = []
        for a in v:
            below = sum(1 for b in v if b < a)
            ties = sum(1 for b in v if b == a)
            out.append(below + (ties + 1) / 2)  # 1-based average rank of a tie group
        return np.asarray(out)

    rx, ry = ranks(list(x)), ranks(list(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float(np.sum(rx * ry) / np.sqrt(np.sum(rx**2) * np.sum(ry**2)))


def test_spearman_matches_brute_force_ranks():
    rng = np.random.default_rng(0)
    for n in (5, 17, 60):
        k = rng.integers(0, 4, n)  # many ties, as a step count has
        difficulty = k + rng.integers(0, 3, n) + rng.normal(0, 0.01, n).round(1)
        assert stats.spearman(k, difficulty) == pytest.approx(
            brute_force_spearman(k, difficulty), abs=1e-12
        )
    assert np.isnan(stats.spearman(np.ones(6), np.arange(6)))  # constant K: undefined


def test_spearman_bootstrap_ci_matches_a_resampling_loop():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 40).astype(float)
    y = x + rng.normal(0, 2.0, 40)
    ci = stats.spearman_ci(x, y, num_resamples=200, seed=3)
    idx = np.random.default_rng(3).integers(0, 40, (200, 40))
    boot = []
    for i in idx:
        xi, yi = x[i], y[i]
        boot.append(np.nan if np.ptp(xi) == 0 or np.ptp(yi) == 0 else brute_force_spearman(xi, yi))
    low, high = np.quantile(boot, [0.025, 0.975])
    assert ci.estimate == pytest.approx(brute_force_spearman(x, y), abs=1e-12)
    assert ci.low == pytest.approx(low, abs=1e-12) and ci.high == pytest.approx(high, abs=1e-12)
    assert ci.low < ci.estimate < ci.high
    with pytest.raises(ValueError, match="same length"):
        stats.spearman_ci(x, y[:-1])


def test_seed_summary_is_the_t_interval_and_nan_for_one_seed():
    values = [0.51, 0.47, 0.58]
    summary = stats.seed_summary(values)
    half = scipy.stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert summary["per_seed"] == values and summary["mean"] == pytest.approx(np.mean(values))
    assert summary["ci"] == pytest.approx(half, rel=1e-12)
    assert math.isnan(stats.seed_summary([0.3])["ci"])  # one seed: spread unknown, not 0
    with pytest.raises(ValueError, match="at least one value"):
        stats.seed_summary([])
