"""GPU benchmark of the selective-scan kernel against its ``jnp`` forms, with a measured floor.

What it measures. For each size (B, L, D, N) of a sweep (default B = 8, N = 16, D in
{1024, 2048, 4096}, L in {1K, 4K, 16K}), the median wall time of a jitted

* forward: ``selective_scan(..., return_last_state=True)`` with D skip, z gate, delta bias and
  softplus (Mamba's configuration), and
* forward+backward: ``jax.vjp`` of the same and its VJP for every input,

for the backends: ``pallas`` (the fused kernel; backward = the ``jnp`` lean backward),
``pallas_bwd`` (the same kernel with the kernel backward, ``PallasConfig(backward_kernel=True)``;
not in the default sweep), ``scan`` (the ``lax.scan`` reference with its lean ``custom_vjp``) and
``associative`` (``lax.associative_scan``, O(B·L·D·N) memory: skipped above ``--assoc-max``
elements).

The floor. Two ceilings of the device are measured in the same run: the copy bandwidth (a jitted
``a + 1`` over a large array: bytes read + written / time) and the special-function rate (a
fused chain of ``timing.EXP_CHAIN`` ``jnp.exp`` per element: exponentials / time). The
floor of a pass is max(bytes / bandwidth, exponentials / rate) with

* forward: each input read once (x, Δ, z: B·L·D; B, C: B·L·N; A: D·N; D, bias: D) and each
  output written once (out: B·L·D; last state: B·D·N in float32); B·L·D·N exponentials;
* forward+backward: the forward, then the backward reading the inputs and the output cotangent
  and writing one gradient per input; 2·B·L·D·N exponentials (one recomputation of the states,
  as Mamba's CUDA kernel does).

Reported per row: time, effective bandwidth (floor bytes / time), time / floor, and for
``pallas`` and ``associative`` the largest relative error against ``scan``'s over the outputs
(forward: the output and the last state) or the gradients (forward+backward: one per input). A
backend that fails (a kernel that does not lower, memory) is reported as failed and the sweep
goes on. The issue's target for the kernel's forward is within 1.5× of the floor.

Reproduce (repository root; on a GPU machine, where the kernel is compiled)::

    python -m experiments.bench.kernels [--write]
    python -m experiments.bench.kernels --dims 1024 --lengths 1024,4096 --backends pallas,scan

On the CPU, ``--smoke`` runs tiny sizes with the kernel in Pallas interpret mode, to check that
the script runs (its numbers mean nothing). ``--write`` replaces the section between
``<!-- kernels_selective_scan:start -->`` and ``<!-- kernels_selective_scan:end -->`` of
``BENCHMARKS.md``. Imports only the standard library, jax, numpy, ``kernels_pallas`` and
:mod:`experiments.report` (itself standard library only): the GPU machines lack the project's
other dependencies.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import report
from experiments.bench.timing import (
    copy_bandwidth,
    exp_rate,
    kernel_bench_main,
    rel_err,
    time_or_reason,
)
from kernels_pallas.selective_scan import PallasConfig, selective_scan

SECTION = "kernels_selective_scan"
BENCHMARKS = report.BENCHMARKS
BACKENDS = {
    "pallas": "pallas",
    "pallas_bwd": "pallas",  # the kernel with its kernel backward (PallasConfig.backward_kernel)
    "scan": "reference",
    "associative": "associative",
}
CONFIGS = {"pallas_bwd": PallasConfig(backward_kernel=True)}


def make_inputs(batch, length, dim, state, dtype, seed=0):
    """Mamba-like inputs: (x, delta, A, B, C, D, z, delta_bias), made on the device."""
    keys = jax.random.split(jax.random.key(seed), 8)
    seq = (batch, length, dim)
    normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
    x = normal(keys[0], seq).astype(dtype)
    delta = normal(keys[1], seq).astype(dtype)
    A = -jnp.exp(0.5 * normal(keys[2], (dim, state)))
    B = normal(keys[3], (batch, length, state)).astype(dtype)
    C = normal(keys[4], (batch, length, state)).astype(dtype)
    D = normal(keys[5], (dim,))
    z = normal(keys[6], seq).astype(dtype)
    bias = normal(keys[7], (dim,)) - 2.0  # softplus(-2 + N(0, 1)): Δ ≈ 0.1, as in Mamba
    return x, delta, A, B, C, D, z, bias


def scan_fn(backend):
    def fn(x, delta, A, B, C, D, z, bias):
        return selective_scan(
            x,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias=bias,
            delta_softplus=True,
            backend=BACKENDS[backend],
            return_last_state=True,
            pallas_config=CONFIGS.get(backend),
        )

    return fn


def pass_fns(backend):
    """Jitted (forward, forward+backward) of one backend."""
    fn = scan_fn(backend)
    forward = jax.jit(lambda args: fn(*args))

    def forward_backward(args, cotangents):
        _, vjp = jax.vjp(fn, *args)
        return vjp(cotangents)

    return forward, jax.jit(forward_backward)


def floor_work(batch, length, dim, state, itemsize):
    """(bytes, exponentials) of the forward and of forward+backward, as the docstring says."""
    seq, per_step = batch * length * dim, batch * length * state
    params = dim * state * 4 + 2 * dim * 4  # A, D, bias in float32
    reads = 3 * seq * itemsize + 2 * per_step * itemsize + params  # x, delta, z, B, C
    writes = seq * itemsize + batch * dim * state * 4  # out, last state
    forward = reads + writes
    backward = reads + writes + reads  # inputs + cotangents in, one gradient per input out
    exps = batch * length * dim * state
    return {"fwd": (forward, exps), "fwd+bwd": (forward + backward, 2 * exps)}


def run(args) -> tuple[str, list[dict]]:
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    bandwidth = copy_bandwidth(args.copy_bytes, args.repeats)
    rate = exp_rate(args.exp_elements, args.repeats)
    rows = []
    for dim in args.dims:
        for length in args.lengths:
            size = (args.batch, length, dim, args.state)
            inputs = make_inputs(*size, dtype)
            outputs = jax.eval_shape(scan_fn("scan"), *inputs)
            cotangents = tuple(jnp.ones(o.shape, o.dtype) for o in outputs)
            work = floor_work(*size, dtype.itemsize)
            expected = {}  # the scan's results per pass, to check the others against
            for backend in sorted(args.backends, key=lambda b: b != "scan"):
                too_big = backend == "associative" and np.prod(size) > args.assoc_max
                forward, forward_backward = pass_fns(backend)
                for name, fn, fn_args in (
                    ("fwd", forward, (inputs,)),
                    ("fwd+bwd", forward_backward, (inputs, cotangents)),
                ):
                    num_bytes, exps = work[name]
                    if too_big:
                        seconds, result, status = None, None, "skipped (memory)"
                    else:
                        seconds, result, status = time_or_reason(fn, fn_args, args.repeats)
                    error = None
                    if result is not None:
                        leaves = [
                            np.asarray(a.astype(jnp.float32)) for a in jax.tree.leaves(result)
                        ]
                        if backend == "scan":
                            expected[name] = leaves
                        elif name in expected:
                            pairs = zip(leaves, expected[name], strict=True)
                            error = max(rel_err(a, b) for a, b in pairs)
                    rows.append(
                        {
                            "size": size,
                            "pass": name,
                            "backend": backend,
                            "seconds": seconds,
                            "status": status,
                            "error": error,
                            "bytes": num_bytes,
                            "floor": max(num_bytes / bandwidth, exps / rate),
                            "bound": "mem" if num_bytes / bandwidth >= exps / rate else "exp",
                        }
                    )
                    _print_row(rows[-1])
    header = (
        f"Device: {device.platform} ({device.device_kind}); JAX {jax.__version__}; "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}; "
        f"dtype {dtype.name}. Measured in this run: copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"exp rate {rate / 1e9:.1f} G/s. Error: the largest ‖a − a_scan‖ / ‖a_scan‖ over the "
        "outputs (fwd) or the input gradients (fwd+bwd)."
    )
    return header, rows


def _print_row(row) -> None:
    seconds = row["seconds"]
    shown = row["status"] if seconds is None else f"{seconds * 1e3:.3f} ms"
    print(f"  {row['size']} {row['pass']:8s} {row['backend']:12s} {shown}", file=sys.stderr)


def markdown(header: str, rows: list[dict], command: str, smoke: bool) -> str:
    lines = [
        "## Selective scan: Pallas kernel vs `lax.scan` vs `lax.associative_scan`"
        + (" (smoke run: tiny sizes, interpret mode; the numbers mean nothing)" if smoke else ""),
        "",
        header,
        f"Command: `{command}`.",
        "",
        "| B | L | D | N | pass | backend | time (ms) | eff. GB/s | floor (ms) | bound | × floor "
        "| error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        batch, length, dim, state = row["size"]
        floor_ms = f"{row['floor'] * 1e3:.3f}"
        error = "–" if row["error"] is None else f"{row['error']:.1e}"
        if row["seconds"] is None:
            cells = [row["status"], "–", floor_ms, row["bound"], "–", error]
        else:
            cells = [
                f"{row['seconds'] * 1e3:.3f}",
                f"{row['bytes'] / row['seconds'] / 1e9:.1f}",
                floor_ms,
                row["bound"],
                f"{row['seconds'] / row['floor']:.2f}",
                error,
            ]
        cells = [batch, length, dim, state, row["pass"], row["backend"], *cells]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, interpret mode)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dims", type=_ints, default=[1024, 2048, 4096], help="D values")
    parser.add_argument("--lengths", type=_ints, default=[1024, 4096, 16384], help="L values")
    parser.add_argument("--state", type=int, default=16, help="N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backends", default="pallas,scan,associative")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--assoc-max", type=float, default=2**29, help="max B·L·D·N elements")
    parser.add_argument("--copy-bytes", type=int, default=1 << 30)
    parser.add_argument("--exp-elements", type=int, default=1 << 24)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--benchmarks", type=pathlib.Path, default=BENCHMARKS)
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {sorted(BACKENDS)}")
    if args.smoke and args.write and args.benchmarks == BENCHMARKS:
        parser.error("--smoke numbers mean nothing: --write them only to another --benchmarks")
    if args.smoke:
        args.batch, args.dims, args.lengths, args.state = 1, [16], [24], 4
        args.repeats, args.copy_bytes, args.exp_elements = 2, 1 << 20, 1 << 14
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    kernel_bench_main("experiments.bench.kernels", SECTION, args, run, markdown)


if __name__ == "__main__":
    main()
