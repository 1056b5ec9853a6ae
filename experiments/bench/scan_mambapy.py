"""CPU time of the selective scan: our ``jnp`` forms against mambapy (PyTorch), side by side.

What it measures. Mamba's selective scan without gate or Δ softplus (mambapy's
``MambaBlock.selective_scan`` computes exactly that: h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t,
y_t = C_t · h_t + D ⊙ x_t, with Δ already positive), at (B, L, D, N) = (2, 512, 256, 16) and
(1, 2048, 512, 16), float32, forward and forward+backward (gradients to x, Δ, A, B, C, D of
Σ y ⊙ g for a fixed random cotangent g), for

* ``scan``: :func:`selective_scan` ``backend="reference"`` (``lax.scan``) with its lean
  ``custom_vjp`` (states recomputed chunk by chunk in ``jnp``; second order still works);
* ``scan-autodiff``: the same scan with plain autodiff (``lean_backward=False``: every state
  stored);
* ``associative``: ``lax.associative_scan`` (plain autodiff);
* ``mambapy``: mambapy 1.2's ``selective_scan`` (its Blelloch ``pscan`` with a hand-written
  backward), ``torch.set_num_threads(--torch-threads)``.

How. (1) Parity first: every form's output and gradients must match the float64 NumPy loop
:func:`reference_loop` on the same inputs (relative error ≤ 1e-4, asserted). (2) Timing:
each callable is warmed up (JAX compiles), then all are interleaved round-robin for
``--repeats`` rounds and the medians are reported, with mambapy / ours ratios. The share of
the cores other processes used meanwhile is reported: run on an idle machine (PyTorch's
intra-op threads stall when their peers are descheduled).

Reproduce (repository root; ``make bench`` installs the ``bench`` extra, mambapy included)::

    python -m experiments.bench.scan_mambapy [--no-write]

The table replaces the marked section ``bench_scan_mambapy`` of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import report
from experiments.bench.timing import cpu_seconds, interleaved_medians, rel_err
from kernels_pallas.selective_scan import selective_scan

SECTION = "bench_scan_mambapy"
SIZES = ((2, 512, 256, 16), (1, 2048, 512, 16))
JAX_FORMS = {
    "scan": dict(backend="reference", lean_backward=True),
    "scan-autodiff": dict(backend="reference", lean_backward=False),
    "associative": dict(backend="associative"),
}
PARITY_TOL = 1e-4
NAMES = ("x", "delta", "A", "B", "C", "D")


def make_inputs(batch, length, dim, state, seed=0) -> dict[str, np.ndarray]:
    """Mamba-like float32 inputs: Δ ≈ softplus(N(−2, 1)) ≈ 0.1, A = −exp(N(0, 0.25))."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32)
    return {
        "x": f32(rng.standard_normal((batch, length, dim))),
        "delta": f32(np.logaddexp(0.0, rng.standard_normal((batch, length, dim)) - 2.0)),
        "A": f32(-np.exp(0.5 * rng.standard_normal((dim, state)))),
        "B": f32(rng.standard_normal((batch, length, state))),
        "C": f32(rng.standard_normal((batch, length, state))),
        "D": f32(rng.standard_normal(dim)),
        "g": f32(rng.standard_normal((batch, length, dim))),
    }


