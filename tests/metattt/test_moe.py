"""The MoE transformer: shapes, causality, pruning, routing losses, backends, profiling hooks.

Routing losses are checked on hand-worked routings; the dispatch backends against each other
through the whole model; pruning by the token counts it must zero. Tiny sizes (B = 2, L = 8,
D = 8, E = 4) keep the module to a few seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metattt import params as P
from metattt.models.moe import (
    MoEConfig,
    expert_bytes_per_token,
    expert_flops_per_token,
    expert_forward,
    expert_work,
    init_moe,
    load_balancing_loss,
    router_z_loss,
)

CFG = MoEConfig(
    vocab_size=11, d_model=8, num_heads=2, num_layers=2, num_experts=4, d_ff=16, top_k=2,
    max_len=16, num_classes=3,
)  # fmt: skip
BATCH, LENGTH = 2, 8


def tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (BATCH, LENGTH)))


@pytest.fixture(scope="module")
def model():
    apply, params = init_moe(CFG, seed=0)
    return jax.jit(apply), params


LORA_CFG = CFG._replace(lora_rank=2, lora_alpha=4.0, norm="layer")


@pytest.fixture(scope="module")
def lora_model():
    apply, params = init_moe(LORA_CFG, seed=0)
    return jax.jit(apply), params


def test_shapes_and_aux(model):
    apply, params = model
    out = apply(params, tokens())
    layers, e, k = CFG.num_layers, CFG.num_experts, CFG.top_k
    assert out.logits.shape == (BATCH, LENGTH, CFG.vocab_size)
    assert out.class_logits.shape == (BATCH, CFG.num_classes)
    aux = out.aux
    assert aux["expert_counts"].shape == (layers, e) and aux["expert_counts"].dtype == jnp.int32
    assert aux["router_probs"].shape == (layers, BATCH, LENGTH, e)
    assert aux["expert_ids"].shape == aux["gates"].shape == (layers, BATCH, LENGTH, k)
    assert aux["dropped"].shape == (layers, BATCH, LENGTH, k)
    assert aux["load_balance_loss"].shape == aux["router_z_loss"].shape == ()
    # dropless: every token reaches its K experts in every layer
    np.testing.assert_array_equal(aux["expert_counts"].sum(-1), BATCH * LENGTH * k)
    assert not np.asarray(aux["dropped"]).any()
    np.testing.assert_allclose(aux["router_probs"].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux["gates"].sum(-1), 1.0, rtol=1e-6)  # renormalised
    assert all(np.isfinite(np.asarray(v, np.float64)).all() for v in jax.tree.leaves(out))


def test_causal(model):
    apply, params = model
    toks = tokens(1)
    j = 5
    changed = toks.at[:, j].set((toks[:, j] + 1) % CFG.vocab_size)
    a, b = apply(params, toks), apply(params, changed)
    np.testing.assert_allclose(a.logits[:, :j], b.logits[:, :j], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        a.aux["router_probs"][:, :, :j], b.aux["router_probs"][:, :, :j], rtol=1e-6, atol=1e-7
    )
    assert float(jnp.max(jnp.abs(a.logits[:, j:] - b.logits[:, j:]))) > 1e-4


def test_expert_mask_prunes_that_expert(model):
    apply, params = model
    toks = tokens(2)
    full = apply(params, toks)
    same = apply(params, toks, expert_mask=jnp.ones((CFG.num_experts,), bool))
    np.testing.assert_allclose(same.logits, full.logits, rtol=1e-6)
    assert np.asarray(full.aux["expert_counts"])[:, 1].min() > 0  # expert 1 was in use
    mask = jnp.array([True, False, True, True])
    pruned = apply(params, toks, expert_mask=mask)
    counts = np.asarray(pruned.aux["expert_counts"])
    assert np.all(counts[:, 1] == 0)
    np.testing.assert_array_equal(counts.sum(-1), BATCH * LENGTH * CFG.top_k)
    assert not np.any(np.asarray(pruned.aux["expert_ids"]) == 1)
    assert np.all(np.asarray(pruned.aux["router_probs"])[..., 1] == 0)
    # one expert left and K = 2: the disabled pick has gate 0 and is not dispatched
    only = apply(params, toks, expert_mask=jnp.array([False, False, True, False]))
    counts = np.asarray(only.aux["expert_counts"])
    np.testing.assert_array_equal(counts, [[0, 0, BATCH * LENGTH, 0]] * CFG.num_layers)
    assert np.isfinite(np.asarray(only.logits)).all()
    with pytest.raises(ValueError, match="expert_mask"):
        apply(params, toks, expert_mask=jnp.ones((3,), bool))


def test_load_balancing_loss_on_known_routings():
    probs = jnp.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    ids = jnp.array([[0], [0], [1], [0]])
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 · (0.75·0.65 + 0.25·0.35) = 1.15
    np.testing.assert_allclose(load_balancing_loss(probs, ids, 2), 1.15, rtol=1e-6)
    uniform = jnp.full((4, 4), 0.25)
    ids2 = jnp.array([[0, 1], [2, 3], [1, 0], [3, 2]])
    np.testing.assert_allclose(load_balancing_loss(uniform, ids2, 4), 1.0, rtol=1e-6)
    # all tokens and all mass on expert 0 (top-2 also picks expert 1 with p = 0):
    collapsed = jnp.array([[1.0, 0.0, 0.0, 0.0]] * 4)
    ids3 = jnp.array([[0, 1]] * 4)  # f = (1/2, 1/2, 0, 0), P = (1, 0, 0, 0) -> 4 · 1/2 = 2
    np.testing.assert_allclose(load_balancing_loss(collapsed, ids3, 4), 2.0, rtol=1e-6)


def test_router_z_loss_on_known_logits():
    np.testing.assert_allclose(router_z_loss(jnp.zeros((3, 4))), np.log(4.0) ** 2, rtol=1e-6)
    logits = jnp.array([[0.0, np.log(3.0)], [np.log(2.0), np.log(2.0)]])
    # logsumexp: log 4 and log 4
    np.testing.assert_allclose(router_z_loss(logits), np.log(4.0) ** 2, rtol=1e-6)


def lm_loss(apply, params, toks):
    out = apply(params, toks)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    nll = -jnp.take_along_axis(logp, toks[:, 1:, None], -1).mean()
    loss = nll + 0.01 * out.aux["load_balance_loss"] + 1e-3 * out.aux["router_z_loss"]
    return loss, out.aux


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_backends_agree_through_the_model():
    toks = tokens(3)
    results = {}
    for backend in ("reference", "ragged"):
        apply, params = init_moe(CFG._replace(backend=backend, num_layers=1), seed=0)
        loss = lambda p, apply=apply: lm_loss(apply, p, toks)
        results[backend] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    ((v_ref, aux_ref), g_ref), ((v_rag, aux_rag), g_rag) = results["reference"], results["ragged"]
    np.testing.assert_allclose(v_rag, v_ref, rtol=1e-5)
    for path, a, b in zip(
        P.leaf_paths(g_ref), jax.tree.leaves(g_rag), jax.tree.leaves(g_ref), strict=True
    ):
        assert rel_err(a, b) <= 1e-4, path
    np.testing.assert_array_equal(aux_rag["expert_counts"], aux_ref["expert_counts"])
    router = g_ref["blocks"]["0"]["ffn"]["router"]["kernel"]
    assert float(jnp.linalg.norm(router)) > 0


def test_capacity_dropping_in_the_model():
    apply, params = init_moe(CFG._replace(capacity_factor=0.5, num_layers=1), seed=0)
    aux = jax.jit(apply)(params, tokens(3)).aux
    cap = -(-int(0.5 * BATCH * LENGTH * CFG.top_k) // CFG.num_experts)  # ceil(c·T·K/E)
    counts, dropped = np.asarray(aux["expert_counts"]), np.asarray(aux["dropped"])
    assert dropped.any() and counts.max() <= cap
    np.testing.assert_array_equal(counts.sum(-1) + dropped.sum((1, 2, 3)), BATCH * LENGTH * 2)


def test_presets_select_the_named_parts(lora_model):
    _, params = lora_model
    expect = {
        "router": ["blocks/0/ffn/router/kernel", "blocks/1/ffn/router/kernel"],
        "attn_proj": ["blocks/0/attn/out/kernel", "blocks/1/attn/out/kernel"],
        "mlp_out": ["blocks/0/ffn/experts/down", "blocks/1/ffn/experts/down"],
    }
    for preset, paths in expect.items():
        assert P.selected_paths(params, P.select(params, preset)) == paths
    lora = P.selected_paths(params, P.select(params, "lora"))
    assert len(lora) == 12 and all("/ffn/experts/lora_" in p for p in lora)
    norms = P.selected_paths(params, P.select(params, "layernorm"))
    assert len(norms) == 2 * (2 * CFG.num_layers + 1)  # scale and bias of 5 LayerNorms


def test_lora_starts_neutral_and_expert_forward_merges_it(lora_model):
    cfg, (apply, params) = LORA_CFG, lora_model
    params = jax.tree.map(lambda x: x, params)  # a copy: the fixture is shared
    toks = tokens(4)
    base = apply(params, toks).logits
    experts = params["blocks"]["0"]["ffn"]["experts"]
    zeroed = jax.tree.map(lambda x: x, params)
    for name in ("gate", "up", "down"):
        zeroed["blocks"]["0"]["ffn"]["experts"][f"lora_{name}_a"] = 0 * experts[f"lora_{name}_a"]
    np.testing.assert_allclose(apply(zeroed, toks).logits, base, rtol=1e-6)  # B = 0 at init
    rng = np.random.default_rng(0)
    for name in ("gate", "up", "down"):
        b = experts[f"lora_{name}_b"]
        experts[f"lora_{name}_b"] = jnp.asarray(rng.standard_normal(b.shape), jnp.float32)
    assert float(jnp.max(jnp.abs(apply(params, toks).logits - base))) > 1e-3
    x = jnp.asarray(rng.standard_normal((5, cfg.d_model)), jnp.float32)
    e, scale = 2, cfg.lora_alpha / cfg.lora_rank
    w = {
        n: np.asarray(experts[n][e], np.float64)
        + scale
        * np.asarray(experts[f"lora_{n}_a"][e], np.float64)
        @ np.asarray(experts[f"lora_{n}_b"][e], np.float64)
        for n in ("gate", "up", "down")
    }
    xn = np.asarray(x, np.float64)
    g = xn @ w["gate"]
    want = (g / (1 + np.exp(-g)) * (xn @ w["up"])) @ w["down"]
    np.testing.assert_allclose(expert_forward(params, cfg, 0, e, x), want, rtol=1e-4, atol=1e-5)


def test_expert_work_by_hand():
    cfg = MoEConfig(vocab_size=5, d_model=4, num_heads=1, d_ff=8)
    assert expert_flops_per_token(4, 8) == 6 * 32 + 5 * 8 + 2 * 4
    assert expert_bytes_per_token(4, 8) == (2 * 4 + 2 * 8) * 4
    counts = jnp.array([[3, 0, 1, 2], [0, 0, 0, 8]])
    work = expert_work(counts, cfg)
    per_token, weights = 240.0, 3 * 4 * 8 * 4
    np.testing.assert_allclose(work.flops, np.asarray(counts) * per_token)
    want_bytes = np.asarray(counts) * 96.0 + (np.asarray(counts) > 0) * weights
    np.testing.assert_allclose(work.bytes, want_bytes)
    lora = expert_work(counts, cfg._replace(lora_rank=2))
    np.testing.assert_allclose(lora.flops - work.flops, 3 * (2 * 4 * 2 * 8 + 4 * 8))
    np.testing.assert_allclose(lora.bytes - work.bytes, 3 * (4 * 2 + 2 * 8) * 4)


def test_int8_expert_work_by_hand():
    """Weight-only int8: the same per-token work, weights read as 1 byte each plus float32
    scales of the 2·F + D output channels, one dequantizing multiply per weight."""
    cfg = MoEConfig(vocab_size=5, d_model=4, num_heads=1, num_experts=2, d_ff=8,
                    expert_widths=(8, 2))  # fmt: skip
    counts = jnp.array([[3, 1], [0, 5]])
    work = expert_work(counts, cfg, weights="int8")
    # expert 0: F = 8, 240 FLOPs and 96 bytes per token; weights 96 codes + (16 + 4) scales
    # expert 1: F = 2, 6·8 + 10 + 8 = 66 FLOPs and (8 + 4)·4 = 48 bytes; 24 codes + 8 scales
    want_flops = [[3 * 240 + 96, 66 + 24], [0, 5 * 66 + 24]]
    want_bytes = [[3 * 96 + 96 + 20 * 4, 48 + 24 + 8 * 4], [0, 5 * 48 + 24 + 8 * 4]]
    np.testing.assert_allclose(work.flops, want_flops)
    np.testing.assert_allclose(work.bytes, want_bytes)
    float_work = expert_work(counts, cfg)
    np.testing.assert_allclose(float_work.bytes, [[3 * 96 + 384, 48 + 96], [0, 5 * 48 + 96]])
    with pytest.raises(ValueError, match="weights must be one of"):
        expert_work(counts, cfg, weights="int4")


def test_model_from_aux_counts_feeds_the_profiler(model):
    apply, params = model
    out = apply(params, tokens(5))
    work = expert_work(out.aux["expert_counts"], CFG)
    assert work.flops.shape == (CFG.num_layers, CFG.num_experts)
    total = float(work.flops.sum())
    want = BATCH * LENGTH * CFG.top_k * CFG.num_layers * expert_flops_per_token(8, 16)
    np.testing.assert_allclose(total, want)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_heads=3), "num_heads"),
        (dict(top_k=5), "top_k"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(norm="batch"), "norm"),
        (dict(backend="triton"), "backend"),
        (dict(d_ff=0), "d_ff"),
    ],
)
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        init_moe(CFG._replace(**change))


def test_token_validation(model):
    apply, params = model
    with pytest.raises(ValueError, match="max_len"):
        apply(params, jnp.zeros((1, CFG.max_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="tokens"):
        apply(params, jnp.zeros((1, 4), jnp.float32))
