"""Meta-gradients against finite differences (float64), first-order semantics, sharding."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metattt import meta
from metattt import params as P
from metattt.data import sinusoid
from metattt.inner import InnerConfig


def mlp_apply(p, x):
    h = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"])
    return h @ p["l1"]["kernel"] + p["l1"]["bias"]


def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((mlp_apply(p, x) - y) ** 2)


def tiny_params(key, width=5):
    k = jax.random.split(key, 4)
    return {
        "l0": {
            "kernel": jax.random.normal(k[0], (1, width)),
            "bias": 0.3 * jax.random.normal(k[1], (width,)),
        },
        "l1": {
            "kernel": jax.random.normal(k[2], (width, 1)) / np.sqrt(width),
            "bias": 0.3 * jax.random.normal(k[3], (1,)),
        },
    }


def one_task(seed):
    tasks = sinusoid.sample_tasks(jax.random.key(seed), 1, 6, 6)
    return jax.tree.map(lambda a: a[0], tasks)


def central_difference_check(f, theta, *, eps, rtol, atol, directions=6):
    """<grad f, v> against (f(theta + eps v) - f(theta - eps v)) / 2 eps for random v."""
    f = jax.jit(f)
    grad = jax.grad(f)(theta)
    leaves, treedef = jax.tree.flatten(theta)
    for i in range(directions):
        keys = jax.random.split(jax.random.key(100 + i), len(leaves))
        v = treedef.unflatten(
            [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
        )
        shift = lambda s, v=v: jax.tree.map(lambda t, d: t + s * d, theta, v)
        numeric = (f(shift(eps)) - f(shift(-eps))) / (2 * eps)
        analytic = sum(
            jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v), strict=True)
        )
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)


# float64 finite differences: eps 1e-6 gives ~1e-9 truncation and rounding error here.
FD = dict(eps=1e-6, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_maml_meta_gradient_matches_finite_differences(x64, opt):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), tiny_params(jax.random.key(0)))
    task = jax.tree.map(lambda a: a.astype(jnp.float64), one_task(1))
    rule = optax.sgd(0.05) if opt == "sgd" else optax.adam(0.01, eps_root=1e-12)
    inner = InnerConfig(rule, max_steps=3, clip_norm=50.0)
    mask = P.select(params, "re:.")
    f = lambda p: meta.maml_loss(loss_fn, p, task, mask=mask, inner=inner)[0]
    central_difference_check(f, params, **FD)


def test_maml_gradient_reaches_frozen_parameters_and_remat_is_identical(x64):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), tiny_params(jax.random.key(3)))
    task = jax.tree.map(lambda a: a.astype(jnp.float64), one_task(4))
    mask = P.select(params, "re:l1")  # adapt the head only; l0 is frozen but meta-learned
    inner = InnerConfig(optax.sgd(0.1), max_steps=4)
    f = lambda p, remat: meta.maml_loss(
        loss_fn, p, task, mask=mask, inner=inner._replace(remat=remat)
    )[0]
    central_difference_check(functools.partial(f, remat=False), params, **FD)
    meta_grad = jax.jit(jax.grad(f), static_argnums=1)  # one program each, not eager ops
    g_plain, g_remat = meta_grad(params, False), meta_grad(params, True)
    chex.assert_trees_all_close(g_plain, g_remat, rtol=1e-12, atol=1e-14)
    assert float(jnp.abs(g_plain["l0"]["kernel"]).sum()) > 0


def test_e2e_ttt_and_meta_sgd_gradients_match_finite_differences(x64):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), tiny_params(jax.random.key(5)))
    task = jax.tree.map(lambda a: a.astype(jnp.float64), one_task(6))
    mask = P.select(params, "re:.")
    inner = InnerConfig(optax.sgd(0.05), max_steps=2)
    e2e = lambda p: meta.e2e_ttt_loss(loss_fn, p, task, mask=mask, inner=inner, num_steps=2)[0]
    central_difference_check(e2e, params, **FD)
    msgd = meta.meta_sgd_init(params, mask, 0.05)
    central_difference_check(
        lambda mp: meta.meta_sgd_loss(loss_fn, mp, task, mask=mask, inner=inner)[0], msgd, **FD
    )
    # With every learned rate equal to the SGD rate, Meta-SGD is MAML.
    np.testing.assert_allclose(
        meta.meta_sgd_loss(loss_fn, msgd, task, mask=mask, inner=inner)[0],
        meta.maml_loss(loss_fn, params, task, mask=mask, inner=inner)[0],
        rtol=1e-12,
    )


def test_e2e_ttt_is_query_plus_mean_inner_loss():
    params, task = tiny_params(jax.random.key(7)), one_task(8)
    mask = P.select(params, "re:.")
    inner = InnerConfig(optax.sgd(0.05), max_steps=4)
    e2e = lambda p: meta.e2e_ttt_loss(loss_fn, p, task, mask=mask, inner=inner, num_steps=3)
    total, aux = jax.jit(e2e)(params)
    np.testing.assert_allclose(total, aux.query_loss + jnp.mean(aux.inner_losses[:3]), rtol=1e-6)


def test_first_order_equals_gradient_at_adapted_parameters():
    """FOMAML's meta-gradient is the query gradient at the adapted parameters (SGD inner)."""
    params, task = tiny_params(jax.random.key(9)), one_task(10)
    mask = P.select(params, "re:.")
    inner = InnerConfig(optax.sgd(0.1), max_steps=3)
    fo_loss = lambda p: meta.fomaml_loss(loss_fn, p, task, mask=mask, inner=inner)[0]
    fo = jax.jit(jax.grad(fo_loss))(params)  # one program, not eager ops
    adapted = params
    for _ in range(3):  # independent reference: three explicit SGD steps
        g = jax.grad(loss_fn)(adapted, task.support)
        adapted = jax.tree.map(lambda p, d: p - 0.1 * d, adapted, g)
    expected = jax.grad(loss_fn)(adapted, task.query)
    chex.assert_trees_all_close(fo, expected, rtol=1e-5, atol=1e-7)
    so = jax.jit(jax.grad(lambda p: meta.maml_loss(loss_fn, p, task, mask=mask, inner=inner)[0]))(
        params
    )
    assert not np.allclose(jax.tree.leaves(so)[0], jax.tree.leaves(fo)[0])


