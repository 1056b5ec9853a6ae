"""make_adapt_fn against a Python loop, compiled once per shape; the eager-adapt warning; the
meta-learner evaluation helper against per-task loops."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metattt as mt
from metattt import inner, meta, stats
from metattt import params as P
from tests.metattt.test_inner import init_params, loss_fn, make_batch

K_MAX = 4


def sgd_loop(params, selector, batch, k, lr):
    """Reference: k plain SGD steps on the selected leaves, in Python, on the whole tree."""
    mask = P.select(params, selector)
    for _ in range(k):
        g = jax.grad(loss_fn)(params, batch)
        params = jax.tree.map(lambda p, d, m: p - lr * d if m else p, params, g, mask)
    return params


def test_make_adapt_fn_is_the_python_loop_for_every_k_from_one_program():
    traces = []

    def counted_loss(p, b):
        traces.append(1)  # runs when traced, not when the compiled program runs
        return loss_fn(p, b)

    params = init_params(jax.random.key(0))
    adapt_fn = mt.make_adapt_fn(counted_loss, optax.sgd(0.2), max_steps=K_MAX, selector="re:w2")
    for i, k in enumerate([None, 0, 1, 3, K_MAX]):
        batch = make_batch(jax.random.key(10 + i))
        adapted, result = adapt_fn(params, batch, num_steps=k)
        want = sgd_loop(params, "re:w2", batch, K_MAX if k is None else k, 0.2)
        chex.assert_trees_all_close(adapted, want, rtol=1e-5, atol=1e-6)
        assert int(np.sum(result.active)) == (K_MAX if k is None else k)
        if i == 0:
            traced = len(traces)
    assert len(traces) == traced  # new k and new batch values: no retrace, no recompile
    adapt_fn(params, make_batch(jax.random.key(3), n=9))
    assert len(traces) > traced  # a new batch shape is a new program


@pytest.mark.parametrize("selector", ["re:^b", "re:^w", lambda path, leaf: leaf.ndim == 2])
def test_make_adapt_fn_takes_any_selector(selector):
    params, batch = init_params(jax.random.key(1)), make_batch(jax.random.key(2))
    adapted, _ = mt.make_adapt_fn(loss_fn, optax.sgd(0.1), max_steps=2, selector=selector)(
        params, batch
    )
    mask = P.select(params, selector)
    chex.assert_trees_all_close(adapted, sgd_loop(params, selector, batch, 2, 0.1), rtol=1e-5)
    for changed, picked in zip(
        jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), adapted, params)),
        jax.tree.leaves(mask),
        strict=True,
    ):
        assert changed == picked


def test_make_adapt_fn_refuses_bad_arguments_in_one_line():
    params, batch = init_params(jax.random.key(1)), make_batch(jax.random.key(2))
    with pytest.raises(ValueError, match="max_steps must be a non-negative int, got 2.0"):
        mt.make_adapt_fn(loss_fn, optax.sgd(0.1), max_steps=2.0, selector="re:^b")
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['num_step'\]"):
        mt.make_adapt_fn(loss_fn, optax.sgd(0.1), max_steps=2, selector="re:^b", num_step=1)
    with pytest.raises(ValueError, match="clip_norm"):
        mt.make_adapt_fn(loss_fn, optax.sgd(0.1), max_steps=2, selector="re:^b", clip_norm=-1.0)
    adapt_fn = mt.make_adapt_fn(loss_fn, optax.sgd(0.1), max_steps=2, selector="re:^b")
    with pytest.raises(ValueError, match=r"num_steps must be in \[0, max_steps=2\], got 3"):
        adapt_fn(params, batch, num_steps=3)
    with pytest.raises(ValueError, match="selects no leaf"):
        mt.make_adapt_fn(loss_fn, optax.sgd(0.1), max_steps=2, selector="re:nope")(params, batch)


def test_eager_adapt_warns_once_and_jitted_adapt_does_not(monkeypatch):
    params, batch = init_params(jax.random.key(1)), make_batch(jax.random.key(2))
    fast, slow = P.split(params, P.select(params, "re:^b"))
    run = functools.partial(mt.adapt, loss_fn, opt=optax.sgd(0.1), max_steps=1)
    monkeypatch.setattr(inner, "_warned_eager", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.jit(run)(fast, slow, batch)
        jax.jit(lambda b: run(fast, slow, b))(batch)  # parameters closed over: still jitted
        assert not caught
        run(fast, slow, batch)
        run(fast, slow, batch)
    assert len(caught) == 1 and "make_adapt_fn" in str(caught[0].message)
    with pytest.raises(ValueError, match="under jax.jit it must be static"):
        jax.jit(functools.partial(mt.adapt, loss_fn, opt=optax.sgd(0.1)))(
            fast, slow, batch, max_steps=1
        )


def test_evaluate_after_steps_is_the_per_task_loop_with_t_intervals():
    params = init_params(jax.random.key(4))
    keys = jax.random.split(jax.random.key(5), 6)
    tasks = meta.Task(jax.vmap(make_batch)(keys[:3]), jax.vmap(make_batch)(keys[3:]))
    tasks = jax.tree.map(lambda x: jnp.concatenate([x, x[::-1] * 0.5]), tasks)  # 6 tasks
    cfg = inner.InnerConfig(optax.sgd(0.3), max_steps=1)  # replaced by max(steps)
    mask = P.select(params, "re:w2|b1")
    got = meta.evaluate_after_steps(loss_fn, params, tasks, mask=mask, inner=cfg, steps=[0, 1, 3])
    assert sorted(got) == [0, 1, 3]
    for k, summary in got.items():
        per_task = []
        for i in range(6):
            task = jax.tree.map(lambda x, i=i: x[i], tasks)
            adapted = sgd_loop(params, "re:w2|b1", task.support, k, 0.3)
            per_task.append(float(loss_fn(adapted, task.query)))
        want = stats.mean_ci(per_task)
        np.testing.assert_allclose(summary.mean, want.mean, rtol=1e-5)
        np.testing.assert_allclose(summary.half_width, want.half_width, rtol=1e-4)
    assert got[3].mean < got[0].mean  # adapting helps on these tasks
    with pytest.raises(ValueError, match="steps must be non-empty"):
        meta.evaluate_after_steps(loss_fn, params, tasks, mask=mask, inner=cfg, steps=[])
