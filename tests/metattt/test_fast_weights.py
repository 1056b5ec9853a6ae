"""Fast-weight experts (:mod:`metattt.models.fast_weights`): the inner update and the chunked
reads against float64 NumPy loops, the key/value gradient against finite differences, the
unchanged function at init, causality, and the parameter counts matched with expert LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metattt.models import fast_weights as fw
from metattt.models import moe
from metattt.params import select

CFG = moe.MoEConfig(
    vocab_size=12, d_model=8, num_heads=2, num_layers=2, num_experts=4, d_ff=16, top_k=2,
    max_len=10, expert_widths=(4, 8, 12, 16), backend="reference",
)  # fmt: skip
FAST = CFG._replace(fast_rank=6, fast_chunk=3, fast_lr=0.7, fast_steps=2)
TOKENS = jax.random.randint(jax.random.key(5), (3, 10), 0, 12)


def _np_update(w, k, v, a, lr, steps):
    """Plain gradient steps of Σ a ||k W − v||² / max(Σ a, 1), the gradient written by hand."""
    w = np.array(w, np.float64)
    for _ in range(steps):
        grad = np.zeros_like(w)
        for n in range(len(k)):
            grad += a[n] * 2 * np.outer(k[n], k[n] @ w - v[n])
        w = w - lr * grad / max(a.sum(), 1.0)
    return w


def _np_loss(w, k, v, a):
    return sum(a[n] * np.sum((k[n] @ w - v[n]) ** 2) for n in range(len(k))) / max(a.sum(), 1.0)


def _chunk_data(seed, n=7, r=4):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(n, r))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return (
        k,
        rng.normal(size=(n, r)),
        (rng.random(n) < 0.7).astype(np.float64),
        rng.normal(size=(r, r)),
    )


def test_kv_update_matches_a_numpy_loop(x64):
    k, v, a, w = _chunk_data(0)
    got = fw.kv_update(jnp.asarray(w), jnp.asarray(k), jnp.asarray(v), jnp.asarray(a), lr=0.6,
                       steps=3)  # fmt: skip
    np.testing.assert_allclose(got, _np_update(w, k, v, a, 0.6, 3), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fw.kv_loss(w, k, v, a), _np_loss(w, k, v, a), rtol=1e-12)


def test_kv_gradient_matches_finite_differences(x64):
    k, v, a, w = _chunk_data(1)
    grad = np.asarray(jax.grad(fw.kv_loss)(jnp.asarray(w), k, v, a))
    fd = np.zeros_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            e = np.zeros_like(w)
            e[i, j] = 1e-6
            fd[i, j] = (_np_loss(w + e, k, v, a) - _np_loss(w - e, k, v, a)) / 2e-6
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_update_lowers_the_kv_loss_on_a_random_chunk():
    for seed in range(3):
        k, v, a, w = (jnp.asarray(x, jnp.float32) for x in _chunk_data(seed + 10, n=16, r=6))
        new = fw.kv_update(w, k, v, a, lr=0.5, steps=1)
        assert float(fw.kv_loss(new, k, v, a)) < 0.95 * float(fw.kv_loss(w, k, v, a))


def test_fast_modulation_matches_a_numpy_loop_over_experts_sequences_and_chunks(x64):
    rng = np.random.default_rng(3)
    b, length, d, e, r, chunk = 2, 7, 5, 3, 4, 3
    x = rng.normal(size=(b, length, d))
    tk, tq, tv = rng.normal(size=(3, e, d, r))
    to = rng.normal(size=(e, r, d))
    assign = (rng.random((b, length, e)) < 0.6).astype(np.float64)
    combine = assign * rng.random((b, length, e))
    got = fw.fast_modulation(x, tk, tq, tv, to, assign, combine, chunk=chunk, lr=0.8, steps=2)
    unit = lambda y: y / np.sqrt(np.sum(y * y) + fw.EPS)
    want = np.zeros((b, length, d))
    for ei in range(e):
        for bi in range(b):
            w = np.zeros((r, r))
            for start in range(0, length, chunk):
                pos = range(start, min(start + chunk, length))
                k = np.array([unit(x[bi, t] @ tk[ei]) for t in pos])
                v = np.array([x[bi, t] @ tv[ei] for t in pos])
                for t in pos:  # apply, then update
                    want[bi, t] += combine[bi, t, ei] * (unit(x[bi, t] @ tq[ei]) @ w) @ to[ei]
                w = _np_update(w, k, v, assign[bi, list(pos), ei], 0.8, 2)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_gradient_through_the_inner_steps_matches_finite_differences(x64):
    """The slow projections' gradient (what a test-time method follows) is second order."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 5, 3))
    tk, tq, tv = rng.normal(size=(3, 2, 3, 2))
    to = rng.normal(size=(2, 2, 3))
    assign = np.ones((1, 5, 2))
    combine = rng.random((1, 5, 2))

    @jax.jit
    def f(theta_v):
        out = fw.fast_modulation(x, tk, tq, theta_v, to, assign, combine, chunk=2, lr=0.5,
                                 steps=2)  # fmt: skip
        return jnp.sum(jnp.sin(out))

    grad = np.asarray(jax.grad(f)(jnp.asarray(tv)))
    fd = np.zeros_like(tv)
    for idx in np.ndindex(tv.shape):
        e = np.zeros_like(tv)
        e[idx] = 1e-6
        fd[idx] = (float(f(tv + e)) - float(f(tv - e))) / 2e-6
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
    assert np.abs(grad).max() > 1e-3


