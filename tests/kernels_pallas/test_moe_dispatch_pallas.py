"""The Pallas grouped matmuls against ``ragged_dot`` and a loop over groups; the dispatch on them.

One base class, :class:`KernelVsReference`, checks ``gmm_pallas`` and ``tgmm_pallas`` on random
inputs against two references: ``jax.lax.ragged_dot`` (through :func:`.grouped.gmm` and
:func:`.grouped.tgmm`, whose VJP is the ragged one) and a float64 NumPy loop over the groups
(for gradients: plain autodiff of a dense per-row gather, evaluated in float32 at highest
precision). Errors are ‖kernel − reference‖ / ‖reference‖ with bounds fixed per dtype.
:class:`TestInterpret` runs it in Pallas interpret mode on the CPU at tiny sizes with small
tiles (M ≤ 64, K, N ≤ 32, G ≤ 4; empty groups, group sizes and M, K, N not multiples of the
tile, rows past the last group); :class:`TestGPU` runs it compiled with the default tiles and is
skipped unless JAX's default backend is a GPU. Interpret mode compiles slowly on the CPU, so each
case builds one jitted function returning every forward output and gradient.

Then: second order (grad of grad) against autodiff of the dense form, ``vmap``, the refusal of
forward mode, and the whole ``moe_dispatch(backend="pallas")`` against the plain loop over
experts and the dense reference, forward and gradients, float32 and bfloat16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.moe_dispatch import (
    GmmConfig,
    dispatch_loop,
    gmm,
    gmm_pallas,
    moe_dispatch,
    resolve_backend,
    tgmm,
    tgmm_pallas,
)
from kernels_pallas.moe_dispatch import pallas as pallas_module

# Fixed bounds on ‖out − ref‖ / ‖ref‖, never loosened to pass.
FORWARD_BOUND = {"float32": 1e-5, "bfloat16": 2e-2}
GRAD_BOUND = {"float32": 1e-4, "bfloat16": 2e-2}
HIGHEST = jax.lax.Precision.HIGHEST
# Interpret-mode tiles: the smallest Triton accepts, so the test shapes have several tiles and
# ragged edges.
SMALL = GmmConfig(block_m=16, block_k=16, block_n=16)


def rel_err(actual, expected) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def loop_gmm(lhs, rhs, sizes):
    """float64 NumPy: out[m] = lhs[m] @ rhs[g(m)], a loop over groups; 0 past the last group."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
    for g, size in enumerate(np.asarray(sizes)):
        out[start : start + size] = lhs[start : start + size] @ rhs[g]
        start += size
    return out


def loop_tgmm(lhs, rhs, sizes):
    """float64 NumPy: out[g] = lhs[rows of g]ᵀ @ rhs[rows of g]."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out, start = np.zeros((len(sizes), lhs.shape[1], rhs.shape[1])), 0
    for g, size in enumerate(np.asarray(sizes)):
        out[g] = lhs[start : start + size].T @ rhs[start : start + size]
        start += size
    return out


def dense_gmm(lhs, rhs, sizes):
    """gmm by a dense gather of each row's weights: plain autodiff to any order."""
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(lhs.shape[0]), side="right")
    weights = rhs[jnp.clip(group, 0, rhs.shape[0] - 1)]
    out = jnp.einsum("mk,mkn->mn", lhs, weights, precision=HIGHEST)
    return jnp.where((group < rhs.shape[0])[:, None], out, 0.0).astype(lhs.dtype)


def make_case(seed, rows, depth, cols, sizes, dtype):
    rng = np.random.default_rng(seed)
    groups = len(sizes)
    arrays = (
        rng.standard_normal((rows, depth)),  # lhs
        rng.standard_normal((groups, depth, cols)) / np.sqrt(depth),  # rhs
        rng.standard_normal((rows, cols)),  # cotangent of gmm, also tgmm's rhs
        rng.standard_normal((groups, depth, cols)),  # cotangent of tgmm
    )
    return (*(jnp.asarray(a, dtype) for a in arrays), jnp.asarray(sizes, jnp.int32))


@functools.cache
def all_outputs(kind, config, precision):
    """One jitted function: forwards of gmm and tgmm and the VJPs of both, for one product."""
    if kind == "pallas":
        mm = functools.partial(gmm_pallas, config=config, precision=precision)
        tmm = functools.partial(tgmm_pallas, config=config, precision=precision)
    else:
        mm = functools.partial(gmm, precision=precision)
        tmm = functools.partial(tgmm, precision=precision)

    def run(lhs, rhs, cot, tcot, sizes):
        out, vjp = jax.vjp(lambda a, b: mm(a, b, sizes), lhs, rhs)
        tout, tvjp = jax.vjp(lambda a, b: tmm(a, b, sizes), lhs, cot)
        return out, tout, vjp(cot), tvjp(tcot)

    return jax.jit(run)


