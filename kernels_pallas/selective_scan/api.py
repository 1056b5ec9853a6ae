"""The public selective scan: input checks at the boundary, then one of the backends.

Backends:

* ``"reference"`` -- ``lax.scan`` over L. With ``lean_backward=True`` (default) its gradient is
  the chunk-recomputing ``custom_vjp`` of :mod:`.lean` (saves O(B·L/T·D·N), not O(B·L·D·N),
  and still supports second order); ``lean_backward=False`` is plain autodiff of the scan.
* ``"associative"`` -- ``lax.associative_scan`` (parallel prefix, O(B·L·D·N) memory), plain
  autodiff.
* ``"pallas"`` -- the fused Pallas kernel of :mod:`~kernels_pallas.selective_scan.pallas`
  (compiled on a GPU, interpreted elsewhere) inside a ``custom_vjp`` that saves only the
  inputs and whose backward is the ``jnp`` lean backward (chunk size ``chunk_size``), so
  second order works; forward mode (``jax.jvp``) is refused, as for any ``custom_vjp``. Block
  sizes: ``pallas_config``.
* ``"auto"`` -- ``"reference"`` unless the kernel is proven on this device kind and passes its
  one-time self-test (:mod:`kernels_pallas.selftest`: an allow-list, empty today, then a
  small case compiled, run and compared with the ``lax.scan`` reference per JAX version,
  device kind, dtype and :class:`PallasConfig`); then ``"pallas"``. A failed self-test falls
  back to ``"reference"`` with one warning. ``lean_backward=False`` (plain autodiff, which
  keeps forward mode working) always stays on ``"reference"``.

Every call reports what it resolved to, and why, to :func:`kernels_pallas.selftest.record`
(written into each run's ``run_info.json``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import selftest
from kernels_pallas.selective_scan.lean import auto_chunk_size, lean_scan_states
from kernels_pallas.selective_scan.pallas import DEFAULT_CONFIG, PallasConfig, pallas_scan
from kernels_pallas.selective_scan.reference import (
    associative_states,
    compute_dtype,
    finish,
    prepare_delta,
    scan_states,
)

BACKENDS = ("reference", "associative", "pallas", "auto")
KERNEL = "selective_scan"  # its name in kernels_pallas.selftest


def _check_float(name: str, a) -> None:
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
        raise ValueError(f"{name} must be a real floating array, got dtype {jnp.result_type(a)}")


def _check_shape(name: str, a, expected: tuple[int, ...], meaning: str) -> None:
    _check_float(name, a)
    if tuple(jnp.shape(a)) != expected:
        raise ValueError(f"{name} must have shape {meaning} = {expected}, got {jnp.shape(a)}")


def _validate(x, delta, A, B, C, D, z, delta_bias, backend, chunk_size, pallas_config) -> None:
    _check_float("x", x)
    if jnp.ndim(x) != 3:
        raise ValueError(f"x must have shape (B, L, D), got {jnp.shape(x)}")
    batch, length, dim = jnp.shape(x)
    if length < 1:
        raise ValueError(f"x must have a positive length L, got shape {jnp.shape(x)}")
    _check_float("A", A)
    if jnp.ndim(A) != 2 or jnp.shape(A)[0] != dim:
        raise ValueError(f"A must have shape (D, N) with D = {dim}, got {jnp.shape(A)}")
    state = jnp.shape(A)[1]
    _check_shape("delta", delta, (batch, length, dim), "(B, L, D)")
    _check_shape("B", B, (batch, length, state), "(B, L, N)")
    _check_shape("C", C, (batch, length, state), "(B, L, N)")
    if D is not None:
        _check_shape("D", D, (dim,), "(D,)")
    if z is not None:
        _check_shape("z", z, (batch, length, dim), "(B, L, D)")
    if delta_bias is not None:
        _check_shape("delta_bias", delta_bias, (dim,), "(D,)")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive Python int, got {chunk_size!r}")
    if pallas_config is not None and not isinstance(pallas_config, PallasConfig):
        raise ValueError(f"pallas_config must be a PallasConfig or None, got {pallas_config!r}")


def _jnp_scan(x, delta, A, B, C, D, z, delta_bias, softplus, backend, lean_backward, chunk_size):
    """``(out, h_last)`` by one of the ``jnp`` backends (``"associative"`` or ``"reference"``)."""
    dtype = compute_dtype(x, delta, A, B, C, D, z, delta_bias)
    d_eff = prepare_delta(delta, delta_bias, softplus, dtype)
    args = (x.astype(dtype), d_eff, A.astype(dtype), B.astype(dtype), C.astype(dtype))
    if backend == "associative":
        y, h_last = associative_states(*args)
    elif lean_backward:
        y, h_last = lean_scan_states(*args, chunk_size=chunk_size)
    else:
        y, h_last = scan_states(*args)
    return finish(y, x, D, z, x.dtype), h_last


def _self_test(dtype, config: PallasConfig) -> None:
    """The kernel against plain autodiff of ``lax.scan`` on a small case with every option (D,
    z, bias, softplus; a ragged L, a padded channel block, N not a power of two): outputs, last
    state and gradients. Raises :class:`kernels_pallas.selftest.SelfTestError` on a failure."""
    rng = np.random.default_rng(0)
    batch, length, dim, state = 2, 19, config.block_d + 3, 5
    seq, per_step, f32 = (batch, length, dim), (batch, length, state), np.float32

    def draw(shape, dt=dtype):
        return rng.standard_normal(shape).astype(dt)

    A = -np.exp(0.5 * draw((dim, state), f32))
    args = (draw(seq), draw(seq), A, draw(per_step), draw(per_step), draw((dim,), f32))
    args += (draw(seq), draw((dim,), f32))
    w_out, w_h = draw(seq, f32), draw((batch, dim, state), f32)

    def loss(scan):
        def total(*a):
            out, h_last = scan(*a)
            value = jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(h_last * w_h)
            return value, (out, h_last)

        return jax.value_and_grad(total, argnums=(0, 1, 2, 3, 4), has_aux=True)

    kernel = functools.partial(pallas_scan, delta_softplus=True, config=config, lean_chunk=8)
    plain = functools.partial(
        _jnp_scan, softplus=True, backend="reference", lean_backward=False, chunk_size=None
    )
    got = selftest.run_compiled(loss(kernel), *args)
    want = selftest.run_compiled(loss(plain), *args)
    names = ("loss", "out", "h_last", "dx", "ddelta", "dA", "dB", "dC")
    selftest.check_close(names, got, want, dtype)


def self_test(dtype=jnp.float32, config: PallasConfig = DEFAULT_CONFIG) -> None:
    """Run the kernel's self-test now, whatever the allow-list says: what a GPU check reports
    before a device kind is added to :data:`kernels_pallas.selftest.PROVEN`.

    Raises:
        kernels_pallas.selftest.SelfTestError: the kernel failed (the message says where).
    """
    _self_test(jnp.dtype(dtype), config)


def _resolve(backend: str, lean_backward: bool, dtype, config: PallasConfig) -> tuple[str, str]:
    """``(concrete backend, why)``."""
    if backend != "auto":
        return backend, "asked for"
    if not lean_backward:
        return "reference", "lean_backward=False asks for plain autodiff (forward mode works)"
    test = functools.partial(_self_test, dtype, config)
    use_kernel, reason = selftest.verdict(KERNEL, test, dtype=dtype, config=config)
    return ("pallas" if use_kernel else "reference"), reason


def resolve_backend(
    backend: str,
    lean_backward: bool = True,
    *,
    dtype=jnp.float32,
    pallas_config: PallasConfig | None = None,
) -> str:
    """The backend ``backend`` stands for here, for inputs ``x`` of ``dtype``.

    Names other than ``"auto"`` are returned unchanged. ``"auto"`` may run the kernel's
    one-time self-test (see the module docstring).
    """
    config = DEFAULT_CONFIG if pallas_config is None else pallas_config
    return _resolve(backend, lean_backward, jnp.dtype(dtype), config)[0]


def selective_scan(
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    *,
    delta_bias: jax.Array | None = None,
    delta_softplus: bool = False,
    backend: str = "reference",
    lean_backward: bool = True,
    chunk_size: int | None = None,
    return_last_state: bool = False,
    pallas_config: PallasConfig | None = None,
):
    """Mamba's selective scan (S6), channels-last; ``selective_scan_ref`` semantics.

    Δ_t = softplus(delta_t + delta_bias) (bias, softplus optional);
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t with h_{-1} = 0;
    out_t = (C_t · h_t + D ⊙ x_t) ⊙ silu(z_t) (D, z optional). Per channel d and state n:
    h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] B_t[n] x_t[d].

    Shapes: x, delta, z (B, L, D); A (D, N); B, C (B, L, N) -> out (B, L, D) in ``x``'s dtype
    [, last_state (B, D, N)]. Arithmetic in float32, or float64 if any input is float64.

    Args:
        x: inputs u.
        delta: raw step sizes.
        A: state matrix, one diagonal per channel; A < 0 keeps exp(Δ A) in (0, 1).
        B: input-dependent input matrix, shared by all channels.
        C: input-dependent output matrix, shared by all channels.
        D: skip connection per channel.
        z: gate; the output is multiplied by silu(z).
        delta_bias: added to ``delta`` before the softplus.
        delta_softplus: apply softplus to ``delta (+ delta_bias)``.
        backend: ``"reference"``, ``"associative"``, ``"pallas"`` or ``"auto"`` (see the module
            docstring).
        lean_backward: ``"reference"`` only: chunk-recomputing ``custom_vjp`` (True) or plain
            autodiff of ``lax.scan`` (False). Both support reverse-over-reverse second order;
            only False supports forward mode (``jax.jvp``, ``jax.hessian``), so with False
            ``"auto"`` stays on the reference. ``"pallas"`` ignores it (its backward is lean).
        chunk_size: T, steps per recomputed chunk of the lean backward; also the T of the
            ``"pallas"`` backward unless ``pallas_config.lean_chunk`` is set. ``None`` (default)
            picks it from the sizes (:func:`.lean.auto_chunk_size`: the largest power of two
            in [8, 64] whose (T, B, N, D) block fits in 2 MiB).
        return_last_state: also return h_{L-1}; gradients flow through it too.
        pallas_config: block sizes of the ``"pallas"`` kernel; ``None`` is
            :data:`.pallas.DEFAULT_CONFIG`.

    Returns:
        ``out``, or ``(out, last_state)`` with ``return_last_state``.

    Raises:
        ValueError: an argument has the wrong shape or a non-floating dtype (the message names
            it), or an unknown ``backend``, a bad ``chunk_size`` or ``pallas_config``.

    Example:
        >>> out = selective_scan(x, delta, -jnp.exp(A_log), B, C, D, z,
        ...                      delta_bias=dt_bias, delta_softplus=True)
    """
    _validate(x, delta, A, B, C, D, z, delta_bias, backend, chunk_size, pallas_config)
    config = DEFAULT_CONFIG if pallas_config is None else pallas_config
    dtype = jnp.dtype(jnp.result_type(x))
    requested = backend
    backend, reason = _resolve(backend, lean_backward, dtype, config)
    selftest.record(KERNEL, requested, backend, reason, dtype=dtype.name, config=config)
    if chunk_size is None:
        batch, length, dim = jnp.shape(x)
        itemsize = compute_dtype(x, delta, A, B, C, D, z, delta_bias).itemsize
        chunk_size = auto_chunk_size(batch, length, dim, jnp.shape(A)[1], itemsize)
    if backend == "pallas":
        out, h_last = pallas_scan(
            x, delta, A, B, C, D, z, delta_bias,
            delta_softplus=delta_softplus, config=config, lean_chunk=chunk_size,
        )  # fmt: skip
    else:
        out, h_last = _jnp_scan(
            x, delta, A, B, C, D, z, delta_bias,
            delta_softplus, backend, lean_backward, chunk_size,
        )  # fmt: skip
    return (out, h_last) if return_last_state else out
