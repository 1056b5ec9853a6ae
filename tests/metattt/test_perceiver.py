"""The Perceiver forecaster against a plain-jnp reference; masking, registration, meta-gradients.

Tiny sizes throughout (D = 8, 4 latents, 1 self-attention layer, <= 9 neurons): the reference
forward is written out here from the parameter dict, runs one example at a time on its real
neurons only, and so checks the masking by construction.

At these sizes XLA's compile time dominates (tens of seconds for the second-order program on a
busy 2-core machine), so every program here is compiled with XLA's cheap optimisation level:
the same operations, about 4x faster to compile.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metattt import meta
from metattt import params as P
from metattt.data import sessions as S
from metattt.inner import InnerConfig
from metattt.models import perceiver as M

CFG = M.PerceiverConfig(
    context=6,
    horizon=3,
    max_units=16,
    max_sessions=3,
    dim=8,
    num_latents=4,
    num_heads=2,
    num_layers=1,
    mlp_ratio=2,
)
EMBEDDINGS = "re:^(unit_emb|session_emb)$"
jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    },
)


def make_batch(seed, b=2, n=5, mask=None):
    rng = np.random.default_rng(seed)
    return {
        "context": rng.normal(size=(b, n, CFG.context)).astype(np.float32),
        "unit_ids": np.stack([rng.permutation(CFG.max_units)[:n] for _ in range(b)]).astype(
            np.int32
        ),
        "session_id": rng.integers(0, CFG.max_sessions, size=b).astype(np.int32),
        "mask": np.ones((b, n), bool) if mask is None else np.asarray(mask, bool),
    }


# ---------------------------------------------------------------------------------------------
# Independent reference: the module's math in NumPy (float64), one example at a time, on its
# real neurons only (so padding cannot matter by construction).


def _ln(p, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _gelu(x):  # jax.nn.gelu's default (tanh) approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _mha(p, q_in, kv_in):
    q = np.einsum("ld,dhk->lhk", q_in, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("ld,dhk->lhk", kv_in, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("ld,dhk->lhk", kv_in, p["value"]["kernel"]) + p["value"]["bias"]
    w = _softmax(np.einsum("qhk,shk->hqs", q, k) / np.sqrt(q.shape[-1]))
    o = np.einsum("hqs,shk->qhk", w, v)
    return np.einsum("qhk,hkd->qd", o, p["out"]["kernel"]) + p["out"]["bias"]


def _mlp(p, x):
    h = _gelu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def _cross(p, q, kv):
    q = q + _mha(p["attn"], _ln(p["norm_q"], q), _ln(p["norm_kv"], kv))
    return q + _mlp(p["mlp"], _ln(p["norm_mlp"], q))


def reference_forward(p, context, unit_ids, session_id, query_context=False):
    """context (N, C), unit_ids (N,), session_id () of real neurons only -> (N, P)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    units = p["unit_emb"][unit_ids]
    tokens = context @ p["token"]["kernel"] + p["token"]["bias"] + units
    tokens = tokens + p["session_emb"][session_id]
    z = _cross(p["encoder"], p["latent_emb"], tokens)
    for i in range(CFG.num_layers):
        lp = p["layers"][str(i)]
        z = z + _mha(lp["attn"], _ln(lp["norm1"], z), _ln(lp["norm1"], z))
        z = z + _mlp(lp["mlp"], _ln(lp["norm2"], z))
    queries = tokens if query_context else units + p["session_emb"][session_id]
    y = _cross(p["decoder"], queries, z)
    return _ln(p["norm_out"], y) @ p["readout"]["kernel"] + p["readout"]["bias"]


@pytest.mark.parametrize("query_context", [False, True])
def test_forward_matches_reference_with_padding(query_context):
    cfg = dataclasses.replace(CFG, query_context=query_context)
    apply, params = M.init_perceiver(cfg, seed=0)
    mask = np.array([[1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 1]], bool)
    batch = make_batch(1, n=6, mask=mask)
    out = jit(apply)(params, batch)
    assert out.shape == (2, 6, 3) and out.dtype == jnp.float32
    for b in range(2):
        real = mask[b]
        expected = reference_forward(
            params,
            batch["context"][b, real],
            batch["unit_ids"][b, real],
            batch["session_id"][b],
            query_context,
        )
        np.testing.assert_allclose(out[b, real], expected, rtol=2e-5, atol=2e-5)


