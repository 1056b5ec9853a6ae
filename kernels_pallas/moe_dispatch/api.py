"""The public MoE dispatch: input checks at the boundary, routing, then one of the backends.

Backends (same result up to float rounding, forward and gradients):

* ``"reference"`` -- the dense capacity-padded einsum of :func:`.reference.dispatch_dense`.
* ``"ragged"`` -- sort by expert and grouped matmuls on ``jax.lax.ragged_dot``
  (:func:`.reference.dispatch_ragged`, :mod:`.grouped`); no padding to capacity. Needs a JAX
  with ``jax.lax.ragged_dot`` and ``ragged_dot_general``. Reverse mode to any order and
  ``vmap`` work; forward mode (``jax.jvp``, ``jax.hessian``) does not -- use ``"reference"``.
* ``"pallas"`` -- the same sort-by-expert form with the grouped matmuls as Pallas kernels
  (:func:`.pallas.dispatch_pallas`, :func:`.pallas.gmm_pallas`); compiled on a GPU, run in the
  Pallas interpreter elsewhere (slow: for tests). Reverse mode to any order works; forward mode
  does not -- use ``"reference"``.
* ``"tokamax"`` -- the ``"ragged"`` form with its grouped matmuls on the optional tokamax
  package's ``ragged_dot`` kernels (:mod:`.tokamax_ops`: Mosaic GPU, else Triton, on a GPU;
  its XLA implementation on the CPU), under the same wrappers, so reverse mode to any order
  and ``vmap`` work as for ``"ragged"``. Needs ``pip install -e '.[tokamax]'``. Under
  evaluation: ``"auto"`` never picks it (the GPU check times it against ``"pallas"`` and
  ``"ragged"``).
* ``"auto"`` -- ``"ragged"`` where ``jax.lax.ragged_dot`` exists, else ``"reference"``, unless
  the kernels are proven on this device kind and pass their one-time self-test
  (:mod:`kernels_pallas.selftest`: an allow-list, empty today, then a small dispatch compiled,
  run and compared with the dense reference, values and gradients, per JAX version, device
  kind, dtype, tile config and ``precision``); then ``"pallas"``. A failed self-test falls
  back with one warning.

Every call reports what it resolved to, and why, to :func:`kernels_pallas.selftest.record`
(written into each run's ``run_info.json``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import selftest
from kernels_pallas.moe_dispatch import tokamax_ops
from kernels_pallas.moe_dispatch.pallas import GmmConfig, dispatch_pallas, tiles_for
from kernels_pallas.moe_dispatch.reference import dispatch_dense, dispatch_ragged
from kernels_pallas.moe_dispatch.routing import (
    DROP_PRIORITIES,
    assign_slots,
    capacity,
    top_k_routing,
)

BACKENDS = ("reference", "ragged", "pallas", "tokamax", "auto")
KERNEL = "moe_dispatch"  # its name in kernels_pallas.selftest


class DispatchResult(NamedTuple):
    """What :func:`moe_dispatch` returns.

    Attributes:
        out: (T, D) the combined expert outputs, in ``x``'s dtype.
        expert_counts: (E,) int32 assignments each expert processed (after dropping).
        dropped: (T, K) bool, routed assignments dropped for capacity.
        expert_ids: (T, K) int32 the routing used.
        gates: (T, K) the combine weights used (dropped assignments included).
    """

    out: jax.Array
    expert_counts: jax.Array
    dropped: jax.Array
    expert_ids: jax.Array
    gates: jax.Array


def ragged_dot_available() -> bool:
    """Whether the installed JAX has ``jax.lax.ragged_dot`` and ``ragged_dot_general``."""
    return all(
        hasattr(jax.lax, name)
        for name in ("ragged_dot", "ragged_dot_general", "RaggedDotDimensionNumbers")
    )


def _self_test(dtype, config: GmmConfig | None, precision) -> None:
    """The Pallas dispatch against the dense reference on a small dropless top-2 case (every
    tile at least 16 wide, one expert left empty): outputs and gradients wrt x, the three
    weights and the gates. Raises :class:`kernels_pallas.selftest.SelfTestError` on a failure."""
    rng = np.random.default_rng(0)
    tokens, dim, hidden, experts, top_k = 48, 32, 64, 4, 2

    def draw(shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    # Routing in NumPy (this may run while a caller's function is traced): each token's top 2
    # of experts 0-2 (expert 3 stays empty), softmax gates, all kept, ranks in flat order.
    logits = rng.standard_normal((tokens, experts)).astype(np.float32)
    logits[:, 3] = -np.inf
    expert_ids = np.argsort(-logits, axis=1, kind="stable")[:, :top_k].astype(np.int32)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    gates = np.take_along_axis(probs, expert_ids, axis=1)
    keep = np.ones((tokens, top_k), bool)
    flat = expert_ids.reshape(-1)
    position = np.array([np.sum(flat[:i] == e) for i, e in enumerate(flat)], np.int32)
    position = position.reshape(tokens, top_k)
    args = (draw((tokens, dim)), draw((experts, dim, hidden), dim**-0.5))
    args += (draw((experts, dim, hidden), dim**-0.5), draw((experts, hidden, dim), hidden**-0.5))
    weights = rng.standard_normal((tokens, dim)).astype(np.float32)

    def loss(dispatch):
        def total(x, w_gate, w_up, w_down, gates):
            out = dispatch(x, w_gate, w_up, w_down, expert_ids, gates, keep)
            return jnp.sum(out.astype(jnp.float32) * weights), out

        return jax.value_and_grad(total, argnums=(0, 1, 2, 3, 4), has_aux=True)

    kernel = functools.partial(dispatch_pallas, precision=precision, config=config)

    def dense(*a):
        return dispatch_dense(*a, position, tokens, precision)

    got = selftest.run_compiled(loss(kernel), *args, gates)
    want = selftest.run_compiled(loss(dense), *args, gates)
    names = ("loss", "out", "dx", "dw_gate", "dw_up", "dw_down", "dgates")
    selftest.check_close(names, got, want, dtype)


def self_test(dtype=jnp.float32, precision=None) -> None:
    """Run the Pallas dispatch's self-test now (default tiles), whatever the allow-list says:
    what a GPU check reports before a device kind is added to
    :data:`kernels_pallas.selftest.PROVEN`.

    Raises:
        kernels_pallas.selftest.SelfTestError: the kernel failed (the message says where).
    """
    _self_test(jnp.dtype(dtype), None, precision)


def _tiles(dtype) -> dict[str, GmmConfig]:
    """The tiles each product of the Pallas dispatch uses here (``config=None``)."""
    return {product: tiles_for(product, dtype) for product in ("gmm", "tgmm")}


def _resolve(backend: str, dtype, precision) -> tuple[str, str]:
    """``(concrete backend, why)``; raises as :func:`resolve_backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("ragged", "tokamax") and not ragged_dot_available():
        raise RuntimeError(
            f"backend={backend!r} needs jax.lax.ragged_dot, which JAX {jax.__version__} lacks; "
            "upgrade JAX or use backend='reference' (or 'auto')"
        )
    if backend == "tokamax":
        tokamax_ops.load()  # raises ImportError naming the extra
    if backend != "auto":
        return backend, "asked for"
    config = (_tiles(dtype), precision)
    test = functools.partial(_self_test, dtype, None, precision)
    use_kernel, reason = selftest.verdict(KERNEL, test, dtype=dtype, config=config)
    if use_kernel:
        return "pallas", reason
    return ("ragged" if ragged_dot_available() else "reference"), reason


def resolve_backend(backend: str, *, dtype=jnp.float32, precision=None) -> str:
    """The concrete backend ``backend`` stands for on this installation, for ``dtype`` inputs.

    ``"auto"`` may run the kernels' one-time self-test (see the module docstring).

    Raises:
        ValueError: unknown ``backend``.
        RuntimeError: ``"ragged"`` or ``"tokamax"`` asked for and ``jax.lax.ragged_dot`` is
            missing.
        ImportError: ``"tokamax"`` asked for and the tokamax package is not installed.
    """
    return _resolve(backend, jnp.dtype(dtype), precision)[0]


def _check_float(name: str, a) -> None:
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
        raise ValueError(f"{name} must be a real floating array, got dtype {jnp.result_type(a)}")


def _check_shape(name: str, a, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(jnp.shape(a)) != expected:
        raise ValueError(f"{name} must have shape {meaning} = {expected}, got {jnp.shape(a)}")


def _validate_weights(x, w_gate, w_up, w_down) -> tuple[int, int, int, int]:
    _check_float("x", x)
    if jnp.ndim(x) != 2:
        raise ValueError(f"x must have shape (T, D), got {jnp.shape(x)}")
    num_tokens, dim = jnp.shape(x)
    if num_tokens < 1:
        raise ValueError(f"x must hold at least one token, got shape {jnp.shape(x)}")
    _check_float("w_gate", w_gate)
    if jnp.ndim(w_gate) != 3 or jnp.shape(w_gate)[1] != dim:
        raise ValueError(
            f"w_gate must have shape (E, D, F) with D = {dim}, got {jnp.shape(w_gate)}"
        )
    num_experts, _, hidden = jnp.shape(w_gate)
    _check_float("w_up", w_up)
    _check_shape("w_up", w_up, (num_experts, dim, hidden), "(E, D, F)")
    _check_float("w_down", w_down)
    _check_shape("w_down", w_down, (num_experts, hidden, dim), "(E, F, D)")
    return num_tokens, dim, num_experts, hidden


def moe_dispatch(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    router_logits: jax.Array | None = None,
    *,
    expert_ids: jax.Array | None = None,
    gates: jax.Array | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
    capacity_factor: float | None = None,
    drop_priority: str = "score",
    backend: str = "reference",
    precision=None,
) -> DispatchResult:
    """Route T tokens to E SwiGLU experts and combine the gate-weighted outputs.

    y_t = Σ_k keep_t,k · g_t,k · (silu(x_t W_gate[e]) ⊙ x_t W_up[e]) W_down[e],  e = S_t,k.

    Routing comes either from ``router_logits`` (softmax, then top-k; see
    :func:`.routing.top_k_routing`) or ready-made as ``expert_ids`` and ``gates``. Capacity
    C = min(T, ceil(capacity_factor·T·K/E)); ``capacity_factor=None`` is dropless. Over
    capacity, the assignments of lowest priority are dropped (``drop_priority``: ``"score"``
    keeps the largest gates, ``"position"`` keeps first choices before second choices, each
    in token order; see :mod:`.routing`). Assignments with gate exactly 0 are not routed.

    Shapes: x (T, D); w_gate, w_up (E, D, F); w_down (E, F, D); router_logits (T, E) or
    expert_ids (T, K) integer and gates (T, K) -> :class:`DispatchResult`.

    Gradients flow to ``x``, the weights and the gates (and through them to
    ``router_logits``); the choice of experts and the drops are discrete.

    Args:
        x: token activations.
        w_gate, w_up, w_down: the stacked SwiGLU weights of the E experts.
        router_logits: router scores; give these or ``expert_ids`` + ``gates``.
        expert_ids: chosen experts, with ``gates``, instead of ``router_logits``.
        gates: combine weights of ``expert_ids``.
        top_k: K; required with ``router_logits``, optional (checked) with ``expert_ids``.
        renormalize: with ``router_logits``, renormalise each token's K gates to sum to 1.
        capacity_factor: c > 0, or None for dropless.
        drop_priority: ``"score"`` or ``"position"``.
        backend: ``"reference"``, ``"ragged"``, ``"pallas"``, ``"tokamax"`` or ``"auto"`` (see
            the module docstring).
        precision: passed to every matmul.

    Returns:
        A :class:`DispatchResult`.

    Raises:
        ValueError: an argument has the wrong shape or dtype (the message names it), both or
            neither routing form is given, or ``top_k``, ``capacity_factor``,
            ``drop_priority`` or ``backend`` is invalid.
        RuntimeError: ``backend="ragged"`` or ``"tokamax"`` on a JAX without
            ``jax.lax.ragged_dot``.
        ImportError: ``backend="tokamax"`` and the tokamax package is not installed.

    Example:
        >>> res = moe_dispatch(x, wg, wu, wd, x @ w_router, top_k=2, capacity_factor=1.25)
        >>> res.out, res.expert_counts
    """
    num_tokens, _, num_experts, _ = _validate_weights(x, w_gate, w_up, w_down)
    if drop_priority not in DROP_PRIORITIES:
        raise ValueError(f"drop_priority must be one of {DROP_PRIORITIES}, got {drop_priority!r}")
    dtype = jnp.dtype(jnp.result_type(x, w_gate, w_up, w_down))
    concrete, reason = _resolve(backend, dtype, precision)
    if concrete == "tokamax":
        config = {"tokamax": tokamax_ops.version(), "implementation": tokamax_ops.implementation()}
    else:
        config = _tiles(dtype)
    selftest.record(
        KERNEL, backend, concrete, reason, dtype=dtype.name, config=config, precision=precision
    )
    if router_logits is not None:
        if expert_ids is not None or gates is not None:
            raise ValueError("give router_logits or (expert_ids, gates), not both")
        if top_k is None:
            raise ValueError("top_k is required with router_logits")
        _check_shape("router_logits", router_logits, (num_tokens, num_experts), "(T, E)")
        routing = top_k_routing(router_logits, top_k, renormalize=renormalize)
        expert_ids, gates = routing.expert_ids, routing.gates
    else:
        if expert_ids is None or gates is None:
            raise ValueError("give router_logits, or both expert_ids and gates")
        if not jnp.issubdtype(jnp.result_type(expert_ids), jnp.integer):
            raise ValueError(f"expert_ids must be integers, got {jnp.result_type(expert_ids)}")
        if jnp.ndim(expert_ids) != 2 or jnp.shape(expert_ids)[0] != num_tokens:
            raise ValueError(
                f"expert_ids must have shape (T, K) with T = {num_tokens}, "
                f"got {jnp.shape(expert_ids)}"
            )
        k = jnp.shape(expert_ids)[1]
        if top_k is not None and top_k != k:
            raise ValueError(f"top_k={top_k} but expert_ids has K = {k} columns")
        if not 1 <= k <= num_experts:
            raise ValueError(f"expert_ids must have 1 <= K <= E = {num_experts}, got K = {k}")
        _check_float("gates", gates)
        _check_shape("gates", gates, (num_tokens, k), "(T, K)")
        expert_ids = expert_ids.astype(jnp.int32)
    k = jnp.shape(expert_ids)[1]
    cap = capacity(num_tokens, num_experts, k, capacity_factor)
    slots = assign_slots(expert_ids, gates, num_experts, cap, drop_priority)
    if concrete == "ragged":
        out = dispatch_ragged(x, w_gate, w_up, w_down, expert_ids, gates, slots.keep, precision)
    elif concrete == "pallas":
        out = dispatch_pallas(x, w_gate, w_up, w_down, expert_ids, gates, slots.keep, precision)
    elif concrete == "tokamax":
        impl = tokamax_ops.implementation()
        out = dispatch_ragged(
            x, w_gate, w_up, w_down, expert_ids, gates, slots.keep, precision, impl
        )
    else:
        out = dispatch_dense(
            x, w_gate, w_up, w_down, expert_ids, gates, slots.keep, slots.position, cap, precision
        )
    routed = jax.lax.stop_gradient(gates) > 0
    counts = jnp.zeros((num_experts,), jnp.int32).at[expert_ids].add(slots.keep.astype(jnp.int32))
    return DispatchResult(out, counts, routed & ~slots.keep, expert_ids, gates)
