"""The inner loop: masking by a traced step count, vmap, weights, clipping, non-finite steps."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metattt import inner
from metattt import params as P

K_MAX = 5


def loss_fn(p, batch):
    x, y = batch
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - y) ** 2)


def init_params(key, width=8):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (2, width)),
        "b1": 0.1 * jax.random.normal(k2, (width,)),
        "w2": jax.random.normal(k3, (width, 1)) / np.sqrt(width),
    }


def make_batch(key, n=16):
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (n, 2))
    return x, jnp.sin(x[:, :1] * 2.0) + 0.1 * jax.random.normal(kn, (n, 1))


@pytest.fixture(scope="module")
def problem():
    params = init_params(jax.random.key(0))
    fast, slow = P.split(params, P.select(params, "re:w2|b1"))
    return fast, slow, make_batch(jax.random.key(1))


def python_loop(fast, slow, batch, opt, k, clip_norm=None, weights=None):
    """Reference: k explicit optax steps, no scan, no masks."""
    state = opt.init(fast)
    for i in range(k):
        g = jax.grad(lambda f: loss_fn(P.merge(f, slow), batch))(fast)
        if clip_norm is not None:
            norm = optax.tree.norm(g)
            g = jax.tree.map(lambda x: x * min(1.0, clip_norm / float(norm)), g)
        u, state = opt.update(g, state, fast)
        w = 1.0 if weights is None else weights[i]
        fast = jax.tree.map(lambda p, d: p + w * d, fast, u)
    return fast


@pytest.mark.parametrize("opt", [optax.sgd(0.1), optax.adam(0.05)], ids=["sgd", "adam"])
def test_masked_k_equals_explicit_k_under_one_compilation(problem, opt):
    fast, slow, batch = problem
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(k):
        return inner.adapt(loss_fn, fast, slow, batch, opt=opt, max_steps=K_MAX, num_steps=k)

    for k in range(K_MAX + 1):
        result = run(jnp.asarray(k))
        expected = python_loop(fast, slow, batch, opt, k)
        chex.assert_trees_all_close(result.params, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(result.active), np.arange(K_MAX) < k)
        assert int(result.num_skipped) == 0
        assert np.all(np.asarray(result.update_norms)[k:] == 0.0)
        if k:
            assert np.all(np.asarray(result.update_norms)[:k] > 0.0)


def test_step_weights_and_clipping_match_reference(problem):
    fast, slow, batch = problem
    weights = jnp.array([1.0, 0.5, 0.0, 2.0, 0.25])
    result = inner.adapt(
        loss_fn,
        fast,
        slow,
        batch,
        opt=optax.sgd(0.3),
        max_steps=K_MAX,
        step_weights=weights,
        clip_norm=0.05,
    )
    expected = python_loop(
        fast, slow, batch, optax.sgd(0.3), K_MAX, clip_norm=0.05, weights=np.asarray(weights)
    )
    chex.assert_trees_all_close(result.params, expected, rtol=1e-5, atol=1e-6)
    # grad norms are reported before clipping; applied updates are at most lr * w * clip.
    assert float(result.grad_norms[0]) > 0.05
    np.testing.assert_allclose(result.update_norms, 0.3 * 0.05 * weights, rtol=1e-5)


def test_vmapped_per_example_adaptation_equals_python_loop(problem):
    fast, slow, _ = problem
    batches = jax.vmap(make_batch)(jax.random.split(jax.random.key(2), 4))
    steps = jnp.array([0, 1, 3, 5])

    def one(batch, k):
        return inner.adapt(
            loss_fn, fast, slow, batch, opt=optax.sgd(0.1), max_steps=K_MAX, num_steps=k
        ).params

    batched = jax.jit(jax.vmap(one))(batches, steps)
    for i in range(4):
        batch_i = jax.tree.map(lambda x, i=i: x[i], batches)
        expected = python_loop(fast, slow, batch_i, optax.sgd(0.1), int(steps[i]))
        got = jax.tree.map(lambda x, i=i: x[i], batched)
        chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first_order", [False, True])
def test_non_finite_step_is_skipped_counted_and_meta_gradient_stays_finite(problem, first_order):
    """Also under first order, where the gradient is not sanitised (nothing differentiates
    through it); the applied inner losses enter the meta-loss as in E2E-TTT."""
    fast, slow, (x, y) = problem
    bad = (x.at[3, 0].set(jnp.nan), y)
    opt = optax.adam(0.05, eps_root=1e-8)

    def meta_loss(f):
        r = inner.adapt(loss_fn, f, slow, bad, opt=opt, max_steps=3, first_order=first_order)
        applied = jnp.sum(jnp.where(r.active, r.losses, 0.0))
        return loss_fn(P.merge(r.params, slow), (x, y)) + applied, r

    (value, result), grads = jax.value_and_grad(meta_loss, has_aux=True)(fast)
    assert int(result.num_skipped) == 3
    assert not np.any(np.asarray(result.active))
    chex.assert_trees_all_equal(result.params, fast)
    chex.assert_trees_all_equal(result.opt_state, opt.init(fast))
    chex.assert_tree_all_finite(grads)
    # No step applied: the meta-gradient is the plain gradient at the initial parameters.
    plain = jax.grad(lambda f: loss_fn(P.merge(f, slow), (x, y)))(fast)
    chex.assert_trees_all_close(grads, plain, rtol=1e-6)
    assert np.isfinite(float(value))


def test_skip_is_per_step_not_per_loop(problem):
    """A step that goes non-finite mid-loop is skipped; earlier steps stay applied."""
    fast, slow, batch = problem

    def exploding(p, b):  # finite while w2 is small, infinite once it grows
        return loss_fn(p, b) + jnp.where(jnp.sum(p["w2"] ** 2) > 3.0, jnp.inf, 0.0)

    far = jax.tree.map(lambda w: w, fast)
    far["w2"] = jnp.full_like(fast["w2"], 0.6)  # sum of squares 2.88: finite at the start
    result = inner.adapt(exploding, far, slow, batch, opt=optax.sgd(-0.5), max_steps=4)
    active = np.asarray(result.active)
    assert active[0] and not active[-1]
    assert int(result.num_skipped) == int((~active).sum())
    assert np.all(np.isfinite(jax.tree.leaves(result.params)[0]))


def test_has_aux_stacks_per_step(problem):
    fast, slow, batch = problem
    aux_loss = lambda p, b: (loss_fn(p, b), {"w2_norm": jnp.linalg.norm(p["w2"])})
    result = inner.adapt(
        aux_loss, fast, slow, batch, opt=optax.sgd(0.1), max_steps=K_MAX, has_aux=True
    )
    assert result.aux["w2_norm"].shape == (K_MAX,)
    assert float(result.losses[-1]) < float(result.losses[0])


def test_bad_arguments_raise(problem):
    fast, slow, batch = problem
    with pytest.raises(ValueError, match="step_weights must have shape"):
        inner.adapt(
            loss_fn, fast, slow, batch, opt=optax.sgd(0.1), max_steps=3, step_weights=jnp.ones(4)
        )
    with pytest.raises(ValueError, match="max_steps"):
        inner.adapt(loss_fn, fast, slow, batch, opt=optax.sgd(0.1), max_steps=2.5)
    with pytest.raises(ValueError, match="num_steps must be in"):
        inner.adapt(loss_fn, fast, slow, batch, opt=optax.sgd(0.1), max_steps=2, num_steps=3)
    with pytest.raises(ValueError, match="clip_norm"):
        inner.adapt(loss_fn, fast, slow, batch, opt=optax.sgd(0.1), max_steps=2, clip_norm=0.0)


def test_adapt_merged_and_adaptation_curve_match_a_python_loop():
    params = init_params(jax.random.key(40))
    kx, ky, kq = jax.random.split(jax.random.key(41), 3)
    support = (jax.random.normal(kx, (16, 2)), jax.random.normal(ky, (16, 1)))
    query = (jax.random.normal(kq, (16, 2)), support[1][::-1])
    mask = P.select(params, "re:w2|b1")
    lr = 0.3

    # The reference: plain SGD on the selected leaves, one step at a time, in Python.
    p, curve = dict(params), [float(loss_fn(params, query))]
    for _ in range(K_MAX):
        grads = jax.grad(loss_fn)(p, support)
        p = {k: (v - lr * grads[k] if k in ("w2", "b1") else v) for k, v in p.items()}
        curve.append(float(loss_fn(p, query)))

    kw = dict(opt=optax.sgd(lr), max_steps=K_MAX)
    adapted, result = inner.adapt_merged(loss_fn, params, mask, support, **kw)
    assert jax.tree.structure(adapted) == jax.tree.structure(params)
    np.testing.assert_array_equal(adapted["w1"], params["w1"])  # frozen leaves untouched
    for k in ("w2", "b1"):
        np.testing.assert_allclose(adapted[k], p[k], rtol=1e-5, atol=1e-6)
    assert jax.tree.leaves(result.params)[0].shape in {(8,), (8, 1)}  # only the fast half
    got = inner.adaptation_curve(loss_fn, loss_fn, params, mask, support, query, **kw)
    np.testing.assert_allclose(got, curve, rtol=1e-5, atol=1e-6)
    assert got.shape == (K_MAX + 1,) and curve[-1] < curve[0]
    with pytest.raises(ValueError, match="clip_norm must be a finite positive"):
        inner.adapt_merged(loss_fn, params, mask, support, clip_norm=float("nan"), **kw)


def test_a_step_whose_update_overflows_is_skipped_and_counted():
    params = init_params(jax.random.key(50))
    batch = make_batch(jax.random.key(51))
    fast, slow = P.split(params, P.select(params, "re:."))
    # The gradient is finite, but the rule's update is not (as when float16 Adam overflows).
    huge = optax.sgd(float("inf"))
    result = inner.adapt(loss_fn, fast, slow, batch, opt=huge, max_steps=3, num_steps=2)
    assert int(result.num_skipped) == 2 and not bool(jnp.any(result.active))
    assert np.all(np.isfinite(np.asarray(result.grad_norms)))
    for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(fast), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing applied
    np.testing.assert_array_equal(result.update_norms, np.zeros(3))


def test_guard_off_is_plain_optimizer_steps_and_lets_a_nan_through():
    params = init_params(jax.random.key(60))
    batch = make_batch(jax.random.key(61))
    fast, slow = P.split(params, P.select(params, "re:w2|b1"))
    opt = optax.adam(0.05)
    off = inner.adapt(loss_fn, fast, slow, batch, opt=opt, max_steps=3, skip_nonfinite=False)
    p, state = fast, opt.init(fast)  # the reference: optax by hand, in Python
    for _ in range(3):
        g = jax.grad(lambda f: loss_fn(P.merge(f, slow), batch))(p)
        u, state = opt.update(g, state, p)
        p = optax.apply_updates(p, u)
    chex.assert_trees_all_close(off.params, p, rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(off.active)) and int(off.num_skipped) == 0
    x, y = batch
    bad = (x.at[0, 0].set(jnp.nan), y)
    poisoned = inner.adapt(loss_fn, fast, slow, bad, opt=opt, max_steps=2, skip_nonfinite=False)
    assert np.isnan(np.asarray(poisoned.params["w2"])).any()  # as in plain JAX: no guard
    guarded = inner.adapt(loss_fn, fast, slow, bad, opt=opt, max_steps=2)
    assert int(guarded.num_skipped) == 2 and np.isnan(float(guarded.grad_norms[0]))


def test_a_non_finite_gradient_of_a_finite_loss_is_skipped():
    # d/dp sqrt(sum p^2) at p = 0 is 0/0: the loss is 0, the gradient NaN.
    fast, slow = {"p": jnp.zeros(3)}, {"p": None}
    result = inner.adapt(
        lambda q, _: jnp.sqrt(jnp.sum(q["p"] ** 2)), fast, slow, None,
        opt=optax.sgd(0.1), max_steps=2,
    )  # fmt: skip
    assert float(result.losses[0]) == 0.0 and np.isnan(float(result.grad_norms[0]))
    assert int(result.num_skipped) == 2
    np.testing.assert_array_equal(result.params["p"], np.zeros(3))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_a_supplied_first_value_and_grad_is_step_0(problem, first_order):
    """Passing step 0's (loss, grad) in gives the loop without it: the same steps, losses and
    masks, and the same meta-gradient wrt the initial and the frozen parameters as the plain
    loop (whose meta-gradients test_meta checks against finite differences)."""
    fast, slow, batch = problem
    opt = optax.adam(0.05, eps_root=1e-16)
    vg = inner.value_and_grad_fn(loss_fn)
    kw = dict(opt=opt, max_steps=K_MAX, num_steps=jnp.asarray(3), first_order=first_order)

    @functools.partial(jax.jit, static_argnums=2)  # one program per variant, not eager ops
    def run(f, s, reuse):
        first = vg(f, s, batch) if reuse else None
        return inner.adapt(loss_fn, f, s, batch, first_value_and_grad=first, **kw), first

    (plain, _), (reused, supplied) = run(fast, slow, False), run(fast, slow, True)
    chex.assert_trees_all_close(reused.params, plain.params, rtol=1e-5, atol=1e-6)
    for field in ("losses", "grad_norms", "update_norms"):
        np.testing.assert_allclose(getattr(reused, field), getattr(plain, field), rtol=1e-5)
    np.testing.assert_array_equal(reused.active, plain.active)
    assert float(reused.losses[0]) == float(supplied[0])  # the supplied value

    def meta(f, s, reuse):
        out, _ = run(f, s, reuse)
        return loss_fn(P.merge(out.params, s), batch)

    meta_grad = jax.jit(jax.grad(meta, argnums=(0, 1)), static_argnums=2)
    g_plain, g_reused = meta_grad(fast, slow, False), meta_grad(fast, slow, True)
    chex.assert_trees_all_close(g_reused, g_plain, rtol=1e-4, atol=1e-6)
    one = inner.adapt(
        loss_fn, fast, slow, batch, opt=opt, max_steps=1, first_value_and_grad=vg(fast, slow, batch)
    )
    chex.assert_trees_all_close(
        one.params, python_loop(fast, slow, batch, opt, 1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("opt", [optax.sgd(0.1), optax.adam(0.05)], ids=["sgd", "adam"])
def test_first_order_guard_gives_autodiffs_meta_gradient(problem, opt):
    """The guard's cheap first-order VJP (only the loss value is differentiated) equals plain
    autodiff with the inner gradients stopped (the guard off), inner losses in the meta-loss
    as in E2E-TTT, for both the fast and the frozen half."""
    fast, slow, (x, y) = problem

    def meta_loss(f, s, guard):
        r = inner.adapt(
            loss_fn, f, s, (x, y), opt=opt, max_steps=3, first_order=True, skip_nonfinite=guard
        )
        return loss_fn(P.merge(r.params, s), (x[::-1], y[::-1])) + jnp.mean(r.losses)

    grad = jax.jit(jax.grad(meta_loss, argnums=(0, 1)), static_argnums=2)
    chex.assert_trees_all_close(
        grad(fast, slow, True), grad(fast, slow, False), rtol=1e-5, atol=1e-6
    )


def test_nonfinite_probe_is_zero_or_nan_over_all_leaves():
    """One reduction over every inexact leaf: 0 when all entries are finite (also huge ones,
    which a sum or a norm would overflow), NaN when any entry of any leaf is NaN or +-inf."""
    keys = jax.random.split(jax.random.key(70), 3)
    tree = {
        "a": jax.random.normal(keys[0], (3, 4)),
        "b": [jax.random.normal(keys[1], (5,)), jnp.arange(4)],  # an int leaf is not tested
        "c": 3e38 * jnp.sign(jax.random.normal(keys[2], (2, 2))),
    }
    probe = jax.jit(inner.nonfinite_probe)
    assert float(probe(tree)) == 0.0
    assert float(probe(tree, {"x": jnp.float32(1.0)})) == 0.0
    assert float(inner.nonfinite_probe({})) == 0.0
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        for path in ("a", "b", "c"):
            planted = jax.tree.map(lambda x: x, tree)
            if path == "b":
                planted["b"][0] = planted["b"][0].at[2].set(bad)
            else:
                planted[path] = planted[path].at[1, 1].set(bad)
            assert np.isnan(float(probe(planted))), (bad, path)
            assert not bool(inner.tree_all_finite(planted))
            assert np.isnan(float(probe(tree, planted)))  # any of several trees
    assert bool(inner.tree_all_finite(tree))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf], ids=["nan", "inf"])
def test_a_planted_fault_leaves_the_state_before_the_step(problem, first_order, bad):
    """Two clean steps, then three on a batch with a NaN or inf target: the three are skipped
    and counted, and parameters and Adam state stay exactly those before them. The expectation
    does not use the guard: a Python loop of two optax steps, and the meta-gradient of a
    two-step loop on the clean batch."""
    fast, slow, (x, y) = problem
    opt = optax.adam(0.05, eps_root=1e-8)
    poisoned = (x, y.at[5, 0].set(bad))
    kw = dict(opt=opt, first_order=first_order)

    def meta_loss(f):
        first = inner.adapt(loss_fn, f, slow, (x, y), max_steps=2, **kw)
        second = inner.adapt(
            loss_fn, first.params, slow, poisoned, max_steps=3, opt_state=first.opt_state, **kw
        )
        return loss_fn(P.merge(second.params, slow), (x[::-1], y[::-1])), (first, second)

    (value, (first, second)), grads = jax.value_and_grad(meta_loss, has_aux=True)(fast)
    assert int(first.num_skipped) == 0 and int(second.num_skipped) == 3
    assert not np.any(np.asarray(second.active))
    assert not np.isfinite(np.asarray(second.grad_norms)).any()  # reported, not hidden as 0
    chex.assert_trees_all_equal(second.params, first.params)  # the state before the step
    chex.assert_trees_all_equal(second.opt_state, first.opt_state)
    chex.assert_trees_all_close(
        second.params, python_loop(fast, slow, (x, y), opt, 2), rtol=1e-5, atol=1e-6
    )

    def clean_meta_loss(f):
        r = inner.adapt(loss_fn, f, slow, (x, y), max_steps=2, **kw)
        return loss_fn(P.merge(r.params, slow), (x[::-1], y[::-1]))

    chex.assert_tree_all_finite(grads)
    chex.assert_trees_all_close(grads, jax.grad(clean_meta_loss)(fast), rtol=1e-5, atol=1e-6)
    assert np.isfinite(float(value))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_an_overflowing_update_is_skipped_in_either_order(problem, first_order):
    """First order tests gradient and update in one probe, second order one after the other:
    both skip a step whose gradient is finite and whose update is not (SGD with lr inf, as
    float16 Adam overflows), and keep the parameters."""
    fast, slow, batch = problem
    result = inner.adapt(
        loss_fn, fast, slow, batch, opt=optax.sgd(float("inf")), max_steps=2,
        first_order=first_order,
    )  # fmt: skip
    assert int(result.num_skipped) == 2 and np.isfinite(np.asarray(result.grad_norms)).all()
    chex.assert_trees_all_equal(result.params, fast)


def test_guard_on_equals_guard_off_on_clean_data_second_order(problem):
    """On finite data the guard changes nothing: second-order meta-gradients (through Adam,
    the masked update's custom VJP and the sanitised gradient) equal plain autodiff's."""
    fast, slow, (x, y) = problem
    opt = optax.adam(0.05, eps_root=1e-8)

    def meta_loss(f, s, guard):
        r = inner.adapt(
            loss_fn, f, s, (x, y), opt=opt, max_steps=3, num_steps=jnp.asarray(2),
            skip_nonfinite=guard, clip_norm=0.5,
        )  # fmt: skip
        return loss_fn(P.merge(r.params, s), (x[::-1], y[::-1])) + jnp.mean(r.losses)

    grad = jax.jit(jax.grad(meta_loss, argnums=(0, 1)), static_argnums=2)
    chex.assert_trees_all_close(
        grad(fast, slow, True), grad(fast, slow, False), rtol=1e-5, atol=1e-6
    )


def _fault_cases():
    """(name, loss_fn, fast, slow, batch, lr, max_steps): a clean loop and each fault the
    guard handles, plus a float16 sum p + u that overflows (caught by neither probe: both test
    the update, not the new parameters, so the step is applied by both)."""
    params = init_params(jax.random.key(80))
    fast, slow = P.split(params, P.select(params, "re:w2|b1"))
    x, y = make_batch(jax.random.key(81))

    def exploding(p, b):  # finite while w2 is small, infinite once it grows
        return loss_fn(p, b) + jnp.where(jnp.sum(p["w2"] ** 2) > 3.0, jnp.inf, 0.0)

    far = dict(fast, w2=jnp.full_like(fast["w2"], 0.6))
    f16 = {"p": jnp.array([6e4, 1.0, -2.0], jnp.float16)}
    return [
        ("clean", loss_fn, fast, slow, (x, y), 0.1, 3),
        ("nan support", loss_fn, fast, slow, (x.at[3, 0].set(jnp.nan), y), 0.1, 3),
        ("inf target", loss_fn, fast, slow, (x, y.at[5, 0].set(jnp.inf)), 0.1, 3),
        ("mid-loop", exploding, far, slow, (x, y), -0.5, 4),
        ("f16 overflow", lambda q, s: s * jnp.sum(q["p"] ** 2), f16, {"p": None},
         jnp.float16(1e3), 0.5, 2),
        ("f16 p + u overflow", lambda q, s: s * jnp.sum(q["p"].astype(jnp.float32)), f16,
         {"p": None}, jnp.float32(-1e4), 1.0, 2),
    ]  # fmt: skip


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_bounded_sgd_skips_exactly_the_steps_optax_sgd_skips(first_order):
    """inner.sgd probes the gradient only (|u| <= |g|): on every fault case it applies,
    skips and counts the same steps as optax.sgd, whose update the guard also probes, and,
    through a NaN in the data or a loss that overflows mid-loop, the meta-gradients through both
    are finite and agree (the update is tested in either case,
    not the new parameters: an overflowing float16 sum p + u is applied by both)."""
    for name, fn, fast, slow, batch, lr, k in _fault_cases():

        def run(f, opt, fn=fn, slow=slow, batch=batch, k=k):
            return inner.adapt(fn, f, slow, batch, opt=opt, max_steps=k, first_order=first_order)

        ref, got = run(fast, optax.sgd(lr)), run(fast, inner.sgd(lr))
        np.testing.assert_array_equal(got.active, ref.active, err_msg=name)
        assert int(got.num_skipped) == int(ref.num_skipped), name
        chex.assert_trees_all_close(got.params, ref.params, rtol=1e-6, atol=0)
        if name == "clean":
            assert int(got.num_skipped) == 0
        elif name.startswith("f16 p"):
            assert bool(got.active[0]) and np.isinf(np.asarray(got.params["p"][0]))
        else:
            assert int(got.num_skipped) > 0, name
        if name not in ("nan support", "mid-loop"):  # a fault from the data, one from params
            continue

        def meta(f, opt, run=run, slow=slow):
            return loss_fn(P.merge(run(f, opt).params, slow), make_batch(jax.random.key(82)))

        g_ref = jax.grad(meta)(fast, optax.sgd(lr))
        g_got = jax.grad(meta)(fast, inner.sgd(lr))
        chex.assert_tree_all_finite(g_got)
        chex.assert_trees_all_close(g_got, g_ref, rtol=1e-5, atol=1e-7)


def test_bounded_sgd_still_probes_the_update_where_its_bound_does_not_hold():
    """Step weights may scale the update past the float16 range, and a supplied gradient of a
    wider dtype than its parameter is cast down: then the update is probed and the step
    skipped, as with any rule."""
    fast, slow = {"p": jnp.array([1.0, -2.0], jnp.float16)}, {"p": None}

    def fn(q, _):
        return jnp.sum(q["p"] ** 2)

    heavy = inner.adapt(
        fn, fast, slow, None, opt=inner.sgd(0.5), max_steps=2,
        step_weights=jnp.array([1e6, 1.0]),
    )  # fmt: skip
    np.testing.assert_array_equal(heavy.active, [False, True])
    assert np.all(np.isfinite(np.asarray(heavy.params["p"], np.float32)))
    wide = (jnp.float32(1.0), {"p": jnp.array([1e6, 1.0], jnp.float32)})  # -0.5 * 1e6: inf
    cast = inner.adapt(
        fn, fast, slow, None, opt=inner.sgd(0.5), max_steps=1, first_value_and_grad=wide
    )
    assert int(cast.num_skipped) == 1
    np.testing.assert_array_equal(cast.params["p"], fast["p"])
