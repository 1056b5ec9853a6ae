"""The dynamics adapter ψ = (U, V): neutral at U = 0, stable for any U, V, its ρ(Ā) diagnostic.

Sizes are tiny (V = 7, M = 8, D = 16, N = 4, B = 2, L = 8).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attd.dynamics import (
    Psi,
    a_log_delta,
    init_psi,
    make_adapter,
    max_transition,
    transition_range,
)
from attd.mamba import MambaConfig, init_mamba

CFG = MambaConfig(vocab_size=7, d_model=8, n_layers=2, d_state=4, num_classes=3, scan_chunk_size=4)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 7, (2, 8)), jnp.int32)
RANGE = jax.jit(functools.partial(transition_range, CFG))


@pytest.fixture(scope="module")
def model():
    apply, params = init_mamba(CFG, seed=0)

    @jax.jit
    def both_heads(params, delta):
        return (
            apply(params, TOKENS, a_log_delta=delta, head="classify"),
            apply(params, TOKENS, a_log_delta=delta, head="lm"),
        )

    return apply, params, both_heads


def random_psi(scale, rank=2, seed=1):
    rng = np.random.default_rng(seed)
    return Psi(
        jnp.asarray(scale * rng.standard_normal((CFG.n_layers, CFG.d_inner, rank)), jnp.float32),
        jnp.asarray(scale * rng.standard_normal((CFG.n_layers, CFG.d_state, rank)), jnp.float32),
    )


def test_init_psi_shapes_and_zero_delta():
    psi = init_psi(CFG, 3, jax.random.key(0), scale=0.5)
    assert psi.U.shape == (2, 16, 3) and psi.V.shape == (2, 4, 3)
    assert bool(jnp.all(psi.U == 0)) and bool(jnp.any(psi.V != 0))
    assert a_log_delta(psi).shape == (CFG.n_layers, CFG.d_inner, CFG.d_state)
    np.testing.assert_array_equal(a_log_delta(psi), 0.0)
    u, v = random_psi(1.0)
    np.testing.assert_allclose(a_log_delta(Psi(u, v))[1], u[1] @ v[1].T, rtol=1e-5, atol=1e-6)


def test_zero_adapter_equals_the_base_model_exactly(model):
    _, params, both_heads = model
    psi = init_psi(CFG, 2, jax.random.key(3), scale=1.0)
    adapted = both_heads(params, a_log_delta(psi))
    base = both_heads(params, None)
    for a, b in zip(adapted, base, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_transitions_stay_in_the_unit_interval_for_random_large_adapters(model, scale):
    _, params, both_heads = model
    psi = random_psi(scale)
    lo, hi = RANGE(params, psi, TOKENS)
    assert 0.0 <= float(lo) <= float(hi) <= 1.0
    if scale == 1.0:  # representable: strictly inside, a contraction
        assert 0.0 < float(lo) and float(hi) < 1.0
    logits, next_logits = both_heads(params, a_log_delta(psi))
    assert bool(jnp.all(jnp.isfinite(logits))) and bool(jnp.all(jnp.isfinite(next_logits)))


def test_transition_range_matches_a_direct_computation(model):
    """With the Δ columns of x_proj zeroed, Δ = softplus(dt_bias) for every token, so the
    extremes of exp(Δ_d A_dn) over layers, channels and states are known in closed form."""
    _, params, _ = model
    params = jax.tree.map(lambda x: x, params)
    transitions = []
    psi = random_psi(1.0, seed=4)
    for i in range(CFG.n_layers):
        mixer = params["layers"][str(i)]["mixer"]
        mixer["x_proj"]["kernel"] = mixer["x_proj"]["kernel"].at[:, : CFG.rank].set(0.0)
        dt = np.log1p(np.exp(np.asarray(mixer["dt_proj"]["bias"], np.float64)))
        log_a = np.asarray(mixer["A_log"], np.float64) + np.asarray(a_log_delta(psi)[i])
        transitions.append(np.exp(dt[:, None] * -np.exp(log_a)))
    lo, hi = RANGE(params, psi, TOKENS)
    expected = [min(t.min() for t in transitions), max(t.max() for t in transitions)]
    np.testing.assert_allclose([lo, hi], expected, rtol=1e-5)


def test_bad_adapters_raise(model):
    _, params, _ = model
    with pytest.raises(ValueError, match="rank"):
        init_psi(CFG, 0, jax.random.key(0))
    psi = init_psi(CFG, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="psi.V"):
        max_transition(CFG, params, Psi(psi.U, psi.V[:, :3]), TOKENS)
    with pytest.raises(ValueError, match="psi.U"):
        max_transition(CFG, params, Psi(psi.U[:1], psi.V), TOKENS)


FAMILY_LEAVES = {  # the leaves of each layer's mixer an adapter family may change
    "low_rank": {"A_log"},
    "a_log": {"A_log"},
    "timescale": {"A_log"},
    "dt_bias": {"dt_proj/bias"},
    "d_skip": {"D"},
}


def _random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    )


def _flat(theta):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(theta)[0]
    }


@pytest.mark.parametrize("kind", sorted(FAMILY_LEAVES))
def test_each_adapter_family_is_neutral_at_init_and_adds_psi_where_documented(kind, model):
    _, params, _ = model
    adapter = make_adapter(kind, CFG, rank=3)
    psi0 = adapter.init(jax.random.key(0))
    assert adapter.size == sum(np.size(x) for x in jax.tree.leaves(psi0))
    base = _flat(params)
    for key, value in _flat(adapter.edit(params, psi0)).items():
        np.testing.assert_array_equal(value, base[key])  # neutral exactly
    psi = _random_like(psi0, seed=4)
    edited = _flat(adapter.edit(params, psi))
    for key, value in edited.items():
        layer, leaf = (key.split("/", 3)[1], key.split("/", 3)[3]) if "mixer" in key else (0, "")
        if leaf not in FAMILY_LEAVES[kind]:
            np.testing.assert_array_equal(value, base[key])
            continue
        i, p = int(layer), psi
        expected = {  # NumPy reference of the documented edit
            "low_rank": lambda: np.asarray(p.U[i]) @ np.asarray(p.V[i]).T,
            "a_log": lambda: np.asarray(p[i])[:, None] * np.ones(CFG.d_state),
            "timescale": lambda: np.full(base[key].shape, float(p[i])),
            "dt_bias": lambda: np.asarray(p[i]),
            "d_skip": lambda: np.asarray(p[i]),
        }[kind]()
        np.testing.assert_allclose(value - base[key], expected, rtol=1e-5, atol=1e-6)


def test_the_low_rank_family_is_the_a_log_delta_hook(model):
    apply, params, both_heads = model
    psi = random_psi(0.5)
    edited = make_adapter("low_rank", CFG).edit(params, psi)
    hook = both_heads(params, a_log_delta(psi))
    for a, b in zip(both_heads(edited, None), hook, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_every_family_gets_a_gradient_at_its_neutral_start(model):
    """The inner loop can move each family from ψ₀ (the next-token loss's gradient is not 0)."""
    apply, params, _ = model
    adapters = [make_adapter(kind, CFG) for kind in sorted(FAMILY_LEAVES)]
    starts = [a.init(jax.random.key(1)) for a in adapters]

    def loss(adapter, psi):
        logits = apply(adapter.edit(params, psi), TOKENS, head="lm")
        return -jnp.mean(jax.nn.log_softmax(logits[:, :-1]).max(-1))

    @jax.jit
    def grad_norms(starts):
        pairs = zip(adapters, starts, strict=True)
        grads = [jax.grad(functools.partial(loss, a))(p) for a, p in pairs]
        return [optax.tree.norm(g) for g in grads]

    norms = dict(zip(sorted(FAMILY_LEAVES), map(float, grad_norms(starts)), strict=True))
    assert all(n > 1e-6 for n in norms.values()), norms
    with pytest.raises(ValueError, match="unknown adapter family 'rank'; known"):
        make_adapter("rank", CFG)