class KernelVsReference:
    """Forward and VJP of gmm / tgmm against ragged_dot and the loop over groups."""

    CONFIG: GmmConfig | None = None
    CASES: tuple = ()

    def _check(self, case):
        name, dtype, (rows, depth, cols), sizes = case
        dname = jnp.dtype(dtype).name
        lhs, rhs, cot, tcot, sizes = make_case(len(name), rows, depth, cols, sizes, dtype)
        out, tout, (d_lhs, d_rhs), (td_lhs, td_rhs) = all_outputs("pallas", self.CONFIG, HIGHEST)(
            lhs, rhs, cot, tcot, sizes
        )
        assert out.shape == (rows, cols) and out.dtype == dtype
        assert tout.shape == (len(sizes), depth, cols) and tout.dtype == dtype
        errors = {}
        # vs the loop over groups in float64 (forward) and dense autodiff (gradients).
        errors["gmm/loop"] = (rel_err(out, loop_gmm(lhs, rhs, sizes)), FORWARD_BOUND)
        errors["tgmm/loop"] = (rel_err(tout, loop_tgmm(lhs, cot, sizes)), FORWARD_BOUND)
        f32 = [a.astype(jnp.float32) for a in (lhs, rhs, cot)]
        _, dense_vjp = jax.vjp(lambda a, b: dense_gmm(a, b, sizes), *f32[:2])
        for arg, got, want in zip(("lhs", "rhs"), (d_lhs, d_rhs), dense_vjp(f32[2]), strict=True):
            errors[f"d{arg}/dense"] = (rel_err(got, want), GRAD_BOUND)
        # vs ragged_dot (its own forward and its VJP through grouped.gmm / grouped.tgmm).
        ref = all_outputs("ragged", None, HIGHEST)(lhs, rhs, cot, tcot, sizes)
        got_all = jax.tree.leaves((out, tout, (d_lhs, d_rhs), (td_lhs, td_rhs)))
        labels = ("gmm", "tgmm", "dlhs", "drhs", "tgmm dlhs", "tgmm drhs")
        for label, got, want in zip(labels, got_all, jax.tree.leaves(ref), strict=True):
            bound = FORWARD_BOUND if label in ("gmm", "tgmm") else GRAD_BOUND
            errors[f"{label}/ragged"] = (rel_err(got, want), bound)
        bad = {k: e for k, (e, b) in errors.items() if not e <= b[dname]}
        assert not bad, (name, bad)
        # Rows past the last group are exactly zero, and so is an empty group's weight grad.
        total = int(np.sum(np.asarray(sizes)))
        assert not np.asarray(out[total:], np.float32).any()
        for g in np.flatnonzero(np.asarray(sizes) == 0):
            assert not np.asarray(d_rhs[g], np.float32).any() and not np.asarray(tout[g]).any()

    def test_forward_and_vjp(self, case):
        self._check(case)


def pytest_generate_tests(metafunc):  # noqa: D103 (pytest hook)
    if "case" in metafunc.fixturenames:
        cases = metafunc.cls.CASES
        metafunc.parametrize("case", cases, ids=[c[0] for c in cases])


class TestInterpret(KernelVsReference):
    """Pallas interpret mode on the CPU, tiles of 16 (K = 13 and N = 11 pad up to them)."""

    CONFIG = SMALL
    CASES = (
        # M = 37 (4.6 tiles), K = 13, N = 11; an empty group; groups straddle tiles; 3 rows
        # past the last group.
        ("f32-ragged", jnp.float32, (37, 13, 11), (5, 0, 20, 9)),
        # M = K = N = 64 / 32 / 32; leading and inner empty groups, one group spans 5 tiles.
        ("f32-empty", jnp.float32, (64, 32, 32), (0, 17, 0, 47)),
        # Group 1 lies inside one tile, starting and ending off its edges.
        ("bf16-ragged", jnp.bfloat16, (37, 13, 11), (5, 3, 17, 9)),
    )


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Pallas)")
class TestGPU(KernelVsReference):
    """Compiled on a GPU with the tiles each product chooses for the device (``config=None``:
    the float32 weight-gradient tiles shrink to fit shared memory), at sizes interpret mode
    cannot afford."""

    CONFIG = None
    CASES = (
        ("f32", jnp.float32, (4000, 512, 256), (1000, 0, 1777, 1100)),
        ("bf16", jnp.bfloat16, (8192, 1024, 512), (2048, 3000, 0, 1000, 2100, 44)),
    )