def test_padded_neurons_change_nothing_and_neurons_are_exchangeable(x64):
    """In float64, so that "nothing" means nothing: a leak would be far above 1e-12."""
    apply, params = M.init_perceiver(CFG, seed=1)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)  # NumPy: no compiles
    apply = jit(apply)
    batch = make_batch(2, n=5)
    batch["context"] = batch["context"].astype(np.float64)
    out = apply(params, batch)
    # Interleave 4 padded neurons carrying garbage: NaN / huge contexts, out-of-range ids.
    slots = np.array([0, 2, 3, 5, 8])  # real neurons' new positions among 9
    padded = {
        "context": np.full((2, 9, CFG.context), np.nan),
        "unit_ids": np.full((2, 9), 10_000, np.int32),
        "session_id": batch["session_id"],
        "mask": np.zeros((2, 9), bool),
    }
    padded["context"][:, [1, 4]] = 1e6
    padded["context"][:, slots] = batch["context"]
    padded["unit_ids"][:, slots] = batch["unit_ids"]
    padded["mask"][:, slots] = True
    out_padded = apply(params, padded)
    np.testing.assert_allclose(out_padded[:, slots], out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out_padded[:, [1, 4, 6, 7]], 0.0)  # padding predicts 0
    # Permuting neurons (with their ids) permutes the predictions.
    perm = np.array([3, 0, 4, 1, 2])
    permuted = {
        **batch,
        "context": batch["context"][:, perm],
        "unit_ids": batch["unit_ids"][:, perm],
    }
    np.testing.assert_allclose(apply(params, permuted), out[:, perm], rtol=1e-12, atol=1e-12)


def test_parameter_names_follow_the_presets():
    _, params = M.init_perceiver(CFG, seed=0)
    assert P.selected_paths(params, P.select(params, EMBEDDINGS)) == ["session_emb", "unit_emb"]
    assert P.selected_paths(params, P.select(params, "emb")) == [
        "latent_emb",
        "session_emb",
        "unit_emb",
    ]
    for preset, leaf in [("attn_proj", "attn/out/"), ("mlp_out", "mlp/out/")]:
        paths = P.selected_paths(params, P.select(params, preset))
        assert {p.split("/")[0] for p in paths} == {"encoder", "layers", "decoder"}
        assert all(leaf in p for p in paths)
    norms = P.selected_paths(params, P.select(params, "layernorm"))
    assert "layers/0/norm1/scale" in norms and "norm_out/bias" in norms
    last = P.selected_paths(params, P.select(params, "re:^layers/0/"))
    assert len(last) == 16  # attn (q, k, v, out) x (kernel, bias) + 2 norms x 2 + mlp 2 x 2
    assert params["unit_emb"].shape == (16, 8) and params["session_emb"].shape == (3, 8)


