"""What metattt's meta-step costs over the same MAML step written in plain JAX.

    python -m experiments.bench.meta_overhead [--rounds 30] [--clock wall|cpu] [--write]

Sinusoid MAML (MLP 1-40-40-1, ReLU; 25 tasks of K = 10 support and 10 query points; inner SGD
lr 0.01 on every parameter for S steps, ``metattt.inner.sgd`` in the metattt steps; outer Adam
lr 1e-3; float32), S = 1 and 5, first and second order. Three jitted steps per setting, timed
interleaved (round robin, medians):

* ``plain``: the hand-written reference -- ``lax.scan`` of SGD steps, ``vmap`` over tasks,
  ``value_and_grad``, ``optax.adam``; no guard, no masks.
* ``guard on``: ``metattt.meta.make_meta_step`` over ``maml_loss`` as shipped (non-finite
  inner and outer steps skipped and counted).
* ``guard off``: the same with ``skip_nonfinite=False`` in the inner and outer loop.

Before timing, both metattt steps are checked against ``plain`` on the same batch (meta-loss
and updated parameters within float32 tolerance), so the ratio compares equal computations.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import report
from metattt import meta
from metattt import params as P
from metattt.data import sinusoid
from metattt.inner import InnerConfig
from metattt.inner import sgd as inner_sgd

INNER_LR, OUTER_LR, TASKS, K = 0.01, 1e-3, 25, 10


def init_mlp(key):
    """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both tensors."""
    sizes = [1, 40, 40, 1]
    layers = []
    for k, a, b in zip(jax.random.split(key, 3), sizes[:-1], sizes[1:], strict=True):
        kw, kb = jax.random.split(k)
        bound = 1.0 / np.sqrt(a)
        layers.append(
            {
                "w": jax.random.uniform(kw, (a, b), minval=-bound, maxval=bound),
                "b": jax.random.uniform(kb, (b,), minval=-bound, maxval=bound),
            }
        )
    return layers


def mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def mse(params, batch):
    x, y = batch
    return jnp.mean((mlp(params, x) - y) ** 2)


def plain_step(steps: int, first_order: bool):
    """The reference MAML step in plain JAX."""
    opt = optax.adam(OUTER_LR)

    def adapted(params, support):
        def one(p, _):
            g = jax.grad(mse)(p, support)
            if first_order:
                g = jax.lax.stop_gradient(g)
            return jax.tree.map(lambda a, b: a - INNER_LR * b, p, g), None

        return jax.lax.scan(one, params, None, length=steps)[0]

    def meta_loss(params, tasks):
        per_task = jax.vmap(lambda t: mse(adapted(params, t.support), t.query))(tasks)
        return jnp.mean(per_task)

    @jax.jit
    def step(state, tasks):
        params, opt_state = state
        loss, grads = jax.value_and_grad(meta_loss)(params, tasks)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return opt.init, step


def metattt_step(steps: int, first_order: bool, guard: bool, params):
    inner = InnerConfig(inner_sgd(INNER_LR), steps, first_order=first_order, skip_nonfinite=guard)
    loss = functools.partial(meta.maml_loss, mse, mask=P.select(params, "re:."), inner=inner)
    return meta.make_meta_step(loss, optax.adam(OUTER_LR), skip_nonfinite=guard)


def xla_ops(step, state, batch) -> int:
    """Operations in the compiled step that run as separate kernels on XLA:CPU (fusions, dots,
    concatenations, copies; a loop body counted once): what the guard adds, without timing."""
    text = step.lower(state, batch).compile().as_text()
    return sum(text.count(f" {op}(") for op in ("fusion", "dot", "concatenate", "copy"))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(steps: int, first_order: bool, rounds: int, clock: str = "wall") -> dict[str, float]:
    """Median ms per meta-step of each implementation, timed interleaved, and their op counts
    (under ``"ops <name>"``). ``clock="cpu"`` times the process's CPU time (all threads), which
    a machine shared with other jobs disturbs less than wall time."""
    now = CLOCKS[clock]
    params = init_mlp(jax.random.key(0))
    pool = [sinusoid.sample_tasks(jax.random.key(i), TASKS, K, K) for i in range(8)]
    init, plain = plain_step(steps, first_order)
    impls = {"plain": (plain, (params, init(params)))}
    for name, guard in (("guard on", True), ("guard off", False)):
        s = metattt_step(steps, first_order, guard, params)
        impls[name] = (s.update, s.init(params))
    # Equal computations first: one step from the same state on the same batch.
    (p_ref, _), loss_ref = plain(impls["plain"][1], pool[0])
    for name in ("guard on", "guard off"):
        update, state = impls[name]
        new, metrics = update(state, pool[0])
        np.testing.assert_allclose(metrics.meta_loss, loss_ref, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(p_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    times = {name: [] for name in impls}
    for r in range(rounds):
        for name, (update, state) in impls.items():
            batch = pool[r % len(pool)]
            start = now()
            out = update(state, batch)
            jax.block_until_ready(out)
            times[name].append(now() - start)
    ops = {f"ops {name}": xla_ops(step, state, pool[0]) for name, (step, state) in impls.items()}
    return {**{name: 1e3 * float(np.median(t[2:])) for name, t in times.items()}, **ops}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--write", action="store_true", help="write into BENCHMARKS.md")
    args = parser.parse_args(argv)
    lines = [
        "## Meta-step overhead: metattt vs the same MAML step in plain JAX (CPU)",
        "",
        f"- Date: {report.today()}; machine: {report.machine()}.",
        f"- Command: `python -m experiments.bench.meta_overhead --rounds {args.rounds}"
        f"{' --clock cpu' if args.clock == 'cpu' else ''}{' --write' if args.write else ''}`"
        f" ({'process CPU time, all threads' if args.clock == 'cpu' else 'wall time'}).",
        "- Sizes: MLP 1-40-40-1, 25 tasks x (10 support, 10 query), inner SGD 0.01 on every "
        "parameter for S steps (`metattt.inner.sgd` in the metattt steps), outer Adam 1e-3, "
        "float32; medians of interleaved single steps.",
        "- Each metattt step was first checked against plain JAX on one batch (meta-loss and "
        "new parameters within float32 tolerance).",
        "- XLA ops: operations of the compiled step that run as separate kernels (fusions, dots, "
        "concatenations, copies; a loop body counted once), plain / on / off.",
        "",
        "| order | S | plain JAX (ms) | guard on (ms) | guard off (ms) | on / plain "
        "| off / plain | XLA ops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for first_order in (False, True):
        for steps in (1, 5):
            ms = measure(steps, first_order, args.rounds, args.clock)
            order = "first" if first_order else "second"
            lines.append(
                f"| {order} | {steps} | {ms['plain']:.2f} | {ms['guard on']:.2f} | "
                f"{ms['guard off']:.2f} | {ms['guard on'] / ms['plain']:.2f}x | "
                f"{ms['guard off'] / ms['plain']:.2f}x | {ms['ops plain']} / "
                f"{ms['ops guard on']} / {ms['ops guard off']} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    if args.write:
        report.update_section("bench_meta_overhead", text)
    print(text)
    return text


if __name__ == "__main__":
    main()
