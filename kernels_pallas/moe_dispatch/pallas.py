"""Grouped matmuls as Pallas kernels, their ``custom_vjp``, and the dispatch built on them.

Dimension names: M rows (assignments sorted by group), K and N feature widths, G groups
(experts). Rows of group g are ``offsets[g] <= m < offsets[g + 1]`` with
``offsets = [0, cumsum(group_sizes)]``; rows past the last group belong to no group. The two
products are those of :mod:`.grouped` (same semantics as ``jax.lax.ragged_dot``)::

    gmm_pallas(lhs (M, K), rhs (G, K, N), sizes (G,)) -> (M, N):
        out[m] = lhs[m] · rhs[g(m)]            (0 for rows in no group)
    tgmm_pallas(lhs (M, K), rhs (M, N), sizes (G,)) -> (G, K, N):
        out[g] = Σ_{m in g} lhs[m]ᵀ rhs[m]     (0 for an empty group)

Kernels. ``gmm``: the grid is (M / block_m, N / block_n). Row tile i visits only the groups that
overlap its rows, ``[lo_i, hi_i)`` (computed outside the kernel from the group offsets, the
idea of megablox's group metadata, without its TPU-only scalar prefetch); per group it runs
a loop over K in ``block_k`` slices that only loads and multiplies (``lhs_tile · rhs[g]``
into a float32 accumulator), and then keeps that group's rows of the product: the group mask
is applied once per group to the (block_m, block_n) product, never to the lhs tile between
its load and the dot. A tile inside one group (the common case when groups are much larger
than ``block_m``) makes one pass over K; a tile straddling a group boundary makes one pass per
group it touches; empty groups cost nothing (their K loop has zero trips), and tiles past the
last group write zeros. No padding to capacity. ``tgmm`` (the weight gradient): the grid is
(G, K / block_k, N / block_n); program g loops over the row tiles of group g, accumulating
``lhs_tileᵀ · rhs_tile``; the row tiles wholly inside the group run unmasked, and only the at
most two tiles that straddle the group's first and last row mask the rows of other groups
(row bounds); an empty group writes zeros. M, K and N are zero-padded to multiples of their
tiles (zeros add nothing).

Tiles. Triton's dot rejects operand tiles under 16 in any dimension, so a tile is at least
:data:`MIN_TILE` = 16: a dimension smaller than its tile is padded up to a power of two of at
least 16, never shrunk below it. Left to ``config=None``, each product chooses its tiles for the
operands' dtype and the device's shared memory (:func:`tiles_for`): the K loop of a program keeps
``num_stages`` copies of its operand tiles in shared memory (:func:`smem_bytes`), and float32
weight-gradient tiles of (128, 64) + (128, 128) at 3 stages need 288 KiB, more than the 227 KiB
an H100 or H200 gives one program.

Only backend-neutral Pallas (``pl.pallas_call``, ``BlockSpec``, ``lax.fori_loop``, ref loads
with ``pl.ds``) is used, so ``interpret=True`` runs the same kernels on the CPU; interpret mode
is chosen automatically unless JAX's default backend is a GPU, where the Triton lowering is
asked for (``compiler_params``).

Differentiation. ``jax.grad`` of a bare ``pallas_call`` fails. Each product is a
``jax.custom_vjp`` whose backward is written with the two *differentiable* products
themselves (for gmm: d lhs = gmm(g, rhsᵀ), d rhs = tgmm(lhs, g); for tgmm: d lhs = gmm(rhs, hᵀ),
d rhs = gmm(lhs, h)), never with a bare kernel, and whose forward rule calls the
``custom_vjp`` function again. So reverse mode works to every order (grad of grad, MAML
through expert weights), each order running the same kernels. Forward mode (``jax.jvp``,
``jax.hessian``) is refused, as for any ``custom_vjp``: use the ``"reference"`` backend there.
``vmap`` goes through ``pallas_call``'s batching rule (one more grid axis).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels_pallas.moe_dispatch.routing import sort_by_expert

MIN_TILE = 16  # Triton's dot rejects operand tiles under 16 in any dimension


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Tile sizes of the grouped-matmul kernels (frozen: hashable, a static argument).

    Attributes:
        block_m: rows per tile (gmm's output tile; tgmm's reduction step). 128 rows keep the
            share of tiles straddling two groups small when groups hold thousands of rows
            (top-2 of 4K–64K tokens over 8–64 experts) and fill an H100 tensor-core tile.
        block_k: contraction slice per step (gmm) / output tile rows (tgmm). 64 keeps a
            (128, 64) + (64, 128) bf16 operand pair at 32 KiB, so ``num_stages`` = 3 stages
            fit in shared memory.
        block_n: output columns per tile. 128.
        num_warps: warps per program on a GPU (4 for a 128 × 128 float32 accumulator).
        num_stages: software-pipelining stages of the K loop on a GPU.

    Tiles are powers of two of at least :data:`MIN_TILE` (Triton's). When a dimension is
    smaller than its tile, the tile shrinks to the smallest power of two at or above the
    dimension, but not below :data:`MIN_TILE` (the dimension is zero-padded instead). These
    are defaults chosen by reasoning about an H100, not tuned by measurement: the GPU
    benchmark is still owed. :func:`tiles_for` shrinks them where shared memory is short.
    """

    block_m: int = 128
    block_k: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_k", "block_n", "num_warps", "num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("block_m", "block_k", "block_n"):
            value = getattr(self, name)
            if value & (value - 1) or value < MIN_TILE:
                raise ValueError(f"{name} must be a power of two >= {MIN_TILE}, got {value}")


