"""Dynamic-rank LoRA: the masked max-rank buffer against real allocations of the active rank.

The independent reference is a plain LoRA whose factors have exactly r components, trained by
the same optax rule: the masked adapter must follow it step for step, across grow, shrink and
free, with its optimizer state carried over the way a careful hand-written reallocation would.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metattt import adapters as L
from metattt.adapters import LoRAFactors

D_IN, D_OUT, R_MAX = 6, 3, 5
SCALE = 0.5


@pytest.fixture(scope="module")
def data():
    k = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k[0], (D_IN, D_OUT)) / np.sqrt(D_IN)
    x = jax.random.normal(k[1], (16, D_IN))
    y = jax.random.normal(k[2], (16, D_OUT))
    return w, (x, y)


def masked_loss(w):
    def loss(lora, batch):
        x, y = batch
        return jnp.mean((L.lora_apply(x, w, lora) - y) ** 2)

    return loss


def small_loss(w, factors, batch):
    """A real rank-r LoRA: factors (D_in, r) and (r, D_out), no mask."""
    x, y = batch
    return jnp.mean((x @ w + SCALE * (x @ factors.a) @ factors.b - y) ** 2)


def fresh(opt):
    lora = L.lora_init(D_IN, D_OUT, R_MAX, scale=SCALE)
    return lora, opt.init(lora.factors)


def test_apply_equals_sliced_reference(data):
    w, (x, _) = data
    k = jax.random.split(jax.random.key(1), 2)
    lora = L.lora_init(D_IN, D_OUT, R_MAX, scale=SCALE)
    lora = lora._replace(
        factors=LoRAFactors(
            jax.random.normal(k[0], (D_IN, R_MAX)), jax.random.normal(k[1], (R_MAX, D_OUT))
        ),
        mask=jnp.array([1.0, 1.0, 1.0, 0.0, 0.0]),
    )
    bias = jnp.arange(D_OUT, dtype=jnp.float32)
    xs, ws = np.asarray(x, np.float64), np.asarray(w, np.float64)
    a, b = (np.asarray(f, np.float64) for f in lora.factors)
    expected = xs @ ws + bias + SCALE * (xs @ a[:, :3]) @ b[:3]
    np.testing.assert_allclose(L.lora_apply(x, w, lora, bias), expected, rtol=1e-5, atol=1e-5)
    assert int(L.rank(lora)) == 3 and int(L.active_params(lora)) == 3 * (D_IN + D_OUT)
    # Batched leading axes.
    assert L.lora_apply(x.reshape(2, 8, D_IN), w, lora).shape == (2, 8, D_OUT)


def test_masked_components_get_zero_gradient(data):
    w, batch = data
    k = jax.random.split(jax.random.key(2), 2)
    # Deliberately non-zero inactive entries: only the forward mask can zero their gradient.
    lora = L.lora_init(D_IN, D_OUT, R_MAX, scale=SCALE)._replace(
        factors=LoRAFactors(
            jax.random.normal(k[0], (D_IN, R_MAX)), jax.random.normal(k[1], (R_MAX, D_OUT))
        ),
        mask=jnp.array([1.0, 1.0, 0.0, 0.0, 0.0]),
    )
    g = jax.grad(lambda f: masked_loss(w)(lora._replace(factors=f), batch))(lora.factors)
    assert np.all(np.asarray(g.a)[:, 2:] == 0) and np.all(np.asarray(g.b)[2:] == 0)
    assert np.all(np.abs(np.asarray(g.a)[:, :2]) > 0) and np.all(np.abs(np.asarray(g.b)[:2]) > 0)


def _run(step, lora, state, batch, n):
    for _ in range(n):
        lora, state, _ = step(lora, state, batch)
    return lora, state


def _small_run(opt, w, factors, state, batch, n):
    @jax.jit
    def small_step(factors, state):
        updates, state = opt.update(jax.grad(small_loss, 1)(w, factors, batch), state, factors)
        return optax.apply_updates(factors, updates), state

    for _ in range(n):
        factors, state = small_step(factors, state)
    return factors, state


def _slice_adam(state, r):
    """An Adam state of the buffer, cut down to its first r components."""
    adam = state[0]
    cut = lambda t: LoRAFactors(t.a[:, :r], t.b[:r])  # noqa: E731
    return (adam._replace(mu=cut(adam.mu), nu=cut(adam.nu)),) + tuple(state[1:])


def _assert_matches_small(lora, state, factors, small_state, r):
    a, b = np.asarray(lora.factors.a), np.asarray(lora.factors.b)
    np.testing.assert_allclose(a[:, :r], factors.a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b[:r], factors.b, rtol=1e-5, atol=1e-6)
    assert np.all(a[:, r:] == 0) and np.all(b[r:] == 0)
    adam, small_adam = state[0], small_state[0]
    assert int(adam.count) == int(small_adam.count)
    for big, small in ((adam.mu, small_adam.mu), (adam.nu, small_adam.nu)):
        np.testing.assert_allclose(np.asarray(big.a)[:, :r], small.a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(big.b)[:r], small.b, rtol=1e-5, atol=1e-7)
        assert np.all(np.asarray(big.a)[:, r:] == 0) and np.all(np.asarray(big.b)[r:] == 0)


def test_follows_real_allocations_through_grow_shrink_free(data):
    w, batch = data
    opt = optax.adam(0.05)
    step = jax.jit(L.make_step(masked_loss(w), opt))
    lora, state = fresh(opt)
    keys = jax.random.split(jax.random.key(3), 3)

    # Allocate rank 2: the reference is a real (D_in, 2) x (2, D_out) LoRA, fresh Adam.
    lora, state = L.alloc(lora, state, 2, keys[0])
    small = LoRAFactors(lora.factors.a[:, :2], jnp.zeros((2, D_OUT)))
    small_state = opt.init(small)
    lora, state = _run(step, lora, state, batch, 6)
    small, small_state = _small_run(opt, w, small, small_state, batch, 6)
    _assert_matches_small(lora, state, small, small_state, 2)

    # Grow to 4: real reallocation copies the old components and moments, appends the new
    # A columns (as drawn) with zero B rows and zero moments, and keeps the step count.
    lora, state = L.realloc(lora, state, 4, keys[1])
    new_cols = lora.factors.a[:, 2:4]
    small = LoRAFactors(
        jnp.concatenate([small.a, new_cols], 1), jnp.concatenate([small.b, jnp.zeros((2, D_OUT))])
    )
    pad = lambda t: LoRAFactors(  # noqa: E731
        jnp.concatenate([t.a, jnp.zeros((D_IN, 2))], 1),
        jnp.concatenate([t.b, jnp.zeros((2, D_OUT))]),
    )
    adam = small_state[0]
    small_state = (adam._replace(mu=pad(adam.mu), nu=pad(adam.nu)),) + tuple(small_state[1:])
    lora, state = _run(step, lora, state, batch, 6)
    small, small_state = _small_run(opt, w, small, small_state, batch, 6)
    _assert_matches_small(lora, state, small, small_state, 4)

    # Shrink to 3: real reallocation drops the last component and its moments.
    lora, state = L.realloc(lora, state, 3, keys[2])
    small = LoRAFactors(small.a[:, :3], small.b[:3])
    small_state = _slice_adam(small_state, 3)
    lora, state = _run(step, lora, state, batch, 6)
    small, small_state = _small_run(opt, w, small, small_state, batch, 6)
    _assert_matches_small(lora, state, small, small_state, 3)

    # Free, then a new allocation: a fresh adapter and a fresh optimizer.
    lora, state = L.alloc(lora, state, 1, keys[0])
    small = LoRAFactors(lora.factors.a[:, :1], jnp.zeros((1, D_OUT)))
    small_state = opt.init(small)
    lora, state = _run(step, lora, state, batch, 4)
    small, small_state = _small_run(opt, w, small, small_state, batch, 4)
    _assert_matches_small(lora, state, small, small_state, 1)


def test_grow_keeps_state_bit_for_bit_and_output_continuous(data):
    w, batch = data
    x = batch[0]
    opt = optax.adam(0.05)
    step = jax.jit(L.make_step(masked_loss(w), opt))
    lora, state = L.alloc(*fresh(opt), 2, jax.random.key(4))
    lora, state = _run(step, lora, state, batch, 5)
    before = L.lora_apply(x, w, lora)
    grown, grown_state = L.realloc(lora, state, 5, jax.random.key(5))
    # The output does not move at all.
    np.testing.assert_array_equal(L.lora_apply(x, w, grown), before)
    np.testing.assert_array_equal(grown.factors.a[:, :2], lora.factors.a[:, :2])
    np.testing.assert_array_equal(grown.factors.b[:2], lora.factors.b[:2])
    assert np.all(np.asarray(grown.factors.b)[2:] == 0)
    new_a = np.asarray(grown.factors.a)[:, 2:]
    assert np.all(new_a != 0) and np.all(np.abs(new_a) <= 1 / np.sqrt(D_IN))
    old, new = state[0], grown_state[0]
    assert int(new.count) == int(old.count) == 5
    for o, n in ((old.mu, new.mu), (old.nu, new.nu)):
        np.testing.assert_array_equal(n.a[:, :2], o.a[:, :2])
        np.testing.assert_array_equal(n.b[:2], o.b[:2])
        assert np.all(np.asarray(n.a)[:, 2:] == 0) and np.all(np.asarray(n.b)[2:] == 0)
    assert int(L.active_params(grown)) == 5 * (D_IN + D_OUT)


def test_shrink_removes_exactly_the_dropped_contribution(data):
    w, batch = data
    x = batch[0]
    opt = optax.adam(0.05)
    step = jax.jit(L.make_step(masked_loss(w), opt))
    lora, state = L.alloc(*fresh(opt), 4, jax.random.key(6))
    lora, state = _run(step, lora, state, batch, 5)
    shrunk, shrunk_state = L.realloc(lora, state, 2, jax.random.key(7))
    a, b = (np.asarray(f, np.float64) for f in lora.factors)
    dropped = SCALE * (np.asarray(x, np.float64) @ a[:, 2:4]) @ b[2:4]
    np.testing.assert_allclose(
        L.lora_apply(x, w, shrunk), np.asarray(L.lora_apply(x, w, lora)) - dropped, atol=1e-5
    )
    assert np.all(np.asarray(shrunk.factors.a)[:, 2:] == 0)
    assert np.all(np.asarray(shrunk.factors.b)[2:] == 0)
    for t in (shrunk_state[0].mu, shrunk_state[0].nu):
        assert np.all(np.asarray(t.a)[:, 2:] == 0) and np.all(np.asarray(t.b)[2:] == 0)
    assert int(shrunk_state[0].count) == 5


def test_free_zeroes_everything(data):
    w, batch = data
    opt = optax.adam(0.05)
    step = jax.jit(L.make_step(masked_loss(w), opt))
    lora, state = L.alloc(*fresh(opt), 3, jax.random.key(8))
    lora, state = _run(step, lora, state, batch, 3)
    freed, freed_state = L.free(lora, state)
    np.testing.assert_array_equal(L.lora_apply(batch[0], w, freed), batch[0] @ w)
    assert int(L.rank(freed)) == 0 and int(L.active_params(freed)) == 0
    chex.assert_trees_all_equal(freed_state, opt.init(freed.factors))
    _, kept = L.free(lora, state, reset_count=False)
    assert int(kept[0].count) == 3


@pytest.mark.parametrize(
    "opt, idle",
    [
        (optax.adam(0.05), 0.0),
        (optax.adamw(0.05, weight_decay=0.1), 0.0),
        (optax.sgd(0.05, momentum=0.9, nesterov=True), 0.0),
        (optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05)), 0.0),
        (optax.inject_hyperparams(optax.adam)(learning_rate=0.05), 0.0),
        (optax.rmsprop(0.05, momentum=0.5), 0.0),
        (optax.lion(0.01), 0.0),
        (optax.adafactor(0.05), 1e-30),  # its second moment accumulates g^2 + 1e-30
        (optax.MultiSteps(optax.adam(0.05), every_k_schedule=2), 0.0),
    ],
    ids=["adam", "adamw", "nesterov", "clip+adam", "inject", "rmsprop", "lion", "adafactor", "k2"],
)
def test_state_surgery_for_usual_optax_states(data, opt, idle):
    """The adapter sits in a dict next to another parameter; only its statistics are edited.

    ``idle`` is what a statistic of an inactive (zero-gradient) component holds after steps:
    0, except adafactor's second moment, which adds epsilon1 = 1e-30 to every squared gradient.
    """
    w, batch = data

    def loss(p, batch):
        x, y = batch
        return jnp.mean((L.lora_apply(x, w, p["lora"], p["bias"]) - y) ** 2)

    lora, _ = fresh(opt)
    params = {"lora": lora, "bias": jnp.zeros((D_OUT,))}
    trainable = {"lora": lora.factors, "bias": params["bias"]}
    state = opt.init(trainable)

    def step(params, state):
        lora = params["lora"]

        def f(t):
            return loss({"lora": lora._replace(factors=t["lora"]), "bias": t["bias"]}, batch)

        t = {"lora": lora.factors, "bias": params["bias"]}
        g = L.project(jax.grad(f)(t), lora)
        updates, state = opt.update(g, state, t)
        t = optax.apply_updates(t, L.project(updates, lora))
        return {"lora": lora._replace(factors=t["lora"]), "bias": t["bias"]}, state

    step = jax.jit(step)
    lora, state = L.alloc(lora, state, 4, jax.random.key(9))
    params["lora"] = lora
    for _ in range(4):
        params, state = step(params, state)
    nodes = lambda s: [  # noqa: E731
        n
        for n in jax.tree.leaves(s, is_leaf=lambda n: isinstance(n, LoRAFactors))
        if isinstance(n, LoRAFactors)
    ]
    full = lambda x: hasattr(x, "shape") and x.ndim == 2  # noqa: E731

    # Inactive statistics stayed at their idle value through the steps (weight decay included).
    for node in nodes(state):
        for leaf, cut in ((node.a, np.s_[:, 4:]), (node.b, np.s_[4:])):
            if full(leaf):
                assert np.all(np.isin(np.asarray(leaf)[cut], np.float32([0.0, idle])))
    assert np.all(np.asarray(params["lora"].factors.a)[:, 4:] == 0)

    lora, new_state = L.realloc(params["lora"], state, 2, jax.random.key(10))
    for old, new in zip(nodes(state), nodes(new_state), strict=True):
        for o, n, keep, drop in (
            (old.a, new.a, np.s_[:, :2], np.s_[:, 2:]),
            (old.b, new.b, np.s_[:2], np.s_[2:]),
        ):
            if full(o):
                np.testing.assert_array_equal(np.asarray(n)[keep], np.asarray(o)[keep])
                assert np.all(np.asarray(n)[drop] == 0)
    # Everything that is not a statistic of the factors is untouched by realloc.
    strip = lambda s: jax.tree.map(  # noqa: E731
        lambda n: None if isinstance(n, LoRAFactors) else n,
        s,
        is_leaf=lambda n: isinstance(n, LoRAFactors),
    )
    chex.assert_trees_all_equal(strip(new_state), strip(state))

    # free(reset_count=False) leaves all non-adapter state alone; the default zeroes counters
    # but no float hyperparameter.
    _, kept = L.free(lora, new_state, reset_count=False)
    chex.assert_trees_all_equal(strip(kept), strip(new_state))
    _, reset = L.free(lora, new_state)
    for before, after in zip(
        jax.tree.leaves(strip(new_state)), jax.tree.leaves(strip(reset)), strict=True
    ):
        if jnp.issubdtype(before.dtype, jnp.integer) and before.ndim == 0:
            assert int(after) == 0
        else:
            np.testing.assert_array_equal(after, before)
    for node in nodes(reset):
        for leaf in node:
            if full(leaf):
                assert np.all(np.asarray(leaf) == 0)


def test_one_trace_serves_every_rank(data):
    w, batch = data
    opt = optax.adam(0.05)
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(L.make_step(masked_loss(w), opt), n=1))
    alloc = jax.jit(chex.assert_max_traces(L.alloc, n=1))
    realloc = jax.jit(chex.assert_max_traces(L.realloc, n=1))
    free = jax.jit(chex.assert_max_traces(L.free, n=1))
    lora, state = fresh(opt)
    key = jax.random.key(11)
    ranks = []
    for cycle in range(2):
        key, *k = jax.random.split(key, 5)
        lora, state = alloc(lora, state, 1 + cycle, k[0])
        lora, state, _ = step(lora, state, batch)
        ranks.append(int(L.rank(lora)))
        for r, kk in ((4, k[1]), (R_MAX, k[2]), (2, k[3])):  # grow, grow, shrink
            lora, state = realloc(lora, state, r, kk)
            lora, state, _ = step(lora, state, batch)
            ranks.append(int(L.rank(lora)))
        lora, state = free(lora, state)
        lora, state, _ = step(lora, state, batch)  # rank 0 steps too (and change nothing)
        assert np.all(np.asarray(lora.factors.a) == 0)
        ranks.append(int(L.active_params(lora)))
    assert ranks == [1, 4, 5, 2, 0, 2, 4, 5, 2, 0]
    # A traced rank beyond the buffer is clipped into [0, R_max].
    lora, state = realloc(lora, state, 99, key)
    assert int(L.rank(lora)) == R_MAX


def test_bad_arguments_raise_value_error(data):
    w, (x, _) = data
    lora = L.lora_init(D_IN, D_OUT, R_MAX)
    opt = optax.adam(0.1)
    state = opt.init(lora.factors)
    with pytest.raises(ValueError, match="rank must be in"):
        L.alloc(lora, state, R_MAX + 1, jax.random.key(0))
    with pytest.raises(ValueError, match="rank must be in"):
        L.realloc(lora, state, -1, jax.random.key(0))
    with pytest.raises(ValueError, match="rank must be a scalar"):
        L.realloc(lora, state, jnp.array([1, 2]), jax.random.key(0))
    with pytest.raises(ValueError, match="base_kernel"):
        L.lora_apply(x, w.T, lora)
    with pytest.raises(ValueError, match="x must have shape"):
        L.lora_apply(x[:, :4], w, lora)
    with pytest.raises(ValueError, match="d_out"):
        L.lora_init(D_IN, 0, R_MAX)
    # A state built over another container would be missed: refused.
    plain = opt.init({"a": lora.factors.a, "b": lora.factors.b})
    with pytest.raises(ValueError, match="no LoRAFactors node"):
        L.free(lora, plain)
    # A factored second moment has no per-component meaning: refused.
    wide = L.lora_init(128, 130, 128)
    factored = optax.adafactor(0.1).init(wide.factors)
    with pytest.raises(ValueError, match="factored"):
        L.realloc(wide, factored, 2, jax.random.key(0))
