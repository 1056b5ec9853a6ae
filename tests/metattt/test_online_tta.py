"""Online adaptation with delayed labels, and the clip-wise TTA runner."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metattt import online, tta
from metattt import params as P

T, H = 12, 3


def predict(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]


def pair_loss(p, batch):
    x, y = batch
    return jnp.mean((predict(p, x) - y) ** 2)


@pytest.fixture(scope="module")
def stream():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(k[0], (3, 4)), "v": jax.random.normal(k[1], (4, 2))}
    xs = jax.random.normal(k[2], (T, 5, 3))
    ys = jax.random.normal(k[3], (T, 5, 2))
    fast, slow = P.split(params, P.select(params, "re:^v$"))
    return fast, slow, xs, ys


def run_online(fast, slow, xs, ys, delay=H, replay=1):
    return online.online_adapt(
        pair_loss,
        predict,
        fast,
        slow,
        xs,
        ys,
        delay=delay,
        opt=optax.sgd(0.2),
        steps_per_update=2,
        replay=replay,
    )


@pytest.mark.parametrize("replay", [1, 3])
def test_prediction_never_depends_on_a_target_before_it_arrives(stream, replay):
    fast, slow, xs, ys = stream
    jac = jax.jit(jax.jacrev(lambda y: run_online(fast, slow, xs, y, replay=replay).predictions))(
        ys
    )
    # jac[t, ..., s, ...]: sensitivity of prediction t to target s; reduce to (T, T).
    sens = np.asarray(jnp.abs(jac).sum(axis=(1, 2, 4, 5)))
    for t in range(T):
        for s in range(T):
            if s >= t - H:  # y_s arrives at s + H >= t: after prediction t was made
                assert sens[t, s] == 0.0, (t, s)
    # The check has teeth: targets that did arrive do move later predictions.
    assert sens[H + 1, 0] > 0.0 and sens[T - 1, T - 1 - H - 1] > 0.0


def test_online_equals_python_reference(stream):
    fast, slow, xs, ys = stream
    result = jax.jit(run_online)(fast, slow, xs, ys)
    params, opt = fast, optax.sgd(0.2)
    state = opt.init(params)
    for t in range(T):
        pred = predict(P.merge(params, slow), xs[t])
        np.testing.assert_allclose(result.predictions[t], pred, rtol=1e-5, atol=1e-6)
        if t >= H:
            for _ in range(2):
                g = jax.grad(lambda f: pair_loss(P.merge(f, slow), (xs[t - H], ys[t - H])))(params)
                u, state = opt.update(g, state, params)
                params = optax.apply_updates(params, u)
    chex.assert_trees_all_close(result.params, params, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.updated, np.arange(T) >= H)


def test_a_replay_window_fits_the_last_m_arrived_pairs_like_a_python_loop(stream):
    fast, slow, xs, ys = stream
    m, opt = 3, optax.sgd(0.2)
    result = jax.jit(
        lambda f: online.online_adapt(
            pair_loss, predict, f, slow, xs, ys, delay=H, opt=opt, steps_per_update=2, replay=m
        )
    )(fast)
    params, state = fast, opt.init(fast)
    for t in range(T):
        pred = predict(P.merge(params, slow), xs[t])
        np.testing.assert_allclose(result.predictions[t], pred, rtol=1e-5, atol=1e-6)
        pairs = [(xs[s], ys[s]) for s in range(max(t - H - m + 1, 0), t - H + 1)]
        if pairs:

            def window(f, pairs=pairs):
                return sum(pair_loss(P.merge(f, slow), p) for p in pairs) / len(pairs)

            np.testing.assert_allclose(result.update_losses[t], window(params), rtol=1e-5)
            for _ in range(2):
                g = jax.grad(window)(params)
                u, state = opt.update(g, state, params)
                params = optax.apply_updates(params, u)
    chex.assert_trees_all_close(result.params, params, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="replay must be an int >= 1"):
        online.online_adapt(pair_loss, predict, fast, slow, xs, ys, delay=H, opt=opt, replay=0)


def test_independent_streams_run_side_by_side_under_vmap(stream):
    fast, slow, xs, ys = stream
    streams = (jnp.stack([xs, -xs, 2 * xs]), jnp.stack([ys, ys, -ys]))
    batched = jax.jit(jax.vmap(lambda x, y: run_online(fast, slow, x, y)))(*streams)
    for i in range(3):
        one = run_online(fast, slow, streams[0][i], streams[1][i])
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, i=i: a[i], batched.params), one.params, rtol=1e-5, atol=1e-6
        )


def test_online_rejects_bad_delay(stream):
    fast, slow, xs, ys = stream
    with pytest.raises(ValueError, match="delay must be an int"):
        run_online(fast, slow, xs, ys, delay=T)


def clip_loss(p, clip):
    x, y = clip
    return jnp.mean((x @ p["w"] - y) ** 2)


@pytest.fixture(scope="module")
def clips():
    k = jax.random.split(jax.random.key(1), 3)
    params = {"w": jax.random.normal(k[0], (3, 1)), "b": jnp.ones(1)}
    xs = jax.random.normal(k[1], (7, 8, 3))
    ys = xs @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.1 * jax.random.normal(k[2], (7, 8, 1))
    fast, slow = P.split(params, P.select(params, "re:^w$"))
    return fast, slow, (xs, ys)


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "cumulative"])
def test_tta_runner_matches_hand_loop(clips, reset):
    fast, slow, data = clips
    opt = optax.adam(0.1)
    result = jax.jit(
        lambda f: tta.run_clips(
            clip_loss, f, slow, data, opt=opt, num_steps=3, reset_per_clip=reset, window=3
        )
    )(fast)
    params, state = fast, opt.init(fast)
    pre, post = [], []
    for c in range(7):
        clip = (data[0][c], data[1][c])
        if reset:
            params, state = fast, opt.init(fast)
        pre.append(clip_loss(P.merge(params, slow), clip))
        for _ in range(3):
            g = jax.grad(lambda f: clip_loss(P.merge(f, slow), clip))(params)
            u, state = opt.update(g, state, params)
            params = optax.apply_updates(params, u)
        post.append(clip_loss(P.merge(params, slow), clip))
    pre, post = np.array(pre), np.array(post)
    np.testing.assert_allclose(result.pre_loss, pre, rtol=1e-5)
    np.testing.assert_allclose(result.post_loss, post, rtol=1e-5)
    np.testing.assert_allclose(result.improvement, pre - post, rtol=1e-4, atol=1e-6)
    expected_roll = [post[max(0, c - 2) : c + 1].mean() for c in range(7)]
    np.testing.assert_allclose(result.rolling_post, expected_roll, rtol=1e-5)
    assert np.all(result.improvement > 0)
    if reset:  # every clip starts from the source parameters
        np.testing.assert_allclose(
            result.pre_loss,
            [clip_loss(P.merge(fast, slow), (data[0][c], data[1][c])) for c in range(7)],
            rtol=1e-5,
        )
    else:  # cumulative: later clips start better than the source model
        assert result.pre_loss[-1] < clip_loss(P.merge(fast, slow), (data[0][-1], data[1][-1]))


def test_rolling_mean_against_numpy():
    values = np.random.default_rng(0).normal(size=120)
    got = tta.rolling_mean(values, 50)
    expected = [values[max(0, i - 49) : i + 1].mean() for i in range(120)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        tta.rolling_mean(values, 0)


def test_rolling_mean_leaves_a_bad_clip_out_of_its_windows_only():
    values = np.random.default_rng(1).normal(size=30)
    values[[4, 5]] = [np.nan, np.inf]  # two bad clips
    got = np.asarray(tta.rolling_mean(values, 8))
    for i in range(30):
        window = [v for v in values[max(0, i - 7) : i + 1] if np.isfinite(v)]  # a Python loop
        np.testing.assert_allclose(got[i], np.mean(window), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(got))  # the mean recovers instead of staying NaN forever
    assert np.isnan(tta.rolling_mean(np.array([np.nan, 1.0]), 1)[0])  # nothing finite: NaN


def test_online_counts_the_updates_it_skips(stream):
    fast, slow, xs, ys = stream
    bad = ys.at[5].set(jnp.nan)  # the pair of t = 5 arrives at t = 5 + H
    result = run_online(fast, slow, xs, bad)
    skipped = np.asarray(result.num_skipped)
    assert skipped[5 + H] == 2 and skipped.sum() == 2  # both inner steps on that pair
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(result.params))


def test_zero_steps_is_the_unadapted_baseline(clips):
    fast, slow, data = clips
    result = tta.run_clips(clip_loss, fast, slow, data, opt=optax.sgd(0.1), num_steps=0)
    np.testing.assert_array_equal(result.improvement, np.zeros(7))
