"""Selective scan (Mamba S6): the public function, its pure-``jnp`` forms and its Pallas kernel.

Modules: :mod:`.api` (the public :func:`selective_scan`, input checks, backend choice),
:mod:`.reference` (the ``lax.scan`` and ``lax.associative_scan`` forms, math in comments),
:mod:`.lean` (the chunk-recomputing ``custom_vjp`` of the ``lax.scan`` form) and :mod:`.pallas`
(the fused Pallas kernel, backend ``"pallas"``, with its block-size config :class:`PallasConfig`
and its ``custom_vjp`` whose backward is the lean ``jnp`` one, or with
``PallasConfig(backward_kernel=True)`` the backward kernels of :mod:`.pallas_bwd`).
"""

from kernels_pallas.selective_scan.api import (
    BACKENDS,
    resolve_backend,
    selective_scan,
    self_test,
)
from kernels_pallas.selective_scan.lean import auto_chunk_size
from kernels_pallas.selective_scan.pallas import (
    DEFAULT_CONFIG,
    PallasConfig,
    pallas_scan,
    selective_scan_kernel,
)
from kernels_pallas.selective_scan.reference import (
    selective_scan_associative,
    selective_scan_scan,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_CONFIG",
    "auto_chunk_size",
    "PallasConfig",
    "pallas_scan",
    "resolve_backend",
    "selective_scan",
    "selective_scan_associative",
    "selective_scan_kernel",
    "selective_scan_scan",
    "self_test",
]