DEFAULT_CONFIG = GmmConfig()


def _interpret() -> bool:
    """Compile the kernels on a GPU; interpret them everywhere else (the CPU has no compiler)."""
    return jax.default_backend() != "gpu"


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _tile(block: int, dim: int) -> int:
    """The tile of a dimension: ``block``, or for a smaller dimension the power of two at or
    above it, but never under MIN_TILE (the dimension is padded up instead)."""
    return min(block, max(MIN_TILE, _next_power_of_2(dim)))


# --- tiles that fit the device's shared memory --------------------------------------------------

KIB = 1024
# Shared memory one program (thread block) may use, by CUDA compute capability: the opt-in
# maximum per block of NVIDIA's CUDA C++ Programming Guide (compute capabilities table).
SMEM_BYTES = {
    "7.0": 96 * KIB,  # V100
    "7.5": 64 * KIB,  # T4, RTX 20
    "8.0": 163 * KIB,  # A100
    "8.6": 99 * KIB,  # A10, A40, RTX 30
    "8.7": 163 * KIB,  # Jetson Orin
    "8.9": 99 * KIB,  # L4, L40S, RTX 40
    "9.0": 227 * KIB,  # H100, H200, H800
    "10.0": 227 * KIB,  # B200
    "12.0": 99 * KIB,  # RTX 50
}
UNKNOWN_GPU_SMEM_BYTES = 99 * KIB  # a GPU whose compute capability is not listed above
HOST_SMEM_BYTES = SMEM_BYTES["9.0"]  # interpret mode: choose the tiles an H100 would get


def smem_limit_bytes(device=None) -> int:
    """Shared memory one program may use on ``device`` (default: JAX's first device).

    GPUs are looked up by ``compute_capability`` in :data:`SMEM_BYTES` (an unlisted one gets
    the small :data:`UNKNOWN_GPU_SMEM_BYTES`); elsewhere the kernels are interpreted and get
    :data:`HOST_SMEM_BYTES`, so the CPU runs the tiles an H100 compiles.
    """
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return HOST_SMEM_BYTES
    return SMEM_BYTES.get(str(getattr(device, "compute_capability", "")), UNKNOWN_GPU_SMEM_BYTES)


def smem_bytes(product: str, config: GmmConfig, itemsize: int) -> int:
    """Shared memory of one program's software-pipelined K loop: ``num_stages`` copies of the
    operand tiles one step loads, in bytes (``itemsize`` bytes per element).

    ``"gmm"`` loads lhs (block_m, block_k) and rhs (block_k, block_n) per step; ``"tgmm"``
    loads lhs (block_m, block_k) and rhs (block_m, block_n). A model of Triton's pipeliner
    (the accumulator lives in registers; a compiler's own scratch comes on top).
    """
    c = config
    if product == "gmm":
        elements = c.block_m * c.block_k + c.block_k * c.block_n
    elif product == "tgmm":
        elements = c.block_m * c.block_k + c.block_m * c.block_n
    else:
        raise ValueError(f"product must be 'gmm' or 'tgmm', got {product!r}")
    return c.num_stages * elements * itemsize


