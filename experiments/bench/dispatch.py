"""GPU benchmark of the MoE expert dispatch: grouped matmul kernels vs ``ragged_dot`` vs dense.

What it measures, for each size (E experts, T tokens, top-k, d_model D, expert width F) of a
sweep (default E in {8, 64}, top-2, T in {4K, 16K, 64K}, D in {1024, 4096}, F = D, bf16),
with the routing drawn once from random router logits (softmax then top-k, so the groups are
ragged and some may be empty):

* the grouped matmul itself, ``out[m] = lhs[m] · W[g(m)]`` over the T·k sorted rows, forward
  and forward+backward (VJP to both operands), for ``pallas`` (:func:`gmm_pallas`),
  ``ragged`` (:func:`gmm` on ``jax.lax.ragged_dot``) and, where the optional tokamax package
  is installed, ``tokamax`` (:func:`gmm` on ``tokamax.ragged_dot``: its Mosaic GPU kernel,
  else its Triton one; the "lowering" column names the implementation tokamax accepted for the
  forward product and for the weight-gradient product), against ``dense``: one plain matmul of
  the same (T·k, D) × (D, F) shape and FLOPs, timed in the same run. "% dense" is the dense
  time over the backend's time: the share of the dense bf16 matmul rate reached. The issue's
  target for the kernel is >= 85% (MegaBlocks reaches ~98% of cuBLAS).
* whether ``ragged_dot`` silently fell back to a dense padded matmul: the compiled program's
  FLOP count (XLA's cost analysis) over the useful FLOPs 2·T·k·D·F. A native grouped matmul
  is ~1×; the padded expansion (what XLA does on the CPU) is ~E×.
* the whole SwiGLU dispatch, :func:`moe_dispatch` forward and forward+backward (to x, the
  three weight stacks and the router logits) for ``pallas``, ``ragged``, ``tokamax`` (where
  installed) and ``reference``
  (the capacity-padded einsum, with the capacity set to the busiest expert's load so that
  nothing is dropped and all three compute the same function), with the error against
  ``ragged``'s (the largest relative error over the outputs, or over the gradients of the
  forward+backward; the grouped matmul's ``pallas`` and ``tokamax`` rows likewise). The
  einsum's one-hot dispatch tensor is T·k·E·C elements; sizes above ``--dense-max`` skip it
  (memory).

Reproduce (repository root; on a GPU machine, where the kernels are compiled)::

    python -m experiments.bench.dispatch [--write]
    python -m experiments.bench.dispatch --experts 8 --tokens 4096 --dims 1024

On the CPU, ``--smoke`` runs tiny sizes with the kernels in Pallas interpret mode, to check that
the script runs (its numbers mean nothing). ``--write`` replaces the marked section
``kernels_moe_dispatch`` of ``BENCHMARKS.md``. Imports only the standard library, jax, numpy,
``kernels_pallas`` and :mod:`experiments.report` / :mod:`experiments.bench.timing`: the GPU machines
lack the project's other dependencies.
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp

from experiments import report
from experiments.bench.timing import kernel_bench_main, matmul_rate, rel_err, time_or_reason
from kernels_pallas.moe_dispatch import (
    gmm,
    gmm_pallas,
    moe_dispatch,
    sort_by_expert,
    tokamax_ops,
    top_k_routing,
)

SECTION = "kernels_moe_dispatch"
BENCHMARKS = report.BENCHMARKS
GMM_BACKENDS = ("pallas", "ragged", "tokamax")
DISPATCH_BACKENDS = ("pallas", "ragged", "tokamax", "reference")
COMPARED = ("pallas", "tokamax")  # rows whose error is taken against ragged's


def available(backends: tuple[str, ...]) -> tuple[str, ...]:
    """``backends`` less ``tokamax`` where the tokamax package is not installed."""
    return tuple(b for b in backends if b != "tokamax" or tokamax_ops.available())


def make_inputs(experts, tokens, top_k, dim, ffn, dtype, seed=0):
    """Tokens, SwiGLU weight stacks (scaled so activations stay O(1)) and router logits."""
    keys = jax.random.split(jax.random.key(seed), 5)
    normal = lambda k, shape, scale: (scale * jax.random.normal(k, shape, jnp.float32)).astype(
        dtype
    )
    x = normal(keys[0], (tokens, dim), 1.0)
    w_gate = normal(keys[1], (experts, dim, ffn), dim**-0.5)
    w_up = normal(keys[2], (experts, dim, ffn), dim**-0.5)
    w_down = normal(keys[3], (experts, ffn, dim), ffn**-0.5)
    logits = jax.random.normal(keys[4], (tokens, experts), jnp.float32)
    return x, w_gate, w_up, w_down, logits


def grouped_operands(x, w_gate, logits, top_k):
    """(lhs, rhs, group_sizes) of the first grouped matmul: the T·k rows sorted by expert."""
    routing = top_k_routing(logits, top_k)
    experts = w_gate.shape[0]
    sort = sort_by_expert(routing.expert_ids, experts)
    rows = jnp.repeat(x, top_k, axis=0)[sort.order]
    return rows, w_gate, sort.group_sizes


def gmm_fns(backend):
    """Jitted (forward, forward+backward) of one grouped-matmul backend; ``dense`` ignores the
    groups and multiplies every row by the first expert's matrix (same shape and FLOPs)."""
    if backend == "pallas":
        fn = gmm_pallas
    elif backend == "ragged":
        fn = gmm
    elif backend == "tokamax":
        impl = tokamax_ops.implementation()
        fn = lambda lhs, rhs, sizes: gmm(lhs, rhs, sizes, tokamax_impl=impl)
    else:
        fn = lambda lhs, rhs, sizes: jnp.dot(
            lhs, rhs[0], preferred_element_type=jnp.float32
        ).astype(lhs.dtype)

    def forward_backward(lhs, rhs, sizes, cotangent):
        _, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
        return vjp(cotangent)

    return jax.jit(fn), jax.jit(forward_backward)


