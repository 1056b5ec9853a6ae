"""The selective scan's kernel backward (``PallasConfig(backward_kernel=True)``) against the
references: the bare kernels against ``jax.vjp`` of the ``jnp`` lean scan in float64, the public
function's forward and VJP against plain autodiff of ``lax.scan`` (the shared base class of
``test_selective_scan_pallas``), second order, and the Triton lowering for CUDA.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.selective_scan import PallasConfig, pallas_bwd
from tests.kernels_pallas.test_selective_scan_pallas import (
    GRAD_BOUND,
    KernelVsReference,
    make_inputs,
    rel_err,
    scan_fn,
)

# Interpret mode: D = 24 is 1.5 blocks, L = 13 is 3 chunks of 4 and a padded one, N = 5 pads.
KERNEL_BWD = PallasConfig(block_d=16, chunk=4, backward_kernel=True, bwd_chunk=4)


def pytest_generate_tests(metafunc):  # noqa: D103 (pytest hook)
    if "case" in metafunc.fixturenames:
        cases = metafunc.cls.CASES
        metafunc.parametrize("case", cases, ids=[c[0] for c in cases])


def core_inputs(seed, batch, length, dim, state, dtype):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    x, dy = draw(batch, length, dim), draw(batch, length, dim)
    d = jnp.asarray(rng.uniform(0.05, 0.8, (batch, length, dim)), dtype)
    A = -jnp.exp(0.5 * draw(dim, state))
    return (
        x,
        d,
        A,
        draw(batch, length, state),
        draw(batch, length, state),
        dy,
        draw(batch, dim, state),
    )


def test_kernels_match_the_lean_jnp_gradients_in_float64(x64):
    args = core_inputs(0, 2, 13, 24, 5, jnp.float64)
    kernels = functools.partial(
        pallas_bwd.core_grads_kernel, chunk=4, block_d=16, num_warps=4, interpret=True
    )
    got = jax.jit(kernels)(*args)
    want = pallas_bwd._jnp_core_grads(*args)
    for name, g, w in zip(("x", "delta", "A", "B", "C"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == jnp.float64, name
        assert rel_err(g, w) < 1e-12, name


class TestInterpret(KernelVsReference):
    """The public function with the kernel backward, interpret mode."""

    CONFIG = KERNEL_BWD
    CASES = (
        ("f32-ragged-options", jnp.float32, (2, 13, 24, 5), True),
        ("bf16-plain", jnp.bfloat16, (1, 16, 8, 8), False),
    )


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Pallas)")
class TestGPU(KernelVsReference):
    """Compiled on a GPU with the default blocks and the kernel backward."""

    CONFIG = PallasConfig(backward_kernel=True)
    CASES = (
        ("f32", jnp.float32, (2, 1000, 256, 16), True),
        ("bf16", jnp.bfloat16, (2, 1000, 256, 16), True),
    )


@functools.cache
def second_order(backend):
    """A ↦ ∂/∂A ‖∇_(x, A, B) loss‖²: reverse over reverse through the scan."""
    config = KERNEL_BWD if backend == "pallas" else None
    fn = scan_fn(backend, True, config)

    def loss(x, delta, A, B, C, D, z, bias):
        out, last = fn(x, delta, A, B, C, D, z, bias)
        weights = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
        return jnp.sum(weights * out) + jnp.sum(jnp.sin(last))

    def grad_norm(A, args):
        x, delta, _, B, C, D, z, bias = args
        grads = jax.grad(loss, argnums=(0, 2, 3))(x, delta, A, B, C, D, z, bias)
        return sum(jnp.sum(g**2) for g in grads)

    return jax.jit(jax.grad(grad_norm))


def test_second_order_matches_the_reference_and_the_kernel_backward_runs():
    args = make_inputs(3, 2, 13, 24, 5, True)
    got, want = second_order("pallas")(args[2], args), second_order("reference")(args[2], args)
    assert rel_err(got, want) < GRAD_BOUND["float32"]
    grad = jax.grad(lambda a: jnp.sum(scan_fn("pallas", True, KERNEL_BWD)(*a)[0]))
    assert "selective_scan_bwd" in str(jax.make_jaxpr(grad)(args))


def test_backward_kernels_lower_to_triton_for_cuda():
    """Cross-platform lowering (no GPU needed): the two kernels at a ragged L, D and N."""
    shapes = core_inputs(0, 2, 100, 24, 5, jnp.float32)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in shapes]
    kernels = functools.partial(
        pallas_bwd.core_grads_kernel, chunk=16, block_d=32, num_warps=4, interpret=False
    )
    text = jax.jit(kernels).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call") == 2 and "triton" in text


@pytest.mark.parametrize("kwargs", [{"bwd_chunk": 0}, {"backward_kernel": 1}])
def test_config_checks(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PallasConfig(**kwargs)
