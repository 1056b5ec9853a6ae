"""When ``backend="auto"`` may run a Pallas kernel, and what every call resolved to.

Why: the kernels have run only in the Pallas interpreter, and a Pallas GPU lowering can fail on
a card, a JAX version or a block config nobody has tried (an unlisted device, shared memory
exhausted, a tile the compiler rejects). ``"auto"`` must never turn such a failure into a
crashed run. So ``"auto"`` uses a kernel only when

1. the device kind (``jax.local_devices()[0].device_kind``) lists the kernel in
   :data:`PROVEN`, an explicit allow-list (empty until a GPU check proves a kernel there;
   every other device gets the ``jnp`` path silently, no self-test), and
2. the kernel's self-test passes: on first use per (kernel, JAX version, device kind, dtype,
   block config) the kernel is lowered, compiled and run on a small case and compared with
   its ``jnp`` reference (:func:`run_compiled`, :func:`check_close`). Any failure -- an
   exception while lowering, compiling or running, or a mismatch -- sends ``"auto"`` to the
   ``jnp`` path with one :class:`KernelFallbackWarning` naming the reason. The verdict is
   cached for the process: the self-test and the warning happen once per key.

The self-test checks the kernel's code paths at a small size; it cannot see a failure that
only a user's larger shapes trigger (asking for ``backend="pallas"`` explicitly skips all of
this). The public functions report each resolution with :func:`record`; :func:`resolutions`
lists them, and :func:`metattt.runlog.write_run_info` writes the list into ``run_info.json``.
Calls made inside :func:`unrecorded` (timing every backend to choose one) are not listed: they
are not what the run ran.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# Device kind (exactly as ``jax.local_devices()[0].device_kind`` prints it) -> the kernels
# proven there. Empty: no kernel has yet run on a GPU. A GPU check adds an entry: on the
# device, run the kernels' tests and checks against their references at realistic sizes (the
# GPU check of issue #14, ``pytest -m gpu tests/kernels_pallas``), record the figures with the
# device, date, JAX version and command in BENCHMARKS.md, then add e.g.
#     "NVIDIA H100 80GB HBM3": frozenset({"selective_scan", "moe_dispatch"}),
# Even a listed kernel still passes its self-test before "auto" uses it.
PROVEN: dict[str, frozenset[str]] = {}

# Largest relative error ||got - want|| / ||want|| a self-test accepts, by dtype. float32
# allows TF32 (the default precision of float32 dots on a GPU); a broken kernel is off by O(1).
TOLERANCE = {"float64": 1e-8, "float32": 5e-3, "float16": 1e-2, "bfloat16": 3e-2}


class KernelFallbackWarning(UserWarning):
    """``backend="auto"`` fell back to the ``jnp`` path because a kernel's self-test failed."""


class SelfTestError(Exception):
    """A self-test failed; the message is the reason (the phase and the error, or the mismatch)."""


_lock = threading.RLock()  # re-entrant: a self-test may resolve another kernel
_verdicts: dict[tuple[str, ...], str | None] = {}  # key -> None (passed) or the failure reason
_records: dict[tuple[str, ...], dict[str, str]] = {}
_local = threading.local()  # .unrecorded: depth of unrecorded() blocks on this thread


def device_kind() -> str:
    """The kind of this process's first device, e.g. ``"cpu"`` or ``"NVIDIA H100 80GB HBM3"``."""
    return jax.local_devices()[0].device_kind


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def run_compiled(fn: Callable, *args) -> Any:
    """``fn(*args)`` lowered, compiled and run ahead of time; outputs as NumPy arrays.

    Safe to call while a caller's function is being traced (the arguments are concrete): the
    compiled program runs at once. Raises :class:`SelfTestError` naming the phase that failed.
    """
    phase = "lowering"
    try:
        lowered = jax.jit(fn).lower(*args)
        phase = "compiling"
        compiled = lowered.compile()
        phase = "running"
        return jax.tree.map(np.asarray, jax.block_until_ready(compiled(*args)))
    except Exception as error:  # any failure of the kernel is a verdict, not a crash
        raise SelfTestError(f"{phase} failed: {_first_line(error)}") from error


def check_close(names: Sequence[str], got, want, dtype) -> None:
    """Raise :class:`SelfTestError` unless each leaf of ``got`` is within :data:`TOLERANCE`
    (relative Frobenius error, for ``dtype``) of the same leaf of ``want``."""
    tol = TOLERANCE.get(np.dtype(dtype).name, TOLERANCE["bfloat16"])
    for name, g, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = np.linalg.norm(g - w) / max(np.linalg.norm(w), np.finfo(np.float64).tiny)
        if not err <= tol:  # also catches NaN
            raise SelfTestError(f"mismatch: {name} relative error {err:.2e} > {tol:.0e}")


def verdict(kernel: str, self_test: Callable[[], None], *, dtype, config) -> tuple[bool, str]:
    """Whether ``"auto"`` may use ``kernel`` here, and why: ``(use_kernel, reason)``.

    ``self_test()`` raises on any failure; it runs at most once per (kernel, JAX version,
    device kind, ``dtype``, ``config``) in this process. A failure warns once
    (:class:`KernelFallbackWarning`) and is remembered.
    """
    kind = device_kind()
    if kernel not in PROVEN.get(kind, frozenset()):
        return False, f"the {kernel} kernel is not proven on {kind!r} (kernels_pallas.selftest)"
    key = (kernel, jax.__version__, kind, np.dtype(dtype).name, repr(config))
    with _lock:
        if key not in _verdicts:
            try:
                self_test()
                _verdicts[key] = None
            except Exception as error:  # the self-test's verdict: fall back, never crash
                reason = str(error) if isinstance(error, SelfTestError) else _first_line(error)
                _verdicts[key] = reason
                warnings.warn(
                    f"{kernel}: backend='auto' falls back to the jnp path on {kind!r} "
                    f"(jax {jax.__version__}, {key[3]}, {config}): the kernel's self-test "
                    f"failed: {reason}",
                    KernelFallbackWarning,
                    stacklevel=3,
                )
        failure = _verdicts[key]
    if failure is None:
        return True, f"proven on {kind!r}; its self-test passed"
    return False, f"self-test failed: {failure}"


def record(kernel: str, requested: str, backend: str, reason: str, **details: Any) -> None:
    """Note that a call of ``kernel`` asked for ``requested`` and ran ``backend``, and why
    (nothing inside :func:`unrecorded` on this thread)."""
    if getattr(_local, "unrecorded", 0):
        return
    entry = {
        "kernel": kernel,
        "requested": requested,
        "backend": backend,
        "reason": reason,
        "device_kind": device_kind(),
        "jax": jax.__version__,
        **{name: str(value) for name, value in details.items()},
    }
    with _lock:
        _records.setdefault(tuple(sorted(entry.items())), entry)


@contextlib.contextmanager
def unrecorded():
    """Calls on this thread inside the block are not recorded (:func:`record`): e.g. timing
    every backend to choose one for a run, which is not a resolution the run made. Verdicts
    (self-tests) are still cached."""
    _local.unrecorded = getattr(_local, "unrecorded", 0) + 1
    try:
        yield
    finally:
        _local.unrecorded -= 1


def resolutions() -> list[dict[str, str]]:
    """Every distinct resolution :func:`record` saw in this process, in first-seen order."""
    with _lock:
        return [dict(entry) for entry in _records.values()]


def reset() -> None:
    """Forget the verdicts and the records (tests; a process whose allow-list changed)."""
    with _lock:
        _verdicts.clear()
        _records.clear()