def flops_ratio(fn, args, useful_flops: float) -> float | None:
    """Compiled FLOPs (XLA cost analysis) over ``useful_flops``; None where XLA gives none."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return None if not flops else float(flops) / useful_flops


def tokamax_lowering(lhs, rhs, sizes) -> str:
    """The tokamax implementation accepted for the forward product (gmm) and for the weight
    gradient's (tgmm), e.g. ``"gmm mosaic, tgmm mosaic"`` (``none`` where all refuse)."""
    cotangent = jnp.zeros((lhs.shape[0], rhs.shape[2]), lhs.dtype)
    names = {
        "gmm": tokamax_ops.accepted("gmm", lhs, rhs, sizes),
        "tgmm": tokamax_ops.accepted("tgmm", lhs, cotangent, sizes),
    }
    return ", ".join(f"{product} {name or 'none'}" for product, name in names.items())


def dispatch_fns(backend, top_k, capacity_factor):
    """Jitted (forward, forward+backward) of :func:`moe_dispatch` with one backend."""
    cf = capacity_factor if backend == "reference" else None

    def fn(x, w_gate, w_up, w_down, logits):
        return moe_dispatch(
            x, w_gate, w_up, w_down, logits, top_k=top_k, capacity_factor=cf, backend=backend
        ).out

    def forward_backward(args, cotangent):
        _, vjp = jax.vjp(fn, *args)
        return vjp(cotangent)

    return jax.jit(lambda args: fn(*args)), jax.jit(forward_backward)


def _max_err(result, expected) -> float:
    """The largest relative error over the leaves (outputs, or one gradient per input)."""
    pairs = zip(jax.tree.leaves(result), jax.tree.leaves(expected), strict=True)
    return max(rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) for a, b in pairs)


def _row(size, part, passname, backend, seconds, status, **extra):
    row = {"size": size, "part": part, "pass": passname, "backend": backend}
    row.update(seconds=seconds, status=status, **extra)
    _print_row(row)
    return row


