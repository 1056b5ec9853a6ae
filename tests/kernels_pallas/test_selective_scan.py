"""Selective scan: every form against a plain NumPy loop; the lean backward against autodiff.

Reference: a Python loop over time in NumPy float64 that follows ``selective_scan_ref`` of
``state-spaces/mamba`` line by line (transposed to channels-last). Sizes stay tiny
(B = 2, L <= 13, D = 3, N = 4) so the module runs in seconds on two cores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.selective_scan import (
    auto_chunk_size,
    selective_scan,
    selective_scan_associative,
    selective_scan_scan,
)

BATCH, LENGTH, DIM, STATE = 2, 13, 3, 4
CHUNK = 4  # 13 = 3 * 4 + 1: the last chunk is ragged

# (backend, lean_backward) pairs that name every form.
FORMS = {
    "lean": ("reference", True),
    "scan": ("reference", False),
    "associative": ("associative", False),
}


def numpy_selective_scan(x, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False):
    """Independent reference: an explicit loop in float64. Returns (out, last_state)."""
    x, delta, A, B, C = (np.asarray(a, np.float64) for a in (x, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias, np.float64)
    if softplus:
        delta = np.log1p(np.exp(delta))
    batch, length, dim = x.shape
    state = np.zeros((batch, dim, A.shape[1]))
    out = np.zeros((batch, length, dim))
    for t in range(length):
        for b in range(batch):
            for d in range(dim):
                decay = np.exp(delta[b, t, d] * A[d])
                state[b, d] = decay * state[b, d] + delta[b, t, d] * B[b, t] * x[b, t, d]
                out[b, t, d] = np.dot(C[b, t], state[b, d])
    if D is not None:
        out = out + np.asarray(D, np.float64) * x
    if z is not None:
        zz = np.asarray(z, np.float64)
        out = out * zz / (1.0 + np.exp(-zz))
    return out, state


def make_inputs(seed=0, length=LENGTH, dtype=np.float32, options=True):
    """Positional (x, delta, A, B, C, D, z) and keyword (delta_bias, delta_softplus) inputs."""
    rng = np.random.default_rng(seed)
    shape = (BATCH, length, DIM)
    x = rng.standard_normal(shape)
    A = -np.exp(0.5 * rng.standard_normal((DIM, STATE)))
    B = rng.standard_normal((BATCH, length, STATE))
    C = rng.standard_normal((BATCH, length, STATE))
    if options:  # raw delta around 0, made positive by bias + softplus
        delta = rng.standard_normal(shape)
        D = rng.standard_normal(DIM)
        z = rng.standard_normal(shape)
        kwargs = {"delta_bias": rng.standard_normal(DIM).astype(dtype), "delta_softplus": True}
    else:  # delta used as is: keep it positive
        delta = rng.uniform(0.05, 0.8, shape)
        D = z = None
        kwargs = {"delta_bias": None, "delta_softplus": False}
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)
    return tuple(cast(a) for a in (x, delta, A, B, C, D, z)), kwargs


@functools.cache
def forward_fn(form, softplus, chunk_size, return_last_state):
    """One jitted forward per static configuration (shared by the tests of this module)."""
    backend, lean = FORMS[form]

    def forward(args, delta_bias):
        return selective_scan(
            *args,
            delta_bias=delta_bias,
            delta_softplus=softplus,
            backend=backend,
            lean_backward=lean,
            chunk_size=chunk_size,
            return_last_state=return_last_state,
        )

    return jax.jit(forward)


def run(form, args, kwargs, chunk_size=CHUNK, return_last_state=False):
    fn = forward_fn(form, kwargs["delta_softplus"], chunk_size, return_last_state)
    return fn(args, kwargs["delta_bias"])


# ---------------------------------------------------------------------------------------------
# Forward against the NumPy loop.


@pytest.mark.parametrize("options", [False, True], ids=["plain", "D-z-bias-softplus"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_forward_matches_numpy_loop_float64(form, options):
    with jax.enable_x64(True):
        args, kwargs = make_inputs(1, dtype=np.float64, options=options)
        out, last = run(form, args, kwargs, return_last_state=True)
        assert out.dtype == jnp.float64 and last.dtype == jnp.float64
        expected, expected_last = numpy_selective_scan(
            *args, delta_bias=kwargs["delta_bias"], softplus=kwargs["delta_softplus"]
        )
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(last), expected_last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("form", "length"),
    [(form, length) for form in sorted(FORMS) for length in (1, LENGTH)] + [("lean", 2 * CHUNK)],
)
def test_forward_matches_numpy_loop_float32(form, length):
    """L = 13 leaves a ragged last chunk of the lean form; L = 8 is a multiple of the chunk."""
    args, kwargs = make_inputs(2, length=length)
    out, last = run(form, args, kwargs, return_last_state=True)
    assert out.shape == (BATCH, length, DIM) and out.dtype == jnp.float32
    assert last.shape == (BATCH, DIM, STATE)
    expected, expected_last = numpy_selective_scan(
        *args, delta_bias=kwargs["delta_bias"], softplus=kwargs["delta_softplus"]
    )
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(last), expected_last, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU 'auto' is the kernel")
def test_auto_backend_is_the_lean_reference_on_cpu():
    args, kwargs = make_inputs(3)
    auto = jax.jit(lambda a: selective_scan(*a, **kwargs, backend="auto", chunk_size=CHUNK))
    np.testing.assert_array_equal(np.asarray(auto(args)), np.asarray(run("lean", args, kwargs)))


def test_module_level_forms_equal_the_public_function():
    args, kwargs = make_inputs(3)
    ref = run("scan", args, kwargs)
    scan = jax.jit(lambda a: selective_scan_scan(*a, **kwargs))
    associative = jax.jit(lambda a: selective_scan_associative(*a, **kwargs))
    np.testing.assert_array_equal(np.asarray(scan(args)), ref)
    np.testing.assert_allclose(np.asarray(associative(args)), ref, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_compute_in_float32_and_return_bfloat16():
    args, kwargs = make_inputs(4)
    low = tuple(a.astype(jnp.bfloat16) for a in args)
    out = run("lean", low, kwargs)
    assert out.dtype == jnp.bfloat16
    expected, _ = numpy_selective_scan(
        *(np.asarray(a.astype(jnp.float32)) for a in low),
        delta_bias=kwargs["delta_bias"],
        softplus=True,
    )
    err = np.linalg.norm(np.asarray(out, np.float32) - expected) / np.linalg.norm(expected)
    assert err < 2e-2


# ---------------------------------------------------------------------------------------------
# Gradients: the lean custom_vjp against plain autodiff and finite differences.


def scalar_loss(form, chunk_size, x, delta, A, B, C, D, z, delta_bias):
    """A scalar that weighs every output and the last state differently."""
    out, last = selective_scan(
        x,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias=delta_bias,
        delta_softplus=True,
        backend=FORMS[form][0],
        lean_backward=FORMS[form][1],
        chunk_size=chunk_size,
        return_last_state=True,
    )
    weights = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
    return jnp.sum(weights * out) + jnp.sum(jnp.sin(last))


ARG_NAMES = ("x", "delta", "A", "B", "C", "D", "z", "delta_bias")
ALL_ARGS = tuple(range(len(ARG_NAMES)))


@functools.cache
def value_and_grad_fn(form, chunk_size):
    loss = functools.partial(scalar_loss, form, chunk_size)
    return jax.jit(jax.value_and_grad(loss, argnums=ALL_ARGS))


def grad_fn(form, chunk_size):
    return lambda *args: value_and_grad_fn(form, chunk_size)(*args)[1]


def all_args(seed, length=LENGTH, dtype=np.float32):
    args, kwargs = make_inputs(seed, length=length, dtype=dtype)
    return args + (kwargs["delta_bias"],)


@pytest.mark.parametrize("chunk_size", [CHUNK, 64, None], ids=lambda c: f"T{c}")
def test_lean_gradients_equal_autodiff_of_the_scan(chunk_size):
    """Also checks the primal value computed by the custom_vjp's forward rule (the chunked
    scan that saves the entry states), which undifferentiated calls never run."""
    args = all_args(5)
    value, lean = value_and_grad_fn("lean", chunk_size)(*args)
    plain_value, plain = value_and_grad_fn("scan", CHUNK)(*args)
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    for name, g_lean, g_plain in zip(ARG_NAMES, lean, plain, strict=True):
        np.testing.assert_allclose(g_lean, g_plain, rtol=1e-5, atol=1e-5, err_msg=name)


def test_auto_chunk_size_is_the_largest_power_of_two_block_within_2_mib():
    """(T, B, N, D) float32 blocks: T·B·N·D·4 ≤ 2 MiB, T a power of two in [8, 64], T ≤ L."""
    for batch, length, dim, state, itemsize in [
        (1, 2048, 512, 16, 4),  # 32 KiB per step -> 64
        (8, 512, 128, 16, 4),  # 64 KiB -> 32
        (32, 128, 64, 16, 4),  # 128 KiB -> 16
        (32, 128, 64, 16, 8),  # float64: 256 KiB -> 8
        (64, 4096, 1024, 16, 4),  # 4 MiB per step: never below 8
        (2, 5, 3, 4, 4),  # a short sequence: T = L
    ]:
        want = next(
            t for t in (64, 32, 16, 8) if t == 8 or t * batch * dim * state * itemsize <= 2 << 20
        )
        got = auto_chunk_size(batch, length, dim, state, itemsize)
        assert got == min(want, length), (batch, length, dim, state, itemsize)


def test_associative_gradients_equal_autodiff_of_the_scan():
    args = all_args(6)
    for g_assoc, g_plain in zip(
        grad_fn("associative", CHUNK)(*args), grad_fn("scan", CHUNK)(*args), strict=True
    ):
        np.testing.assert_allclose(g_assoc, g_plain, rtol=1e-4, atol=1e-5)


def directional_fd(fn, args, direction, eps):
    """Central difference of ``fn`` along ``direction`` (tuples of arrays), in NumPy."""
    shift = lambda sign: tuple(a + sign * eps * v for a, v in zip(args, direction, strict=True))
    plus, minus = fn(*shift(1.0)), fn(*shift(-1.0))
    return jax.tree.map(lambda p, m: (np.asarray(p) - np.asarray(m)) / (2 * eps), plus, minus)


def random_direction(args, seed):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(a.shape) for a in args)


def vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(a, b, strict=True))


def np_vdot(a, b):
    return sum(np.vdot(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


def hvp_fn(form):
    """(args, v) -> H v by reverse-over-reverse: jax.grad of the function <jax.grad f, v>."""
    loss = functools.partial(scalar_loss, form, 3)
    grad = jax.grad(lambda a: loss(*a))
    return jax.jit(jax.grad(lambda a, v: vdot(grad(a), v)))


def test_lean_gradients_and_second_order_match_autodiff_and_finite_differences_float64():
    """First order: <grad f, v> against the difference quotient of f along v. Second order:
    the Hessian-vector product through the chunked custom_vjp (grad of a function of grad)
    against the same through plain autodiff of ``lax.scan``, and against the difference
    quotient of grad f along v. Float64, L = 7 in chunks of 3."""
    with jax.enable_x64(True):
        args = tuple(np.asarray(a) for a in all_args(7, length=7, dtype=np.float64))
        loss = functools.partial(scalar_loss, "lean", 3)
        f = jax.jit(loss)
        grad = jax.jit(jax.grad(loss, argnums=ALL_ARGS))
        hvp_lean, hvp_plain = hvp_fn("lean"), hvp_fn("scan")
        for seed in range(2):
            v = random_direction(args, seed)
            fd = directional_fd(f, args, v, 1e-6)
            np.testing.assert_allclose(np_vdot(grad(*args), v), fd, rtol=1e-7)
            fd_grad = directional_fd(grad, args, v, 1e-5)
            hv_lean, hv_plain = hvp_lean(args, v), hvp_plain(args, v)
            for name, h, p, d in zip(ARG_NAMES, hv_lean, hv_plain, fd_grad, strict=True):
                np.testing.assert_allclose(h, p, rtol=1e-10, atol=1e-12, err_msg=name)
                np.testing.assert_allclose(h, d, rtol=1e-6, atol=1e-7, err_msg=name)


def test_vmap_of_lean_gradient_equals_per_example_gradients():
    args = all_args(10)
    stacked = tuple(jnp.stack([a, a * 0.5 + 0.1]) for a in args)
    batched = jax.vmap(grad_fn("lean", CHUNK))(*stacked)
    for i in range(2):
        single = grad_fn("lean", CHUNK)(*(a[i] for a in stacked))
        for g_b, g_s in zip(batched, single, strict=True):
            np.testing.assert_allclose(g_b[i], g_s, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Memory: what the forward pass saves for the backward pass.


def residual_sizes(form):
    """Sizes of every array the VJP closure keeps: its pytree leaves are the residuals. It is
    built under ``jit`` (a ``jax.vjp`` closure is a pytree that can leave ``jit``), so the
    sizes are those of the arrays the compiled forward pass hands to the backward pass."""
    args, kwargs = make_inputs(11, length=12)

    backend, lean = FORMS[form]
    scan = functools.partial(
        selective_scan, **kwargs, backend=backend, lean_backward=lean, chunk_size=CHUNK
    )

    def vjp_closure(*a):
        return jax.vjp(scan, *a)[1]

    closure = jax.jit(vjp_closure)(*args)
    return [int(np.size(leaf)) for leaf in jax.tree.leaves(closure)]


def test_lean_forward_saves_no_per_step_state():
    full_states = BATCH * 12 * DIM * STATE  # B·L·D·N
    lean = residual_sizes("lean")
    plain = residual_sizes("scan")
    # The check can see a per-step state: plain autodiff keeps one (the control).
    assert max(plain) >= full_states
    # The lean form keeps O(B·L·D) inputs and O(B·L/T·D·N) chunk entry states only.
    assert lean and max(lean) < full_states, lean
    inputs = BATCH * 12 * max(DIM, STATE)  # x, delta, z: B·L·D; B, C: B·L·N
    assert max(lean) <= max(inputs, (12 // CHUNK) * BATCH * DIM * STATE)


# ---------------------------------------------------------------------------------------------
# Input checks.

GOOD = make_inputs(12)[0]


@pytest.mark.parametrize(
    ("name", "position", "bad"),
    [
        ("x", 0, jnp.zeros((BATCH, LENGTH))),
        ("x", 0, jnp.zeros((BATCH, LENGTH, DIM), jnp.int32)),
        ("x", 0, jnp.zeros((BATCH, 0, DIM))),
        ("delta", 1, jnp.zeros((BATCH, LENGTH + 1, DIM))),
        ("A", 2, jnp.zeros((DIM + 1, STATE))),
        ("A", 2, jnp.zeros((DIM,))),
        ("B", 3, jnp.zeros((BATCH, LENGTH, STATE + 1))),
        ("C", 4, jnp.zeros((1, LENGTH, STATE))),
        ("D", 5, jnp.zeros((DIM, 1))),
        ("z", 6, jnp.zeros((BATCH, LENGTH, DIM + 1))),
    ],
)
def test_bad_shapes_and_dtypes_raise_naming_the_argument(name, position, bad):
    args = list(GOOD)
    args[position] = bad
    with pytest.raises(ValueError, match=rf"^{name} "):
        selective_scan(*args)


def test_bad_keyword_arguments_raise():
    with pytest.raises(ValueError, match=r"^delta_bias "):
        selective_scan(*GOOD, delta_bias=jnp.zeros((DIM + 1,)))
    with pytest.raises(ValueError, match=r"^backend "):
        selective_scan(*GOOD, backend="triton")
    with pytest.raises(ValueError, match=r"^chunk_size "):
        selective_scan(*GOOD, chunk_size=0)
