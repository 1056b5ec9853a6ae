"""The digits backbone: explicit normalisation statistics in and out of apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metattt import params as P
from metattt.models.digits_net import NormStats, digits_net


@pytest.fixture
def net_and_params():
    net = digits_net()
    params, stats = net.init(jax.random.key(0))
    return net, params, stats


def _batch(n=16, seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, 8, 8))


def test_shapes_and_image_or_flat_input(net_and_params):
    net, params, stats = net_and_params
    x = _batch()
    logits, out = net.apply(params, stats, x, batch_stats=False)
    assert logits.shape == (16, 10)
    flat, _ = net.apply(params, stats, x.reshape(16, 64), batch_stats=False)
    np.testing.assert_array_equal(logits, flat)
    h, _ = net.features(params, stats, x, batch_stats=False)
    assert h.shape == (16, 128) and bool(jnp.all(h >= 0))
    np.testing.assert_allclose(net.head(params, h), logits, rtol=1e-6)


def test_running_statistics_pass_through_unchanged_in_inference(net_and_params):
    net, params, _ = net_and_params
    stats = NormStats(jnp.full((128,), 0.3), jnp.full((128,), 2.0))
    _, out = net.apply(params, stats, _batch(), batch_stats=False)
    assert out is stats


def test_batch_statistics_normalise_and_update_by_momentum(net_and_params):
    net, params, stats = net_and_params
    x = _batch(32)
    h, new = net.features(params, stats, x, batch_stats=True)
    z = x.reshape(32, 64) @ params["hidden"]["kernel"] + params["hidden"]["bias"]
    mean, var = z.mean(0), z.var(0)
    expected = jax.nn.relu((z - mean) / jnp.sqrt(var + 1e-5))
    np.testing.assert_allclose(h, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new.mean, 0.9 * stats.mean + 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new.var, 0.9 * stats.var + 0.1 * var * 32 / 31, rtol=1e-5)


def test_batch_statistics_remove_a_feature_shift_that_running_statistics_keep(net_and_params):
    # Normalisation-statistics adaptation: a contrast-like change of the input moves the
    # hidden pre-activations; normalising with the batch's own statistics undoes an affine
    # change of each unit exactly, the running statistics do not.
    net, params, stats = net_and_params
    x = _batch(64)
    _, stats = net.apply(params, stats, x, batch_stats=True)
    # x' = 2x + 0.5 gives z' = 2z + c (c per unit): an affine change of every unit.
    x2 = 2.0 * x + 0.5
    clean_batch, _ = net.apply(params, stats, x, batch_stats=True)
    moved_batch, _ = net.apply(params, stats, x2, batch_stats=True)
    moved_running, _ = net.apply(params, stats, x2, batch_stats=False)
    gap_batch = float(jnp.max(jnp.abs(moved_batch - clean_batch)))
    gap_running = float(jnp.max(jnp.abs(moved_running - clean_batch)))
    assert gap_batch < 1e-3 < gap_running


def test_layernorm_preset_selects_exactly_the_norm_affine_parameters(net_and_params):
    _, params, _ = net_and_params
    mask = P.select(params, "layernorm")
    assert P.selected_paths(params, mask) == ["norm/bias", "norm/scale"]
    assert P.count(params, mask).trainable == 256


def test_apply_is_jittable_and_differentiable_in_the_norm_parameters(net_and_params):
    net, params, stats = net_and_params
    x = _batch()

    @jax.jit
    def entropy_grad(p):
        def loss(p):
            logits, _ = net.apply(p, stats, x, batch_stats=True)
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, -1))

        return jax.grad(loss)(p)

    g = entropy_grad(params)
    assert jax.tree.structure(g) == jax.tree.structure(params)
    assert float(jnp.linalg.norm(g["norm"]["scale"])) > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden": 0}, "hidden must be a positive int"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"eps": 0.0}, "eps must be positive"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        digits_net(**kwargs)


def test_bad_input_shape_names_the_argument(net_and_params):
    net, params, stats = net_and_params
    with pytest.raises(ValueError, match="x must have shape"):
        net.apply(params, stats, jnp.zeros((4, 7, 7)), batch_stats=False)