def bench_gmm(size, inputs, args) -> list[dict]:
    """Rows of the grouped-matmul comparison at one size."""
    experts, tokens, top_k, dim, ffn = size
    lhs, rhs, sizes = grouped_operands(inputs[0], inputs[1], inputs[4], top_k)
    cotangent = jnp.ones((lhs.shape[0], ffn), lhs.dtype)
    useful = 2.0 * lhs.shape[0] * dim * ffn
    timings = {}
    for backend in ("dense", *args.gmm_backends):
        forward, forward_backward = gmm_fns(backend)
        for name, fn, fn_args in (
            ("fwd", forward, (lhs, rhs, sizes)),
            ("fwd+bwd", forward_backward, (lhs, rhs, sizes, cotangent)),
        ):
            seconds, result, status = time_or_reason(fn, fn_args, args.repeats)
            timings[backend, name] = (seconds, result)
    rows = []
    expected = {name: timings.get(("ragged", name), (None, None))[1] for name in ("fwd", "fwd+bwd")}
    for (backend, name), (seconds, result) in timings.items():
        flops = useful * (1 if name == "fwd" else 3)
        dense = timings["dense", name][0]
        extra = {"tflops": None if seconds is None else flops / seconds / 1e12}
        extra["of_dense"] = None if seconds is None or dense is None else dense / seconds
        extra["error"] = None
        if backend in COMPARED and result is not None and expected.get(name) is not None:
            extra["error"] = _max_err(result, expected[name])
        extra["lowering"] = None
        if backend == "tokamax" and name == "fwd":
            extra["lowering"] = tokamax_lowering(lhs, rhs, sizes)
        if backend == "ragged" and name == "fwd":
            ratio = flops_ratio(gmm, (lhs, rhs, sizes), useful)
            extra["lowering"] = (
                "no cost analysis"
                if ratio is None
                else ("native" if ratio < 1.5 else "dense padded") + f" ({ratio:.1f}× FLOPs)"
            )
        status = None if seconds is not None else "failed"
        rows.append(_row(size, "gmm", name, backend, seconds, status, **extra))
    return rows


def bench_dispatch(size, inputs, args) -> list[dict]:
    """Rows of the whole-dispatch comparison at one size."""
    experts, tokens, top_k, dim, ffn = size
    routing = top_k_routing(inputs[4], top_k)
    busiest = int(jnp.max(jnp.bincount(routing.expert_ids.ravel(), length=experts)))
    capacity_factor = busiest * experts / (tokens * top_k)  # C = the busiest expert's load
    dense_elements = (
        tokens * top_k * experts * math.ceil(capacity_factor * tokens * top_k / experts)
    )
    cotangent = jnp.ones((tokens, dim), inputs[0].dtype)
    rows, expected = [], {}
    for backend in sorted(args.dispatch_backends, key=lambda b: b != "ragged"):
        forward, forward_backward = dispatch_fns(backend, top_k, capacity_factor)
        for name, fn, fn_args in (
            ("fwd", forward, (inputs,)),
            ("fwd+bwd", forward_backward, (inputs, cotangent)),
        ):
            if backend == "reference" and dense_elements > args.dense_max:
                seconds, result, status = None, None, "skipped (memory)"
            else:
                seconds, result, status = time_or_reason(fn, fn_args, args.repeats)
            error = None
            if result is not None:
                if backend == "ragged":
                    expected[name] = result
                elif name in expected:
                    error = _max_err(result, expected[name])
            rows.append(
                _row(size, "dispatch", name, backend, seconds, status, error=error, tflops=None)
            )
    return rows