def test_meta_step_sharded_over_eight_devices_equals_one_device():
    assert jax.device_count() >= 8, "tests/conftest.py asks for 8 simulated CPU devices"
    params = tiny_params(jax.random.key(11))
    tasks = sinusoid.sample_tasks(jax.random.key(12), 8, 5, 5)
    mask = P.select(params, "re:.")
    loss = functools.partial(
        meta.maml_loss, loss_fn, mask=mask, inner=InnerConfig(optax.sgd(0.05), max_steps=2)
    )
    single = meta.make_meta_step(loss, optax.adam(1e-2), clip_norm=10.0)
    mesh = jax.make_mesh((8,), ("tasks",))
    sharded = meta.make_meta_step(loss, optax.adam(1e-2), clip_norm=10.0, mesh=mesh)
    p1, m1 = single.update(single.init(params), tasks)
    p8, m8 = sharded.update(sharded.init(params), tasks)
    chex.assert_trees_all_close(p1, p8, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m1.meta_loss, m8.meta_loss, rtol=1e-6)
    np.testing.assert_allclose(m1.grad_norm, m8.grad_norm, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        sharded.update(sharded.init(params), jax.tree.map(lambda a: a[:6], tasks))


def test_gradient_accumulation_over_micro_batches_equals_the_full_batch():
    params = tiny_params(jax.random.key(21))
    tasks = sinusoid.sample_tasks(jax.random.key(22), 6, 5, 5)
    mask = P.select(params, "re:l1")
    loss = functools.partial(
        meta.e2e_ttt_loss, loss_fn, mask=mask, inner=InnerConfig(optax.sgd(0.05), max_steps=2)
    )
    full = meta.make_meta_step(loss, optax.sgd(0.1), clip_norm=1.0)
    accumulated = meta.make_meta_step(loss, optax.sgd(0.1), clip_norm=1.0, micro_batches=3)
    p1, m1 = full.update(full.init(params), tasks)
    p3, m3 = accumulated.update(accumulated.init(params), tasks)
    chex.assert_trees_all_close(p1, p3, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m1.meta_loss, m3.meta_loss, rtol=1e-6)
    np.testing.assert_allclose(m1.query_loss, m3.query_loss, rtol=1e-6)
    np.testing.assert_allclose(m1.grad_norm, m3.grad_norm, rtol=1e-5)
    # An explicit Python loop over the micro-batches gives the same mean gradient.
    grad = jax.jit(jax.grad(lambda p, t: meta.batch_meta_loss(loss, p, t)[0]))
    chunks = [jax.tree.map(lambda a, i=i: a[2 * i : 2 * i + 2], tasks) for i in range(3)]
    mean = jax.tree.map(lambda *g: sum(g) / 3, *(grad(params, c) for c in chunks))
    chex.assert_trees_all_close(mean, grad(params, tasks), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="divisible by micro_batches = 4"):
        step = meta.make_meta_step(loss, optax.sgd(0.1), micro_batches=4)
        step.update(step.init(params), tasks)
    with pytest.raises(ValueError, match="micro_batches must be a positive int"):
        meta.make_meta_step(loss, optax.sgd(0.1), micro_batches=0)
    # A mesh shards the batch inside the compiled step: without jit it would be ignored.
    with pytest.raises(ValueError, match="mesh needs jit=True"):
        meta.make_meta_step(
            loss, optax.sgd(0.1), mesh=jax.sharding.Mesh(jax.devices(), ("b",)), jit=False
        )


def test_a_non_finite_query_loss_skips_the_outer_update_and_is_counted():
    params = tiny_params(jax.random.key(31))
    tasks = sinusoid.sample_tasks(jax.random.key(32), 4, 5, 5)
    mask = P.select(params, "re:.")
    loss = functools.partial(
        meta.maml_loss, loss_fn, mask=mask, inner=InnerConfig(optax.sgd(0.05), max_steps=2)
    )
    step = meta.make_meta_step(loss, optax.adam(1e-2))
    state = step.init(params)
    state, metrics = step.update(state, tasks)  # a good step first: adam's moments are not zero
    assert int(metrics.outer_skipped) == 0 and np.isfinite(float(metrics.grad_norm))
    # One task's query targets hold a NaN (the support set is clean, so the inner loop is too).
    query_x, query_y = tasks.query
    poisoned = tasks._replace(query=(query_x, query_y.at[2, 0].set(jnp.nan)))
    after, metrics = step.update(state, poisoned)
    assert int(metrics.outer_skipped) == 1
    assert np.isnan(float(metrics.grad_norm))  # reported as NaN, not hidden as 0
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # nothing applied
    # The next clean batch trains on as before.
    again, metrics = step.update(after, tasks)
    assert int(metrics.outer_skipped) == 0
    assert not np.array_equal(again.params["l0"]["kernel"], state.params["l0"]["kernel"])