def test_adding_fast_weights_leaves_the_model_unchanged_and_stays_causal():
    apply, params = moe.init_moe(CFG, seed=1)
    apply, fapply = jax.jit(apply), jax.jit(moe.init_moe(FAST).apply)
    fparams = moe.with_fast(params, FAST, seed=2)
    base = apply(params, TOKENS)
    out = fapply(fparams, TOKENS)
    np.testing.assert_allclose(out.logits, base.logits, rtol=1e-6, atol=1e-6)
    moved = jax.tree.map(lambda x: x, fparams)
    for i in range(FAST.num_layers):
        f = moved["blocks"][str(i)]["ffn"]["fast"]
        f["out"] = jax.random.normal(jax.random.key(i), f["out"].shape)
    a = fapply(moved, TOKENS).logits
    assert float(jnp.abs(a - base.logits).max()) > 1e-2  # the term is live once θ_O moves
    b = fapply(moved, TOKENS.at[:, -1].set((TOKENS[:, -1] + 1) % 12)).logits
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fast_rank"):
        moe.with_fast(params, CFG)


@pytest.mark.parametrize(
    ("d_model", "d_ff", "lora_rank", "fast_rank", "count"),
    [
        (16, 32, 4, 9, 576),  # configs/energy_moe.py:tiny and energy_moe_digits.py:tiny
        (64, 256, 4, 15, 3840),  # configs/energy_moe.py
        (32, 128, 4, 15, 1920),  # configs/energy_moe_digits.py
        (32, 128, 16, 60, 7680),
    ],
)
def test_fast_rank_matches_the_trainable_parameters_of_expert_lora(
    d_model, d_ff, lora_rank, fast_rank, count
):
    assert fw.matched_rank(d_model, d_ff, lora_rank) == fast_rank
    base = CFG._replace(d_model=d_model, d_ff=d_ff, num_heads=2, expert_widths=None)
    lora = jax.eval_shape(lambda: moe.init_moe(base._replace(lora_rank=lora_rank)).params)
    fast = jax.eval_shape(lambda: moe.init_moe(base._replace(fast_rank=fast_rank)).params)

    def size(tree, selector):  # the selected leaves' entries
        picks = jax.tree.leaves(select(tree, selector))
        return sum(
            int(np.prod(x.shape)) for x, on in zip(jax.tree.leaves(tree), picks, strict=True) if on
        )

    per_expert = base.num_layers * base.num_experts
    assert size(lora, "lora") == count * per_expert  # the rank mask is not a LoRA factor
    assert size(fast, "fast") == count * per_expert
    assert fw.fast_param_count(d_model, fast_rank) == count


@pytest.mark.parametrize("groups", [None, 4])
def test_fast_work_prices_every_assignment_and_chunk_update(groups):
    """Per token: projections, reads, k·W, residual and outer product; per (sequence, chunk)
    group, at most min(n_e, groups) of them: the update and W's traffic (2 inner steps)."""
    counts = jnp.array([[0, 3, 5, 1], [2, 0, 0, 7]])
    plain = moe.expert_work(counts, CFG)
    work = moe.expert_work(counts, FAST, fast_groups=groups)
    d, r, n = FAST.d_model, FAST.fast_rank, np.asarray(counts)
    chunks = n if groups is None else np.minimum(n, groups)
    per_token = 6 * d * r + 6 * r + 2 * r * r + 2 * r * d + 2 * d + 2 * (4 * r * r + r)
    np.testing.assert_allclose(work.flops - plain.flops, n * per_token + chunks * 2 * 2 * r * r,
                               rtol=1e-6)  # fmt: skip
    used = (n > 0) * 4 * d * r * 4
    want = n * (6 * r + 2 * d) * 4 + chunks * 2 * 3 * r * r * 4 + used
    np.testing.assert_allclose(work.bytes - plain.bytes, want, rtol=1e-6)


