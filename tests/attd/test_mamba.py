"""The Mamba model: heads and shapes, causality, the A_log hook, masking, presets, training.

Sizes are tiny (V = 11, M = 8, D = 16, N = 4, two layers, B = 2, L = 12); the jitted functions
are built once per module.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attd.mamba import (
    Mamba,
    MambaConfig,
    MambaMixer,
    causal_depthwise_conv,
    init_mamba,
    zero_a_log_delta,
)
from metattt import objectives
from metattt import params as P
from metattt.models.functional import functionalize

CFG = MambaConfig(vocab_size=11, d_model=8, n_layers=2, d_state=4, num_classes=3, scan_chunk_size=4)
BATCH, LENGTH = 2, 12


@pytest.fixture(scope="module")
def model():
    apply, params = init_mamba(CFG, seed=0)
    classify = jax.jit(functools.partial(apply, head="classify"))
    lm = jax.jit(functools.partial(apply, head="lm"))
    return apply, params, classify, lm


def apply_for(cfg):
    """``apply`` of a model with another config but the same parameter tree, built abstractly
    (no initialisation to compile)."""
    return functionalize(nnx.eval_shape(lambda: Mamba(cfg, rngs=nnx.Rngs(0)))).apply


def tokens_for(seed, shape=(BATCH, LENGTH)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


def classify_loss(apply, params, batch):
    tokens, labels = batch
    return objectives.cross_entropy(apply(params, tokens, head="classify"), labels)


@pytest.fixture(scope="module")
def loss_and_grad(model):
    apply = model[0]
    return jax.jit(jax.value_and_grad(functools.partial(classify_loss, apply)))


def test_output_shapes_of_both_heads(model):
    _, params, classify, lm = model
    tokens = tokens_for(0)
    logits = classify(params, tokens)
    assert logits.shape == (BATCH, CFG.num_classes) and logits.dtype == jnp.float32
    next_logits = lm(params, tokens)
    assert next_logits.shape == (BATCH, LENGTH, CFG.vocab_size)
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(next_logits))


def test_lm_head_is_causal(model):
    _, params, _, lm = model
    tokens = tokens_for(1)
    t = 5
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 3) % CFG.vocab_size)
    before, after = np.asarray(lm(params, tokens)), np.asarray(lm(params, changed))
    np.testing.assert_allclose(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-6)
    assert np.abs(before[:, t + 1 :] - after[:, t + 1 :]).max() > 1e-4  # later ones do change


def test_zero_a_log_delta_equals_the_base_model_exactly(model):
    _, params, classify, lm = model
    tokens = tokens_for(2)
    zeros = zero_a_log_delta(CFG)
    assert zeros.shape == (CFG.n_layers, CFG.d_inner, CFG.d_state)
    np.testing.assert_array_equal(
        classify(params, tokens, a_log_delta=zeros), classify(params, tokens)
    )
    delta = 0.5 * jax.random.normal(jax.random.key(0), zeros.shape)  # a real change moves it
    moved = classify(params, tokens, a_log_delta=delta)
    assert np.abs(np.asarray(moved - classify(params, tokens))).max() > 1e-6


def test_padded_positions_are_masked_out_of_the_pooled_head(model):
    _, params, classify, _ = model
    valid = LENGTH - 4
    tokens = tokens_for(3)
    mask = jnp.ones((BATCH, LENGTH), jnp.int32).at[0, valid:].set(0)
    logits = classify(params, tokens, mask=mask)
    # Whatever sits in the padding, row 0 is unchanged, and equals the unpadded sequence.
    repadded = tokens.at[0, valid:].set((tokens[0, valid:] + 5) % CFG.vocab_size)
    np.testing.assert_allclose(classify(params, repadded, mask=mask), logits, atol=1e-6)
    alone = classify(params, tokens[:1, :valid])
    np.testing.assert_allclose(logits[0], alone[0], rtol=1e-5, atol=1e-6)
    # Row 1 has no padding: the mask changes nothing there.
    np.testing.assert_allclose(logits[1], classify(params, tokens)[1], rtol=1e-6, atol=1e-6)


def test_associative_backend_gives_the_same_logits(model):
    _, params, classify, _ = model
    assoc_apply = apply_for(dataclasses.replace(CFG, scan_backend="associative"))
    tokens = tokens_for(5)
    np.testing.assert_allclose(
        jax.jit(assoc_apply)(params, tokens), classify(params, tokens), rtol=1e-5, atol=1e-6
    )


def test_a_few_adam_steps_lower_the_loss(model, loss_and_grad):
    _, params, _, _ = model
    tokens = tokens_for(6, (8, LENGTH))
    batch = (tokens, tokens[:, 0] % CFG.num_classes)  # the class is a function of token 0
    opt = optax.adam(1e-2)

    @jax.jit
    def apply_update(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    losses = []
    for _ in range(25):
        loss, grads = loss_and_grad(params, batch)
        params, state = apply_update(grads, state, params)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_parameter_names_work_with_the_presets(model):
    params = model[1]
    norms = P.selected_paths(params, P.select(params, "layernorm"))
    assert norms == ["final_norm/scale", "layers/0/norm/scale", "layers/1/norm/scale"]
    assert P.selected_paths(params, P.select(params, "emb")) == ["embedding/embedding"]
    assert P.selected_paths(params, P.select(params, "re:/a_log$")) == [
        "layers/0/mixer/a_log",
        "layers/1/mixer/a_log",
    ]
    for i in range(CFG.n_layers):  # S4D-real initialisation: A = -(n + 1) in every channel
        a_log = np.asarray(params["layers"][str(i)]["mixer"]["A_log"])
        np.testing.assert_allclose(a_log, np.log(np.tile(np.arange(1, 5), (CFG.d_inner, 1))))


def test_causal_depthwise_conv_matches_flax_conv_and_a_loop():
    """The shifted-sum conv the mixer runs equals the ``nnx.Conv`` whose parameters it holds,
    and a NumPy loop over taps and times (float64), on random inputs and weights."""
    taps, dim = 4, 6
    conv = nnx.Conv(
        dim, dim, kernel_size=(taps,), padding=((taps - 1, 0),), feature_group_count=dim,
        rngs=nnx.Rngs(3),
    )  # fmt: skip
    conv.bias[...] = jax.random.normal(jax.random.key(4), (dim,))
    x = jax.random.normal(jax.random.key(5), (2, 9, dim))
    kernel, bias = conv.kernel[...], conv.bias[...]
    ours = causal_depthwise_conv(x, kernel, bias)
    np.testing.assert_allclose(ours, conv(x), rtol=1e-5, atol=1e-6)
    xn, kn, bn = (np.asarray(a, np.float64) for a in (x, kernel, bias))
    loop = np.zeros_like(xn)
    for t in range(xn.shape[1]):
        loop[:, t] = bn
        for k in range(taps):
            src = t - (taps - 1) + k
            if src >= 0:
                loop[:, t] += kn[k, 0] * xn[:, src]
    np.testing.assert_allclose(ours, loop, rtol=1e-5, atol=1e-6)


def test_time_invariant_mixer_is_a_convolution_with_the_ssm_kernel():
    """selective=False: Δ, B, C are constants, so the SSM is a causal convolution of each
    channel with K_d[k] = Δ_d Σ_n C_n B_n exp(k Δ_d A_dn) (checked in NumPy float64)."""
    cfg = dataclasses.replace(CFG, selective=False)
    mixer = nnx.jit(lambda: MambaMixer(cfg, rngs=nnx.Rngs(1)))()
    assert not hasattr(mixer, "x_proj") and not hasattr(mixer, "dt_proj")
    u = jax.random.normal(jax.random.key(2), (1, LENGTH, cfg.d_model))

    @nnx.jit
    def run(mixer, u):
        x, z = jnp.split(mixer.in_proj(u), 2, axis=-1)
        return jax.nn.silu(mixer.conv1d(x))[0], z[0], mixer(u)[0]

    x, z, out = (np.asarray(a, np.float64) for a in run(mixer, u))  # (L, D), (L, D), (L, M)
    dt = np.log1p(np.exp(np.asarray(mixer.dt_bias[...], np.float64)))  # (D,)
    A = -np.exp(np.asarray(mixer.A_log[...], np.float64))  # (D, N)
    bc = np.asarray(mixer.B[...], np.float64) * np.asarray(mixer.C[...], np.float64)  # (N,)
    lags = np.arange(LENGTH)
    kernel = dt * np.einsum("n,kdn->kd", bc, np.exp(lags[:, None, None] * dt[:, None] * A))
    y = np.stack([np.sum(kernel[: t + 1][::-1] * x[: t + 1], axis=0) for t in range(LENGTH)])
    y = (y + np.asarray(mixer.D[...], np.float64) * x) * z / (1.0 + np.exp(-z))
    expected = y @ np.asarray(mixer.out_proj.kernel[...], np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_bad_arguments_raise_naming_them(model):
    apply, params, _, _ = model
    tokens = tokens_for(7)
    with pytest.raises(ValueError, match="a_log_delta"):
        apply(params, tokens, a_log_delta=jnp.zeros((CFG.n_layers, CFG.d_inner)))
    with pytest.raises(ValueError, match="^mask "):
        apply(params, tokens, mask=jnp.ones((BATCH, LENGTH + 1)))
    with pytest.raises(ValueError, match="^tokens "):
        apply(params, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="^head "):
        apply(params, tokens, head="both")
    lm_only = nnx.eval_shape(
        lambda: Mamba(dataclasses.replace(CFG, num_classes=None), rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match="num_classes"):
        lm_only(tokens)
    with pytest.raises(ValueError, match="scan_backend"):
        MambaConfig(vocab_size=4, d_model=8, n_layers=1, scan_backend="triton")
    with pytest.raises(ValueError, match="d_state"):
        MambaConfig(vocab_size=4, d_model=8, n_layers=1, d_state=0)
    with pytest.raises(ValueError, match="dt_rank"):
        MambaConfig(vocab_size=4, d_model=8, n_layers=1, dt_rank="full")
