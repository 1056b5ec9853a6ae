"""Heterogeneous experts and energy-aware TENT on a tiny MoE trained inside the test module.

The model (V = 16, D = 16, one layer, E = 4 experts of widths 4, 8, 16, 32, top-2) is trained
for 40 Adam steps on "count up by 1 from a digit in 0..7" sequences; the shifted test batch
counts up by 3 over the tokens 8..15, which the model never saw. Adaptation runs 10 Adam steps.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kernels_pallas.moe_dispatch import moe_dispatch, top_k_routing
from metattt import objectives
from metattt.energy import energy_tent, proxy_costs
from metattt.models.moe import (
    MoEConfig,
    expert_bytes_per_token,
    expert_flops_per_token,
    expert_forward,
    expert_token_costs,
    expert_work,
    init_moe,
    width_mask,
)

WIDTHS = (4, 8, 16, 32)
CFG = MoEConfig(
    vocab_size=16, d_model=16, num_heads=2, num_layers=1, num_experts=4, d_ff=32, top_k=2,
    max_len=16, expert_widths=WIDTHS, backend="reference",
)  # fmt: skip


def counting(key, n, low, step):
    """(n, 16) tokens low + (s + step·t) mod 8 with a random start s."""
    start = jax.random.randint(key, (n, 1), 0, 8)
    return low + (start + step * jnp.arange(16)[None]) % 8


@pytest.fixture(scope="module")
def trained():
    apply, params = init_moe(CFG, seed=0)
    opt = optax.adam(3e-2)

    @jax.jit
    def step(p, state, key):
        toks = counting(key, 16, 0, 1)
        loss_fn = lambda p: objectives.next_token_cross_entropy(apply(p, toks).logits, toks)
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = opt.init(params)
    for i in range(40):
        params, state, loss = step(params, state, jax.random.key(i))
    assert float(loss) < 0.1  # it learned the training distribution
    return apply, params


@pytest.fixture(scope="module")
def costs():
    return proxy_costs(CFG.num_experts, *expert_token_costs(CFG))


SHIFTED = counting(jax.random.key(99), 8, 8, 3)


# --- heterogeneous experts --------------------------------------------------------------------


def small_swiglu(x, gate, up, down):
    """A width-F_e SwiGLU expert in float64 numpy: (silu(x·G) ⊙ x·U)·W_down."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    g = x @ gate
    return (g / (1.0 + np.exp(-g)) * (x @ up)) @ down


def test_masked_width_expert_equals_a_smaller_swiglu():
    _, params = init_moe(CFG, seed=1)
    p = params["blocks"]["0"]["ffn"]["experts"]
    x = jax.random.normal(jax.random.key(0), (6, CFG.d_model))
    small = [
        (p["gate"][e][:, :w], p["up"][e][:, :w], p["down"][e][:w]) for e, w in enumerate(WIDTHS)
    ]
    for e in range(CFG.num_experts):
        want = small_swiglu(x, *small[e])
        got = expert_forward(params, CFG, 0, e, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The masked full-width buffers through the dispatch = a top-k mix of the smaller experts.
    m = width_mask(CFG)
    w_gate, w_up, w_down = p["gate"], p["up"] * m[:, None, :], p["down"] * m[:, :, None]
    logits = jax.random.normal(jax.random.key(1), (6, CFG.num_experts))
    routing = top_k_routing(logits, CFG.top_k, renormalize=True)
    res = moe_dispatch(
        x, w_gate, w_up, w_down, expert_ids=routing.expert_ids, gates=routing.gates,
        backend="reference",
    )  # fmt: skip
    ids, gates = np.asarray(routing.expert_ids), np.asarray(routing.gates)
    rows = np.stack(
        [
            sum(gates[t, k] * small_swiglu(x[t], *small[ids[t, k]]) for k in range(CFG.top_k))
            for t in range(6)
        ]
    )
    np.testing.assert_allclose(res.out, rows, rtol=1e-5, atol=1e-5)


def test_model_ignores_weights_past_the_width():
    apply, params = init_moe(CFG, seed=2)
    apply = jax.jit(apply)
    toks = counting(jax.random.key(3), 2, 0, 1)
    experts = params["blocks"]["0"]["ffn"]["experts"]
    outside = 1.0 - width_mask(CFG)
    noisy = jax.tree.map(lambda a: a, params)
    noise = lambda k, a: jax.random.normal(jax.random.key(k), a.shape)
    e = noisy["blocks"]["0"]["ffn"]["experts"]
    e["gate"] = experts["gate"] + outside[:, None, :] * noise(4, experts["gate"])
    e["up"] = experts["up"] + outside[:, None, :] * noise(5, experts["up"])
    e["down"] = experts["down"] + outside[:, :, None] * noise(6, experts["down"])
    np.testing.assert_allclose(apply(noisy, toks).logits, apply(params, toks).logits, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, toks).logits ** 2)))(params)
    g = grads["blocks"]["0"]["ffn"]["experts"]
    for name, mask in (("up", outside[:, None, :]), ("down", outside[:, :, None])):
        assert float(jnp.max(jnp.abs(g[name] * mask))) == 0.0


