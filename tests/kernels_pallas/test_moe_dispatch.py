"""MoE dispatch: routing helpers against NumPy, every backend against a plain loop over experts.

The oracle is :func:`dispatch_loop`: every expert runs on every token and is masked, and its
drop rule is a separate plain-Python implementation (:func:`loop_keep`) checked here on a
hand-worked example. Errors are ‖out − ref‖ / ‖ref‖ with fixed float32 bounds. Sizes stay tiny
(T = 12, D = 6, F = 8, E = 4) so the module runs in seconds on two cores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.moe_dispatch import (
    DROP_PRIORITIES,
    assign_slots,
    capacity,
    dispatch_loop,
    gmm,
    loop_keep,
    moe_dispatch,
    resolve_backend,
    sort_by_expert,
    tgmm,
    top_k_routing,
)

TOKENS, DIM, HIDDEN, EXPERTS, TOP_K = 12, 6, 8, 4, 2
BACKENDS = ("reference", "ragged")
FWD_TOL = 1e-5  # float32, relative norm error
GRAD_TOL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(seed=0, tokens=TOKENS, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, DIM))
    w_gate = rng.standard_normal((EXPERTS, DIM, HIDDEN)) / np.sqrt(DIM)
    w_up = rng.standard_normal((EXPERTS, DIM, HIDDEN)) / np.sqrt(DIM)
    w_down = rng.standard_normal((EXPERTS, HIDDEN, DIM)) / np.sqrt(HIDDEN)
    logits = rng.standard_normal((tokens, EXPERTS)) * 2.0
    return tuple(jnp.asarray(a, dtype) for a in (x, w_gate, w_up, w_down, logits))


def numpy_top_k(logits, k):
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return ids, np.take_along_axis(probs, ids, -1), probs


# --- routing helpers --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_matches_numpy_argsort(k):
    *_, logits = make_inputs(seed=k)
    ids, gates, probs = numpy_top_k(logits, k)
    routing = top_k_routing(logits, k)
    np.testing.assert_array_equal(routing.expert_ids, ids)
    np.testing.assert_allclose(routing.gates, gates, rtol=1e-6)
    np.testing.assert_allclose(routing.probs, probs, rtol=1e-6)
    renorm = top_k_routing(logits, k, renormalize=True)
    np.testing.assert_array_equal(renorm.expert_ids, ids)
    np.testing.assert_allclose(renorm.gates, gates / gates.sum(-1, keepdims=True), rtol=1e-6)


def test_top_k_skips_disabled_experts():
    *_, logits = make_inputs()
    logits = logits.at[:, 1].set(-jnp.inf)
    routing = top_k_routing(logits, 3)
    assert not np.any(np.asarray(routing.expert_ids) == 1)
    routing = top_k_routing(logits, 4)  # K > enabled experts: the disabled one has gate 0
    ids, gates = np.asarray(routing.expert_ids), np.asarray(routing.gates)
    assert np.all(gates[ids == 1] == 0) and np.all(gates[ids != 1] > 0)


@pytest.mark.parametrize("top_k", [0, 5, 2.0, True])
def test_top_k_rejects_bad_k(top_k):
    *_, logits = make_inputs()
    with pytest.raises(ValueError, match="top_k"):
        top_k_routing(logits, top_k)


def test_sort_by_expert_is_a_grouping_permutation():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, EXPERTS, size=(10, 3))
    valid = rng.random((10, 3)) > 0.3
    srt = sort_by_expert(jnp.asarray(ids), EXPERTS, valid=jnp.asarray(valid))
    order, sizes, inverse = (np.asarray(a) for a in srt)
    flat_ids, flat_valid = ids.reshape(-1), valid.reshape(-1)
    np.testing.assert_array_equal(np.sort(order), np.arange(30))
    np.testing.assert_array_equal(order[inverse], np.arange(30))
    np.testing.assert_array_equal(sizes, np.bincount(flat_ids[flat_valid], minlength=EXPERTS))
    num_valid = int(flat_valid.sum())
    assert flat_valid[order[:num_valid]].all() and not flat_valid[order[num_valid:]].any()
    key = flat_ids[order[:num_valid]]
    np.testing.assert_array_equal(key, np.sort(key))
    groups = np.split(order[:num_valid], np.cumsum(sizes)[:-1])
    for e, members in enumerate(groups):
        assert np.all(flat_ids[members] == e) and np.all(np.diff(members) > 0)  # stable


@pytest.mark.parametrize(
    "tokens, experts, k, factor, expected",
    [
        (10, 4, 2, None, 10),
        (10, 4, 2, 1.0, 5),
        (10, 4, 2, 1.1, 6),  # 5.5 -> 6
        (8, 4, 2, 1.25, 5),
        (10, 4, 2, 100.0, 10),  # never above T
        (3, 4, 1, 0.01, 1),  # never below 1
    ],
)
def test_capacity(tokens, experts, k, factor, expected):
    assert capacity(tokens, experts, k, factor) == expected


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_capacity_rejects_non_positive(factor):
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity(10, 4, 2, factor)


# A hand-worked drop example, E = 2, K = 2, C = 2 (see the comments for the orders).
HAND_IDS = np.array([[0, 1], [0, 1], [0, 1], [1, 0]])
HAND_GATES = np.array([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5], [0.7, 0.3]], np.float32)
HAND_KEEP = {
    # by gate: .9 e0, .7 e1, .6 e0 (e0 full), .5 e0 drop, .5 e1 (e1 full), rest dropped
    "score": np.array([[1, 0], [1, 0], [0, 1], [1, 0]], bool),
    # first choices in token order: e0, e0, e0 drop, e1; second: e1 (e1 full), rest dropped
    "position": np.array([[1, 1], [1, 0], [0, 0], [1, 0]], bool),
}


@pytest.mark.parametrize("priority", DROP_PRIORITIES)
def test_drop_rule_on_a_hand_worked_example(priority):
    np.testing.assert_array_equal(
        loop_keep(HAND_IDS, HAND_GATES, 2, 2, priority), HAND_KEEP[priority]
    )
    slots = assign_slots(jnp.asarray(HAND_IDS), jnp.asarray(HAND_GATES), 2, 2, priority)
    np.testing.assert_array_equal(slots.keep, HAND_KEEP[priority])


@pytest.mark.parametrize("priority", DROP_PRIORITIES)
@pytest.mark.parametrize("cap", [1, 3, 5, TOKENS])
def test_assign_slots_matches_the_loop_rule(priority, cap):
    rng = np.random.default_rng(cap)
    ids = np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(TOKENS)])
    gates = (rng.integers(1, 5, size=(TOKENS, TOP_K)) / 4).astype(np.float32)  # many ties
    gates[0, 1] = 0.0  # not routed
    slots = assign_slots(jnp.asarray(ids), jnp.asarray(gates), EXPERTS, cap, priority)
    expected = loop_keep(ids, gates, EXPERTS, cap, priority)
    np.testing.assert_array_equal(slots.keep, expected)
    # positions are distinct within each expert and the kept ones fill 0..count-1
    position = np.asarray(slots.position)
    for e in range(EXPERTS):
        routed = (ids == e) & (gates > 0)
        np.testing.assert_array_equal(np.sort(position[routed]), np.arange(routed.sum()))


# --- dispatch: forward and gradients against the loop -----------------------------------------


def loop_reference(x, wg, wu, wd, logits, *, factor, priority, renormalize=False):
    ids, gates, _ = numpy_top_k(logits, TOP_K)
    probs = jax.nn.softmax(logits, axis=-1)
    gates_j = jnp.take_along_axis(probs, jnp.asarray(ids), axis=-1)
    if renormalize:
        gates_j = gates_j / jnp.sum(gates_j, -1, keepdims=True)
    cap = None if factor is None else capacity(TOKENS, EXPERTS, TOP_K, factor)
    return dispatch_loop(x, wg, wu, wd, ids, gates_j, capacity=cap, drop_priority=priority)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factor", [None, 0.5, 1.0])
@pytest.mark.parametrize("priority", DROP_PRIORITIES)
def test_forward_matches_loop(backend, factor, priority):
    x, wg, wu, wd, logits = make_inputs(seed=1)
    renormalize = factor == 1.0
    ref, keep = loop_reference(
        x, wg, wu, wd, logits, factor=factor, priority=priority, renormalize=renormalize
    )
    res = moe_dispatch(
        x,
        wg,
        wu,
        wd,
        logits,
        top_k=TOP_K,
        renormalize=renormalize,
        capacity_factor=factor,
        drop_priority=priority,
        backend=backend,
    )
    assert res.out.shape == (TOKENS, DIM) and res.out.dtype == jnp.float32
    assert rel_err(res.out, ref) <= FWD_TOL
    np.testing.assert_array_equal(res.dropped, ~keep)
    ids = np.asarray(res.expert_ids)
    np.testing.assert_array_equal(res.expert_counts, np.bincount(ids[keep], minlength=EXPERTS))
    if factor is None:
        assert not np.asarray(res.dropped).any()
    else:
        assert int(np.asarray(res.expert_counts).max()) <= capacity(TOKENS, EXPERTS, TOP_K, factor)
    if factor == 0.5:
        assert np.asarray(res.dropped).any()  # the capacity case really drops


GRAD_COTANGENT = np.random.default_rng(9).standard_normal((TOKENS, DIM)).astype(np.float32)


@functools.cache
def loop_gradients(factor):
    """Gradients of <loop output, cotangent> wrt (x, w_gate, w_up, w_down, logits)."""
    x, wg, wu, wd, logits = make_inputs(seed=2)
    ids, gate_values, _ = numpy_top_k(logits, TOP_K)
    cap = None if factor is None else capacity(TOKENS, EXPERTS, TOP_K, factor)

    def loss_loop(*args):
        gates = jnp.take_along_axis(jax.nn.softmax(args[4], -1), jnp.asarray(ids), -1)
        out, _ = dispatch_loop(*args[:4], ids, gates, capacity=cap, scores=gate_values)
        return jnp.sum(out * GRAD_COTANGENT)

    return jax.jit(jax.grad(loss_loop, tuple(range(5))))(x, wg, wu, wd, logits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factor", [None, 0.5])
def test_gradients_match_loop(backend, factor):
    x, wg, wu, wd, logits = make_inputs(seed=2)

    def loss_dispatch(*args):
        res = moe_dispatch(*args[:4], args[4], top_k=TOP_K, capacity_factor=factor, backend=backend)
        return jnp.sum(res.out * GRAD_COTANGENT)

    got = jax.jit(jax.grad(loss_dispatch, tuple(range(5))))(x, wg, wu, wd, logits)
    want = loop_gradients(factor)
    for name, g, w in zip(("x", "w_gate", "w_up", "w_down", "logits"), got, want, strict=True):
        assert rel_err(g, w) <= GRAD_TOL, name
        assert float(jnp.linalg.norm(w)) > 0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_experts_and_unrouted_assignments(backend):
    x, wg, wu, wd, _ = make_inputs(seed=4)
    rng = np.random.default_rng(4)
    ids = np.stack([rng.permutation(2) for _ in range(TOKENS)]).astype(
        np.int32
    )  # experts 2, 3 idle
    gates = rng.random((TOKENS, 2)).astype(np.float32)
    gates[3, 1] = 0.0  # a gate of exactly 0 is not routed
    res = moe_dispatch(
        x, wg, wu, wd, expert_ids=jnp.asarray(ids), gates=jnp.asarray(gates), backend=backend
    )
    ref, keep = dispatch_loop(x, wg, wu, wd, ids, jnp.asarray(gates))
    assert rel_err(res.out, ref) <= FWD_TOL
    counts = np.asarray(res.expert_counts)
    assert counts[2] == counts[3] == 0 and counts.sum() == 2 * TOKENS - 1
    assert not np.asarray(res.dropped).any() and not keep[3, 1]


def test_bfloat16_stays_close_to_float32_loop():
    x, wg, wu, wd, logits = make_inputs(seed=5)
    ref, _ = loop_reference(x, wg, wu, wd, logits, factor=None, priority="score")
    args = tuple(a.astype(jnp.bfloat16) for a in (x, wg, wu, wd))
    for backend in BACKENDS:
        res = moe_dispatch(*args, logits, top_k=TOP_K, backend=backend)
        assert res.out.dtype == jnp.bfloat16
        assert rel_err(res.out, ref) <= 2e-2


def test_auto_backend_and_missing_ragged_dot(monkeypatch):
    assert resolve_backend("auto") == "ragged"
    x, wg, wu, wd, logits = make_inputs()
    monkeypatch.delattr(jax.lax, "ragged_dot")
    assert resolve_backend("auto") == "reference"
    with pytest.raises(RuntimeError, match="ragged_dot"):
        moe_dispatch(x, wg, wu, wd, logits, top_k=TOP_K, backend="ragged")
    res = moe_dispatch(x, wg, wu, wd, logits, top_k=TOP_K, backend="auto")
    assert res.out.shape == (TOKENS, DIM)


def test_input_validation_names_the_argument():
    x, wg, wu, wd, logits = make_inputs()
    ids = jnp.zeros((TOKENS, TOP_K), jnp.int32)
    gates = jnp.ones((TOKENS, TOP_K))
    cases = [
        (dict(x=x[0]), "x must"),
        (dict(w_up=wu[:, :, :3]), "w_up"),
        (dict(w_down=wd[:3]), "w_down"),
        (dict(router_logits=logits[:, :3]), "router_logits"),
        (dict(top_k=None), "top_k is required"),
        (dict(expert_ids=ids, gates=gates), "not both"),
        (dict(router_logits=None, expert_ids=ids), "both expert_ids and gates"),
        (dict(router_logits=None, expert_ids=ids, gates=gates[:, :1], top_k=None), "gates"),
        (dict(router_logits=None, expert_ids=ids.astype(jnp.float32), gates=gates), "integers"),
        (dict(backend="triton"), "backend"),
        (dict(drop_priority="random"), "drop_priority"),
        (dict(capacity_factor=0.0), "capacity_factor"),
    ]
    base = dict(x=x, w_gate=wg, w_up=wu, w_down=wd, router_logits=logits, top_k=TOP_K)
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            moe_dispatch(**{**base, **change})


# --- grouped matmuls: vmap and higher-order gradients -----------------------------------------

GROUP_SIZES = np.array([2, 0, 5], np.int32)  # an empty group; rows 7 and 8 are in no group


def numpy_gmm(lhs, rhs, sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
    for g, size in enumerate(np.asarray(sizes)):
        out[start : start + size] = lhs[start : start + size] @ rhs[g]
        start += size
    return out


def numpy_tgmm(lhs, rhs, sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out, start = np.zeros((len(sizes), lhs.shape[1], rhs.shape[1])), 0
    for g, size in enumerate(np.asarray(sizes)):
        out[g] = lhs[start : start + size].T @ rhs[start : start + size]
        start += size
    return out


def masked_gmm(lhs, rhs, sizes):
    """gmm by a dense gather of each row's weights: plain autodiff, any order, any vmap."""
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(lhs.shape[0]), side="right")
    valid = group < rhs.shape[0]
    weights = rhs[jnp.clip(group, 0, rhs.shape[0] - 1)]
    return jnp.where(valid[:, None], jnp.einsum("mk,mkn->mn", lhs, weights), 0.0)


