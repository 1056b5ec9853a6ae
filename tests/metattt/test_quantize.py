"""Weight-only int8 experts: codes and scales against a NumPy reference, the round-trip bound,
the int8 matmul and expert against float64 NumPy, and the whole MoE on quantized parameters
(its routers still adaptable) within a stated tolerance of the float model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metattt import params as P
from metattt.models import quantize as Q
from metattt.models.moe import MoEConfig, init_moe

CFG = MoEConfig(
    vocab_size=11, d_model=8, num_heads=2, num_layers=1, num_experts=4, d_ff=16, top_k=2,
    max_len=16, num_classes=3, expert_widths=(4, 8, 12, 16),
)  # fmt: skip


def _reference(w):
    """NumPy per-output-channel symmetric int8: (codes int8, scales float32)."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=-2, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


@pytest.mark.parametrize("seed", range(3))
def test_codes_scales_and_round_trip_bound(seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, 7, 5)).astype(np.float32) * rng.uniform(0.1, 3, (3, 1, 5))
    w[1, :, 2] = 0.0  # an all-zero channel dequantizes to zeros exactly
    t = Q.quantize_int8(jnp.asarray(w))
    q, scale = _reference(w)
    assert t.q.dtype == jnp.int8 and t.scale.shape == (3, 1, 5)
    np.testing.assert_array_equal(np.asarray(t.q), q)
    np.testing.assert_allclose(np.asarray(t.scale), scale, rtol=2e-7)  # x/127: 1 ulp
    back = np.asarray(Q.dequantize(t), np.float64)
    err = np.abs(back - w)
    assert np.all(err <= scale / 2 * (1 + 1e-6))  # round to nearest: half a step per channel
    assert np.all(back[1, :, 2] == 0)
    assert np.abs(np.asarray(t.q)).max() == 127  # each channel's largest weight maps to ±127
    assert t.nbytes == 3 * 7 * 5 + 3 * 5 * 4


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="w must be a float array"):
        Q.quantize_int8(jnp.ones((4,)))
    with pytest.raises(ValueError, match="w must be a float array"):
        Q.quantize_int8(jnp.ones((4, 4), jnp.int32))
    t = Q.quantize_int8(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"x \(N, I\)"):
        Q.int8_matmul(jnp.ones((2, 5)), t)
    with pytest.raises(ValueError, match="no '.../experts/"):
        Q.quantize_experts({"router": jnp.ones((2, 2))})


@pytest.mark.parametrize("seed", range(2))
def test_int8_matmul_and_expert_against_numpy(seed):
    """(x @ q) · s equals x @ Ŵ in float64 NumPy to float32 rounding; the SwiGLU expert at a
    reduced width matches NumPy on the dequantized weights."""
    rng = np.random.default_rng(10 + seed)
    d, f, width = 8, 16, 12
    x = rng.standard_normal((5, d)).astype(np.float32)
    ws = [rng.standard_normal(s).astype(np.float32) for s in ((d, f), (d, f), (f, d))]
    ts = [Q.quantize_int8(jnp.asarray(w)) for w in ws]
    deq = [np.asarray(q, np.float64) * s for q, s in map(_reference, ws)]
    np.testing.assert_allclose(Q.int8_matmul(jnp.asarray(x), ts[0]), x @ deq[0], rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    g, u, dn = deq[0][:, :width], deq[1][:, :width], deq[2][:width]
    xn = x.astype(np.float64)
    h = xn @ g
    want = (h / (1 + np.exp(-h)) * (xn @ u)) @ dn
    got = Q.swiglu_int8(jnp.asarray(x), *ts, width=width)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    apply, params = init_moe(CFG, seed=1)
    return jax.jit(Q.int8_apply(apply)), params, Q.quantize_experts(params)


def test_quantized_tree_holds_int8_experts_only(model):
    _, params, qparams = model
    experts = qparams["blocks"]["0"]["ffn"]["experts"]
    for name in ("gate", "up", "down"):
        assert isinstance(experts[name], Q.Int8Tensor) and experts[name].q.dtype == jnp.int8
    router = qparams["blocks"]["0"]["ffn"]["router"]["kernel"]
    assert router is params["blocks"]["0"]["ffn"]["router"]["kernel"]
    float_bytes = sum(params["blocks"]["0"]["ffn"]["experts"][n].nbytes for n in Q.EXPERT_MATRICES)
    int8_bytes = sum(experts[n].nbytes for n in Q.EXPERT_MATRICES)
    # 4x fewer weight bytes, plus the per-channel scales: (2F + D) float32 per expert
    assert int8_bytes == float_bytes // 4 + CFG.num_experts * (2 * CFG.d_ff + CFG.d_model) * 4


def test_model_on_int8_experts(model):
    """The int8 model equals the float model run on the dequantized weights (same program up to
    where the dequantization happens: 1e-5), and stays near the float model (the quantization
    error: logits within 2% of their spread here)."""
    apply, params, qparams = model
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 8)))
    out_q = apply(qparams, tokens)
    out_deq = apply(Q.dequantize_tree(qparams), tokens)
    out_f = apply(params, tokens)
    np.testing.assert_allclose(out_q.logits, out_deq.logits, rtol=1e-5, atol=1e-5)
    spread = float(jnp.std(out_f.logits))
    assert float(jnp.max(jnp.abs(out_q.logits - out_f.logits))) < 0.02 * spread
    assert float(jnp.max(jnp.abs(out_q.logits - out_f.logits))) > 0  # it did quantize


def test_router_adapts_on_top_of_int8_experts(model):
    """The router's gradient flows through the frozen int8 experts; the codes get none."""
    _, _, qparams = model
    apply = Q.int8_apply(init_moe(CFG).apply)
    mask = P.select(qparams, "router")
    fast, slow = P.split(qparams, mask)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 8)))

    def loss(fast):
        return jnp.mean(apply(P.merge(fast, slow), tokens).class_logits ** 2)

    grads = jax.jit(jax.grad(loss))(fast)
    router = grads["blocks"]["0"]["ffn"]["router"]["kernel"]
    assert float(jnp.linalg.norm(router)) > 0
    assert grads["blocks"]["0"]["ffn"]["experts"]["gate"].q is None
