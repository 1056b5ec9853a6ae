"""Forecast metrics of a session's query windows and the adaptation-curve step counts, against
Python loops over neurons, windows and horizon steps on random inputs."""

import numpy as np
import pytest

from metattt.data import WindowBatch
from metattt.data import session_metrics as SM


def _query(rng, w=5, n=4, c=3, p=2, real=(True, True, False, True)):
    return WindowBatch(
        context=rng.normal(size=(w, n, c)).astype(np.float32),
        target=rng.normal(size=(w, n, p)).astype(np.float32),
        mask=np.broadcast_to(np.array(real), (w, n)).copy(),
        unit_ids=np.zeros((w, n), np.int32),
        session_id=np.zeros(w, np.int32),
        start=np.arange(w, dtype=np.int32),
    )


def test_neuron_sse_sums_squared_errors_of_real_neurons_only():
    rng = np.random.default_rng(1)
    query = _query(rng)
    pred = rng.normal(size=query.target.shape).astype(np.float32)
    got = np.asarray(SM.neuron_sse(pred, query.target, query.mask))
    w, n, p = pred.shape
    for j in range(n):
        want = 0.0
        for i in range(w):
            if query.mask[i, j]:
                want += sum(
                    (float(pred[i, j, k]) - float(query.target[i, j, k])) ** 2 for k in range(p)
                )
        assert got[j] == pytest.approx(want, rel=1e-5), j
    assert got[2] == 0.0  # the padded neuron


def test_query_stats_match_a_loop():
    rng = np.random.default_rng(2)
    query = _query(rng, w=6, n=3, c=4, p=3, real=(True, False, True))
    qs = SM.query_stats(query)
    w, n, p = query.target.shape
    assert qs.count == w * p and qs.mask.tolist() == [True, False, True]
    copy = 0.0
    for j in range(n):
        y = [float(query.target[i, j, k]) for i in range(w) for k in range(p)]
        mean = sum(y) / len(y)
        assert qs.sst[j] == pytest.approx(sum((v - mean) ** 2 for v in y), rel=1e-9)
        if query.mask[0, j]:
            last = [float(query.context[i, j, -1]) for i in range(w) for _ in range(p)]
            copy += sum((a - b) ** 2 for a, b in zip(last, y, strict=True))
    assert qs.copy_sse == pytest.approx(copy, rel=1e-9)


def test_forecast_metrics_match_a_loop_along_a_curve():
    rng = np.random.default_rng(0)
    query = _query(rng)
    w, n, p = query.target.shape
    preds = rng.normal(size=(3, w, n, p)).astype(np.float32)  # three steps of a curve
    sse = np.stack([np.asarray(SM.neuron_sse(x, query.target, query.mask)) for x in preds])
    got = SM.forecast_metrics(sse, SM.query_stats(query))
    assert {k: v.shape for k, v in got.items()} == {"mse": (3,), "r2": (3,), "poco": (3,)}
    for step, pred in enumerate(preds):
        r2s, total, copy, count = [], 0.0, 0.0, 0
        for j in (0, 1, 3):  # the real neurons, one at a time
            y = [float(query.target[i, j, k]) for i in range(w) for k in range(p)]
            yhat = [float(pred[i, j, k]) for i in range(w) for k in range(p)]
            last = [float(query.context[i, j, -1]) for i in range(w) for _ in range(p)]
            mean = sum(y) / len(y)
            err = sum((a - b) ** 2 for a, b in zip(yhat, y, strict=True))
            r2s.append(1 - err / sum((a - mean) ** 2 for a in y))
            total += err
            copy += sum((a - b) ** 2 for a, b in zip(last, y, strict=True))
            count += len(y)
        np.testing.assert_allclose(got["mse"][step], total / count, rtol=1e-5)
        np.testing.assert_allclose(got["r2"][step], np.mean(r2s), rtol=1e-5)
        np.testing.assert_allclose(got["poco"][step], 1 - total / copy, rtol=1e-5)


def _first_step_loop(curve, fraction):
    gain = curve[-1] - curve[0]
    if gain <= 0:
        return 0
    for i, v in enumerate(curve):
        if v - curve[0] >= fraction * gain:
            return i
    raise AssertionError("unreachable: the last step reaches the whole gain")


def test_steps_to_fraction_hand_values_and_a_loop():
    assert SM.steps_to_fraction(np.array([0.1, 0.5, 0.85, 0.9, 0.9])) == 3
    assert SM.steps_to_fraction(np.array([0.1, 0.5, 0.87, 0.95, 0.9])) == 2
    assert SM.steps_to_fraction(np.array([0.5, 0.4, 0.3])) == 0  # no gain
    assert SM.steps_to_fraction(np.array([0.0, 0.6, 1.0]), fraction=0.5) == 1
    rng = np.random.default_rng(3)
    for _ in range(50):
        curve = rng.normal(size=rng.integers(2, 12)).cumsum()
        fraction = rng.uniform(0.1, 1.0)
        assert SM.steps_to_fraction(curve, fraction) == _first_step_loop(curve, fraction)


def test_steps_to_level_hand_values_and_a_loop():
    assert SM.steps_to_level([0.1, 0.3, 0.2, 0.5], 0.25) == 1
    assert SM.steps_to_level([0.1, 0.3], 0.4) == 2  # never: the curve's length
    assert SM.steps_to_level([0.4, 0.1], 0.4) == 0
    rng = np.random.default_rng(4)
    for _ in range(50):
        curve = rng.normal(size=rng.integers(1, 12))
        level = rng.normal()
        want = next((i for i, v in enumerate(curve) if v >= level), len(curve))
        assert SM.steps_to_level(curve, level) == want
