"""Test-wide settings, set before jax loads: eight simulated CPU devices (for sharding tests),
cheap settings for XLA:CPU's code generation, and no persistent compilation cache.

Optimisation level 0 (``--xla_backend_optimization_level=0``) changes only how XLA's fused HLO
is turned into machine code, not the HLO passes (fusion, layout, algebraic simplification):
the programs the tests run are the programs users run, compiled without LLVM's expensive
passes. Nearly all of the suite's time is compiling tiny programs, and this cut its CPU time
by about a quarter (user time 20.4 -> 15.0 min, 2 workers, 2026-12-07). Results move only by
float rounding (e.g. fused multiply-adds, reduction order; ~1e-5 relative on the tiny runs),
which every tolerance already allows; a test that compares a run with a fixture frozen by
another compiled program uses a tolerance (``tests/experiments/compare.py``). An
``XLA_FLAGS`` of your own that names the level overrides it.

Two more code-generation settings, of the same kind: ``--xla_cpu_use_fusion_emitters=false``
emits each fusion with XLA:CPU's elemental IR emitter instead of its newer MLIR fusion emitters
(same fused HLO, same operations; the MLIR pipeline costs more to run than the kernels it
builds here), and ``--xla_cpu_parallel_codegen_split_count=1`` keeps the program's LLVM code in
one module instead of splitting it for parallel compilation (the test workers already use the
cores). Together they halved the CPU time of ``tests/metattt/test_perceiver.py`` and
``tests/attd/test_method.py`` (98.5 -> 47.4 s user) and of ``tests/metattt/test_inner.py``
(51.7 -> 21.1 s), cold cache, one worker, 2026-12-07. Each is left as you set it when your
``XLA_FLAGS`` names it.

No persistent compilation cache (JAX's ``JAX_COMPILATION_CACHE_DIR``): the suite compiles
thousands of small programs, and with a cache each one is keyed (its HLO serialised and hashed)
and every one over the threshold serialised and written; loading them back in the subprocesses
of the kill and two-process tests saved less than that cost. Measured from a cold start, idle,
2 workers, on the same clone, 2026-12-07: with a cache under ``.pytest_cache`` (threshold
0.2 s) 396 s wall and 734 s user CPU, without it 362 s and 637 s. Set the variable yourself to
use one.
"""

import os

_FLAGS = os.environ.get("XLA_FLAGS", "")
for _flag in (
    "xla_backend_optimization_level=0",
    "xla_cpu_use_fusion_emitters=false",
    "xla_cpu_parallel_codegen_split_count=1",
):
    if _flag.split("=")[0] not in _FLAGS:
        _FLAGS += f" --{_flag}"
os.environ["XLA_FLAGS"] = (_FLAGS + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("METATTT_NO_PROGRESS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# float32 comparisons with references are meant at float32: on a GPU, default-precision f32
# matmuls run as TF32 (10-bit mantissa) and would fail a 1e-5 tolerance for that reason alone.
# On the CPU this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def x64():
    """Float64 for the duration of one test (finite-difference checks)."""
    with jax.enable_x64(True):
        yield


def pytest_collection_modifyitems(config, items):
    """Files that hold slow end-to-end tests run first, in collection order otherwise (a
    stable sort; a file's tests stay together and in order). The workers take files from one
    queue (``--dist loadfile``), so a long file taken last leaves the other cores idle at the
    end; started first, the long files overlap with the many short ones. (xdist keeps this
    order only with ``--no-loadscope-reorder``, which ``make test`` passes; by default it
    queues the files with the most tests first, and so the one-test tutorials last.)"""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