def run(args) -> tuple[str, list[dict]]:
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    rows = []
    for experts in args.experts:
        for tokens in args.tokens:
            for dim in args.dims:
                ffn = args.ffn or dim
                size = (experts, tokens, args.top_k, dim, ffn)
                inputs = make_inputs(*size, dtype)
                rows += bench_gmm(size, inputs, args)
                rows += bench_dispatch(size, inputs, args)
    m = max(args.tokens) * args.top_k
    rate = matmul_rate(m, max(args.dims), args.ffn or max(args.dims), dtype, args.repeats)
    header = (
        f"Device: {device.platform} ({device.device_kind}); JAX {jax.__version__}; "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}; "
        f"dtype {dtype.name}; routing: top-{args.top_k} of random router logits. Dense "
        f"{dtype.name} matmul rate measured in this run at ({m}, {max(args.dims)}) × "
        f"({max(args.dims)}, {args.ffn or max(args.dims)}): {rate / 1e12:.1f} TFLOP/s."
    )
    return header, rows


def _print_row(row) -> None:
    seconds = row["seconds"]
    shown = row["status"] if seconds is None else f"{seconds * 1e3:.3f} ms"
    print(
        f"  {row['size']} {row['part']:8s} {row['pass']:8s} {row['backend']:10s} {shown}",
        file=sys.stderr,
    )


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(header: str, rows: list[dict], command: str, smoke: bool) -> str:
    lines = [
        "## MoE expert dispatch: Pallas grouped matmul vs `ragged_dot` (and tokamax, where "
        "installed) vs capacity einsum"
        + (" (smoke run: tiny sizes, interpret mode; the numbers mean nothing)" if smoke else ""),
        "",
        header,
        f"Command: `{command}`.",
        "",
        "| E | T | k | D | F | part | pass | backend | time (ms) | TFLOP/s | % dense | error "
        "| lowering |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        time_ms = row["status"] if row["seconds"] is None else f"{row['seconds'] * 1e3:.3f}"
        of_dense = row.get("of_dense")
        cells = [
            *row["size"],
            row["part"],
            row["pass"],
            row["backend"],
            time_ms,
            _fmt(row.get("tflops"), ".1f"),
            "–" if of_dense is None else f"{100 * of_dense:.0f}%",
            _fmt(row.get("error"), ".1e"),
            row.get("lowering") or "–",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(text: str, known: tuple[str, ...], parser, flag: str) -> list[str]:
    names = [b for b in text.split(",") if b]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown {flag} {unknown}; choose from {list(known)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, interpret mode)")
    parser.add_argument("--experts", type=_ints, default=[8, 64], help="E values")
    parser.add_argument("--tokens", type=_ints, default=[4096, 16384, 65536], help="T values")
    parser.add_argument("--dims", type=_ints, default=[1024, 4096], help="d_model values")
    parser.add_argument("--ffn", type=int, default=0, help="expert width F (0: F = d_model)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--gmm-backends", default=",".join(available(GMM_BACKENDS)))
    parser.add_argument("--dispatch-backends", default=",".join(available(DISPATCH_BACKENDS)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-max", type=float, default=2**30, help="max T·k·E·C elements")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--benchmarks", type=pathlib.Path, default=BENCHMARKS)
    args = parser.parse_args(argv)
    args.gmm_backends = _names(args.gmm_backends, GMM_BACKENDS, parser, "--gmm-backends")
    args.dispatch_backends = _names(
        args.dispatch_backends, DISPATCH_BACKENDS, parser, "--dispatch-backends"
    )
    if "tokamax" in args.gmm_backends + args.dispatch_backends and not tokamax_ops.available():
        parser.error("backend tokamax: the tokamax package is not installed (pip install tokamax)")
    if args.smoke and args.write and args.benchmarks == BENCHMARKS:
        parser.error("--smoke numbers mean nothing: --write them only to another --benchmarks")
    if args.smoke:
        args.experts, args.tokens, args.dims, args.ffn = [4], [24], [16], 8
        args.dtype, args.repeats = "float32", 2
    if not 1 <= args.top_k <= min(args.experts):
        parser.error(f"--top-k must be in [1, {min(args.experts)}], got {args.top_k}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    kernel_bench_main("experiments.bench.dispatch", SECTION, args, run, markdown)


if __name__ == "__main__":
    main()
