"""Drift detectors on a scalar stream signal, a recovery rule, and the stream state machine.

Each detector is a factory returning a :class:`DriftDetector` of pure functions, in the style
of an optax ``GradientTransformation``: ``init() -> state``, ``update(state, x) -> (state,
DetectorOutput)`` and ``baseline(state) -> (mean, std)``. States are ``NamedTuple`` pytrees of
scalars, so a detector runs under ``jit``, inside ``lax.scan`` and under ``vmap`` over streams.
The signal ``x`` is one scalar per step -- a stream's prediction entropy, its internal
(self-supervised) loss, or any other unsupervised statistic.

Both detectors learn the signal's *baseline* (mean and standard deviation) from the first
``warmup`` finite samples, never alarm before that, and measure everything after it in units
of the baseline standard deviation, so their thresholds are scale-free. After an alarm a
detector resets its accumulators (not its baseline), so alarms are separate events and a false
alarm rate is "alarms per step". A non-finite sample is ignored: the state does not change and
no alarm is raised.

Detectors
---------
:func:`page_hinkley` -- the two-sided Page-Hinkley test (Page, 1954; Hinkley, 1971) on the
standardised signal z_t = (x_t - mu_0) / sigma_0, with (mu_0, sigma_0) frozen at the end of the
warm-up. With m_t = sum_{i<=t} (z_i - delta) and M_t = min_{i<=t} m_i, the upward statistic
m_t - M_t obeys the recursion U_t = max(0, U_{t-1} + z_t - delta) (this is also Page's CUSUM);
the downward one is D_t = max(0, D_{t-1} - z_t - delta). Alarm when max(U_t, D_t) > lambda.
For a shift of one standard deviation, delta = 1/2 is the optimal drift allowance.

:func:`ema_zscore` -- exponential moving averages: the baseline mean and variance follow a slow
EMA (rate ``baseline_rate``; during the warm-up the rate is 1/t, i.e. exact running moments),
the signal is smoothed by a fast EMA s_t = (1 - beta) s_{t-1} + beta x_t, and

    z_t = (s_t - mu_{t-1}) / (sigma_{t-1} sqrt(beta / (2 - beta)))

is s_t's deviation in units of its own stationary standard deviation (an EMA of i.i.d. noise
of variance sigma^2 has variance sigma^2 beta / (2 - beta)). Alarm when ``|z_t|`` > ``threshold``
for ``consecutive`` steps in a row. ``smoothing=1`` gives the raw z-score of x_t, which does
poorly on a one-sigma shift because one step carries little evidence about it: by the
run-length formula, ``|z|`` > 0.5 for 9 steps in a row gives about 0.35 false alarms per 10,000
steps but a mean delay near 90 steps. Smoothing accumulates the evidence.

Defaults and what they achieve
------------------------------
The defaults were chosen by simulation (``tests/metattt/test_drift.py`` repeats it with fixed
seeds) for the two targets of the dynamic-adapter protocol: alarm within 50 steps of a
one-standard-deviation mean shift, and at most one false alarm per 10,000 stationary steps,
on i.i.d. Gaussian signals.

* Page-Hinkley: ``warmup=300, delta=0.5, threshold=11``. With a known baseline its average
  run length without change is about 1.9e5 steps (Siegmund's approximation, two-sided); the
  baseline estimated from 300 samples lowers it (measured: 0.14 false alarms per 10,000
  steps over 1e7 simulated steps; 0.22 with a 200-sample warm-up, and the count per stream
  is over-dispersed, because a stream with an unlucky baseline alarms repeatedly). A
  one-sigma shift is detected after about 20 steps (median; 95th percentile about 40).
* EMA z-score: ``warmup=300, baseline_rate=0.002, smoothing=0.05, threshold=3.5,
  consecutive=3`` (measured: 0.22 false alarms per 10,000 steps over 1e7 steps; delay
  median 20, 95th percentile about 40). A larger ``smoothing`` reacts faster but needs a
  higher threshold, and a slower ``baseline_rate`` keeps the warm-up's estimation error
  longer (more false alarms, not fewer).

The tests re-measure these numbers on fixed seeds. A correlated signal (an entropy averaged
over overlapping windows, say) raises the false-alarm rate at the same thresholds; re-tune
``threshold`` on a clean stretch of the real signal.

Recovery and the stream state machine
-------------------------------------
:func:`recovery_rule` smooths the signal with its own fast EMA and counts the consecutive
steps on which the smoothed signal lies within ``k`` of its own stationary standard deviations
of the baseline mean; ``patience`` such steps in a row mean "recovered" (the trigger for
freeing an adapter). With the defaults (k = 2, patience = 20, beta = 0.1) recovery comes about
30 steps after a one-sigma drift ends (95th percentile about 60). Smoothing matters here too:
a raw signal under a persistent one-sigma shift lies within two sigma of the baseline 84% of
the time and would "recover" by chance.

:func:`stream_monitor` composes a detector and a recovery rule into a two-state machine,
*watching* -> (alarm) -> *drifted* -> (recovered) -> *watching*. While drifted the detector is
frozen, so its baseline stays the pre-drift one that recovery is measured against.
:func:`run_stream` scans it over a signal and returns per-step flags.

Example:
    >>> monitor = stream_monitor(page_hinkley(), recovery_rule())
    >>> flags = run_stream(monitor, entropies)          # entropies: (T,)
    >>> flags.alarm, flags.recovered, flags.drifted     # (T,) bool each
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "DetectorOutput",
    "DriftDetector",
    "EMAZScoreState",
    "MonitorState",
    "PageHinkleyState",
    "RecoveryRule",
    "RecoveryState",
    "StreamFlags",
    "StreamMonitor",
    "ema_zscore",
    "page_hinkley",
    "recovery_rule",
    "run_detector",
    "run_stream",
    "stream_monitor",
]

# The baseline standard deviation is floored at this fraction of (1 + |mean|), so a constant
# warm-up signal gives large but finite z-scores instead of a division by zero.
_STD_FLOOR = 1e-6


class DetectorOutput(NamedTuple):
    """What a detector reports for one step (scalars).

    Attributes:
        alarm: the statistic crossed its threshold on this step (bool).
        statistic: the detector's statistic before any reset (PH: max(U, D); EMA: ``|z|``);
            0 during the warm-up and on non-finite samples.
        ready: the warm-up is over, so this step was tested (bool).
    """

    alarm: jax.Array
    statistic: jax.Array
    ready: jax.Array


class DriftDetector(NamedTuple):
    """A detector as pure functions.

    Attributes:
        init: ``() -> state``.
        update: ``(state, x) -> (state, DetectorOutput)`` for one scalar sample ``x``.
        baseline: ``state -> (mean, std)``, the learned pre-drift level of the signal.
    """

    init: Callable[[], Any]
    update: Callable[[Any, jax.Array], tuple[Any, DetectorOutput]]
    baseline: Callable[[Any], tuple[jax.Array, jax.Array]]


class PageHinkleyState(NamedTuple):
    """State of :func:`page_hinkley`.

    Attributes:
        count: finite samples seen (int32).
        mean: baseline mean (running mean during the warm-up, then frozen).
        m2: sum of squared deviations from the running mean (Welford), frozen after warm-up.
        up: U_t, the upward cumulative statistic (in baseline standard deviations).
        down: D_t, the downward one.
    """

    count: jax.Array
    mean: jax.Array
    m2: jax.Array
    up: jax.Array
    down: jax.Array


class EMAZScoreState(NamedTuple):
    """State of :func:`ema_zscore`.

    Attributes:
        count: finite samples seen (int32).
        mean: baseline mean (EMA; exact running mean during the warm-up).
        var: baseline variance (EMA; running population variance during the warm-up).
        fast: s_t, the fast EMA of the signal.
        run: consecutive tested steps with ``|z|`` above the threshold (int32).
    """

    count: jax.Array
    mean: jax.Array
    var: jax.Array
    fast: jax.Array
    run: jax.Array


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_warmup(warmup: int) -> None:
    if not isinstance(warmup, int) or warmup < 2:
        raise ValueError(f"warmup must be an int >= 2 (a variance needs 2 samples), got {warmup!r}")


def _floor_std(mean: jax.Array, var: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.sqrt(jnp.maximum(var, 0.0)), _STD_FLOOR * (1.0 + jnp.abs(mean)))


def _keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def page_hinkley(
    *, warmup: int = 300, delta: float = 0.5, threshold: float = 11.0
) -> DriftDetector:
    """Two-sided Page-Hinkley test on the signal standardised by its warm-up baseline.

    U_t = max(0, U_{t-1} + z_t - delta), D_t = max(0, D_{t-1} - z_t - delta),
    alarm when max(U_t, D_t) > threshold (lambda), then U = D = 0.

    Args:
        warmup: samples used to estimate the baseline mean and standard deviation (frozen
            afterwards); no alarm before the sample after them.
        delta: drift allowance in baseline standard deviations (the magnitude of change
            tolerated); half the smallest shift worth detecting quickly.
        threshold: lambda, the alarm level in baseline standard deviations.

    Returns:
        A :class:`DriftDetector` whose state is a :class:`PageHinkleyState`.

    Raises:
        ValueError: ``warmup < 2``, negative ``delta`` or non-positive ``threshold``.
    """
    _check_warmup(warmup)
    if not (isinstance(delta, int | float) and math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be a non-negative finite number, got {delta!r}")
    _check_positive("threshold", threshold)

    def init() -> PageHinkleyState:
        zero = jnp.zeros((), jnp.float32)
        return PageHinkleyState(jnp.zeros((), jnp.int32), zero, zero, zero, zero)

    def baseline(state: PageHinkleyState) -> tuple[jax.Array, jax.Array]:
        n = jnp.maximum(jnp.minimum(state.count, warmup).astype(jnp.float32) - 1.0, 1.0)
        return state.mean, _floor_std(state.mean, state.m2 / n)

    def update(state: PageHinkleyState, x: jax.Array) -> tuple[PageHinkleyState, DetectorOutput]:
        x = jnp.asarray(x, jnp.float32)
        finite = jnp.isfinite(x)
        x_safe = jnp.where(finite, x, 0.0)
        ready = state.count >= warmup
        # Welford's running moments, only while warming up.
        count = state.count + 1
        diff = x_safe - state.mean
        mean_w = state.mean + diff / count.astype(jnp.float32)
        m2_w = state.m2 + diff * (x_safe - mean_w)
        mean = jnp.where(ready, state.mean, mean_w)
        m2 = jnp.where(ready, state.m2, m2_w)
        mu, sigma = baseline(state)
        z = (x_safe - mu) / sigma
        up = jnp.where(ready, jnp.maximum(0.0, state.up + z - delta), 0.0)
        down = jnp.where(ready, jnp.maximum(0.0, state.down - z - delta), 0.0)
        statistic = jnp.maximum(up, down)
        alarm = ready & (statistic > threshold) & finite
        up = jnp.where(alarm, 0.0, up)
        down = jnp.where(alarm, 0.0, down)
        new = PageHinkleyState(count, mean, m2, up, down)
        new = _keep_if_finite(finite, new, state)
        return new, DetectorOutput(alarm, jnp.where(finite, statistic, 0.0), ready & finite)

    return DriftDetector(init, update, baseline)


def ema_zscore(
    *,
    warmup: int = 300,
    baseline_rate: float = 0.002,
    smoothing: float = 0.05,
    threshold: float = 3.5,
    consecutive: int = 3,
) -> DriftDetector:
    """EMA z-score detector: alarm when the smoothed signal leaves its baseline band.

    mu_t, var_t: EMA of x_t and of its squared deviation (rate 1/t while t <= warmup, then
    ``baseline_rate``); s_t = (1 - beta) s_{t-1} + beta x_t;
    z_t = (s_t - mu_{t-1}) / (sigma_{t-1} sqrt(beta / (2 - beta)));
    alarm when ``|z|`` > ``threshold`` on ``consecutive`` tested steps in a row, then the run
    counter resets and s is set back to the baseline mean.

    Args:
        warmup: samples averaged exactly into the first baseline; no alarm before the next one.
        baseline_rate: EMA rate of the baseline after the warm-up (time constant 1/rate steps).
        smoothing: beta, the fast EMA rate of the tested signal (1: no smoothing).
        threshold: the ``|z|`` level.
        consecutive: m, the number of consecutive steps above the level that raise an alarm.

    Returns:
        A :class:`DriftDetector` whose state is an :class:`EMAZScoreState`.

    Raises:
        ValueError: a rate outside (0, 1], a non-positive threshold, ``consecutive < 1`` or
            ``warmup < 2``.
    """
    _check_warmup(warmup)
    for name, rate in (("baseline_rate", baseline_rate), ("smoothing", smoothing)):
        if not (isinstance(rate, int | float) and 0 < rate <= 1):
            raise ValueError(f"{name} must be in (0, 1], got {rate!r}")
    _check_positive("threshold", threshold)
    if not isinstance(consecutive, int) or consecutive < 1:
        raise ValueError(f"consecutive must be an int >= 1, got {consecutive!r}")
    noise_scale = math.sqrt(smoothing / (2.0 - smoothing))

    def init() -> EMAZScoreState:
        zero = jnp.zeros((), jnp.float32)
        izero = jnp.zeros((), jnp.int32)
        return EMAZScoreState(izero, zero, zero, zero, izero)

    def baseline(state: EMAZScoreState) -> tuple[jax.Array, jax.Array]:
        return state.mean, _floor_std(state.mean, state.var)

    def update(state: EMAZScoreState, x: jax.Array) -> tuple[EMAZScoreState, DetectorOutput]:
        x = jnp.asarray(x, jnp.float32)
        finite = jnp.isfinite(x)
        x_safe = jnp.where(finite, x, 0.0)
        ready = state.count >= warmup
        count = state.count + 1
        fast = jnp.where(
            state.count == 0, x_safe, (1.0 - smoothing) * state.fast + smoothing * x_safe
        )
        mu, sigma = baseline(state)
        z = (fast - mu) / (sigma * noise_scale)
        above = ready & (jnp.abs(z) > threshold)
        run = jnp.where(above, state.run + 1, 0)
        alarm = run >= consecutive
        # Baseline moments: exact running mean / population variance while warming up.
        rate = jnp.where(ready, baseline_rate, 1.0 / count.astype(jnp.float32))
        diff = x_safe - state.mean
        mean = state.mean + rate * diff
        var = (1.0 - rate) * (state.var + rate * diff * diff)
        run = jnp.where(alarm, 0, run)
        fast = jnp.where(alarm, mean, fast)
        new = EMAZScoreState(count, mean, var, fast, run)
        new = _keep_if_finite(finite, new, state)
        statistic = jnp.where(finite & ready, jnp.abs(z), 0.0)
        out = DetectorOutput(alarm & finite, statistic, ready & finite)
        return new, out

    return DriftDetector(init, update, baseline)


class RecoveryState(NamedTuple):
    """State of :func:`recovery_rule`: the smoothed signal, whether it has started, the run."""

    fast: jax.Array
    started: jax.Array
    run: jax.Array


class RecoveryRule(NamedTuple):
    """Recovery as pure functions.

    Attributes:
        init: ``() -> RecoveryState``.
        update: ``(state, x, mean, std) -> (state, recovered)``: ``recovered`` is True once
            the smoothed signal has stayed within the band around ``mean`` for ``patience``
            steps in a row (and stays True while it remains there).
        reset: ``state -> state`` with the run counter cleared (the smoother keeps going).
    """

    init: Callable[[], RecoveryState]
    update: Callable[..., tuple[RecoveryState, jax.Array]]
    reset: Callable[[RecoveryState], RecoveryState]


def recovery_rule(*, k: float = 2.0, patience: int = 20, smoothing: float = 0.1) -> RecoveryRule:
    """Signal back within ``k`` standard deviations of its baseline for ``patience`` steps.

    s_t = (1 - beta) s_{t-1} + beta x_t; "within" means ``|s_t - mean|`` <= k * std *
    sqrt(beta / (2 - beta)), the band s_t stays in about 95% of the time (k = 2) when the
    signal is back at its baseline. ``smoothing=1`` tests the raw signal.

    Args:
        k: half-width of the band in standard deviations of the smoothed signal.
        patience: consecutive steps inside the band that declare recovery.
        smoothing: beta, the fast EMA rate.

    Returns:
        A :class:`RecoveryRule`.

    Raises:
        ValueError: non-positive ``k``, ``patience < 1`` or ``smoothing`` outside (0, 1].
    """
    _check_positive("k", k)
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an int >= 1, got {patience!r}")
    if not (isinstance(smoothing, int | float) and 0 < smoothing <= 1):
        raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
    band = k * math.sqrt(smoothing / (2.0 - smoothing))

    def init() -> RecoveryState:
        return RecoveryState(
            jnp.zeros((), jnp.float32), jnp.zeros((), jnp.bool_), jnp.zeros((), jnp.int32)
        )

    def update(
        state: RecoveryState, x: jax.Array, mean: jax.Array, std: jax.Array
    ) -> tuple[RecoveryState, jax.Array]:
        x = jnp.asarray(x, jnp.float32)
        finite = jnp.isfinite(x)
        x_safe = jnp.where(finite, x, 0.0)
        fast = jnp.where(state.started, (1.0 - smoothing) * state.fast + smoothing * x_safe, x_safe)
        within = jnp.abs(fast - mean) <= band * std
        run = jnp.where(within, state.run + 1, 0)
        new = _keep_if_finite(finite, RecoveryState(fast, jnp.ones((), jnp.bool_), run), state)
        return new, new.run >= patience

    def reset(state: RecoveryState) -> RecoveryState:
        return state._replace(run=jnp.zeros_like(state.run))

    return RecoveryRule(init, update, reset)


class MonitorState(NamedTuple):
    """State of :func:`stream_monitor`: detector and recovery states and the drifted flag."""

    detector: Any
    recovery: RecoveryState
    drifted: jax.Array


class StreamFlags(NamedTuple):
    """Per-step output of the stream state machine; each field has shape (T,) (or (...,)).

    Attributes:
        alarm: drift detected on this step (the trigger to allocate an adapter).
        recovered: recovery declared on this step (the trigger to free it).
        drifted: the machine is in the drifted state after this step.
        statistic: the detector's statistic (0 while drifted: the detector is frozen).
    """

    alarm: jax.Array
    recovered: jax.Array
    drifted: jax.Array
    statistic: jax.Array


class StreamMonitor(NamedTuple):
    """The stream state machine as pure functions: ``init() -> MonitorState`` and
    ``update(state, x) -> (state, StreamFlags)`` for one scalar sample."""

    init: Callable[[], MonitorState]
    update: Callable[[MonitorState, jax.Array], tuple[MonitorState, StreamFlags]]


def stream_monitor(detector: DriftDetector, recovery: RecoveryRule) -> StreamMonitor:
    """Compose a detector and a recovery rule: watching -> alarm -> drifted -> recovered.

    Watching: the detector sees every sample; its alarm moves the machine to *drifted* and
    clears the recovery run. Drifted: the detector is frozen (its baseline stays the pre-drift
    one) and the recovery rule compares the signal with that baseline; when it declares
    recovery the machine goes back to *watching* with the detector's accumulators as they
    were reset at the alarm. The recovery smoother sees every sample in both states.

    Args:
        detector: from :func:`page_hinkley` or :func:`ema_zscore`.
        recovery: from :func:`recovery_rule`.

    Returns:
        A :class:`StreamMonitor`.
    """

    def init() -> MonitorState:
        return MonitorState(detector.init(), recovery.init(), jnp.zeros((), jnp.bool_))

    def update(state: MonitorState, x: jax.Array) -> tuple[MonitorState, StreamFlags]:
        det_new, out = detector.update(state.detector, x)
        watching = ~state.drifted
        alarm = watching & out.alarm
        det = jax.tree.map(lambda n, o: jnp.where(watching, n, o), det_new, state.detector)
        mean, std = detector.baseline(det)
        rec, back = recovery.update(state.recovery, x, mean, std)
        recovered = state.drifted & back
        rec = jax.tree.map(
            lambda r, c: jnp.where(alarm | recovered, r, c), recovery.reset(rec), rec
        )
        drifted = (state.drifted & ~recovered) | alarm
        statistic = jnp.where(watching, out.statistic, 0.0)
        return MonitorState(det, rec, drifted), StreamFlags(alarm, recovered, drifted, statistic)

    return StreamMonitor(init, update)


def run_stream(monitor: StreamMonitor, signals: jax.Array) -> StreamFlags:
    """Scan ``monitor`` over a signal: signals (T,) -> :class:`StreamFlags` of (T,) arrays.

    Pure and jittable; ``jax.vmap(lambda s: run_stream(monitor, s))`` runs many streams.

    Raises:
        ValueError: ``signals`` is not one-dimensional.
    """
    if jnp.ndim(signals) != 1:
        raise ValueError(f"signals must have shape (T,), got {jnp.shape(signals)}")
    _, flags = jax.lax.scan(monitor.update, monitor.init(), jnp.asarray(signals, jnp.float32))
    return flags


def run_detector(detector: DriftDetector, signals: jax.Array) -> DetectorOutput:
    """Scan a bare detector over signals (T,) -> :class:`DetectorOutput` of (T,) arrays.

    Raises:
        ValueError: ``signals`` is not one-dimensional.
    """
    if jnp.ndim(signals) != 1:
        raise ValueError(f"signals must have shape (T,), got {jnp.shape(signals)}")
    _, out = jax.lax.scan(detector.update, detector.init(), jnp.asarray(signals, jnp.float32))
    return out
