"""ATTD's method: masked steps equal explicit steps, the grouped evaluation path equals the
masked one, the second-order outer gradient matches finite differences, baselines share the
code path, and a tiny end-to-end run learns.

Sizes are tiny (V = 5, M = D = 8, N = 4, one layer, B = 4, L = 8, K_max = 2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attd.controller import fixed_controller, gate_controller, threshold_controller
from attd.dynamics import Psi, a_log_delta, init_psi, make_adapter
from attd.mamba import MambaConfig, init_mamba
from attd.method import ATTDParams, benchmark_eval_paths, make_attd
from metattt import objectives

CFG = MambaConfig(
    vocab_size=5,
    d_model=8,
    n_layers=1,
    d_state=4,
    expand=1,
    d_conv=2,
    num_classes=2,
    scan_chunk_size=4,
    lean_backward=False,  # plain autodiff of the scan: smaller programs, faster compiles
)
BATCH, LENGTH, K_MAX, LR = 4, 8, 2, 50.0
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 5, (BATCH, LENGTH)), jnp.int32)
MASK = jnp.ones_like(TOKENS).at[3, 6:].set(0)  # one padded input


def start_psi(seed=0, scale=0.5):
    """ψ₀ with a non-zero U too, so that every factor moves in the first step."""
    psi = init_psi(CFG, 2, jax.random.key(seed), scale)
    u = np.random.default_rng(seed).standard_normal(psi.U.shape)
    return Psi(jnp.asarray(scale * u, jnp.float32), psi.V)


@pytest.fixture(scope="module")
def attd():
    apply, theta = init_mamba(CFG, seed=0)
    method = make_attd(apply, CFG, threshold_controller(K_MAX), inner_lr=LR)
    params = method.init(theta, start_psi())
    s = np.sort(np.asarray(jax.jit(method.signal)(params, TOKENS, MASK)))
    # thresholds between the sorted signals: K = 0, 1, 1, 2 by rank of s
    params = method.init(theta, params.psi, jnp.array([(s[0] + s[1]) / 2, (s[2] + s[3]) / 2]))
    return apply, method, params, method.predict(params, TOKENS, MASK)


def test_masked_steps_equal_explicit_steps(attd):
    apply, method, params, out = attd
    np.testing.assert_array_equal(np.sort(out.hard_steps), [0, 1, 1, 2])

    @jax.jit
    def grad(psi, x, m):
        logits = apply(params.theta, x[None], a_log_delta=a_log_delta(psi), head="lm")[0]
        return jax.grad(
            lambda p: objectives.next_token_cross_entropy(
                apply(params.theta, x[None], a_log_delta=a_log_delta(p), head="lm")[0], x, m
            )
        )(psi), logits

    moved = 0.0
    for i in range(BATCH):
        psi = params.psi
        for _ in range(int(out.hard_steps[i])):  # a plain Python loop of SGD steps
            g, _ = grad(psi, TOKENS[i], MASK[i])
            psi = jax.tree.map(lambda p, d: p - LR * d, psi, g)
        got = jax.tree.map(lambda a: a[i], out.psi)
        for a, b in zip(got, psi, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, float(jnp.max(jnp.abs(psi.U - params.psi.U))))
        np.testing.assert_allclose(
            out.update_sq[i] > 0, out.hard_steps[i] > 0
        )  # only taken steps are charged
    assert moved > 1e-3  # the steps are not negligible at this learning rate


def test_a_per_channel_family_adapts_by_explicit_sgd_steps(attd):
    """ATTD with the Δ-bias family (full TTT, K = 2) equals a Python loop of SGD steps on the
    model whose Δ bias is shifted by hand."""
    apply, _, params, _ = attd
    adapter = make_adapter("dt_bias", CFG)
    method = make_attd(apply, CFG, fixed_controller(K_MAX), inner_lr=LR, adapter=adapter)
    psi0 = jnp.asarray(np.random.default_rng(3).normal(0, 0.1, (1, CFG.d_inner)), jnp.float32)
    out = method.predict(method.init(params.theta, psi0), TOKENS, MASK)

    def shifted(psi):
        theta = jax.tree.map(lambda a: a, params.theta)
        mixer = theta["layers"]["0"]["mixer"]
        mixer["dt_proj"] = {**mixer["dt_proj"], "bias": mixer["dt_proj"]["bias"] + psi[0]}
        return theta

    @jax.jit
    def grad(psi, x, m):
        lm = lambda p: apply(shifted(p), x[None], head="lm")[0]
        return jax.grad(lambda p: objectives.next_token_cross_entropy(lm(p), x, m))(psi)

    for i in range(BATCH):
        psi = psi0
        for _ in range(K_MAX):
            psi = psi - LR * grad(psi, TOKENS[i], MASK[i])
        np.testing.assert_allclose(out.psi[i], psi, rtol=1e-5, atol=1e-6)
        logits = jax.jit(apply)(shifted(psi), TOKENS[i : i + 1], mask=MASK[i : i + 1])[0]
        np.testing.assert_allclose(out.logits[i], logits, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out.psi - psi0))) > 1e-3


def test_grouped_path_equals_the_masked_path(attd):
    _, method, params, out = attd
    grouped = method.predict_grouped(params, TOKENS, MASK)
    np.testing.assert_array_equal(grouped.hard_steps, out.hard_steps)
    np.testing.assert_allclose(grouped.logits, out.logits, rtol=1e-5, atol=1e-6)
    assert grouped.inner_steps == 4 and grouped.masked_steps == BATCH * K_MAX
    assert grouped.inner_steps <= grouped.executed_steps < grouped.masked_steps
    timing = benchmark_eval_paths(method, params, TOKENS, MASK, repeats=1)
    assert timing["max_abs_diff"] < 1e-5 and timing["masked_s"] > 0 and timing["grouped_s"] > 0


def test_transition_radius_is_below_one_after_adaptation(attd):
    _, method, params, out = attd
    rho = jax.jit(method.transition_radius)(params, TOKENS, out.psi)
    assert rho.shape == (BATCH,) and bool(jnp.all((rho > 0) & (rho < 1)))


def test_fixed_mamba_baseline_is_the_base_model(attd):
    apply, _, params, _ = attd
    method = make_attd(apply, CFG, fixed_controller(0))
    base = method.init(params.theta, init_psi(CFG, 2, jax.random.key(1)))
    out = method.predict(base, TOKENS, MASK)
    expected = jax.jit(apply)(base.theta, TOKENS, mask=MASK)
    np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.hard_steps, 0)
    assert out.inner_losses.shape == (BATCH, 0)


def test_classify_is_the_model_under_psi0_and_equals_the_unadapted_inputs(attd):
    """classify applies θ edited by ψ₀ (the model itself, no step); for the K = 0 input of
    the masked path the two agree, for adapted ones they differ."""
    apply, method, params, out = attd
    logits = jax.jit(method.classify)(params, TOKENS, MASK)
    theta = jax.tree.map(jnp.asarray, params.theta)
    expected = jax.jit(apply)(theta, TOKENS, mask=MASK, a_log_delta=a_log_delta(params.psi))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    hard = np.asarray(out.hard_steps)
    np.testing.assert_allclose(logits[hard == 0], out.logits[hard == 0], rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(np.asarray(logits - out.logits))[hard > 0].max(axis=-1) > 1e-6)


def test_masked_reconstruction_signal_is_seeded(attd):
    apply, _, params, _ = attd
    method = make_attd(apply, CFG, gate_controller(K_MAX), objective="masked", mask_rate=0.3)
    signal = jax.jit(method.signal)
    s1, s2 = signal(params, TOKENS, MASK), signal(params, TOKENS, MASK)
    np.testing.assert_array_equal(s1, s2)
    assert s1.shape == (BATCH,) and bool(jnp.all(jnp.isfinite(s1) & (s1 > 0)))


def test_second_order_outer_gradient_matches_finite_differences():
    """d L_total / d(θ, ψ₀, thresholds) through two second-order inner steps, in float64, along
    random directions, against central differences (ε = 1e-6: the truncation error is
    ~3e-8 relative at this inner learning rate, measured at ε = 1e-3 .. 1e-6).
    """
    apply, theta = init_mamba(CFG, seed=1)
    method = make_attd(
        apply,
        CFG,
        threshold_controller(K_MAX, temperature=0.5),
        inner_lr=LR,
        first_order=False,
        signal_grad=True,
        lam=0.1,
        beta=1e-3,
    )
    params = method.init(theta, start_psi(seed=2), jnp.array([1.4, 1.8]))  # s ≈ 1.60, 1.62
    batch = (TOKENS[:2], MASK[:2], jnp.array([0, 1]))
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        loss = jax.jit(lambda p: method.loss(p, batch)[0])
        grads = jax.jit(jax.grad(lambda p: method.loss(p, batch)[0]))(params)
        leaves, treedef = jax.tree.flatten(params)
        eps = 1e-6
        for _ in range(3):
            direction = treedef.unflatten([rng.standard_normal(np.shape(x)) for x in leaves])
            shift = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, params, direction)
            numeric = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
            pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
            analytic = sum(jnp.vdot(g, d) for g, d in pairs)
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_end_to_end_training_decreases_the_loss():
    """Majority of tokens (label: more 1s than 2s), 16 inputs in 4 batches, 40 Adam steps."""
    apply, theta = init_mamba(CFG, seed=3)
    rng = np.random.default_rng(3)
    ones = rng.choice([1, 2, 3, 5, 6, 7], 16)
    tokens = np.stack([rng.permutation([1] * k + [2] * (LENGTH - k)) for k in ones])
    tokens, labels = jnp.asarray(tokens, jnp.int32), jnp.asarray(ones > LENGTH // 2, jnp.int32)
    mask = jnp.ones_like(tokens)
    method = make_attd(apply, CFG, threshold_controller(K_MAX), inner_lr=LR, lam=0.05)
    params = method.init(theta, start_psi(seed=3))
    s = jax.jit(method.signal)(params, tokens[:4], mask[:4])
    params = method.init(theta, params.psi, jnp.mean(s) + jnp.array([-0.05, 0.05]))
    optimizer = optax.adam(1e-2)
    step = method.train_step(optimizer)
    state, start = step.init(params), params
    losses = []
    for i in range(40):
        b = slice(4 * (i % 4), 4 * (i % 4) + 4)
        state, metrics = step.update(state, (tokens[b], mask[b], labels[b]))
        losses.append(float(metrics["loss"]))
    params = state.params
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert not np.allclose(params.controller["raw"], start.controller["raw"])  # learned too
    assert isinstance(params, ATTDParams)


def test_bad_arguments_raise(attd):
    apply, method, params, _ = attd
    with pytest.raises(ValueError, match="objective"):
        make_attd(apply, CFG, fixed_controller(1), objective="entropy")
    with pytest.raises(ValueError, match="cost"):
        make_attd(apply, CFG, fixed_controller(1), cost="cubic")
    with pytest.raises(ValueError, match="mask_token"):
        make_attd(apply, CFG, fixed_controller(1), objective="masked", mask_token=9)
    with pytest.raises(ValueError, match="tokens"):
        method.signal(params, TOKENS[0], MASK[0])


def test_int_weight_adds_the_mean_signal_to_the_loss_and_its_gradient(attd):
    """μ · E[s] joins the outer objective: loss and θ-gradient move by exactly μ times those of
    the mean ponder signal (computed on its own, through ``signal``)."""
    apply, _, params, _ = attd
    labels = jnp.array([0, 1, 1, 0])
    mu = 0.7
    plain, joint = (
        make_attd(apply, CFG, threshold_controller(K_MAX), inner_lr=LR, int_weight=w)
        for w in (0.0, mu)
    )
    batch = (TOKENS, MASK, labels)
    (l0, m0), g0 = jax.jit(jax.value_and_grad(plain.loss, has_aux=True))(params, batch)
    (l1, m1), g1 = jax.jit(jax.value_and_grad(joint.loss, has_aux=True))(params, batch)
    mean_s = lambda p: jnp.mean(plain.signal(p, TOKENS, MASK))
    s, gs = jax.jit(jax.value_and_grad(mean_s))(params)
    np.testing.assert_allclose(l1 - l0, mu * s, rtol=1e-5)
    np.testing.assert_allclose(m1.task_loss, m0.task_loss, rtol=1e-6)
    for a, b, c in zip(
        jax.tree.leaves(g1.theta), jax.tree.leaves(g0.theta), jax.tree.leaves(gs.theta), strict=True
    ):
        np.testing.assert_allclose(a - b, mu * c, rtol=1e-3, atol=1e-6)
    assert float(optax.tree.norm(gs.theta)) > 1e-3  # the check has teeth
    with pytest.raises(ValueError, match="int_weight"):
        make_attd(apply, CFG, fixed_controller(1), int_weight=-1.0)