def grouped_inputs(seed=0, batch=None):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    lhs = jnp.asarray(rng.standard_normal((*lead, 9, 3)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((3, 3, 4)), jnp.float32)
    return lhs, rhs


def test_gmm_and_tgmm_match_numpy():
    lhs, rhs = grouped_inputs()
    sizes = jnp.asarray(GROUP_SIZES)
    assert rel_err(gmm(lhs, rhs, sizes), numpy_gmm(lhs, rhs, GROUP_SIZES)) <= FWD_TOL
    other = jnp.asarray(np.random.default_rng(1).standard_normal((9, 4)), jnp.float32)
    assert rel_err(tgmm(lhs, other, sizes), numpy_tgmm(lhs, other, GROUP_SIZES)) <= FWD_TOL


def test_gmm_second_order_matches_autodiff_of_the_masked_form():
    lhs, rhs = grouped_inputs(2)
    sizes = jnp.asarray(GROUP_SIZES)

    def second(fn):
        loss = lambda a, b: jnp.sum(jnp.tanh(fn(a, b, sizes)) ** 2)
        norm = lambda a, b: sum(jnp.sum(g**2) for g in jax.grad(loss, (0, 1))(a, b))
        return jax.jit(jax.grad(norm, (0, 1)))(lhs, rhs)

    for got, want in zip(second(gmm), second(masked_gmm), strict=True):
        assert rel_err(got, want) <= GRAD_TOL


def test_gmm_vmaps_with_shared_and_batched_operands():
    lhs, rhs = grouped_inputs(3, batch=2)
    sizes = jnp.asarray([[2, 0, 5], [4, 4, 1]], jnp.int32)
    rhs_b = jnp.stack([rhs, -2.0 * rhs])
    stacked = jnp.stack([lhs, 3.0 * lhs])

    @functools.partial(jax.jit, static_argnums=0)
    def forms(f, lhs, rhs, rhs_b, sizes, stacked):
        shared = lambda *xs: jax.vmap(f, (0, None, 0))(*xs)  # rule re-sorts the rows
        loss = lambda lhs, rhs: jnp.sum(shared(lhs, rhs, sizes) ** 3)
        return (
            shared(lhs, rhs, sizes),
            jax.vmap(f)(lhs, rhs_b, sizes),  # per-member weights
            jax.vmap(f, (0, None, None))(lhs, rhs, sizes[0]),  # shared weights and sizes
            jax.vmap(shared, (0, None, None))(stacked, rhs, sizes),  # nested vmap
            jax.grad(loss, (0, 1))(lhs, rhs),
        )

    got = forms(gmm, lhs, rhs, rhs_b, sizes, stacked)
    want = forms(masked_gmm, lhs, rhs, rhs_b, sizes, stacked)
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        assert rel_err(g, w) <= FWD_TOL, i


def test_dispatch_vmaps_per_example_and_differentiates_twice():
    """Per-example dispatch (vmap over examples, shared experts) and a MAML-style
    second-order gradient through the expert weights: ragged == reference."""
    batch, factor = 2, 0.5
    x, wg, wu, wd, logits = make_inputs(seed=6, tokens=batch * 6)
    x, logits = x.reshape(batch, 6, DIM), logits.reshape(batch, 6, EXPERTS)

    def run(backend, x, wg, logits):
        one = lambda xi, li: (
            moe_dispatch(
                xi, wg, wu, wd, li, top_k=TOP_K, capacity_factor=factor, backend=backend
            ).out
        )
        return jax.vmap(one)(x, logits)

    single = jax.jit(  # the unbatched call, once per example: one program, not op by op
        lambda xi, li: moe_dispatch(xi, wg, wu, wd, li, top_k=TOP_K, capacity_factor=factor).out
    )
    per_example = jnp.stack([single(x[i], logits[i]) for i in range(batch)])

    def meta(backend):
        inner = lambda w: jnp.sum(run(backend, x, w, logits) ** 2)
        outer = lambda w: jnp.sum(jax.grad(inner)(w) ** 2)
        return jax.jit(lambda w: (run(backend, x, w, logits), jax.grad(outer)(w)))(wg)

    (out_rag, meta_rag), (out_ref, meta_ref) = meta("ragged"), meta("reference")
    assert rel_err(out_rag, per_example) <= FWD_TOL
    assert rel_err(out_ref, per_example) <= FWD_TOL
    assert rel_err(meta_rag, meta_ref) <= GRAD_TOL
    assert float(jnp.linalg.norm(meta_ref)) > 0