# ---------------------------------------------------------------------------------------------
# Second order, vmap, forward mode.


def test_second_order_matches_autodiff_of_the_dense_form():
    lhs, rhs, *_ = make_case(7, 37, 13, 11, (5, 0, 20, 9), jnp.float32)
    sizes = jnp.asarray((5, 0, 20, 9), jnp.int32)

    def second(fn):
        loss = lambda a, b: jnp.sum(jnp.tanh(fn(a, b, sizes)) ** 2)
        norm = lambda a, b: sum(jnp.sum(g**2) for g in jax.grad(loss, (0, 1))(a, b))
        return jax.jit(jax.grad(norm, (0, 1)))(lhs, rhs)

    pallas = functools.partial(gmm_pallas, config=SMALL, precision=HIGHEST)
    for got, want in zip(second(pallas), second(dense_gmm), strict=True):
        assert rel_err(got, want) <= GRAD_BOUND["float32"]


def test_vmap_with_shared_and_batched_operands():
    lhs, rhs, *_ = make_case(8, 19, 6, 5, (4, 0, 9), jnp.float32)
    lhs_b = jnp.stack([lhs, -0.5 * lhs])
    sizes_b = jnp.asarray([[4, 0, 9], [0, 19, 0]], jnp.int32)
    pallas = functools.partial(gmm_pallas, config=SMALL, precision=HIGHEST)

    @functools.partial(jax.jit, static_argnums=0)
    def forms(f):
        shared = jax.vmap(f, (0, None, 0))(lhs_b, rhs, sizes_b)
        per_member = jax.vmap(f)(lhs_b, jnp.stack([rhs, 2.0 * rhs]), sizes_b)
        return shared, per_member

    for got, want in zip(forms(pallas), forms(dense_gmm), strict=True):
        assert rel_err(got, want) <= FORWARD_BOUND["float32"]


def test_forward_mode_is_refused_with_a_clear_error():
    """jvp of a custom_vjp is refused by JAX itself (never a wrong answer); the message says
    so. Forward mode is the ``"reference"`` backend's job (plain autodiff of einsums)."""
    lhs, rhs, *_ = make_case(3, 9, 3, 4, (2, 0, 5), jnp.float32)
    sizes = jnp.asarray((2, 0, 5), jnp.int32)
    fn = lambda a: gmm_pallas(a, rhs, sizes, config=SMALL)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(fn, (lhs,), (jnp.ones_like(lhs),))


