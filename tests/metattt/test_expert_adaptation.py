"""Expert-level test-time adaptation of a MoE: the consistency objective, the token corruptions,
energy-aware TENT's masked-reconstruction and consistency losses (each against a float64 NumPy
loop), and dynamic-rank expert LoRA (:func:`metattt.models.moe.lora_realloc`)."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metattt import augment, objectives
from metattt.energy import energy_tent, proxy_costs
from metattt.models import moe

CFG = moe.MoEConfig(
    vocab_size=12, d_model=8, num_heads=2, num_layers=2, num_experts=4, d_ff=16, top_k=2,
    max_len=10, expert_widths=(4, 8, 12, 16), backend="reference",
)  # fmt: skip
LORA = CFG._replace(lora_rank=4, lora_alpha=4.0)
TOKENS = jax.random.randint(jax.random.key(5), (3, 10), 0, 12)


def _softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- objectives and corruptions ---------------------------------------------------------------


def test_kl_and_consistency_match_a_numpy_loop():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 5, 7)).astype(np.float32) * 2
    mask = rng.random((3, 5)) < 0.6
    p, q = _softmax64(a), _softmax64(b)
    kl = lambda p, q: [sum(p[i, j] * np.log(p[i, j] / q[i, j])) for i in range(3) for j in range(5)]
    m = mask.reshape(-1)
    want_kl = np.sum(np.array(kl(p, q)) * m) / m.sum()
    sym = 0.5 * (np.array(kl(p, q)) + np.array(kl(q, p)))
    np.testing.assert_allclose(objectives.kl_divergence(a, b, mask), want_kl, rtol=1e-5)
    np.testing.assert_allclose(objectives.consistency(a, b, mask), np.sum(sym * m) / m.sum(),
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(objectives.consistency(a, b), sym.mean(), rtol=1e-5)
    assert float(objectives.consistency(a, a)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="logits_p shape"):
        objectives.kl_divergence(a, b[..., :6])


def test_corrupt_tokens_hides_the_rate_behind_random_tokens():
    tokens = jax.random.randint(jax.random.key(0), (64, 50), 20, 40)
    out, hidden = augment.corrupt_tokens(jax.random.key(1), tokens, 0.2, low=0, high=10)
    out, hidden, tokens = np.asarray(out), np.asarray(hidden), np.asarray(tokens)
    for i in range(64):
        for j in range(50):
            if hidden[i, j]:
                assert 0 <= out[i, j] < 10
            else:
                assert out[i, j] == tokens[i, j]
    n = hidden.size
    assert abs(hidden.mean() - 0.2) < 5 * np.sqrt(0.2 * 0.8 / n)
    assert out.dtype == tokens.dtype
    with pytest.raises(ValueError, match="rate must be in"):
        augment.corrupt_tokens(jax.random.key(1), tokens, 1.0, low=0, high=10)


def test_drop_swap_swaps_aligned_pairs_and_drops_bytes():
    tokens = jnp.tile(jnp.arange(100, 111), (200, 1))  # odd length: the last token has no pair
    out = np.asarray(augment.drop_swap(jax.random.key(2), tokens, drop_rate=0.0, swap_rate=0.3,
                                       low=0, high=5))  # fmt: skip
    swaps = []
    for row in out:
        assert row[-1] == 110
        for i in range(5):
            pair = tuple(row[2 * i : 2 * i + 2])
            assert pair in ((100 + 2 * i, 101 + 2 * i), (101 + 2 * i, 100 + 2 * i))
            swaps.append(pair[0] != 100 + 2 * i)
    assert abs(np.mean(swaps) - 0.3) < 5 * np.sqrt(0.3 * 0.7 / len(swaps))
    dropped = np.asarray(augment.drop_swap(jax.random.key(3), tokens, drop_rate=0.25,
                                           swap_rate=0.0, low=0, high=5))  # fmt: skip
    changed = dropped != np.asarray(tokens)
    assert np.all(dropped[changed] < 5)
    assert abs(changed.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / changed.size)


def test_grid_noise_shift_is_a_zero_filled_shift_plus_bounded_noise():
    rng = np.random.default_rng(4)
    images = rng.integers(1, 17, size=(60, 64))
    out = np.asarray(augment.grid_noise_shift(jax.random.key(4), jnp.asarray(images), levels=17,
                                              max_shift=1, noise=0))  # fmt: skip
    seen = set()
    for img, got in zip(images.reshape(-1, 8, 8), out.reshape(-1, 8, 8), strict=True):
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                want = np.zeros((8, 8), images.dtype)
                for r in range(8):
                    for c in range(8):
                        if 0 <= r - dy < 8 and 0 <= c - dx < 8:
                            want[r, c] = img[r - dy, c - dx]
                if np.array_equal(got, want):
                    matches.append((dy, dx))
        assert len(matches) == 1  # pixels are >= 1, so the zero fill tells the shift
        seen.add(matches[0])
    assert len(seen) == 9
    noisy = np.asarray(augment.grid_noise_shift(jax.random.key(5), jnp.asarray(images), levels=17,
                                                max_shift=0, noise=1))  # fmt: skip
    clipped = np.clip(images, 0, 16)
    assert np.all(np.abs(noisy - clipped) <= 1) and noisy.min() >= 0 and noisy.max() <= 16
    assert np.mean(noisy != images) > 0.5
    with pytest.raises(ValueError, match="must be a square"):
        augment.grid_noise_shift(jax.random.key(5), jnp.zeros((2, 10), jnp.int32), levels=17)


# --- energy-aware TENT with the new objectives ------------------------------------------------


@pytest.fixture(scope="module")
def model():
    apply, params = moe.init_moe(CFG, seed=1)
    costs = proxy_costs(CFG.num_experts, *moe.expert_token_costs(CFG))
    return apply, params, np.asarray(costs.values("joules_per_token"), np.float64)


def _energy64(probs, joules):
    """Normalised hard top-k energy per token, summed over layers: a loop over tokens."""
    probs = np.asarray(probs, np.float64)
    c = joules / joules.mean()
    layers, b, length, _ = probs.shape
    total = sum(
        c[np.argsort(-probs[layer, i, t], kind="stable")[: CFG.top_k]].sum()
        for layer in range(layers)
        for i in range(b)
        for t in range(length)
    )
    return total / (b * length)


CORRUPT = partial(augment.corrupt_tokens, rate=0.3, low=0, high=12)
AUGMENT = partial(augment.drop_swap, drop_rate=0.2, swap_rate=0.2, low=0, high=12)


def test_masked_reconstruction_loss_matches_a_loop(model):
    apply, params, joules = model
    ttt = energy_tent(apply, joules, top_k=CFG.top_k, task="masked", corrupt=CORRUPT)
    key, lam = jax.random.key(7), 0.7
    loss, stats = jax.jit(ttt.loss_fn)(params, _batch(lam, key))
    corrupted, hidden = (np.asarray(x) for x in CORRUPT(key, TOKENS))
    out = jax.jit(apply)(params, jnp.asarray(corrupted))
    logp = np.log(_softmax64(out.logits))
    toks = np.asarray(TOKENS)
    terms = [-logp[i, t - 1, toks[i, t]] for i in range(3) for t in range(1, 10) if hidden[i, t]]
    assert len(terms) > 3
    energy = _energy64(out.aux["router_probs"], joules)
    np.testing.assert_allclose(stats.task_loss, np.mean(terms), rtol=1e-5)
    np.testing.assert_allclose(stats.energy, energy, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(terms) + lam * energy, rtol=1e-5)
    assert stats.expert_counts.shape == (CFG.num_layers, CFG.num_experts)


def _batch(lam, key):
    from metattt.energy import EnergyBatch

    return EnergyBatch(TOKENS, jnp.float32(lam), None, key)


@pytest.mark.parametrize("head", ["lm", "class"])
def test_consistency_loss_matches_a_loop(head):
    cfg = CFG._replace(num_classes=3 if head == "class" else 0)
    apply, params = moe.init_moe(cfg, seed=2)
    joules = np.asarray(proxy_costs(4, *moe.expert_token_costs(cfg)).values("joules_per_token"))
    ttt = energy_tent(apply, joules, top_k=2, task="consistency", head=head, augment=AUGMENT)
    key, lam = jax.random.key(8), 0.4
    loss, stats = jax.jit(ttt.loss_fn)(params, _batch(lam, key))
    ka, kb = jax.random.split(key)  # the documented draw of the two augmentations
    outs = [jax.jit(apply)(params, AUGMENT(k, TOKENS)) for k in (ka, kb)]
    preds = [o.logits if head == "lm" else o.class_logits for o in outs]
    p, q = (_softmax64(x).reshape(-1, preds[0].shape[-1]) for x in preds)
    sym = np.mean([0.5 * np.sum(p[n] * np.log(p[n] / q[n]) + q[n] * np.log(q[n] / p[n]))
                   for n in range(len(p))])  # fmt: skip
    energy = np.mean([_energy64(o.aux["router_probs"], joules) for o in outs])
    np.testing.assert_allclose(stats.task_loss, sym, rtol=1e-4)
    np.testing.assert_allclose(loss, sym + lam * energy, rtol=1e-4)
    assert stats.expert_counts.shape == (2, cfg.num_layers, cfg.num_experts)
    np.testing.assert_array_equal(stats.expert_counts[1], outs[1].aux["expert_counts"])


@pytest.mark.parametrize("task", ["entropy", "next_token", "masked", "consistency"])
def test_the_energy_term_combines_with_every_objective(model, task):
    """loss(λ) - loss(0) = λ·Ē for every task, the same corruptions in both."""
    apply, params, joules = model
    ttt = energy_tent(apply, joules, top_k=CFG.top_k, task=task, corrupt=CORRUPT,
                      augment=AUGMENT)  # fmt: skip
    loss = jax.jit(ttt.loss_fn)
    l1, _ = loss(params, _batch(1.5, jax.random.key(9)))
    l0, s0 = loss(params, _batch(0.0, jax.random.key(9)))
    np.testing.assert_allclose(float(l1 - l0), 1.5 * float(s0.energy), rtol=1e-4)


@pytest.mark.parametrize("task", ["masked", "consistency"])
def test_energy_aware_adaptation_with_the_new_objectives_routes_cheaper(model, task):
    """Adapting the router with λ > 0 ends at a cheaper routing than λ = 0 and than before;
    one compilation serves both λ."""
    apply, params, joules = model
    ttt = energy_tent(apply, joules, top_k=CFG.top_k, task=task, corrupt=CORRUPT,
                      augment=AUGMENT, opt=optax.adam(1e-1), max_steps=4)  # fmt: skip
    key = jax.random.key(9)

    def adapt_fn(p, tokens, lam):
        return ttt.adapt(p, tokens, lam, key=key)

    adapt = jax.jit(chex.assert_max_traces(adapt_fn, n=1))
    chex.clear_trace_counter()
    energy_aware = adapt(params, TOKENS, 10.0)
    plain = adapt(params, TOKENS, 0.0)
    after = float(energy_aware.after.joules_per_token)
    assert after < float(energy_aware.before.joules_per_token)
    assert after < float(plain.after.joules_per_token)
    assert energy_aware.inner.aux.expert_counts.shape[:2] == ((4, 2) if task == "consistency"
                                                             else (4, CFG.num_layers))  # fmt: skip


def test_new_objectives_check_their_arguments(model):
    apply, params, joules = model
    with pytest.raises(ValueError, match="needs corrupt"):
        energy_tent(apply, joules, top_k=2, task="masked")
    with pytest.raises(ValueError, match="needs augment"):
        energy_tent(apply, joules, top_k=2, task="consistency")
    ttt = energy_tent(apply, joules, top_k=2, task="masked", corrupt=CORRUPT)
    with pytest.raises(ValueError, match="pass a key"):
        ttt.stats(params, TOKENS)


# --- dynamic-rank expert LoRA -----------------------------------------------------------------


def test_with_lora_at_rank_zero_is_the_same_function(model):
    apply, params, _ = model
    lora_apply, _ = moe.init_moe(LORA)
    lp = moe.with_lora(params, LORA)
    np.testing.assert_allclose(jax.jit(lora_apply)(lp, TOKENS).logits,
                               jax.jit(apply)(params, TOKENS).logits,
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    assert int(jnp.sum(moe.lora_ranks(lp, LORA))) == 0
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        moe.with_lora(params, CFG)


def test_lora_realloc_sets_per_expert_ranks_and_merges_masked_factors(model):
    _, params, _ = model
    ranks = np.array([[0, 1, 2, 4], [3, 3, 0, 1]])
    lp = jax.jit(lambda p, r: moe.lora_realloc(p, LORA, r, jax.random.key(0)))(
        moe.with_lora(params, LORA), ranks
    )
    np.testing.assert_array_equal(moe.lora_ranks(lp, LORA), ranks)
    rng = np.random.default_rng(1)
    ex = lp["blocks"]["1"]["ffn"]["experts"]
    for name in moe.LORA_MATRICES:  # random B everywhere: only the mask keeps ranks apart
        ex[f"lora_{name}_b"] = jnp.asarray(rng.normal(size=ex[f"lora_{name}_b"].shape),
                                           jnp.float32)  # fmt: skip
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    for e in range(4):
        r, width = ranks[1, e], CFG.expert_widths[e]
        a = {n: np.asarray(ex[f"lora_{n}_a"][e], np.float64) for n in moe.LORA_MATRICES}
        assert np.all(a["up"][:, r:] == 0) and (r == 0 or np.all(a["up"][:, :r] != 0))
        w = {
            n: np.asarray(ex[n][e], np.float64)
            + a[n][:, :r] @ np.asarray(ex[f"lora_{n}_b"][e], np.float64)[:r]
            for n in moe.LORA_MATRICES
        }  # scale alpha / R = 1
        xn = np.asarray(x, np.float64)
        g = xn @ w["gate"][:, :width]
        want = (g / (1 + np.exp(-g)) * (xn @ w["up"][:, :width])) @ w["down"][:width]
        np.testing.assert_allclose(moe.expert_forward(lp, LORA, 1, e, x), want, rtol=1e-4,
                                   atol=1e-5)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"ranks must be an int or \(2, 4\) ints in \[0, R_max=4\]"
    ):
        moe.lora_realloc(lp, LORA, 5, jax.random.key(0))


def test_lora_ttt_moves_only_active_components_one_compilation_for_every_rank(model):
    """Energy-aware TENT on the expert LoRA factors: inactive components stay exactly zero, and
    realloc + adapt, jitted, serve every rank allocation without tracing again."""
    apply, params, joules = model
    lora_apply, _ = moe.init_moe(LORA)
    ttt = energy_tent(lora_apply, joules, top_k=2, params="router+lora", task="next_token",
                      opt=optax.adam(5e-2), max_steps=3)  # fmt: skip

    @jax.jit
    @partial(chex.assert_max_traces, n=1)
    def step(p, ranks, key):
        p = moe.lora_realloc(p, LORA, ranks, key)
        return ttt.adapt(p, TOKENS, 0.5, diagnostics=False).params

    chex.clear_trace_counter()
    p = moe.with_lora(params, LORA)
    for i, rank in enumerate([2, 4, 1, 0, 3]):
        ranks = jnp.full((2, 4), rank, jnp.int32)
        p = step(p, ranks, jax.random.key(i))
        for layer in ("0", "1"):
            ex = p["blocks"][layer]["ffn"]["experts"]
            for n in moe.LORA_MATRICES:
                a, b = np.asarray(ex[f"lora_{n}_a"]), np.asarray(ex[f"lora_{n}_b"])
                assert np.all(a[..., rank:] == 0) and np.all(b[:, rank:] == 0)
            if rank:
                assert np.any(np.asarray(ex["lora_up_b"])[:, :rank] != 0)  # B learned
    np.testing.assert_array_equal(moe.lora_ranks(p, LORA), np.full((2, 4), 3))


def test_expert_work_prices_the_active_lora_ranks():
    counts = jnp.array([[3, 0, 1, 2], [0, 5, 0, 8]])
    ranks = jnp.array([[0, 1, 2, 4], [3, 3, 0, 1]])
    base = moe.expert_work(counts, CFG)
    lora = moe.expert_work(counts, LORA, lora_ranks=ranks)
    d, f = CFG.d_model, CFG.d_ff
    for layer in range(2):
        for e in range(4):
            r = int(ranks[layer, e])
            flops = 3 * (2 * d * r * f + d * f) if r else 0
            assert float(lora.flops[layer, e] - base.flops[layer, e]) == pytest.approx(flops)
            assert float(lora.bytes[layer, e] - base.bytes[layer, e]) == pytest.approx(
                3 * (d * r + r * f) * 4
            )
    full = moe.expert_work(counts, LORA)  # no ranks given: config.lora_rank everywhere
    np.testing.assert_allclose(full.flops, moe.expert_work(counts, LORA, lora_ranks=4).flops)