def reference_loop(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Output and gradients of Σ y ⊙ g, float64, by an explicit loop over time (and its
    hand-derived adjoint): the independent reference both libraries are checked against."""
    x, dt, A, B, C, D, g = (np.asarray(inputs[k], np.float64) for k in (*NAMES, "g"))
    batch, length, dim = x.shape
    a = np.exp(dt[..., None] * A)  # (B, L, D, N)
    h = np.zeros((batch, length + 1, dim, A.shape[1]))  # h[:, t + 1] = state after step t
    for t in range(length):
        h[:, t + 1] = a[:, t] * h[:, t] + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
    y = np.einsum("bldn,bln->bld", h[:, 1:], C) + D * x
    adj = np.zeros_like(h[:, 0])
    grads = {k: np.zeros_like(v) for k, v in zip(NAMES, (x, dt, A, B, C, D), strict=True)}
    grads["D"] = np.sum(g * x, axis=(0, 1))
    grads["x"] = g * D
    for t in reversed(range(length)):
        adj = adj + g[:, t, :, None] * C[:, t, None, :]  # total cotangent of h_t
        grads["C"][:, t] = np.einsum("bd,bdn->bn", g[:, t], h[:, t + 1])
        da = adj * h[:, t] * a[:, t]  # ∂/∂(Δ A) of the transition term
        grads["delta"][:, t] = np.sum(da * A, -1) + x[:, t] * np.sum(adj * B[:, t, None], -1)
        grads["A"] += np.einsum("bdn,bd->dn", da, dt[:, t])
        grads["x"][:, t] += dt[:, t] * np.sum(adj * B[:, t, None], -1)
        grads["B"][:, t] = np.einsum("bdn,bd->bn", adj, dt[:, t] * x[:, t])
        adj = adj * a[:, t]
    return y, grads


def jax_fns(form: dict):
    """Jitted (forward, forward+backward) of one of our forms."""

    def fn(x, delta, A, B, C, D):
        return selective_scan(x, delta, A, B, C, D, **form)

    def forward_backward(args, g):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(g)

    return jax.jit(lambda args: fn(*args)), jax.jit(forward_backward)


def torch_fns():
    """(forward, forward+backward) of mambapy's scan (``self`` is unused by the method).

    torch and mambapy are imported here, not at the top, so that :func:`reference_loop` and
    the rest of the module load where the ``bench`` extra is not installed.
    """
    import torch
    from mambapy.mamba import MambaBlock

    scan = lambda x, delta, A, B, C, D: MambaBlock.selective_scan(None, x, delta, A, B, C, D)

    def forward(args):
        with torch.no_grad():
            return scan(*args)

    def forward_backward(args, g):
        leaves = [a.detach().requires_grad_(True) for a in args]
        out = scan(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_outputs=g)
        return out, grads

    return forward, forward_backward


def _torch_args(inputs):
    """The six scan inputs and the cotangent as torch tensors sharing NumPy's memory."""
    import torch

    return tuple(torch.from_numpy(inputs[k]) for k in NAMES), torch.from_numpy(inputs["g"])


def check_parity(inputs) -> dict[str, float]:
    """Worst relative error of each form's output and gradients against :func:`reference_loop`."""
    y_ref, grads_ref = reference_loop(inputs)
    expected = [y_ref, *(grads_ref[k] for k in NAMES)]
    jargs = tuple(jnp.asarray(inputs[k]) for k in NAMES)
    targs, tg = _torch_args(inputs)
    errors = {}
    for name, form in JAX_FORMS.items():
        out, grads = jax_fns(form)[1](jargs, jnp.asarray(inputs["g"]))
        errors[name] = max(rel_err(a, e) for a, e in zip((out, *grads), expected, strict=True))
    out, grads = torch_fns()[1](targs, tg)
    actual = [out.detach().numpy(), *(t.numpy() for t in grads)]
    errors["mambapy"] = max(rel_err(a, e) for a, e in zip(actual, expected, strict=True))
    return errors


def time_size(size, repeats: int) -> dict[tuple[str, str], float]:
    """Median seconds of every (form, pass) at one size, all interleaved."""
    inputs = make_inputs(*size)
    jargs = tuple(jnp.asarray(inputs[k]) for k in NAMES)
    jg = jnp.asarray(inputs["g"])
    targs, tg = _torch_args(inputs)
    calls = {}
    for name, form in JAX_FORMS.items():
        forward, forward_backward = jax_fns(form)
        calls[name, "fwd"] = lambda f=forward: jax.block_until_ready(f(jargs))
        calls[name, "fwd+bwd"] = lambda f=forward_backward: jax.block_until_ready(f(jargs, jg))
    forward, forward_backward = torch_fns()
    calls["mambapy", "fwd"] = lambda: forward(targs)
    calls["mambapy", "fwd+bwd"] = lambda: forward_backward(targs, tg)
    medians = interleaved_medians(list(calls.values()), repeats)
    return dict(zip(calls, medians, strict=True))


def markdown(results, errors, other: float, threads: int, repeats: int, command: str) -> str:
    versions = ", ".join(
        f"{n} {importlib.metadata.version(n)}" for n in ("jax", "jaxlib", "torch", "mambapy")
    )
    lines = [
        "## Selective scan on the CPU: `lax.scan` (lean backward) vs mambapy (PyTorch)",
        "",
        f"- Date: {report.today()}; machine: {report.machine()}; Python "
        f"{platform.python_version()}; {versions}; torch.set_num_threads({threads}), XLA CPU "
        f"defaults; other processes used {100 * other:.0f}% of the cores while timing.",
        f"- Command: `{command}`. Float32, no gate, Δ given positive (mambapy's "
        "`selective_scan` semantics), gradients to all six inputs. Medians of "
        f"{repeats} interleaved rounds after warm-up; ratio = mambapy / ours (> 1: ours faster).",
        "- Parity before timing, worst relative error of output and gradients against a "
        "float64 NumPy loop at the first size: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        + f" (asserted ≤ {PARITY_TOL:g}).",
        "",
        "| B | L | D | N | pass | scan (lean) ms | scan-autodiff ms | associative ms | mambapy ms "
        "| mambapy / scan |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, times in results.items():
        for name in ("fwd", "fwd+bwd"):
            ms = [times[form, name] * 1e3 for form in (*JAX_FORMS, "mambapy")]
            ratio = times["mambapy", name] / times["scan", name]
            cells = [*size, name, *(f"{m:.2f}" for m in ms), f"{ratio:.2f}×"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="a tiny size, 2 rounds (smoke)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = ((1, 24, 8, 4),) if args.quick else SIZES
    repeats = 2 if args.quick else args.repeats
    import torch

    torch.set_num_threads(args.torch_threads)
    errors = check_parity(make_inputs(*sizes[0], seed=1))
    bad = {k: v for k, v in errors.items() if not v <= PARITY_TOL}
    if bad:
        raise AssertionError(f"forms disagree with the float64 loop: {bad}")
    busy0, total0, own0 = *cpu_seconds(), time.process_time()
    results = {}
    for size in sizes:
        print(f"timing {size}", file=sys.stderr)
        results[size] = time_size(size, repeats)
    busy1, total1, own1 = *cpu_seconds(), time.process_time()
    other = max((busy1 - busy0 - (own1 - own0)) / max(total1 - total0, 1e-9), 0.0)
    command = "python -m experiments.bench.scan_mambapy " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = markdown(results, errors, other, args.torch_threads, repeats, command.strip())
    print(text)
    if not args.no_write and not args.quick:
        report.update_section(SECTION, text)
        print(f"updated {report.BENCHMARKS}", file=sys.stderr)


if __name__ == "__main__":
    main()