def test_config_and_input_checks():
    for bad in (dict(block_m=12), dict(block_n=8), dict(block_k=0), dict(num_warps=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GmmConfig(**bad)
    lhs, rhs, cot, _, sizes = make_case(0, 9, 3, 4, (2, 0, 5), jnp.float32)
    with pytest.raises(ValueError, match="rhs"):
        gmm_pallas(lhs, rhs[:, :2], sizes)
    with pytest.raises(ValueError, match="group_sizes"):
        gmm_pallas(lhs, rhs, sizes.astype(jnp.float32))
    with pytest.raises(ValueError, match="rhs"):
        tgmm_pallas(lhs, cot[:5], sizes)


# ---------------------------------------------------------------------------------------------
# The whole dispatch: moe_dispatch(backend="pallas") against the loop and the dense reference.

TOKENS, DIM, HIDDEN, EXPERTS, TOP_K = 12, 6, 8, 4, 2


def dispatch_inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((TOKENS, DIM))
    w_gate = rng.standard_normal((EXPERTS, DIM, HIDDEN)) / np.sqrt(DIM)
    w_up = rng.standard_normal((EXPERTS, DIM, HIDDEN)) / np.sqrt(DIM)
    w_down = rng.standard_normal((EXPERTS, HIDDEN, DIM)) / np.sqrt(HIDDEN)
    logits = rng.standard_normal((TOKENS, EXPERTS)) * 2.0
    logits[:, 3] = -np.inf  # expert 3 disabled: an empty group
    cast = [jnp.asarray(a, dtype) for a in (x, w_gate, w_up, w_down)]
    return (*cast, jnp.asarray(logits, jnp.float32))


@functools.cache
def dispatch_fn(backend, factor):
    """(x, w_gate, w_up, w_down, logits) -> (out, gradients wrt all five) of <out, cos>."""

    def loss(*args):
        res = moe_dispatch(
            *args, top_k=TOP_K, capacity_factor=factor, backend=backend, precision=HIGHEST
        )
        weights = jnp.cos(jnp.arange(res.out.size)).reshape(res.out.shape)
        return jnp.sum(res.out.astype(jnp.float32) * weights), res.out

    return jax.jit(jax.value_and_grad(loss, tuple(range(5)), has_aux=True))


def test_dispatch_matches_loop_and_reference(factor=0.5):
    """With capacity dropping (the dropless path is the bfloat16 test's, and the grouped
    matmuls' own tests are exact to float32 rounding)."""
    args = dispatch_inputs(seed=1)
    (_, out), grads = dispatch_fn("pallas", factor)(*args)
    (_, ref_out), ref_grads = dispatch_fn("reference", factor)(*args)
    x, wg, wu, wd, logits = args
    ids = np.asarray(jax.lax.top_k(logits, TOP_K)[1])
    gates = jnp.take_along_axis(jax.nn.softmax(logits, -1), jnp.asarray(ids), -1)
    cap = None if factor is None else int(np.ceil(factor * TOKENS * TOP_K / EXPERTS))
    loop_out, keep = dispatch_loop(x, wg, wu, wd, ids, gates, capacity=cap, precision=HIGHEST)
    if factor is not None:
        assert not keep.all()  # the capacity case really drops
    assert rel_err(out, loop_out) <= FORWARD_BOUND["float32"]
    assert rel_err(out, ref_out) <= FORWARD_BOUND["float32"]
    names = ("x", "w_gate", "w_up", "w_down", "logits")
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert float(jnp.linalg.norm(want)) > 0, name
        assert rel_err(got, want) <= GRAD_BOUND["float32"], name


def test_dispatch_bfloat16_stays_close_to_float32():
    args32 = dispatch_inputs(seed=5)
    args16 = dispatch_inputs(seed=5, dtype=jnp.bfloat16)
    (_, out), grads = dispatch_fn("pallas", None)(*args16)
    (_, ref_out), ref_grads = dispatch_fn("reference", None)(*args32)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref_out) <= FORWARD_BOUND["bfloat16"]
    for name, got, want in zip(
        ("x", "w_gate", "w_up", "w_down"), grads, ref_grads[:4], strict=False
    ):
        assert got.dtype == jnp.bfloat16, name
        assert rel_err(got, want) <= GRAD_BOUND["bfloat16"], name


def test_auto_stays_on_jnp_where_the_kernels_are_not_proven(monkeypatch):
    """A GPU alone no longer sends "auto" to the kernels (tests/kernels_pallas/test_selftest.py
    covers the allow-listed device and its self-test)."""
    assert pallas_module._interpret() is (jax.default_backend() != "gpu")
    assert resolve_backend("pallas") == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert pallas_module._interpret() is False
    assert resolve_backend("auto") == "ragged"


def test_dispatch_second_order_through_expert_weights():
    """MAML-style: grad of a gradient norm wrt w_gate, through the kernels' own custom_vjps,
    equals the dense reference's (plain autodiff of einsums)."""
    x, wg, wu, wd, logits = dispatch_inputs(seed=6)

    def meta(backend):
        def inner(w):
            res = moe_dispatch(
                x, w, wu, wd, logits, top_k=TOP_K, capacity_factor=0.5, backend=backend,
                precision=HIGHEST,
            )  # fmt: skip
            return jnp.sum(jnp.tanh(res.out) ** 2)

        return jax.jit(jax.grad(lambda w: jnp.sum(jax.grad(inner)(w) ** 2)))(wg)

    got, want = meta("pallas"), meta("reference")
    assert float(jnp.linalg.norm(want)) > 0
    assert rel_err(got, want) <= GRAD_BOUND["float32"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernels_lower_to_triton_for_cuda(dtype):
    """The compiled (not interpreted) kernels lower to one Triton call each for CUDA, checked
    on any machine by cross-platform lowering (no GPU needed to catch a lowering error)."""
    m, k, n, g = 256, 64, 128, 4
    lhs, sizes = jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((g,), jnp.int32)
    cases = {
        "gmm": (gmm_pallas, (lhs, jax.ShapeDtypeStruct((g, k, n), dtype), sizes)),
        "tgmm": (tgmm_pallas, (lhs, jax.ShapeDtypeStruct((m, n), dtype), sizes)),
    }
    for name, (fn, args) in cases.items():
        lowered = jax.jit(functools.partial(fn, interpret=False)).trace(*args)
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call") == 1 and "triton" in text, name
