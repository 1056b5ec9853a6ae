"""The Pallas selective-scan kernel against the ``lax.scan`` reference: forward, VJP, second order.

One base class, :class:`KernelVsReference`, compares the kernel (through the public
``selective_scan(backend="pallas")``) with plain autodiff of the ``lax.scan`` reference on random
inputs: the outputs, the last state and the VJP for every input, with the error measured as
‖kernel − reference‖ / ‖reference‖ and bounds fixed per dtype. :class:`TestInterpret` runs it in
Pallas interpret mode on the CPU at tiny sizes (L ≤ 64, D ≤ 32, N ≤ 8, at most 3 shapes per
dtype, ragged lengths and channel counts included); :class:`TestGPU` runs it compiled on larger
shapes and is skipped unless JAX's default backend is a GPU. Interpret mode compiles slowly on
the CPU (a few seconds per shape), so each case builds one jitted function that returns the
forward outputs and the VJP together.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.selective_scan import (
    PallasConfig,
    resolve_backend,
    selective_scan,
    selective_scan_kernel,
)
from kernels_pallas.selective_scan import pallas as pallas_module

# Fixed bounds on ‖out − ref‖ / ‖ref‖, never loosened to pass.
FORWARD_BOUND = {"float32": 1e-5, "bfloat16": 2e-2}
GRAD_BOUND = {"float32": 1e-4, "bfloat16": 2e-2}

ARG_NAMES = ("x", "delta", "A", "B", "C", "D", "z", "delta_bias")
# Interpret-mode block sizes: small enough that D and L are ragged in the test shapes.
SMALL = PallasConfig(block_d=16, chunk=4)


def rel_err(actual, expected) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def make_inputs(seed, batch, length, dim, state, options, dtype=jnp.float32):
    """Positional (x, delta, A, B, C, D, z, delta_bias); D, z and delta_bias are None without
    ``options`` (then delta is used as is and kept positive; with options it is made positive
    by bias + softplus)."""
    rng = np.random.default_rng(seed)
    seq = (batch, length, dim)
    x = rng.standard_normal(seq)
    A = -np.exp(0.5 * rng.standard_normal((dim, state)))
    B = rng.standard_normal((batch, length, state))
    C = rng.standard_normal((batch, length, state))
    if options:
        delta = rng.standard_normal(seq)
        D, z, bias = rng.standard_normal(dim), rng.standard_normal(seq), rng.standard_normal(dim)
    else:
        delta = rng.uniform(0.05, 0.8, seq)
        D = z = bias = None
    return tuple(
        None if a is None else jnp.asarray(a, dtype) for a in (x, delta, A, B, C, D, z, bias)
    )


def upcast(args):
    return tuple(None if a is None else a.astype(jnp.float32) for a in args)


def scan_fn(backend, softplus, config=None, chunk_size=4):
    """(x, delta, A, B, C, D, z, delta_bias) -> (out, last_state) by the public function."""

    def fn(x, delta, A, B, C, D, z, delta_bias):
        return selective_scan(
            x,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias=delta_bias,
            delta_softplus=softplus,
            backend=backend,
            lean_backward=backend != "reference",  # the reference: plain autodiff of lax.scan
            chunk_size=chunk_size,
            return_last_state=True,
            pallas_config=config,
        )

    return fn


@functools.cache
def forward_and_vjp(backend, softplus, config):
    """One jitted function per static configuration: (args, cotangents) -> (outputs, grads)."""
    fn = scan_fn(backend, softplus, config)

    def run(args, cotangents):
        outputs, vjp = jax.vjp(fn, *args)
        return outputs, vjp(cotangents)

    return jax.jit(run)


def cotangents_for(outputs, seed):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(o.shape), o.dtype) for o in outputs)


def pytest_generate_tests(metafunc):
    """Each subclass of KernelVsReference names its own cases."""
    if "case" in metafunc.fixturenames:
        cases = metafunc.cls.CASES
        metafunc.parametrize("case", cases, ids=[c[0] for c in cases])


class KernelVsReference:
    """Forward and VJP of the kernel against the reference; subclasses set CASES and CONFIG.

    A case is (id, dtype, (B, L, D, N), options).
    """

    CASES: tuple = ()
    CONFIG: PallasConfig | None = None

    def test_forward_and_vjp_match_the_reference(self, case):
        _, dtype, shape, options = case
        args = make_inputs(sum(shape), *shape, options, dtype=dtype)
        cotangents = cotangents_for(jax.eval_shape(scan_fn("pallas", options), *args), 1)
        outputs, grads = forward_and_vjp("pallas", options, self.CONFIG)(args, cotangents)
        # The reference sees the same (rounded) inputs and cotangents, in float32.
        expected, expected_grads = forward_and_vjp("reference", options, None)(
            upcast(args), upcast(cotangents)
        )
        out, last = outputs
        assert out.dtype == dtype and out.shape == shape[:3]
        assert last.dtype == jnp.float32 and last.shape == (shape[0], shape[2], shape[3])
        name = jnp.dtype(dtype).name
        errors = {"out": rel_err(out, expected[0]), "last_state": rel_err(last, expected[1])}
        assert max(errors.values()) < FORWARD_BOUND[name], errors
        present = [i for i, a in enumerate(args) if a is not None]
        errors = {ARG_NAMES[i]: rel_err(grads[i], expected_grads[i]) for i in present}
        for i in present:
            assert grads[i].dtype == dtype, ARG_NAMES[i]
        assert max(errors.values()) < GRAD_BOUND[name], errors


class TestInterpret(KernelVsReference):
    """Interpret mode on the CPU (chosen automatically there); block_d = 16, chunk = 4."""

    CONFIG = SMALL
    CASES = (
        # L = 13 = 3 · 4 + 1 (ragged chunk), D = 24 = 1.5 blocks, N = 5 (both padded).
        ("f32-ragged-options", jnp.float32, (2, 13, 24, 5), True),
        # L = 64 = 16 chunks, D = 32 = 2 blocks; no D, z, bias or softplus.
        ("f32-long-plain", jnp.float32, (1, 64, 32, 8), False),
        ("bf16-ragged-options", jnp.bfloat16, (2, 13, 24, 5), True),
        ("bf16-plain", jnp.bfloat16, (1, 16, 8, 8), False),
    )


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Pallas)")
class TestGPU(KernelVsReference):
    """Compiled on a GPU with the default block sizes, at sizes interpret mode cannot afford."""

    CONFIG = None
    CASES = (
        ("f32", jnp.float32, (2, 1000, 256, 16), True),
        ("f32-plain", jnp.float32, (4, 2048, 512, 16), False),
        ("bf16", jnp.bfloat16, (2, 1000, 256, 16), True),
    )


# ---------------------------------------------------------------------------------------------
# Second order, and the ATTD adapter's A table.

SHAPE = (2, 13, 24, 5)


def scalar_loss(backend, *args):
    out, last = scan_fn(backend, True, SMALL, chunk_size=3)(*args)
    weights = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
    return jnp.sum(weights * out) + jnp.sum(jnp.sin(last))


@functools.cache
def hvp_fn(backend):
    """(args, v) -> H v by reverse-over-reverse: jax.grad of <jax.grad f, v>."""
    grad = jax.grad(lambda a: scalar_loss(backend, *a))
    inner = lambda a, v: sum(jnp.vdot(g, w) for g, w in zip(grad(a), v, strict=True))
    return jax.jit(jax.grad(inner))


def test_hessian_vector_product_matches_the_reference():
    args = make_inputs(3, *SHAPE, True)
    rng = np.random.default_rng(4)
    v = tuple(jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in args)
    hv, expected = hvp_fn("pallas")(args, v), hvp_fn("reference")(args, v)
    errors = {n: rel_err(h, e) for n, h, e in zip(ARG_NAMES, hv, expected, strict=True)}
    assert max(errors.values()) < GRAD_BOUND["float32"], errors


@functools.cache
def attd_meta_grad(backend):
    """MAML-style meta-gradient through the ATTD dynamics adapter A = -exp(A_log + U Vᵀ).

    One inner SGD step on (U, V); meta-loss = loss after the step + the inner loss value (a
    value computed inside ``jax.value_and_grad`` and differentiated again). Returns the inner
    gradient wrt (U, V) and the meta-gradient wrt (A_log, U, V).
    """

    def loss(A_log, U, V, data):
        x, delta, B, C, D, z, bias, target = data
        A = -jnp.exp(A_log + jnp.einsum("dr,nr->dn", U, V, precision="highest"))
        out = scan_fn(backend, True, SMALL)(x, delta, A, B, C, D, z, bias)[0]
        return jnp.mean((out - target) ** 2)

    def meta_loss(params, data):
        A_log, U, V = params
        inner, (gU, gV) = jax.value_and_grad(loss, argnums=(1, 2))(A_log, U, V, data)
        return loss(A_log, U - 0.5 * gU, V - 0.5 * gV, data) + inner, (gU, gV)

    return jax.jit(jax.grad(meta_loss, has_aux=True))


def test_attd_adapter_first_and_second_order_match_the_reference():
    x, delta, A, B, C, D, z, bias = make_inputs(5, *SHAPE, True)
    rng = np.random.default_rng(6)
    rank = 2
    A_log = jnp.log(-A)
    U = jnp.asarray(0.3 * rng.standard_normal((SHAPE[2], rank)), jnp.float32)
    V = jnp.asarray(0.3 * rng.standard_normal((SHAPE[3], rank)), jnp.float32)
    target = jnp.asarray(rng.standard_normal(SHAPE[:3]), jnp.float32)
    data = (x, delta, B, C, D, z, bias, target)
    meta, inner = attd_meta_grad("pallas")((A_log, U, V), data)
    meta_ref, inner_ref = attd_meta_grad("reference")((A_log, U, V), data)
    names = ("inner_U", "inner_V", "meta_A_log", "meta_U", "meta_V")
    pairs = zip(names, (*inner, *meta), (*inner_ref, *meta_ref), strict=True)
    errors = {name: rel_err(g, e) for name, g, e in pairs}
    assert max(errors.values()) < GRAD_BOUND["float32"], errors


# ---------------------------------------------------------------------------------------------
# Memory, backend choice, configuration.


def residual_sizes(backend):
    """Sizes of the arrays a ``jax.vjp`` closure keeps (its pytree leaves are the residuals),
    from abstract evaluation: nothing is compiled."""
    args = make_inputs(7, *SHAPE, True)
    fn = scan_fn(backend, True, SMALL)
    closure = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
    return [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(closure)]


def test_kernel_forward_saves_only_the_inputs():
    batch, length, dim, state = SHAPE
    full_states = batch * length * dim * state  # B·L·D·N
    assert max(residual_sizes("reference")) >= full_states  # the check can see one (control)
    sizes = residual_sizes("pallas")
    assert sizes and max(sizes) < full_states, sizes
    assert max(sizes) <= batch * length * max(dim, state), sizes  # inputs: B·L·D and B·L·N


def test_auto_stays_on_the_reference_where_the_kernel_is_not_proven(monkeypatch):
    """A GPU alone no longer sends "auto" to the kernel (tests/kernels_pallas/test_selftest.py
    covers the allow-listed device and its self-test)."""
    assert pallas_module._interpret() is (jax.default_backend() != "gpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert pallas_module._interpret() is False
    assert resolve_backend("auto") == "reference"
    assert resolve_backend("auto", lean_backward=False) == "reference"
    assert resolve_backend("associative") == "associative"
    assert resolve_backend("pallas") == "pallas"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_lowers_to_triton_for_cuda(dtype):
    """The compiled (not interpreted) kernel lowers to one Triton call for CUDA, checked on any
    machine by cross-platform lowering: no power-of-two tile or loop-unrolling rule of the
    Triton lowering is broken, at a ragged L and with D, N not powers of two."""
    batch, length, dim, state = 2, 100, 24, 5
    seq, per_step = (batch, length, dim), (batch, length, state)
    shapes = [seq, seq, (dim, state), per_step, per_step, (dim,), seq, (dim,)]
    dtypes = [dtype, dtype, jnp.float32, dtype, dtype, jnp.float32, dtype, jnp.float32]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes, strict=True)]
    kernel = functools.partial(selective_scan_kernel, delta_softplus=True, interpret=False)
    text = jax.jit(kernel).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call") == 1 and "triton" in text


@pytest.mark.parametrize(
    "kwargs",
    [{"block_d": 0}, {"block_d": 24}, {"chunk": -1}, {"block_d": True}, {"lean_chunk": 0}],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError, match=rf"^{next(iter(kwargs))} "):
        PallasConfig(**kwargs)


def test_bad_pallas_config_argument_raises():
    args = make_inputs(9, 1, 4, 2, 2, False)
    with pytest.raises(ValueError, match=r"^pallas_config "):
        selective_scan(*args[:5], backend="pallas", pallas_config={"block_d": 8})
