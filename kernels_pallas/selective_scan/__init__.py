"""Selective scan (Mamba S6): the public function and its pure-``jnp`` forms.

Modules: :mod:`.api` (the public :func:`selective_scan`, input checks, backend choice),
:mod:`.reference` (the ``lax.scan`` and ``lax.associative_scan`` forms, math in comments) and
:mod:`.lean` (the chunk-recomputing ``custom_vjp`` of the ``lax.scan`` form). The Pallas kernel
(backend ``"pallas"``) arrives with its own issue.
"""

from kernels_pallas.selective_scan.api import BACKENDS, DEFAULT_CHUNK_SIZE, selective_scan
from kernels_pallas.selective_scan.reference import (
    selective_scan_associative,
    selective_scan_scan,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "selective_scan",
    "selective_scan_associative",
    "selective_scan_scan",
]
