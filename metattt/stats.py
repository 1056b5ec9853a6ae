"""Confidence intervals for reported numbers: Student-t for means, percentile bootstrap otherwise.

Every figure a results table reports over seeds, tasks or clips comes with an interval from
here. :func:`mean_ci` is the t-interval of a mean (exact for normal data, good for a handful of
seeds); :func:`bootstrap_ci` covers any statistic, including ones of paired arrays such as a
rank correlation, by resampling indices jointly; :func:`format_ci` prints ``0.512 ± 0.034``.
:func:`seed_summary` is the one rule by which a results file reports a quantity over seeds, and
:func:`spearman_ci` a rank correlation with its bootstrap interval.

Example:
    >>> m = mean_ci([0.51, 0.49, 0.55, 0.52, 0.50])
    >>> format_ci(m)
    '0.514 ± 0.029'
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "BootstrapCI",
    "MeanCI",
    "bootstrap_ci",
    "format_ci",
    "mean_ci",
    "seed_summary",
    "spearman",
    "spearman_ci",
]


class MeanCI(NamedTuple):
    """A mean with its two-sided confidence interval ``[low, high] = mean ± half_width``."""

    mean: float
    low: float
    high: float
    half_width: float
    n: int


class BootstrapCI(NamedTuple):
    """A statistic's value on the data with a percentile-bootstrap interval ``[low, high]``."""

    estimate: float
    low: float
    high: float


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def mean_ci(values: Any, confidence: float = 0.95) -> MeanCI:
    """The mean of ``values`` with a Student-t confidence interval.

    ``half_width = t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)``, with ``s`` the sample
    standard deviation (``ddof=1``). The interval assumes independent, roughly normal values.

    Note:
      With a single value the spread is unknown: ``half_width``, ``low`` and ``high`` are NaN
      (and :func:`format_ci` prints ``± nan``), rather than a misleading zero. So they are
      when a value is infinite or NaN (e.g. a diverged run's loss): the mean is then inf or
      NaN as NumPy gives it, and no spread is computed (nor warned about).

    Args:
      values: the observations, any array-like (flattened).
      confidence: the coverage probability, in (0, 1).

    Returns:
      ``MeanCI(mean, low, high, half_width, n)`` as Python floats and int.

    Raises:
      ValueError: no values, or ``confidence`` outside (0, 1).
    """
    _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        raise ValueError("mean_ci needs at least one value, got none")
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, said in the docstring
        mean = float(np.mean(x))
    if n == 1 or not np.all(np.isfinite(x)):
        half = math.nan
    else:
        sem = float(np.std(x, ddof=1)) / math.sqrt(n)
        import scipy.stats  # here: importing it costs ~0.4 s of every `import metattt`

        half = float(scipy.stats.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * sem
    return MeanCI(mean=mean, low=mean - half, high=mean + half, half_width=half, n=n)


def bootstrap_ci(
    data: Any,
    statistic: Callable[..., Any] = np.mean,
    *,
    confidence: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
) -> BootstrapCI:
    """A statistic with a percentile-bootstrap confidence interval.

    Each resample draws ``n`` indices with replacement and evaluates the statistic on the
    rows at those indices; the interval is the ``(1 -/+ confidence) / 2`` quantiles of the
    resampled statistics. A resample whose statistic is NaN (e.g. a correlation of a constant
    resample) makes the bounds NaN rather than being silently dropped.

    Args:
      data: one array (resampled along axis 0), or a *tuple* of arrays of equal length,
        resampled jointly by the same indices so that pairs stay together; the statistic then
        gets one argument per array (``statistic(x, y)``).
      statistic: maps the (resampled) data to a scalar; default the mean.
      confidence: the coverage probability, in (0, 1).
      num_resamples: the number of bootstrap resamples.
      seed: the seed of the resampling generator (``numpy.random.default_rng``).

    Returns:
      ``BootstrapCI(estimate, low, high)``; ``estimate`` is the statistic on ``data`` itself.

    Raises:
      ValueError: empty data, tuple members of different lengths, a bad ``confidence`` or
        ``num_resamples``.
    """
    _check_confidence(confidence)
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    arrays = tuple(np.asarray(a) for a in data) if isinstance(data, tuple) else (np.asarray(data),)
    if not arrays or any(a.ndim == 0 for a in arrays):
        raise ValueError("bootstrap_ci needs arrays with a leading sample axis")
    lengths = {a.shape[0] for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"the arrays of a data tuple must have equal lengths, got {lengths}")
    n = lengths.pop()
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one sample, got none")

    estimate = float(statistic(*arrays))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(num_resamples, n))
    stats = np.array([float(statistic(*(a[i] for a in arrays))) for i in idx])
    low, high = np.quantile(stats, [0.5 - confidence / 2.0, 0.5 + confidence / 2.0])
    return BootstrapCI(estimate=estimate, low=float(low), high=float(high))


def format_ci(m: MeanCI, digits: int = 3) -> str:
    """Formats a mean and half-width as ``"0.512 ± 0.034"`` with ``digits`` decimals."""
    return f"{m.mean:.{digits}f} ± {m.half_width:.{digits}f}"


def seed_summary(values: Any, confidence: float = 0.95) -> dict[str, Any]:
    """The one record a results file keeps of a quantity measured once per seed.

    Returns:
      ``{"mean": float, "ci": float, "per_seed": [float, ...]}``: the mean, the half-width of
      its Student-t interval (:func:`mean_ci`; NaN for a single seed, whose spread is unknown),
      and the values in seed order.

    Raises:
      ValueError: no values.
    """
    per_seed = [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]
    m = mean_ci(per_seed, confidence)
    return {"mean": m.mean, "ci": m.half_width, "per_seed": per_seed}


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation of paired samples (NaN when either side is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    import scipy.stats

    return float(scipy.stats.spearmanr(x, y).statistic)


def spearman_ci(
    x: Any, y: Any, *, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> BootstrapCI:
    """Spearman's ρ of paired samples with a percentile-bootstrap interval (pairs kept).

    Raises:
        ValueError: the samples differ in length or hold fewer than 3 pairs.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 3:
        raise ValueError(f"x and y must be 1-D of the same length >= 3, got {x.shape}, {y.shape}")
    return bootstrap_ci(
        (x, y), spearman, num_resamples=num_resamples, confidence=confidence, seed=seed
    )