def test_register_session_resets_only_the_selected_rows():
    _, params = M.init_perceiver(CFG, seed=0)
    ids = np.array([4, 7, 0, 9], np.int32)
    mask = np.array([True, True, False, True])  # slot 2 is padding: row 0 must stay
    key = jax.random.key(3)
    register = jit(M.register_session, static_argnames="init_std")
    new = register(params, 2, ids, key, mask=mask)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, params)
    changed = np.zeros(16, bool)
    changed[[4, 7, 9]] = True
    units, old_units = np.asarray(new["unit_emb"]), np.asarray(params["unit_emb"])
    np.testing.assert_array_equal(units[~changed], old_units[~changed])
    assert np.all(np.any(units[changed] != old_units[changed], axis=1))
    np.testing.assert_array_equal(new["session_emb"][:2], params["session_emb"][:2])
    assert np.all(new["session_emb"][2] != params["session_emb"][2])
    rest = lambda p: {k: v for k, v in p.items() if k not in ("unit_emb", "session_emb")}
    chex.assert_trees_all_equal(rest(new), rest(params))
    # Rows are drawn per table row: the order of the ids does not matter; the key does.
    shuffled = register(params, 2, ids[::-1], key, mask=mask[::-1])
    chex.assert_trees_all_equal(shuffled, new)
    other = register(params, 2, ids, jax.random.key(4), mask=mask)
    assert not np.allclose(other["unit_emb"][4], new["unit_emb"][4])
    zeros = register(params, 2, ids, key, mask=mask, init_std=0.0)
    np.testing.assert_array_equal(zeros["unit_emb"][changed], 0.0)
    with pytest.raises(ValueError, match="unit_ids"):
        M.register_session(params, 0, np.array([16]), key)
    with pytest.raises(ValueError, match="session_id"):
        M.register_session(params, 3, ids, key)


def test_registering_a_new_session_does_not_retrace():
    chex.clear_trace_counter()
    apply, params = M.init_perceiver(CFG, seed=0)
    fwd = jit(chex.assert_max_traces(apply, n=1))
    register = jit(chex.assert_max_traces(M.register_session, n=1))
    activate = jit(chex.assert_max_traces(M.activate, n=1))
    registry = M.init_registry(CFG)

    def new_session(params, registry, session_id, num, key):
        ids = np.zeros(6, np.int32)
        ids[:num] = M.unused_unit_ids(registry, num)
        mask = np.arange(6) < num
        params = register(params, session_id, ids, key, mask=mask)
        registry = activate(registry, session_id, ids, mask)
        batch = make_batch(session_id, b=2, n=6, mask=np.broadcast_to(mask, (2, 6)))
        batch.update(unit_ids=np.broadcast_to(ids, (2, 6)), session_id=np.full(2, session_id))
        return params, registry, batch

    params, registry, batch0 = new_session(params, registry, 0, 5, jax.random.key(0))
    out0 = fwd(params, batch0, registry=registry)
    params, registry, batch1 = new_session(params, registry, 1, 4, jax.random.key(1))
    out1 = fwd(params, batch1, registry=registry)
    np.testing.assert_array_equal(np.flatnonzero(registry.unit_active), np.arange(9))
    np.testing.assert_array_equal(registry.session_active, [True, True, False])
    assert out1.shape == out0.shape
    # Session 0's rows were untouched, so its predictions are unchanged.
    np.testing.assert_allclose(fwd(params, batch0, registry=registry), out0, rtol=1e-6)
    with pytest.raises(ValueError, match="free"):
        M.unused_unit_ids(registry, 8)


def test_registry_masks_inactive_units_and_sessions():
    apply, params = M.init_perceiver(CFG, seed=0)
    apply = jit(apply)
    batch = make_batch(5, b=2, n=5)
    registry = M.init_registry(CFG)
    for b in range(2):
        registry = M.activate(registry, batch["session_id"][b], batch["unit_ids"][b])
    np.testing.assert_allclose(apply(params, batch, registry=registry), apply(params, batch))
    # An inactive unit is padding.
    gone = batch["unit_ids"][0, 2]
    off = registry._replace(unit_active=registry.unit_active.at[gone].set(False))
    masked = {**batch, "mask": batch["mask"] & (batch["unit_ids"] != gone)}
    np.testing.assert_allclose(
        apply(params, batch, registry=off), apply(params, masked), rtol=1e-6, atol=1e-6
    )
    target = np.ones((2, 5, CFG.horizon), np.float32)
    np.testing.assert_allclose(
        M.forecast_loss(apply, registry=off)(params, {**batch, "target": target}),
        M.forecast_loss(apply)(params, {**masked, "target": target}),
        rtol=1e-6,
    )
    # An inactive session has a zero embedding.
    sid = batch["session_id"][0]
    no_session = registry._replace(session_active=registry.session_active.at[sid].set(False))
    zeroed = {**params, "session_emb": params["session_emb"].at[sid].set(0.0)}
    np.testing.assert_allclose(
        apply(params, batch, registry=no_session), apply(zeroed, batch), rtol=1e-6, atol=1e-6
    )


