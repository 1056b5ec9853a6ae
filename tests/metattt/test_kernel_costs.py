"""Kernel cost profiles: the shape features by hand, the fit and the choice on timings drawn from
known cost laws, device-aware candidates, and a real measurement at tiny sizes stored, reloaded
under its device key and used to choose (the mechanism; the CPU benchmark of the choice is
experiments/bench/kernel_choice.py)."""

import json
import math

import numpy as np
import pytest

from kernels_pallas import selftest
from metattt.energy import SimulatedMonitor
from metattt.energy import kernel_costs as kc


def test_shape_features_by_hand():
    shape = kc.DispatchShape(tokens=10, d_model=4, d_ff=6, experts=5, top_k=2, capacity_factor=1.5)
    c = 6  # ceil(1.5 · 10 · 2 / 5)
    assert shape.capacity == c
    want = [1, 40, 10 * 2 * 24, 5 * c * 24, 5 * 10 * 2 * 24, 10 * 5 * c * 4, 10 * 2 * 5 * c, 120]
    np.testing.assert_array_equal(kc.shape_features(shape), want)
    dropless = shape._replace(capacity_factor=None)
    assert dropless.capacity == 10 and dropless.key() == "T=10,D=4,F=6,E=5,K=2,cf=none"
    with pytest.raises(ValueError, match="shape.top_k must be <= shape.experts"):
        kc.shape_features(shape._replace(top_k=6))
    with pytest.raises(ValueError, match="shape.d_ff must be a positive int"):
        kc.shape_features(shape._replace(d_ff=0))


def _shapes(rng, n):
    return [
        kc.DispatchShape(
            int(rng.integers(8, 512)),
            int(rng.choice([8, 16, 32])),
            int(rng.choice([16, 64])),
            int(rng.choice([2, 4, 8])),
            int(rng.integers(1, 3)),
            rng.choice([None, 1.0, 2.0]),
        )  # fmt: skip
        for _ in range(n)
    ]


@pytest.mark.parametrize("seed", range(3))
def test_fit_recovers_known_cost_laws_and_chooses_the_cheaper(seed):
    """Timings made by two non-negative cost laws (plus 1% noise): the fit predicts held-out
    shapes within 5%, and the choice is the backend of lower true cost wherever the two laws
    differ by more than the noise."""
    rng = np.random.default_rng(seed)
    laws = {
        "reference": np.array([2e-5, 0, 0, 3e-10, 0, 1e-10, 4e-9, 0]),
        "ragged": np.array([5e-5, 2e-8, 0, 0, 2e-10, 0, 0, 1e-9]),
    }
    true = lambda b, s: float(kc.shape_features(s) @ laws[b])
    train, held = _shapes(rng, 40), _shapes(rng, 20)
    timings = [
        kc.KernelTiming(b, s, true(b, s) * (1 + 0.01 * rng.standard_normal()), 2 * true(b, s))
        for s in train
        for b in laws
    ]
    model = kc.fit_cost_model(timings)
    assert set(model.coefficients) == {"seconds", "joules"}
    for s in held:
        for b in laws:
            assert model.predict(b, s) == pytest.approx(true(b, s), rel=0.05)
        costs = {b: true(b, s) for b in laws}
        if abs(costs["reference"] / costs["ragged"] - 1) > 0.1:
            assert kc.choose_backend(model, s) == min(costs, key=costs.get)
            assert kc.choose_backend(model, s, objective="joules") == min(costs, key=costs.get)
    # a measured shape uses its measurement, whatever the fit says
    s = train[0]
    measured = {b: t.seconds for t in timings if t.shape == s for b in [t.backend]}
    assert kc.choose_backend(model, s) == min(measured, key=measured.get)
    assert kc.choose_backend(model, s, backends=["ragged"]) == "ragged"


def test_bad_model_inputs():
    s = kc.DispatchShape(16, 8, 16, 4, 2)
    one = [kc.KernelTiming("ragged", s, 1e-3)]
    with pytest.raises(ValueError, match="timings is empty"):
        kc.fit_cost_model([])
    with pytest.raises(ValueError, match="a fit needs >= 2"):
        kc.fit_cost_model(one)
    model = kc.fit_cost_model(one * 2)
    with pytest.raises(ValueError, match="no joules model"):
        kc.choose_backend(model, s, objective="joules")
    with pytest.raises(ValueError, match="objective must be one of"):
        kc.choose_backend(model, s, objective="watts")
    with pytest.raises(ValueError, match="no seconds model for backend 'pallas'"):
        model.predict("pallas", s)


def test_candidates_are_device_aware():
    assert "pallas" not in kc.candidate_backends("cpu")
    assert kc.candidate_backends("gpu")[-1] == "pallas"
    assert kc.candidate_backends("cpu")[0] == "reference"