def test_bad_fast_settings_are_refused():
    with pytest.raises(ValueError, match="no fast rank matches"):
        fw.matched_rank(16, 30, 1)
    with pytest.raises(ValueError, match="fast_lr"):
        moe.init_moe(CFG._replace(fast_rank=2, fast_lr=1.5))
    with pytest.raises(ValueError, match="fast_chunk"):
        moe.init_moe(CFG._replace(fast_rank=2, fast_chunk=0))


def test_expert_forward_adds_the_fast_weight_term_and_the_measured_profile_prices_it():
    """expert_forward (what measure_costs times) of a fast-weight expert is the SwiGLU expert at
    its width plus the fast-weight term of its N tokens as one sequence, all routed, gate 1 (a
    NumPy loop over chunks, apply then update); the profile's per-token costs add the
    fast-weight work of a token in a full chunk."""
    from functools import partial

    from metattt.energy import SimulatedDevice, measure_costs

    _, params = moe.init_moe(CFG, seed=1)
    fparams = moe.with_fast(params, FAST, seed=2)
    rng = np.random.default_rng(6)
    f = fparams["blocks"]["1"]["ffn"]["fast"]
    f["out"] = jnp.asarray(rng.normal(size=f["out"].shape), jnp.float32)  # the term is live
    x = rng.normal(size=(7, CFG.d_model)).astype(np.float32)  # chunks of 3, 3 and 1 tokens
    ex = {n: np.asarray(v, np.float64) for n, v in fparams["blocks"]["1"]["ffn"]["experts"].items()}
    th = {n: np.asarray(v, np.float64) for n, v in f.items()}
    unit = lambda y: y / np.sqrt(np.sum(y * y) + fw.EPS)
    xn, r, chunk = x.astype(np.float64), FAST.fast_rank, FAST.fast_chunk
    for e in (0, 3):
        width = CFG.expert_widths[e]
        g = xn @ ex["gate"][e][:, :width]
        plain = (g / (1 + np.exp(-g)) * (xn @ ex["up"][e][:, :width])) @ ex["down"][e][:width]
        term, w = np.zeros_like(xn), np.zeros((r, r))
        for start in range(0, len(xn), chunk):
            pos = range(start, min(start + chunk, len(xn)))
            for t in pos:
                term[t] = (unit(xn[t] @ th["query"][e]) @ w) @ th["out"][e]
            k = np.array([unit(xn[t] @ th["key"][e]) for t in pos])
            v = np.array([xn[t] @ th["value"][e] for t in pos])
            w = _np_update(w, k, v, np.ones(len(k)), FAST.fast_lr, FAST.fast_steps)
        assert np.abs(term).max() > 1e-2
        got = moe.expert_forward(fparams, FAST, 1, e, jnp.asarray(x))
        np.testing.assert_allclose(got, plain + term, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            moe.expert_forward(fparams, CFG, 1, e, jnp.asarray(x)), plain, rtol=1e-4, atol=1e-5
        )
    d, s = CFG.d_model, FAST.fast_steps
    flops = 6 * d * r + 6 * r + 2 * r * r + 2 * r * d + 2 * d + s * (4 * r * r + r)
    flops += s * 2 * r * r / chunk  # each chunk's update, shared by its tokens
    nbytes = (6 * r + 2 * d) * 4 + s * 3 * r * r * 4 / chunk
    base_f, base_b = moe.expert_token_costs(CFG)
    fast_f, fast_b = moe.expert_token_costs(FAST)
    np.testing.assert_allclose(fast_f - base_f, flops, rtol=1e-12)
    np.testing.assert_allclose(fast_b - base_b, nbytes, rtol=1e-12)
    dev = SimulatedDevice()
    profile = measure_costs(partial(moe.expert_forward, fparams, FAST, 1), 4, jnp.asarray(x),
                            flops_per_token=fast_f, bytes_per_token=fast_b, repeats=1,
                            device=dev)  # fmt: skip
    want = [dev.work_energy(a, b) for a, b in zip(fast_f, fast_b, strict=True)]
    np.testing.assert_allclose(profile.values("joules_per_token"), want, rtol=1e-9)