def test_masked_mse_and_batch_checks():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))
    mask = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], bool)
    expected = ((pred - target) ** 2)[mask].mean()
    np.testing.assert_allclose(M.masked_mse(pred, target, mask), expected, rtol=1e-6)
    apply, params = M.init_perceiver(CFG, seed=0)
    batch = make_batch(0)
    with pytest.raises(ValueError, match="context"):
        apply(params, {**batch, "context": batch["context"][..., :4]})
    with pytest.raises(ValueError, match="unit_ids"):
        apply(params, {**batch, "unit_ids": batch["unit_ids"].astype(np.float32)})
    with pytest.raises(ValueError, match="unit_ids must lie"):
        apply(params, {**batch, "unit_ids": batch["unit_ids"] + 16})
    with pytest.raises(ValueError, match="session_id"):
        apply(params, {**batch, "session_id": np.array([0, 3], np.int32)})
    with pytest.raises(ValueError, match="'mask'"):
        apply(params, {k: v for k, v in batch.items() if k != "mask"})
    with pytest.raises(ValueError, match="num_heads"):
        M.PerceiverConfig(dim=6, num_heads=4).validate()
    with pytest.raises(ValueError, match="dtype"):
        M.PerceiverConfig(dtype="int8").validate()


def _tiny_task():
    """Support/query windows of one generated session (5-6 neurons padded to 7, T = 60)."""
    session = S.generate_sessions(
        1, 0, num_steps=60, min_neurons=5, max_neurons=6, burn_in=50, calcium_tau=2.0
    )[0]
    padded = S.pad_sessions([session], max_neurons=7)
    ids = S.assign_unit_ids([session.meta["num_neurons"]], 7, start=3)
    return S.session_task(
        padded.data[0],
        context=CFG.context,
        horizon=CFG.horizon,
        mask=padded.mask[0],
        unit_ids=ids[0],
        session_id=1,
    )


def test_second_order_meta_gradient_matches_finite_differences_and_remat(x64):
    """MAML through 2 inner SGD steps on the embeddings, differentiated wrt every parameter.

    Without latent self-attention layers: the encoder and decoder blocks exercise the same
    attention / LayerNorm / MLP code, and the second-order program compiles in half the time.
    The remat program (``jax.checkpoint`` on every inner step) computes the same numbers with
    a smaller compiled temporary buffer (XLA's memory analysis of the two programs: buffer
    assignment, which sets it, does not depend on the optimisation level).
    """
    apply, params = M.init_perceiver(dataclasses.replace(CFG, num_layers=0), seed=0)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)  # NumPy: no compiles
    task = jax.tree.map(
        lambda a: a.astype(np.float64) if a.dtype == np.float32 else a, _tiny_task()
    )
    loss_fn = M.forecast_loss(apply)
    mask = P.select(params, EMBEDDINGS)
    inner = InnerConfig(optax.sgd(1.0), max_steps=2)

    def meta_loss(p, remat=False):
        return meta.maml_loss(loss_fn, p, task, mask=mask, inner=inner._replace(remat=remat))[0]

    value_and_grad = jit(jax.value_and_grad(meta_loss), static_argnums=1)
    plain, remat = (value_and_grad.lower(params, r).compile() for r in (False, True))
    f = lambda p: plain(p)[0]  # one compiled program for values and gradient
    g = jax.tree.map(np.asarray, plain(params)[1])
    rng = np.random.default_rng(100)
    for _ in range(3):  # <grad, v> against central differences along random directions v
        v = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
        shift = lambda s, v=v: jax.tree.map(lambda t, d: t + s * d, params, v)
        eps = 1e-6  # float64: truncation ~eps^2, rounding ~1e-16 / eps, both << 1e-6 relative
        numeric = (f(shift(eps)) - f(shift(-eps))) / (2 * eps)
        pairs = zip(jax.tree.leaves(g), jax.tree.leaves(v), strict=True)
        analytic = sum(np.vdot(a, b) for a, b in pairs)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
    # Remat recomputes the same numbers instead of keeping every inner step's intermediates:
    # less temporary memory (seen: 183 kB vs 463 kB, float64).
    chex.assert_trees_all_close(remat(params)[1], g, rtol=1e-12, atol=1e-14)
    temp = [p.memory_analysis().temp_size_in_bytes for p in (plain, remat)]
    assert 0 < temp[1] < temp[0], temp
    # The second-order terms matter here: the first-order (FOMAML) meta-gradient, i.e. the
    # query gradient at the parameters after two explicit SGD steps on the embeddings, differs.
    step_grad = jit(jax.grad(loss_fn))  # support and query batches share shapes: one compile
    adapted = params
    for _ in range(2):
        inner_grad = step_grad(adapted, task.support)
        adapted = {
            **adapted,
            **{
                k: adapted[k] - 1.0 * np.asarray(inner_grad[k]) for k in ("unit_emb", "session_emb")
            },
        }
    first_order = step_grad(adapted, task.query)
    diff = np.linalg.norm(first_order["unit_emb"] - g["unit_emb"])
    assert diff > 1e-2 * np.linalg.norm(g["unit_emb"])