def fit_config(product: str, itemsize: int, limit: int, base: GmmConfig = DEFAULT_CONFIG):
    """``base`` shrunk until :func:`smem_bytes` is at most ``limit`` bytes.

    In order, while it does not fit: halve the tile the loop steps over (gmm's block_k, tgmm's
    block_m) down to 32, which keeps the output tile and so the work per loaded byte; then
    drop ``num_stages`` to 2; then halve the larger output tile; never under MIN_TILE.

    Raises:
        ValueError: not even the smallest tiles fit ``limit``.
    """
    step_over = "block_k" if product == "gmm" else "block_m"
    outputs = ("block_m", "block_n") if product == "gmm" else ("block_k", "block_n")
    config = base
    while smem_bytes(product, config, itemsize) > limit:
        if getattr(config, step_over) > 32:
            change = {step_over: getattr(config, step_over) // 2}
        elif config.num_stages > 2:
            change = {"num_stages": 2}
        else:
            name = max(outputs, key=lambda n: getattr(config, n))
            if getattr(config, name) <= MIN_TILE:
                raise ValueError(
                    f"limit: {limit} bytes of shared memory fit no {product} tiles "
                    f"(itemsize {itemsize})"
                )
            change = {name: getattr(config, name) // 2}
        config = dataclasses.replace(config, **change)
    return config


def tiles_for(product: str, dtype, device=None) -> GmmConfig:
    """The tiles ``config=None`` uses: :data:`DEFAULT_CONFIG` fitted (:func:`fit_config`) to the
    shared memory of ``device`` (:func:`smem_limit_bytes`) for operands of ``dtype``."""
    itemsize = jnp.dtype(dtype).itemsize
    return fit_config(product, itemsize, smem_limit_bytes(device))


def _pad_to(a: jax.Array, axis: int, multiple: int) -> jax.Array:
    size = a.shape[axis]
    padded = -(-size // multiple) * multiple
    if padded == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, padded - size)
    return jnp.pad(a, widths)


def _offsets(group_sizes: jax.Array, rows: int) -> jax.Array:
    """(G + 1,) int32 group boundaries [0, cumsum(sizes)], clipped to the row count."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.minimum(jnp.concatenate([jnp.zeros((1,), jnp.int32), ends]), rows)


def _compiler_params(config: GmmConfig, interpret: bool):
    if interpret:
        return None
    return pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


# --- gmm ----------------------------------------------------------------------------------------


def _gmm_kernel(lo_ref, hi_ref, off_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, num_k, precision):
    """Row tile ``program_id(0)``, column tile ``program_id(1)``.

    Refs: lo, hi (M / tm,) first and one-past-last group overlapping each row tile; off (G + 1,)
    group offsets; lhs (tm, K) the row tile; rhs (G, K, tn); out (tm, tn).
    """
    i = pl.program_id(0)
    rows = i * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

    def group_body(g, acc):
        start, end = off_ref[g], off_ref[g + 1]

        def k_body(kk, part):  # load, multiply, accumulate: no mask on the load path
            k0 = pl.multiple_of(kk * tk, tk)
            a = lhs_ref[:, pl.ds(k0, tk)]
            b = rhs_ref[g, pl.ds(k0, tk), :]
            return part + jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)

        trips = jnp.where(end > start, num_k, 0)  # an empty group costs nothing
        part = lax.fori_loop(0, trips, k_body, jnp.zeros_like(acc))
        mask = (rows >= start) & (rows < end)  # (tm, 1): rows of group g in this tile
        return acc + jnp.where(mask, part, 0.0)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    acc = lax.fori_loop(lo_ref[i], hi_ref[i], group_body, acc)
    out_ref[...] = acc.astype(out_ref.dtype)


def gmm_kernel(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    config: GmmConfig | None = None,
    precision=None,
    interpret: bool | None = None,
) -> jax.Array:
    """The bare grouped-matmul kernel (not differentiable by ``jax.grad``; see gmm_pallas).

    Shapes: lhs (M, K), rhs (G, K, N), group_sizes (G,) -> (M, N) in lhs's dtype.
    """
    if interpret is None:
        interpret = _interpret()
    rows, depth = lhs.shape
    groups, _, cols = rhs.shape
    dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    config = config or tiles_for("gmm", dtype)
    tm, tk, tn = (
        _tile(config.block_m, rows),
        _tile(config.block_k, depth),
        _tile(config.block_n, cols),
    )
    lhs_p = _pad_to(_pad_to(lhs.astype(dtype), 0, tm), 1, tk)
    rhs_p = _pad_to(_pad_to(rhs.astype(dtype), 1, tk), 2, tn)
    num_m, num_k, num_n = lhs_p.shape[0] // tm, lhs_p.shape[1] // tk, rhs_p.shape[2] // tn

    # Group metadata: for row tile i, the groups overlapping rows [i·tm, (i + 1)·tm).
    offsets = _offsets(group_sizes, rows)
    tile_start = jnp.arange(num_m, dtype=jnp.int32) * tm
    lo = jnp.searchsorted(offsets[1:], tile_start, side="right").astype(jnp.int32)
    hi = jnp.searchsorted(offsets[:-1], tile_start + tm, side="left").astype(jnp.int32)

    kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, num_k=num_k, precision=precision)
    whole = lambda n: pl.BlockSpec((n,), lambda i, j: (0,))  # noqa: E731
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((lhs_p.shape[0], rhs_p.shape[2]), lhs.dtype),
        grid=(num_m, num_n),
        in_specs=[
            whole(num_m),
            whole(num_m),
            whole(groups + 1),
            pl.BlockSpec((tm, lhs_p.shape[1]), lambda i, j: (i, 0)),
            pl.BlockSpec((groups, rhs_p.shape[1], tn), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=_compiler_params(config, interpret),
        name="moe_gmm",
    )(lo, hi, offsets, lhs_p, rhs_p)
    return out[:rows, :cols]


# --- tgmm ---------------------------------------------------------------------------------------


def tgmm_row_tiles(start, end, tm: int):
    """The row tiles of the group of rows ``[start, end)``, as three ranges of tile indices:
    ``(head, inside, tail)``, each ``(first, one past last)``.

    ``inside`` holds the tiles wholly within the group (no mask needed); ``head`` and ``tail``
    the at most one tile each that straddles the group's first or last row (masked). Together
    they cover the tiles ``[start // tm, ceil(end / tm))`` once each; all are empty for an
    empty group. Works on Python ints and on traced int32 scalars alike.
    """
    empty = end <= start
    first = start // tm
    last = jnp.where(empty, first, (end + tm - 1) // tm)
    inside_lo = (start + tm - 1) // tm  # the first tile that starts at or after `start`
    inside_hi = jnp.maximum(end // tm, inside_lo)  # one past the last tile ending by `end`
    head_hi = jnp.minimum(inside_lo, last)
    tail_lo = jnp.where(empty, last, jnp.maximum(inside_hi, head_hi))
    inside_hi = jnp.where(empty, inside_lo, inside_hi)
    return (first, head_hi), (inside_lo, inside_hi), (tail_lo, last)


def _tgmm_kernel(off_ref, lhs_ref, rhs_ref, out_ref, *, tm, precision):
    """Group ``program_id(0)``, K tile ``program_id(1)``, N tile ``program_id(2)``.

    Refs: off (G + 1,) group offsets; lhs (M, tk); rhs (M, tn); out (tk, tn).
    """
    g = pl.program_id(0)
    start, end = off_ref[g], off_ref[g + 1]
    dims = (((0,), (0,)), ((), ()))

    def body(masked: bool):
        def step(t, acc):
            r0 = pl.multiple_of(t * tm, tm)
            a = lhs_ref[pl.ds(r0, tm), :]
            b = rhs_ref[pl.ds(r0, tm), :]
            if masked:  # a tile straddling the group's first or last row
                rows = r0 + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
                a = jnp.where((rows >= start) & (rows < end), a, jnp.zeros_like(a))
            return acc + lax.dot_general(
                a, b, dims, precision=precision, preferred_element_type=jnp.float32
            )

        return step

    head, inside, tail = tgmm_row_tiles(start, end, tm)
    acc = jnp.zeros(out_ref.shape, jnp.float32)
    acc = lax.fori_loop(*head, body(True), acc)
    acc = lax.fori_loop(*inside, body(False), acc)
    acc = lax.fori_loop(*tail, body(True), acc)
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm_kernel(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    config: GmmConfig | None = None,
    precision=None,
    interpret: bool | None = None,
) -> jax.Array:
    """The bare transposed grouped-matmul kernel (the weight gradient; see tgmm_pallas).

    Shapes: lhs (M, K), rhs (M, N), group_sizes (G,) -> (G, K, N) in lhs's dtype.
    """
    if interpret is None:
        interpret = _interpret()
    rows, depth = lhs.shape
    cols = rhs.shape[1]
    groups = group_sizes.shape[0]
    dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    config = config or tiles_for("tgmm", dtype)
    tm, tk, tn = (
        _tile(config.block_m, rows),
        _tile(config.block_k, depth),
        _tile(config.block_n, cols),
    )
    lhs_p = _pad_to(_pad_to(lhs.astype(dtype), 0, tm), 1, tk)
    rhs_p = _pad_to(_pad_to(rhs.astype(dtype), 0, tm), 1, tn)
    padded_rows, num_k, num_n = lhs_p.shape[0], lhs_p.shape[1] // tk, rhs_p.shape[1] // tn
    offsets = _offsets(group_sizes, rows)

    kernel = functools.partial(_tgmm_kernel, tm=tm, precision=precision)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((groups, lhs_p.shape[1], rhs_p.shape[1]), lhs.dtype),
        grid=(groups, num_k, num_n),
        in_specs=[
            pl.BlockSpec((groups + 1,), lambda g, a, b: (0,)),
            pl.BlockSpec((padded_rows, tk), lambda g, a, b: (0, a)),
            pl.BlockSpec((padded_rows, tn), lambda g, a, b: (0, b)),
        ],
        out_specs=pl.BlockSpec((None, tk, tn), lambda g, a, b: (g, a, b)),
        interpret=interpret,
        compiler_params=_compiler_params(config, interpret),
        name="moe_tgmm",
    )(offsets, lhs_p, rhs_p)
    return out[:, :depth, :cols]


# --- differentiable wrappers --------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, sizes, config, precision, interpret):
    return gmm_kernel(lhs, rhs, sizes, config=config, precision=precision, interpret=interpret)


def _gmm_fwd(lhs, rhs, sizes, config, precision, interpret):
    # Call the custom_vjp function, not the bare kernel, so that an outer derivative of the
    # primal output meets this rule again (nested differentiation).
    return _gmm(lhs, rhs, sizes, config, precision, interpret), (lhs, rhs, sizes)


def _gmm_bwd(config, precision, interpret, residuals, g):
    lhs, rhs, sizes = residuals
    static = (config, precision, interpret)
    d_lhs = _gmm(g.astype(rhs.dtype), jnp.swapaxes(rhs, 1, 2), sizes, *static)
    d_rhs = _tgmm(lhs, g.astype(lhs.dtype), sizes, *static)
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tgmm(lhs, rhs, sizes, config, precision, interpret):
    return tgmm_kernel(lhs, rhs, sizes, config=config, precision=precision, interpret=interpret)


def _tgmm_fwd(lhs, rhs, sizes, config, precision, interpret):
    return _tgmm(lhs, rhs, sizes, config, precision, interpret), (lhs, rhs, sizes)


def _tgmm_bwd(config, precision, interpret, residuals, h):
    lhs, rhs, sizes = residuals
    static = (config, precision, interpret)
    d_lhs = _gmm(rhs, jnp.swapaxes(h, 1, 2).astype(rhs.dtype), sizes, *static)
    d_rhs = _gmm(lhs, h.astype(lhs.dtype), sizes, *static)
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def _check(name: str, lhs, rhs, group_sizes, rhs_rank: int) -> None:
    if jnp.ndim(lhs) != 2:
        raise ValueError(f"{name}: lhs must have shape (M, K), got {jnp.shape(lhs)}")
    if jnp.ndim(rhs) != rhs_rank:
        meaning = "(G, K, N)" if rhs_rank == 3 else "(M, N)"
        raise ValueError(f"{name}: rhs must have shape {meaning}, got {jnp.shape(rhs)}")
    if jnp.ndim(group_sizes) != 1 or not jnp.issubdtype(jnp.result_type(group_sizes), jnp.integer):
        raise ValueError(
            f"{name}: group_sizes must be a 1-D integer array (G,), got "
            f"{jnp.shape(group_sizes)} {jnp.result_type(group_sizes)}"
        )


def gmm_pallas(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    config: GmmConfig | None = None,
    precision=None,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped matmul ``out[m] = lhs[m] · rhs[g(m)]`` (0 for rows in no group), Pallas kernel.

    Shapes: lhs (M, K) sorted by group, rhs (G, K, N), group_sizes (G,) int -> (M, N) in lhs's
    dtype (float32 accumulation). Same result as ``jax.lax.ragged_dot`` and :func:`.grouped.gmm`.
    Differentiable in reverse mode to every order (see the module docstring).

    Args:
        config: the tile sizes (:class:`GmmConfig`), used by every product of the forward
            and backward alike; ``None`` lets each product choose its own for the dtype and
            the device's shared memory (:func:`tiles_for`).
        precision: passed to the in-kernel dots.
        interpret: run in the Pallas interpreter; ``None`` does so unless JAX's default
            backend is a GPU.

    Raises:
        ValueError: an operand has the wrong rank, K or G disagree, or group_sizes is not
            a 1-D integer array.
    """
    _check("gmm_pallas", lhs, rhs, group_sizes, 3)
    if rhs.shape[1] != lhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(
            f"gmm_pallas: rhs must have shape (G, K, N) with G = {group_sizes.shape[0]}, "
            f"K = {lhs.shape[1]}; got {rhs.shape}"
        )
    if interpret is None:
        interpret = _interpret()
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), config, precision, bool(interpret))


def tgmm_pallas(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    config: GmmConfig | None = None,
    precision=None,
    interpret: bool | None = None,
) -> jax.Array:
    """Transposed grouped matmul ``out[g] = Σ_{m in g} lhs[m]ᵀ rhs[m]``, Pallas kernel.

    Shapes: lhs (M, K), rhs (M, N), group_sizes (G,) int -> (G, K, N) in lhs's dtype; an
    empty group gives zeros. Same result as :func:`.grouped.tgmm`; differentiable in reverse
    mode to every order. Arguments as for :func:`gmm_pallas`.
    """
    _check("tgmm_pallas", lhs, rhs, group_sizes, 2)
    if rhs.shape[0] != lhs.shape[0]:
        raise ValueError(
            f"tgmm_pallas: rhs must have shape (M, N) with M = {lhs.shape[0]}, got {rhs.shape}"
        )
    if interpret is None:
        interpret = _interpret()
    return _tgmm(lhs, rhs, group_sizes.astype(jnp.int32), config, precision, bool(interpret))


def dispatch_pallas(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    expert_ids: jax.Array,
    gates: jax.Array,
    keep: jax.Array,
    precision=None,
    *,
    config: GmmConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """:func:`.reference.dispatch_ragged` with its three grouped matmuls on :func:`gmm_pallas`.

    Shapes: x (T, D); w_gate, w_up (E, D, F); w_down (E, F, D); expert_ids, gates, keep (T, K)
    -> (T, D).
    """
    num_tokens, top_k = expert_ids.shape
    grouped = sort_by_expert(expert_ids, w_gate.shape[0], valid=keep)
    rows = x[grouped.order // top_k]  # (N, D): assignment i reads token i // K
    mm = functools.partial(
        gmm_pallas,
        group_sizes=grouped.group_sizes,
        config=config,
        precision=precision,
        interpret=interpret,
    )
    hidden = jax.nn.silu(mm(rows, w_gate)) * mm(rows, w_up)
    out = mm(hidden, w_down)
    per_slot = out[grouped.inverse].reshape(num_tokens, top_k, -1)  # back to (t, k) order
    weights = jnp.where(keep, gates, 0).astype(x.dtype)
    return jnp.einsum("tk,tkd->td", weights, per_slot, precision=precision)