def test_expert_work_and_costs_honour_the_widths(costs):
    counts = jnp.array([[3, 0, 2, 5]])
    work = expert_work(counts, CFG)
    d = CFG.d_model
    want_flops = [
        n * expert_flops_per_token(d, w) for n, w in zip((3, 0, 2, 5), WIDTHS, strict=True)
    ]
    want_bytes = [
        n * expert_bytes_per_token(d, w) + (n > 0) * 3 * d * w * 4
        for n, w in zip((3, 0, 2, 5), WIDTHS, strict=True)
    ]
    np.testing.assert_allclose(work.flops[0], want_flops)
    np.testing.assert_allclose(work.bytes[0], want_bytes)
    joules = costs.values()
    assert np.all(np.diff(joules) > 0)  # cheap and expensive experts exist
    assert joules[-1] > 2.5 * joules[0]


def test_bad_expert_widths_raise():
    for widths in ((4, 8, 16), (0, 8, 16, 32), (4, 8, 16, 33)):
        with pytest.raises(ValueError, match="expert_widths"):
            init_moe(CFG._replace(expert_widths=widths))


# --- energy-aware TENT ------------------------------------------------------------------------


def overlay(base, src):
    """``base`` with every leaf that ``src`` also has replaced by ``src``'s."""
    if not isinstance(base, dict):
        return src
    return {k: overlay(v, src[k]) if k in src else v for k, v in base.items()}


@pytest.mark.parametrize("preset", ["layernorm", "lora"])  # "router": the next test
def test_tent_lowers_prediction_entropy_on_a_shifted_batch(trained, costs, preset):
    apply, params = trained
    if preset == "lora":  # the trained weights plus zero-initialised LoRA: the same function
        apply, lora_params = init_moe(CFG._replace(lora_rank=2), seed=0)
        params = overlay(lora_params, params)
    ttt = energy_tent(apply, costs, top_k=CFG.top_k, params=preset, opt=optax.adam(5e-2),
                      max_steps=10)  # fmt: skip
    res = jax.jit(ttt.adapt)(params, SHIFTED, 0.0)
    assert float(res.after.entropy) < 0.9 * float(res.before.entropy)
    assert res.inner.losses.shape == (10,) and bool(jnp.all(res.inner.active))
    # Only the selected leaves moved.
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), res.params, params)
    paths = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(moved) if v]
    assert paths and all(preset in p or (preset == "layernorm" and "norm" in p) for p in paths)


def test_energy_term_lowers_expected_energy_one_compilation_for_every_lambda(trained, costs):
    apply, params = trained
    ttt = energy_tent(apply, costs, top_k=CFG.top_k, params="router", opt=optax.adam(5e-2),
                      max_steps=10)  # fmt: skip
    adapt = jax.jit(chex.assert_max_traces(ttt.adapt, n=1))
    chex.clear_trace_counter()
    steps = jnp.int32(10)
    plain = adapt(params, SHIFTED, 0.0, None, steps)  # TENT on the router alone
    energy_aware = adapt(params, SHIFTED, 1.0, None, steps)
    assert float(plain.after.entropy) < 0.9 * float(plain.before.entropy)
    after0, after1 = float(plain.after.joules_per_token), float(energy_aware.after.joules_per_token)
    assert after1 < 0.9 * after0
    assert after1 < 0.9 * float(energy_aware.before.joules_per_token)
    # The cheapest experts take more of the work.
    counts0, counts1 = plain.after.expert_counts[0], energy_aware.after.expert_counts[0]
    assert int(counts1[0] + counts1[1]) > int(counts0[0] + counts0[1])
    # A step-count change is traced too; vmap over λ equals the separate runs.
    three = adapt(params, SHIFTED, 1.0, None, jnp.int32(3))
    assert int(jnp.sum(three.inner.active)) == 3
    lams = jnp.array([0.0, 1.0])
    batched = jax.jit(jax.vmap(ttt.adapt, in_axes=(None, None, 0)))(params, SHIFTED, lams)
    np.testing.assert_allclose(batched.after.joules_per_token, [after0, after1], rtol=1e-4)
    # Serving skips the diagnostic forward passes; the adapted parameters are the same.
    serve = jax.jit(lambda p, x, lam: ttt.adapt(p, x, lam, None, steps, diagnostics=False))
    served = serve(params, SHIFTED, 1.0)
    assert served.before is None and served.after is None
    chex.assert_trees_all_close(served.params, energy_aware.params, rtol=1e-5, atol=1e-6)


def test_stats_match_a_brute_force_energy_and_prune_with_a_mask(trained, costs):
    apply, params = trained
    ttt = energy_tent(apply, costs, top_k=CFG.top_k)
    mask = jnp.array([True, True, True, False])
    stats = jax.jit(ttt.stats)(params, SHIFTED, 0.0, mask)
    ids = jax.jit(apply)(params, SHIFTED, expert_mask=mask).aux["expert_ids"]
    want = costs.values()[np.asarray(ids)].sum() / SHIFTED.size
    np.testing.assert_allclose(stats.joules_per_token, want, rtol=1e-5)
    assert int(stats.expert_counts[0, 3]) == 0


def test_bad_arguments_raise(trained, costs):
    apply, _ = trained
    with pytest.raises(ValueError, match="task"):
        energy_tent(apply, costs, top_k=2, task="bogus")
    with pytest.raises(ValueError, match="head"):
        energy_tent(apply, costs, top_k=2, head="bogus")
    with pytest.raises(ValueError, match="costs"):
        energy_tent(apply, np.zeros(4), top_k=2)