def test_bf16_compute_is_close_to_fp32_and_keeps_fp32_params():
    apply, params = M.init_perceiver(CFG, seed=0)
    batch = make_batch(7, b=2, n=6, mask=np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool))
    run = jit(apply, static_argnames="dtype")
    out32 = run(params, batch)
    out16 = run(params, batch, dtype="bfloat16")
    assert out16.dtype == jnp.float32
    assert not np.array_equal(out16, out32)  # it really computed in bf16
    # bf16 keeps 8 significand bits (relative rounding 2^-9 ~ 0.2% per op); through this
    # ~20-op-deep network a 3% relative error on the whole output is the bound we accept.
    rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert rel < 3e-2, rel
    target = np.zeros((2, 6, 3), np.float32)
    loss = lambda p, dt: M.masked_mse(apply(p, batch, dtype=dt), target, batch["mask"])
    grad = jit(jax.grad(loss), static_argnums=1)
    g16 = grad(params, "bfloat16")
    chex.assert_trees_all_equal_dtypes(g16, params)  # gradients wrt the fp32 master params
    g32 = grad(params, None)
    flat16, flat32 = (np.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (g16, g32))
    assert np.linalg.norm(flat16 - flat32) / np.linalg.norm(flat32) < 5e-2
    # The config's dtype is the default of apply: its program computes in bf16 (traced only).
    apply16, _ = M.init_perceiver(dataclasses.replace(CFG, dtype="bfloat16"), seed=0)
    program = str(jax.make_jaxpr(apply16)(params, batch))
    assert "bf16" in program and str(jax.make_jaxpr(apply)(params, batch)).count("bf16") == 0


def test_training_lowers_the_forecast_loss():
    """A few Adam steps on generated windows: the model learns (sanity, not a benchmark)."""
    sessions = S.generate_sessions(2, 0, num_steps=120, min_neurons=6, max_neurons=8, burn_in=50)
    padded = S.pad_sessions(sessions)
    ids = S.assign_unit_ids([s.meta["num_neurons"] for s in sessions], padded.mask.shape[1])
    windows = [
        S.session_windows(
            padded.data[i],
            context=6,
            horizon=3,
            stride=3,
            mask=padded.mask[i],
            unit_ids=ids[i],
            session_id=i,
        )
        for i in range(2)
    ]
    batch = S.WindowBatch(*(np.concatenate(f) for f in zip(*windows, strict=True)))
    apply, params = M.init_perceiver(CFG, seed=0)
    loss_fn = M.forecast_loss(apply)
    opt = optax.adam(1e-2)

    @jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    losses = []
    for _ in range(60):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