def test_measure_store_reload_and_choose(tmp_path):
    """Tiny real timings on this device: positive, not recorded as the run's backends, stored
    under this device's key beside another device's entry (kept), reloaded equal, and the
    choice is the measured faster."""
    shapes = [kc.DispatchShape(16, 8, 16, 4, 2), kc.DispatchShape(32, 8, 16, 4, 1, 1.0)]
    backends = ("reference", "ragged")
    monitor = SimulatedMonitor(seed=0)  # fed no work: no energy, so joules stay NaN
    before = selftest.resolutions()
    timings = kc.measure_dispatch(shapes, backends, repeats=2, monitor=monitor)
    assert selftest.resolutions() == before  # timing is not what a run resolved to
    assert [(t.backend, t.shape) for t in timings] == [(b, s) for s in shapes for b in backends]
    assert all(t.seconds > 0 and math.isnan(t.joules) for t in timings)
    path = tmp_path / "costs" / "kernels.json"
    other = [t._replace(seconds=1.0) for t in timings]
    kc.save_timings(path, other, key="TPU v9|jax-9.9")
    kc.save_timings(path, timings)
    stored = json.loads(path.read_text())["devices"]
    assert sorted(stored) == sorted(["TPU v9|jax-9.9", kc.device_key()])
    order = lambda ts: sorted(ts, key=lambda t: (t.shape.key(), t.backend))
    assert order(kc.load_timings(path)) == order(timings)  # the NaN joules: math.nan itself
    assert order(kc.load_timings(path, key="TPU v9|jax-9.9")) == order(other)
    with pytest.raises(ValueError, match="no timings for 'GPU|jax-0'"):
        kc.load_timings(path, key="GPU|jax-0")
    model = kc.fit_cost_model(kc.load_timings(path))
    for s in shapes:
        times = {t.backend: t.seconds for t in timings if t.shape == s}
        assert kc.choose_backend(model, s) == min(times, key=times.get)
    with pytest.raises(ValueError, match="concrete dispatch backends"):
        kc.measure_dispatch(shapes, ("auto",))


def test_neighbour_shapes_by_hand():
    s = kc.DispatchShape(64, 8, 16, 4, 2)
    assert kc.neighbour_shapes(s) == [s._replace(tokens=32), s._replace(tokens=16)]
    assert kc.neighbour_shapes(s._replace(tokens=2)) == [s._replace(tokens=1)]  # T=1 once
    with pytest.raises(ValueError, match="factors must be > 0"):
        kc.neighbour_shapes(s, (0.0,))


class _Measure:
    """A measurement by known cost laws (no timing): ``reference`` costs 1 ms + 1 µs per token,
    ``ragged`` 3 ms flat, so reference is cheaper below T = 2000; counts its calls."""

    laws = {"reference": lambda s: 1e-3 + 1e-6 * s.tokens, "ragged": lambda s: 3e-3}

    def __init__(self):
        self.calls = []

    def __call__(self, shapes, backends, *, repeats, monitor):
        self.calls.append([s.key() for s in shapes])
        return [kc.KernelTiming(b, s, self.laws[b](s)) for s in shapes for b in backends]


def test_profile_and_choose_measures_only_what_the_file_lacks(tmp_path):
    """The first call measures every shape, stores, fits and chooses at the first shape by its
    measurement; a second call reads everything back (no measurement, the same choice); a new
    shape measures that shape alone; another device key measures afresh."""
    path, measure = tmp_path / "k" / "costs.json", _Measure()
    small, big = kc.DispatchShape(64, 8, 16, 4, 2), kc.DispatchShape(4096, 8, 16, 4, 2)
    shapes = [small, *kc.neighbour_shapes(small)]
    backends = ("reference", "ragged")
    first = kc.profile_and_choose(path, shapes, backends=backends, measure=measure, key="X|jax-1")
    assert measure.calls == [[s.key() for s in shapes]] and first.measured == 6
    assert first.backend == "reference" and first.shape == small and first.objective == "seconds"
    assert first.costs == {b: law(small) for b, law in _Measure.laws.items()}
    assert set(first.predicted) == set(backends) and first.key == "X|jax-1"
    again = kc.profile_and_choose(path, shapes, backends=backends, measure=measure, key="X|jax-1")
    assert len(measure.calls) == 1 and again == first._replace(measured=0)
    grown = kc.profile_and_choose(path, [big, *shapes], backends=backends, measure=measure,
                                  key="X|jax-1")  # fmt: skip
    assert measure.calls[1:] == [[big.key()]] and grown.measured == 2
    assert grown.backend == "ragged" and grown.costs["reference"] == _Measure.laws["reference"](big)
    assert len(kc.load_timings(path, key="X|jax-1")) == 8
    kc.profile_and_choose(path, shapes, backends=backends, measure=measure, key="Y|jax-1")
    assert len(measure.calls) == 3 and len(kc.load_timings(path, key="X|jax-1")) == 8
    with pytest.raises(ValueError, match="shapes is empty"):
        kc.profile_and_choose(path, [], measure=measure)
    with pytest.raises(ValueError, match="objective must be one of"):
        kc.profile_and_choose(path, shapes, objective="watts", measure=measure)
    with pytest.raises(ValueError, match="no joules model"):  # the laws give no energy
        kc.profile_and_choose(path, shapes, backends=backends, objective="joules",
                              measure=measure, key="X|jax-1")  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"format": "other"}',
        '{"format": "metattt.kernel_costs", "version": 1,'
        ' "devices": {"X|jax-1": {"ragged": {"a": {"seconds": 1}}}}}',
        '{"format": "metattt.kernel_costs", "version": 1, "devices": {"X|jax-1": {"ragged": {"a":'
        ' {"seconds": 1, "joules": null, "shape": {"tokens": 0, "d_model": 8, "d_ff": 16,'
        ' "experts": 4, "top_k": 2}}}}}}',
    ],
)
def test_profile_and_choose_measures_again_over_a_damaged_file(tmp_path, caplog, text):
    """Bad JSON, another format, a malformed entry, an invalid shape: logged, measured, and the
    file replaced."""
    path, measure = tmp_path / "costs.json", _Measure()
    path.write_text(text)
    shapes = [kc.DispatchShape(64, 8, 16, 4, 2), kc.DispatchShape(32, 8, 16, 4, 2)]
    with caplog.at_level("WARNING"):
        choice = kc.profile_and_choose(path, shapes, backends=("reference", "ragged"),
                                       measure=measure, key="X|jax-1")  # fmt: skip
    assert "is unreadable" in caplog.text and choice.measured == 4 and len(measure.calls) == 1
    assert len(kc.load_timings(path, key="X|jax-1")) == 4  # a valid file again
