"""Depth controllers: ordered thresholds, monotone hard and relaxed counts, threshold gradients.

No model is involved; everything runs on a few hundred scalars.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attd.controller import (
    fixed_controller,
    gate_controller,
    ordered_thresholds,
    raw_thresholds,
    threshold_controller,
)

SIGNALS = jnp.linspace(-3.0, 6.0, 301)
CONTROLLERS = {
    "attd": threshold_controller(3, temperature=0.2),
    "gate": gate_controller(3, temperature=0.2),
    "ttt": fixed_controller(3),
    "fixed": fixed_controller(0),
}


@pytest.mark.parametrize("scale", [1.0, 10.0, 60.0])
def test_thresholds_are_ordered_for_any_raw_parameters(scale):
    raw = scale * jax.random.normal(jax.random.key(0), (64, 4))
    t = jax.vmap(ordered_thresholds)(raw)
    assert bool(jnp.all(jnp.diff(t, axis=-1) > 0))
    np.testing.assert_array_equal(t[:, 0], raw[:, 0])


def test_raw_thresholds_inverts_ordered_thresholds():
    t = jnp.array([-0.5, 0.25, 2.0, 2.1])
    np.testing.assert_allclose(ordered_thresholds(raw_thresholds(t)), t, rtol=0, atol=1e-6)
    ctrl = threshold_controller(4)
    np.testing.assert_allclose(ctrl.thresholds(ctrl.init(t)), t, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_hard_and_soft_counts_are_monotone_in_the_signal(name):
    ctrl = CONTROLLERS[name]
    params = ctrl.init()
    hard = np.asarray(ctrl.hard_steps(params, SIGNALS))
    weights = np.asarray(ctrl.step_weights(params, SIGNALS))  # (S, K_max)
    assert hard.dtype == np.int32 and weights.shape == (SIGNALS.size, ctrl.max_steps)
    assert np.all(np.diff(hard) >= 0)
    assert np.all(np.diff(weights, axis=0) >= 0)  # each w_k non-decreasing in s
    assert np.all(np.diff(weights, axis=1) <= 0)  # a soft "first K steps" mask
    assert hard.min() >= 0 and hard.max() <= ctrl.max_steps
    if name in ("attd", "gate"):
        assert hard[0] == 0 and hard[-1] == ctrl.max_steps  # the signal range spans all K
    if name == "gate":
        assert set(np.unique(hard)) == {0, 3}


def test_threshold_count_is_the_number_of_thresholds_below_the_signal():
    ctrl = threshold_controller(3)
    params = ctrl.init(jnp.array([0.0, 1.0, 2.0]))
    s = jnp.array([-1.0, 0.5, 1.5, 2.5])
    np.testing.assert_array_equal(ctrl.hard_steps(params, s), [0, 1, 2, 3])


@pytest.mark.parametrize("name", ["attd", "gate"])
def test_relaxed_weights_tend_to_the_hard_mask(name):
    make = threshold_controller if name == "attd" else gate_controller
    ctrl = make(3, temperature=1e-4)
    params = ctrl.init()
    s = jnp.array([0.3, 1.2, 1.7, 2.6])  # away from the default thresholds 1, 1.5, 2
    hard = ctrl.hard_steps(params, s)
    mask = (jnp.arange(3)[None, :] < hard[:, None]).astype(jnp.float32)
    np.testing.assert_allclose(ctrl.step_weights(params, s), mask, rtol=0, atol=1e-6)


@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("name", ["attd", "gate"])
def test_relaxation_has_nonzero_threshold_gradients(name, straight_through):
    ctrl = CONTROLLERS[name]
    params = ctrl.init()
    s = jnp.array([0.9, 1.4, 1.6, 2.1])
    gain = jnp.array([-1.0, -0.5, -0.25])  # a task benefit per step

    def objective(p):
        w = ctrl.step_weights(p, s, straight_through)
        return jnp.sum(w * gain) + 0.1 * jnp.sum(w)

    grads = jax.grad(objective)(params)["raw"]
    assert bool(jnp.all(jnp.isfinite(grads))) and bool(jnp.all(grads != 0))
    if straight_through:
        hard = ctrl.hard_steps(params, s)
        mask = (jnp.arange(3)[None, :] < hard[:, None]).astype(jnp.float32)
        np.testing.assert_array_equal(ctrl.step_weights(params, s, True), mask)
        relaxed = jax.grad(
            lambda p: (
                jnp.sum(ctrl.step_weights(p, s) * gain) + 0.1 * jnp.sum(ctrl.step_weights(p, s))
            )
        )(params)["raw"]
        np.testing.assert_allclose(grads, relaxed, rtol=1e-6)


def test_fixed_controller_has_no_parameters_and_constant_counts():
    ctrl = fixed_controller(2)
    params = ctrl.init()
    assert params == {} and ctrl.thresholds(params).shape == (0,)
    np.testing.assert_array_equal(ctrl.hard_steps(params, SIGNALS[:5]), np.full(5, 2))
    np.testing.assert_array_equal(ctrl.step_weights(params, SIGNALS[:5]), np.ones((5, 2)))
    assert fixed_controller(0).name == "fixed" and ctrl.name == "ttt2"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_steps"):
        threshold_controller(0)
    with pytest.raises(ValueError, match="temperature"):
        threshold_controller(2, temperature=0.0)
    with pytest.raises(ValueError, match="increase"):
        raw_thresholds([1.0, 0.5])
    with pytest.raises(ValueError, match="shape"):
        threshold_controller(3).init(jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_steps"):
        fixed_controller(-1)
    with pytest.raises(ValueError, match="full_steps"):
        gate_controller(0)


def test_quantile_thresholds_spread_k_evenly_and_match_numpy_quantiles():
    from attd.controller import quantile_thresholds

    signal = np.random.default_rng(2).gamma(2.0, 1.0, 1000)
    t = quantile_thresholds(signal, 4)
    np.testing.assert_allclose(t, np.quantile(signal, [0.2, 0.4, 0.6, 0.8]), rtol=1e-6)
    ctrl = threshold_controller(4)
    k = np.asarray(ctrl.hard_steps(ctrl.init(t), signal))
    np.testing.assert_allclose(np.bincount(k, minlength=5) / 1000, 0.2, atol=0.01)
    assert quantile_thresholds(signal, 1) == pytest.approx(np.median(signal))
    # A signal with ties keeps the thresholds strictly increasing, min_gap apart.
    tied = quantile_thresholds(np.zeros(10), 3, min_gap=0.5)
    np.testing.assert_allclose(tied, [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="non-empty array of finite"):
        quantile_thresholds([np.nan, 1.0], 2)
