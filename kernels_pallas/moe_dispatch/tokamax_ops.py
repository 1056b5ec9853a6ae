"""The grouped-matmul primitives of the optional ``tokamax`` package (backend ``"tokamax"``).

tokamax (github.com/openxla/tokamax) is a maintained Pallas kernel library; its
``tokamax.ragged_dot`` / ``ragged_dot_general`` have the API of ``jax.lax.ragged_dot`` and
several implementations: ``"mosaic"`` (Pallas Mosaic GPU kernels for Hopper and Blackwell, or
Mosaic TPU), ``"triton"`` (Pallas Triton) and ``"xla"`` (``jax.lax.ragged_dot_general``).
Given a sequence, it uses the first that does not refuse the call (``NotImplementedError``).

Here they replace ``jax.lax.ragged_dot`` as the raw products inside :mod:`.grouped`, whose
``custom_vjp`` and ``custom_vmap`` wrappers are kept: tokamax's own ``ragged_dot`` (0.0.12 on
JAX 0.10) refuses ``vmap`` with shared weights ("ragged_dot vmap over any dim but 0 - NYI") and
a second derivative ("Linearization failed"), which :mod:`.grouped` provides. Every product
-- forward, and both products of each backward -- then runs on tokamax's kernels.

The implementation follows the device (:func:`implementation`): the kernels on a GPU or TPU,
with no silent fallback to XLA there (that is backend ``"ragged"``); XLA on the CPU, where
tokamax has no kernel. tokamax is imported only when this backend is used; it is the
``tokamax`` extra of the project (``pip install -e '.[tokamax]'``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import sys

import jax

EXTRA = "tokamax"  # the optional dependency group in pyproject.toml
_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)
# tokamax implementations by JAX platform, in the order tried; anything else gets ("xla",).
_BY_PLATFORM = {"gpu": ("mosaic", "triton"), "cuda": ("mosaic", "triton"), "tpu": ("mosaic",)}


def available() -> bool:
    """Whether the ``tokamax`` package is installed (without importing it)."""
    return importlib.util.find_spec("tokamax") is not None


def load():
    """The ``tokamax`` module. Raises ImportError (one line, naming the extra) if missing."""
    if not available():
        raise ImportError(
            "backend='tokamax' needs the optional package tokamax: "
            f"pip install -e '.[{EXTRA}]' (or pip install tokamax)"
        )
    tokamax = importlib.import_module("tokamax")
    # tokamax 0.0.12 reads its options from absl flags and, on first use, parses all of
    # sys.argv with them, which fails in any program with a command line of its own (pytest,
    # argparse: "UnrecognizedFlagError"). As tokamax's later releases do, give absl only the
    # --tokamax_* arguments (all of sys.argv, even known_only, lets absl's own -v eat the next
    # argument), unless someone has parsed the flags already.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        ours = [a for a in sys.argv[1:] if a.startswith("--tokamax_")]
        flags.FLAGS([sys.argv[0] if sys.argv else "python", *ours], known_only=True)
    return tokamax


def version() -> str:
    """The installed tokamax version (``"absent"`` when it is not installed)."""
    if not available():
        return "absent"
    return importlib.metadata.version("tokamax")


def implementation(platform: str | None = None) -> tuple[str, ...]:
    """The tokamax implementations tried, in order, on ``platform`` (default: JAX's default
    backend): ``("mosaic", "triton")`` on a GPU, ``("mosaic",)`` on a TPU, else ``("xla",)``."""
    return _BY_PLATFORM.get(platform or jax.default_backend(), ("xla",))


@functools.cache
def products(precision, impl: tuple[str, ...]) -> tuple:
    """``(raw_gmm, raw_tgmm)`` on tokamax with implementations ``impl``, for one ``precision``.

    raw_gmm(lhs (M, K), rhs (G, K, N), sizes (G,)) -> (M, N); raw_tgmm(lhs (M, K), rhs (M, N),
    sizes (G,)) -> (G, K, N): the products of :mod:`.grouped`, undifferentiated.
    """
    tokamax = load()

    def raw_gmm(lhs, rhs, sizes):
        return tokamax.ragged_dot(lhs, rhs, sizes, precision=precision, implementation=impl)

    def raw_tgmm(lhs, rhs, sizes):
        return tokamax.ragged_dot_general(
            lhs, rhs, sizes, _TGMM_DIMS, precision=precision, implementation=impl
        )

    return raw_gmm, raw_tgmm


def accepted(product: str, lhs, rhs, sizes, precision=None, impl=None) -> str | None:
    """Which of ``impl`` (default :func:`implementation`) tokamax runs for one product, or None.

    ``product`` is ``"gmm"`` or ``"tgmm"`` (operands as in :func:`products`); the first
    implementation that does not refuse the call (``NotImplementedError``: an unsupported
    device, dtype, ``precision`` or layout) when traced abstractly (nothing runs) is the one
    tokamax uses. What a benchmark reports beside a tokamax timing.
    """
    if product not in ("gmm", "tgmm"):
        raise ValueError(f"product must be 'gmm' or 'tgmm', got {product!r}")
    for name in impl or implementation():
        raw = products(precision, (name,))[0 if product == "gmm" else 1]
        try:
            jax.eval_shape(raw, lhs, rhs, sizes)
        except NotImplementedError:
            continue
        return name
    return None
