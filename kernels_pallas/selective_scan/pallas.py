"""The selective scan as one fused Pallas kernel, and its ``custom_vjp`` with a ``jnp`` backward.

Kernel (forward). The grid is (B, D / block_d): one program per batch row and block of
``block_d`` channels. Each program walks the whole sequence, one step at a time, in chunks of
``chunk`` steps (the inner loop is unrolled so that loads of later steps can be issued early),
holding its (block_d, N) state in registers. Per step t it reads one row of x, Δ, z (block_d
values each, contiguous in the channels-last layout) and of B, C (N values), and writes one row
of the output, so every input element is read once and every output element written once:

    Δ_t  = softplus(delta_t + delta_bias)                      (bias and softplus optional)
    h_t  = exp(Δ_t[:, None] A) ⊙ h_{t-1} + (Δ_t x_t)[:, None] B_t[None, :]     (block_d, N)
    out_t = (Σ_n C_t[n] h_t[:, n] + D ⊙ x_t) ⊙ silu(z_t)       (D, z optional)

A length that is not a multiple of ``chunk`` ends with a short loop over the remaining steps
(no padding). The interpreter runs the same loops without unrolling (the same arithmetic in
the same order; unrolling is only a hint to a compiler). A channel count that is not a
multiple of ``block_d`` is zero-padded to one, and N to a power of two (Triton's tiles are).
Arithmetic is float32 (float64 when an input is float64), whatever the storage dtype.

The kernel uses only backend-neutral Pallas (``pl.pallas_call``, ``BlockSpec``,
``lax.fori_loop``, ref loads and stores), so ``interpret=True`` runs the same kernel on the CPU;
it is chosen automatically whenever JAX's default backend is not a GPU. On a GPU the call asks
for the Triton lowering (``compiler_params``; the default Mosaic GPU lowering would stage whole
(L, block_d) blocks in shared memory).

Backward. ``jax.grad`` of a bare ``pallas_call`` fails, and a backward written as another
``pallas_call`` would give first-order gradients only. So the kernel sits inside a
``jax.custom_vjp`` whose forward rule saves only the inputs (O(B·L·D), never an O(B·L·D·N)
state history) and whose backward rule is the pure-``jnp`` chunk-recomputing backward of
:mod:`.lean`, reached through ``jax.vjp`` of the ``jnp`` forward. That rule is differentiable
``jnp``, so reverse-over-reverse second order works. The forward rule calls the
``custom_vjp`` function itself (not the bare kernel): under nested differentiation (a loss value
computed inside an inner ``jax.value_and_grad`` and differentiated again by an outer
``jax.grad``) the outer derivative of the primal output then meets this ``custom_vjp`` again
instead of the non-differentiable ``pallas_call``. Forward mode (``jax.jvp``) is refused, as for
any ``custom_vjp``.

With ``PallasConfig(backward_kernel=True)`` the backward rule instead differentiates the same
function with its core recurrence on kernels: the forward kernel recomputes the core outputs and
the backward kernels of :mod:`.pallas_bwd` give its gradients (themselves a ``custom_vjp`` with a
``jnp`` backward, so second order still works); the elementwise parts (Δ's bias and softplus,
the D skip and the z gate) stay ``jnp``. Off by default until measured on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels_pallas.selective_scan.lean import lean_scan_states
from kernels_pallas.selective_scan.pallas_bwd import core_grads
from kernels_pallas.selective_scan.reference import compute_dtype, finish, prepare_delta


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Block sizes of the selective-scan kernel (frozen: hashable, a static argument).

    Attributes:
        block_d: channels per program. Each program holds a (block_d, N) float32 state; the
            grid has B · D / block_d programs. 32 keeps the state at 512 registers-worth of
            float32 for N = 16 and gives B · D / 32 = 256–1024 programs at the benchmark sizes
            (B = 8, D = 1024–4096), a few per SM of an H100. A power of two (Triton's tiles
            are); D is zero-padded to a multiple of it (and N to a power of two).
        chunk: steps per unrolled inner loop (the sequence loop is ``L // chunk`` iterations of
            ``chunk`` unrolled steps, then the ``L % chunk`` remaining steps). 8 lets the
            compiler hoist the loads of the next steps above the exponentials of this one
            without a long compile.
        lean_chunk: T of the ``jnp`` backward of :mod:`.lean` (steps per recomputed chunk;
            ≈ √L is best); ``None`` uses the public function's ``chunk_size``.
        num_warps: warps per program on a GPU (4: 128 threads share the (block_d, N) tile).
        backward_kernel: the backward runs as Pallas kernels (:mod:`.pallas_bwd`: chunk
            checkpoints, then the adjoint walked in reverse with each chunk's states recomputed
            in registers) instead of the ``jnp`` lean backward. Off by default until a GPU has
            measured it; second order works either way.
        bwd_chunk: T of the kernel backward: steps whose states (and transitions) one program
            keeps in registers, and the spacing of the saved chunk-entry states.

    These are defaults chosen by reasoning about an H100, not yet tuned by measurement
    (``experiments/bench/kernels.py`` is the tool for that).
    """

    block_d: int = 32
    chunk: int = 8
    lean_chunk: int | None = None
    num_warps: int = 4
    backward_kernel: bool = False
    bwd_chunk: int = 16

    def __post_init__(self):
        if not isinstance(self.backward_kernel, bool):
            raise ValueError(f"backward_kernel must be a bool, got {self.backward_kernel!r}")
        for name in ("block_d", "chunk", "num_warps", "bwd_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.block_d & (self.block_d - 1):
            raise ValueError(f"block_d must be a power of two, got {self.block_d}")
        lean = self.lean_chunk
        if lean is not None and (isinstance(lean, bool) or not isinstance(lean, int) or lean < 1):
            raise ValueError(f"lean_chunk must be None or a positive int, got {lean!r}")


DEFAULT_CONFIG = PallasConfig()


def _softplus(v: jax.Array) -> jax.Array:
    """log(1 + exp(v)) without overflow, from max/exp/log1p only (lowers on every backend)."""
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _silu(v: jax.Array) -> jax.Array:
    return v / (1.0 + jnp.exp(-v))


def _kernel(*refs, length, chunk, unroll, has_D, has_z, has_bias, softplus, dtype):
    """One program: batch row ``program_id(0)``, channel block ``program_id(1)``.

    Refs (batch dim squeezed): x, delta (L, bd); A (bd, N); B, C (L, N); [D (bd,)]; [z (L, bd)];
    [delta_bias (bd,)]; then the outputs out (L, bd) and h_last (bd, N).
    """
    refs = list(refs)
    x_ref, delta_ref, A_ref, B_ref, C_ref = refs[:5]
    rest = refs[5:]
    D_ref = rest.pop(0) if has_D else None
    z_ref = rest.pop(0) if has_z else None
    bias_ref = rest.pop(0) if has_bias else None
    out_ref, h_ref = rest

    A = A_ref[...].astype(dtype)  # (bd, N)
    D = D_ref[...].astype(dtype) if has_D else None
    bias = bias_ref[...].astype(dtype) if has_bias else None

    def step(t, h):
        x_t = x_ref[t, :].astype(dtype)  # (bd,)
        d_t = delta_ref[t, :].astype(dtype)
        if has_bias:
            d_t = d_t + bias
        if softplus:
            d_t = _softplus(d_t)
        B_t = B_ref[t, :].astype(dtype)  # (N,)
        C_t = C_ref[t, :].astype(dtype)
        h = jnp.exp(d_t[:, None] * A) * h + (d_t * x_t)[:, None] * B_t[None, :]
        y = jnp.sum(h * C_t[None, :], axis=1)  # (bd,)
        if has_D:
            y = y + D * x_t
        if has_z:
            y = y * _silu(z_ref[t, :].astype(dtype))
        out_ref[t, :] = y.astype(out_ref.dtype)
        return h

    def chunk_body(c, h):
        start = c * chunk
        if unroll:  # in Python: Triton lowers only fori_loops with unroll=1
            for i in range(chunk):
                h = step(start + i, h)
            return h
        return lax.fori_loop(0, chunk, lambda i, h: step(start + i, h), h)

    num_full = length // chunk
    h = jnp.zeros(A.shape, dtype)
    h = lax.fori_loop(0, num_full, chunk_body, h)
    if length % chunk:
        h = lax.fori_loop(num_full * chunk, length, step, h)
    h_ref[...] = h.astype(h_ref.dtype)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _pad(a: jax.Array | None, axis: int, padded: int) -> jax.Array | None:
    """Zero-pad ``a`` along ``axis`` to length ``padded`` (None stays None)."""
    if a is None or a.shape[axis] == padded:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, padded - a.shape[axis])
    return jnp.pad(a, widths)


