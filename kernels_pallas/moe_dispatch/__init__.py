"""Mixture-of-experts expert dispatch: the public function, routing helpers, jnp forms.

Modules: :mod:`.api` (the public :func:`moe_dispatch`, input checks, backend choice),
:mod:`.routing` (softmax-then-top-k, capacity, drop priority, the sort-by-expert permutation),
:mod:`.grouped` (grouped matmuls on ``ragged_dot`` that vmap and differentiate to any order)
and :mod:`.reference` (the dense capacity einsum, the ``ragged_dot`` grouped form, and the
plain loop over experts that tests compare against) and :mod:`.pallas` (the grouped matmuls as
Pallas kernels with their tile config :class:`GmmConfig` and ``custom_vjp``, backend
``"pallas"``) and :mod:`.tokamax_ops` (the optional tokamax package's ``ragged_dot`` kernels as
the grouped matmuls' primitives, backend ``"tokamax"``).
"""

from kernels_pallas.moe_dispatch.api import (
    BACKENDS,
    DispatchResult,
    moe_dispatch,
    ragged_dot_available,
    resolve_backend,
    self_test,
)
from kernels_pallas.moe_dispatch.grouped import gmm, tgmm
from kernels_pallas.moe_dispatch.pallas import (
    DEFAULT_CONFIG,
    GmmConfig,
    dispatch_pallas,
    gmm_kernel,
    gmm_pallas,
    smem_bytes,
    smem_limit_bytes,
    tgmm_kernel,
    tgmm_pallas,
    tiles_for,
)
from kernels_pallas.moe_dispatch.reference import (
    dispatch_dense,
    dispatch_loop,
    dispatch_ragged,
    loop_keep,
    swiglu,
)
from kernels_pallas.moe_dispatch.routing import (
    DROP_PRIORITIES,
    ExpertSort,
    Routing,
    Slots,
    assign_slots,
    capacity,
    priority_order,
    sort_by_expert,
    top_k_routing,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_CONFIG",
    "DROP_PRIORITIES",
    "DispatchResult",
    "GmmConfig",
    "ExpertSort",
    "Routing",
    "Slots",
    "assign_slots",
    "capacity",
    "dispatch_dense",
    "dispatch_loop",
    "dispatch_pallas",
    "dispatch_ragged",
    "gmm",
    "gmm_kernel",
    "gmm_pallas",
    "loop_keep",
    "moe_dispatch",
    "priority_order",
    "ragged_dot_available",
    "resolve_backend",
    "self_test",
    "smem_bytes",
    "smem_limit_bytes",
    "sort_by_expert",
    "swiglu",
    "tgmm",
    "tgmm_kernel",
    "tgmm_pallas",
    "tiles_for",
    "top_k_routing",
]
