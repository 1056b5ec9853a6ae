"""Timing and device ceilings shared by the kernel benchmarks (standard library, jax, numpy only).

Medians of repeated calls after a warm-up, side-by-side timing that interleaves the contenders
(so load that comes and goes on a shared machine hits all of them alike), and the two device
ceilings the kernels are judged against: copy bandwidth and dense matmul rate (plus the
special-function rate for the scan).
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EXP_CHAIN = 64


def median_seconds(fn: Callable, *args, repeats: int) -> float:
    """Compile and warm up, then the median of ``repeats`` timed calls (outputs blocked on)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(calls: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each zero-argument call, timed round-robin after one warm-up each.

    ``calls`` must block until their work is done (``jax.block_until_ready`` or a framework's
    synchronous return). Interleaving makes the ratios between them fair on a noisy machine.
    """
    for call in calls:
        call()
    times = [[] for _ in calls]
    for _ in range(repeats):
        for slot, call in zip(times, calls, strict=True):
            start = time.perf_counter()
            call()
            slot.append(time.perf_counter() - start)
    return [statistics.median(slot) for slot in times]


def time_or_reason(fn: Callable, args: tuple, repeats: int):
    """(median seconds, first result, None), or (None, None, why it did not run): the error's
    type and the first line of its message (a lowering error, shared memory, device memory)."""
    try:
        result = fn(*args)
        return median_seconds(fn, *args, repeats=repeats), result, None
    except Exception as error:  # a kernel that does not lower, or memory: report, go on
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return None, None, f"failed: {type(error).__name__}: {(lines or [''])[0][:200]}"


def rel_err(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    actual, expected = (np.asarray(a, np.float64) for a in (actual, expected))
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """Bytes per second of a jitted ``a + 1`` over a float32 array of ``num_bytes`` bytes."""
    a = jnp.zeros((num_bytes // 4,), jnp.float32)
    seconds = median_seconds(jax.jit(lambda v: v + 1.0), a, repeats=repeats)
    return 2 * a.size * 4 / seconds


def exp_rate(num_elements: int, repeats: int) -> float:
    """Exponentials per second: a fused chain of EXP_CHAIN ``jnp.exp`` per float32 element
    (values stay in (0, 1]; memory traffic is 1/EXP_CHAIN of the work)."""

    def chain(v):
        for _ in range(EXP_CHAIN):
            v = jnp.exp(-v)
        return v

    a = jnp.linspace(0.0, 1.0, num_elements, dtype=jnp.float32)
    return EXP_CHAIN * num_elements / median_seconds(jax.jit(chain), a, repeats=repeats)


def matmul_rate(m: int, k: int, n: int, dtype, repeats: int) -> float:
    """FLOP/s of a jitted dense (m, k) @ (k, n) matmul in ``dtype`` (float32 accumulation)."""
    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(keys[1], (k, n), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype))
    return 2.0 * m * k * n / median_seconds(matmul, a, b, repeats=repeats)


def cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from ``/proc/stat`` (0 if absent).

    With ``time.process_time()`` before and after a timing loop it gives the share of the cores
    that other processes used meanwhile (a noisy-machine warning for CPU benchmarks).
    """
    try:
        fields = pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return 0.0, 0.0
    ticks = [int(f) for f in fields]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


def kernel_bench_main(module: str, section: str, args, run, markdown) -> None:
    """The shared ``main`` of the GPU kernel benchmarks: run the sweep, print the Markdown
    table, and with ``--write`` replace ``section`` of ``args.benchmarks``.

    ``run(args) -> (header, rows)`` and ``markdown(header, rows, command, smoke) -> str`` are
    the benchmark's own; ``module`` names it in the reproducing command.
    """
    from experiments import report  # standard library only

    command = f"python -m {module} " + " ".join(args.argv)
    if jax.default_backend() != "gpu" and not args.smoke:
        print("warning: no GPU; the kernels run in Pallas interpret mode", file=sys.stderr)
    header, rows = run(args)
    body = markdown(header, rows, command.strip(), args.smoke)
    print(body)
    if args.write:
        report.update_section(section, body, args.benchmarks)
        print(f"wrote section {section} of {args.benchmarks}", file=sys.stderr)