def _interpret() -> bool:
    """Compile the kernel on a GPU; interpret it everywhere else (the CPU has no compiler)."""
    return jax.default_backend() != "gpu"


def selective_scan_kernel(
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    delta_bias: jax.Array | None = None,
    *,
    delta_softplus: bool = False,
    config: PallasConfig = DEFAULT_CONFIG,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The bare forward kernel (not differentiable by ``jax.grad``; see :func:`pallas_scan`).

    Shapes: x, delta, z (B, L, D); A (D, N); B, C (B, L, N); D, delta_bias (D,) ->
    (out (B, L, D) in ``x``'s dtype, h_last (B, D, N) in the compute dtype). Inputs are read in
    their own dtype and converted in the kernel.

    Args:
        interpret: run the kernel in the Pallas interpreter; ``None`` does so unless JAX's
            default backend is a GPU.
    """
    if interpret is None:
        interpret = _interpret()
    dtype = compute_dtype(x, delta, A, B, C, D, z, delta_bias)
    batch, length, dim = x.shape
    state = A.shape[1]
    # Triton loads and stores only power-of-two tiles: round block_d (when D is smaller) and N
    # up, padding with zeros. A padded channel has x = 0, so its state stays 0; a padded state
    # has B = C = 0, so it stays 0 and reaches no output. Both are sliced off at the end.
    block_d = min(config.block_d, _next_power_of_2(dim))
    padded = -(-dim // block_d) * block_d
    state_padded = _next_power_of_2(state)
    x, delta, z = (_pad(a, 2, padded) for a in (x, delta, z))
    A = _pad(_pad(A.astype(dtype), 0, padded), 1, state_padded)
    D, delta_bias = (_pad(a, 0, padded) for a in (D, delta_bias))
    B, C = (_pad(a, 2, state_padded) for a in (B, C))

    seq = pl.BlockSpec((None, length, block_d), lambda b, j: (b, 0, j))
    per_step = pl.BlockSpec((None, length, state_padded), lambda b, j: (b, 0, 0))
    channel = pl.BlockSpec((block_d,), lambda b, j: (j,))
    table = pl.BlockSpec((block_d, state_padded), lambda b, j: (j, 0))
    operands = [x, delta, A, B, C]
    in_specs = [seq, seq, table, per_step, per_step]
    for a, spec in ((D, channel), (z, seq), (delta_bias, channel)):
        if a is not None:
            operands.append(a)
            in_specs.append(spec)

    kernel = functools.partial(
        _kernel,
        length=length,
        chunk=min(config.chunk, length),
        unroll=not interpret,  # a hint for the compiler; it only slows the interpreter's compile
        has_D=D is not None,
        has_z=z is not None,
        has_bias=delta_bias is not None,
        softplus=bool(delta_softplus),
        dtype=dtype,
    )
    # On a GPU, ask for the Triton lowering: the default (Mosaic GPU) stages whole blocks in
    # shared memory, and a (L, block_d) block does not fit. These are compiler options only;
    # the kernel body uses no backend-specific primitive.
    compiler_params = None if interpret else pl_triton.CompilerParams(num_warps=config.num_warps)
    out, h_last = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((batch, length, padded), x.dtype),
            jax.ShapeDtypeStruct((batch, padded, state_padded), dtype),
        ),
        grid=(batch, padded // block_d),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, length, block_d), lambda b, j: (b, 0, j)),
            pl.BlockSpec((None, block_d, state_padded), lambda b, j: (b, j, 0)),
        ),
        interpret=interpret,
        compiler_params=compiler_params,
        name="selective_scan_fwd",
    )(*operands)
    return out[:, :, :dim], h_last[:, :dim, :state]


def _jnp_scan(x, delta, A, B, C, D, z, delta_bias, *, delta_softplus, lean_chunk):
    """The same function in ``jnp`` (lean ``lax.scan`` form): what the backward differentiates."""
    dtype = compute_dtype(x, delta, A, B, C, D, z, delta_bias)
    d_eff = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    args = (x.astype(dtype), d_eff, A.astype(dtype), B.astype(dtype), C.astype(dtype))
    y, h_last = lean_scan_states(*args, chunk_size=lean_chunk)
    return finish(y, x, D, z, x.dtype), h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _scan(x, delta, A, B, C, D, z, delta_bias, softplus, config, lean_chunk, interpret):
    return selective_scan_kernel(
        x, delta, A, B, C, D, z, delta_bias,
        delta_softplus=softplus, config=config, interpret=interpret,
    )  # fmt: skip


def _scan_fwd(x, delta, A, B, C, D, z, delta_bias, softplus, config, lean_chunk, interpret):
    # Call the custom_vjp function, not the bare kernel: see the module docstring.
    out = _scan(x, delta, A, B, C, D, z, delta_bias, softplus, config, lean_chunk, interpret)
    return out, (x, delta, A, B, C, D, z, delta_bias)


def _scan_bwd(softplus, config, lean_chunk, interpret, residuals, cotangents):
    if config.backward_kernel:
        fn = functools.partial(
            _kernel_core_scan, delta_softplus=softplus, config=config, interpret=interpret
        )
    else:
        fn = functools.partial(_jnp_scan, delta_softplus=softplus, lean_chunk=lean_chunk)
    _, vjp = jax.vjp(fn, *residuals)
    return vjp(cotangents)


def _kernel_core_scan(x, delta, A, B, C, D, z, delta_bias, *, delta_softplus, config, interpret):
    """The function again, with the core recurrence on the kernels (forward and backward) and
    the elementwise parts (Δ's bias and softplus, D skip, z gate) in ``jnp``: what the kernel
    backward differentiates (the core's forward is recomputed, as Mamba's backward does)."""
    dtype = compute_dtype(x, delta, A, B, C, D, z, delta_bias)
    d_eff = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    args = (x.astype(dtype), d_eff, A.astype(dtype), B.astype(dtype), C.astype(dtype))
    y, h_last = _core(*args, config, interpret)
    return finish(y, x, D, z, x.dtype), h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _core(x, d, A, B, C, config, interpret):
    """(y, h_last) of the core recurrence (inputs in the compute dtype) by the forward kernel."""
    return selective_scan_kernel(x, d, A, B, C, config=config, interpret=interpret)


def _core_fwd(x, d, A, B, C, config, interpret):
    return _core(x, d, A, B, C, config, interpret), (x, d, A, B, C)


def _core_bwd(config, interpret, residuals, cotangents):
    dy, dh = cotangents
    static = (config.bwd_chunk, config.block_d, config.num_warps, interpret)
    dtype = residuals[0].dtype
    return core_grads(*residuals, dy.astype(dtype), dh.astype(dtype), *static)


_core.defvjp(_core_fwd, _core_bwd)


_scan.defvjp(_scan_fwd, _scan_bwd)


def pallas_scan(
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    delta_bias: jax.Array | None = None,
    *,
    delta_softplus: bool = False,
    config: PallasConfig = DEFAULT_CONFIG,
    lean_chunk: int = 64,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The kernel with its ``custom_vjp``: ``(out, h_last)``, differentiable to second order.

    Same shapes as :func:`selective_scan_kernel`; no input checks (the public
    :func:`kernels_pallas.selective_scan.selective_scan` does them). ``lean_chunk`` is the T of
    the ``jnp`` backward, overridden by ``config.lean_chunk`` when that is set; it is clipped
    to L.
    """
    if interpret is None:
        interpret = _interpret()
    chunk = config.lean_chunk if config.lean_chunk is not None else lean_chunk
    chunk = max(1, min(int(chunk), x.shape[1]))
    return _scan(
        x, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), config, chunk, bool(interpret)
    )
