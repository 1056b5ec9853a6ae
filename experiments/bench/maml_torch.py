"""CPU time of one MAML meta-training step: metattt (JAX) against PyTorch, side by side.

What it measures. One outer step of MAML on the sinusoid task of Finn et al. (2017): an MLP
1-40-40-1, 25 tasks, K=10 support and 10 query points per task, S inner SGD steps (lr 0.01) on
every parameter, meta-loss = mean query MSE, outer Adam (lr 1e-3), all in float32. Second order
(differentiated through the inner gradients) and first order (FOMAML), S in {1, 5}. Three
implementations of the same computation:

* ``jax``: ``metattt.meta.make_meta_step`` over ``maml_loss`` / ``fomaml_loss`` (jitted), the
  inner rule ``metattt.inner.sgd`` and the non-finite guard on (the defaults a user gets).
* ``torch.func``: ``functional_call`` + nested ``grad`` + ``vmap`` over the tasks.
* ``higher``: ``higher.innerloop_ctx`` with a Python loop over the tasks.

How. (1) Parity: from the same initial parameters and data, the meta-loss, the meta-gradient
and the first Adam update of each PyTorch form must match JAX (relative errors are printed and
asserted). (2) Timing: every implementation is warmed up (JAX compiles), then all are
interleaved round-robin, each running a few consecutive meta-steps per round on fresh task
batches drawn in advance (the same batches for all); each step is timed on its own (JAX outputs
blocked on) with the garbage collector off, and the median is reported with torch/JAX ratios.
PyTorch runs with ``torch.set_num_threads(2)`` (``--torch-threads``); XLA keeps its CPU
defaults. Run on an idle machine: with other processes on the cores, PyTorch's intra-op threads
wait on descheduled peers and its timings blow up (the share of CPU that other processes
used while timing is reported).

Reproduce (from the repository root; ``make bench`` installs the ``bench`` extra first)::

    make bench
    python -m experiments.bench.maml_torch [--quick] [--no-write]

The results go to stdout as Markdown and, unless ``--no-write``, replace the section between
``<!-- bench_maml_torch:start -->`` and ``<!-- bench_maml_torch:end -->`` in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import abc
import argparse
import functools
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import report as report_lib
from experiments.bench.timing import cpu_seconds
from metattt import meta, runlog
from metattt import params as P
from metattt.data import sinusoid
from metattt.inner import InnerConfig
from metattt.inner import sgd as inner_sgd
from metattt.models.mlp import mlp

try:
    import higher
    import torch
    from torch import nn
except ImportError as err:  # pragma: no cover - benchmark-only peers
    raise SystemExit(f"{err}: install the peers with `pip install -e '.[bench]'`") from err

SIZES = (1, 40, 40, 1)
NUM_TASKS, NUM_SUPPORT, NUM_QUERY = 25, 10, 10
INNER_LR, OUTER_LR = 0.01, 1e-3
ORDERS = ("second", "first")
INNER_STEPS = (1, 5)
IMPLS = ("jax", "torch.func", "higher")
TORCH_THREADS = 2
LOSS_TOL, GRAD_TOL, UPDATE_TOL = 1e-5, 1e-4, 1e-4
# Adam's first update is about g / (|g| + 1e-8): it turns float32 noise in gradient entries near
# zero (|g| ~ 1e-9, pure cancellation) into O(1) differences, so the update check skips them.
UPDATE_MIN_GRAD = 1e-6

TorchData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data and params


def draw_tasks(seed: int) -> meta.Task:
    return sinusoid.sample_tasks(jax.random.key(seed), NUM_TASKS, NUM_SUPPORT, NUM_QUERY)


def to_torch_data(task: meta.Task) -> TorchData:
    (xs, ys), (xq, yq) = task.support, task.query
    return tuple(torch.tensor(np.asarray(a)) for a in (xs, ys, xq, yq))


def jax_to_list(tree: Any) -> list[np.ndarray]:
    """Layer-ordered [W0, b0, W1, b1, ...] in torch layout ((out, in) weights), float64."""
    out = []
    for i in range(len(tree["layers"])):
        layer = tree["layers"][str(i)]
        out += [np.asarray(layer["kernel"], np.float64).T, np.asarray(layer["bias"], np.float64)]
    return out


def torch_to_list(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().numpy().astype(np.float64) for t in tensors]


def torch_mlp(jax_params: Any) -> nn.Sequential:
    """The JAX MLP as ``nn.Sequential`` (Linear, ReLU, ..., Linear) with copied weights."""
    layers: list[nn.Module] = []
    for a, b in zip(SIZES[:-1], SIZES[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    with torch.no_grad():
        for p, value in zip(model.parameters(), jax_to_list(jax_params), strict=True):
            p.copy_(torch.tensor(value, dtype=torch.float32))
    return model


def where_grad(tree: list[np.ndarray], grad: list[np.ndarray]) -> list[np.ndarray]:
    """``tree`` with the entries whose gradient is below ``UPDATE_MIN_GRAD`` zeroed."""
    return [np.where(np.abs(g) >= UPDATE_MIN_GRAD, x, 0.0) for x, g in zip(tree, grad, strict=True)]


def rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Global-norm relative error ||a - b|| / ||b||."""
    diff = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b, strict=True)))
    return float(diff / np.sqrt(sum(np.sum(y**2) for y in b)))


# ----------------------------------------------------------------------------- implementations


class JaxImpl:
    """metattt's jitted meta-step; ``meta_grad`` is ``jax.grad`` of ``meta.batch_meta_loss``."""

    def __init__(self, model: Any, order: str, steps: int):
        def loss_fn(p, batch):
            x, y = batch
            return jnp.mean((model.apply(p, x) - y) ** 2)

        mask = P.select(model.params, lambda path, leaf: True)
        inner = InnerConfig(opt=inner_sgd(INNER_LR), max_steps=steps)  # guard on (default)
        method = meta.maml_loss if order == "second" else meta.fomaml_loss
        meta_loss = functools.partial(method, loss_fn, mask=mask, inner=inner)
        self._step = meta.make_meta_step(meta_loss, optax.adam(OUTER_LR))
        self._grad = jax.jit(
            jax.value_and_grad(lambda p, t: meta.batch_meta_loss(meta_loss, p, t)[0])
        )
        self.state = self._step.init(model.params)

    def meta_grad(self, tasks: meta.Task) -> tuple[float, list[np.ndarray]]:
        loss, grads = self._grad(self.state.params, tasks)
        return float(loss), jax_to_list(grads)

    def step(self, tasks: meta.Task) -> None:
        self.state, metrics = self._step.update(self.state, tasks)
        jax.block_until_ready((self.state, metrics))

    def param_list(self) -> list[np.ndarray]:
        return jax_to_list(self.state.params)


class TorchImpl(abc.ABC):
    """Shared outer loop of the PyTorch forms: ``meta_grad`` fills ``.grad``, Adam steps."""

    def __init__(self, jax_params: Any, order: str, steps: int):
        self.model = torch_mlp(jax_params)
        self.order, self.steps = order, steps
        self.opt = torch.optim.Adam(self.model.parameters(), lr=OUTER_LR)

    @abc.abstractmethod
    def _fill_grad(self, data: TorchData) -> torch.Tensor:
        """Compute the meta-loss and leave its meta-gradient in the parameters' ``.grad``."""

    def meta_grad(self, data: TorchData) -> tuple[float, list[np.ndarray]]:
        loss = self._fill_grad(data)
        return float(loss), torch_to_list([p.grad for p in self.model.parameters()])

    def step(self, data: TorchData) -> None:
        self._fill_grad(data)
        self.opt.step()

    def param_list(self) -> list[np.ndarray]:
        return torch_to_list(list(self.model.parameters()))


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.mean((pred - y) ** 2)


class TorchFuncImpl(TorchImpl):
    """``torch.func``: nested ``grad`` through the inner loop, ``vmap`` over the tasks."""

    def __init__(self, jax_params: Any, order: str, steps: int):
        super().__init__(jax_params, order, steps)
        self._grad_fn = torch.func.grad_and_value(self._meta_loss)

    def _inner_loss(self, p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _mse(torch.func.functional_call(self.model, p, (x,)), y)

    def _task_loss(self, p: dict, xs, ys, xq, yq) -> torch.Tensor:
        for _ in range(self.steps):
            g = torch.func.grad(self._inner_loss)(p, xs, ys)
            if self.order == "first":
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - INNER_LR * g[k] for k in p}
        return self._inner_loss(p, xq, yq)

    def _meta_loss(self, p: dict, data: TorchData) -> torch.Tensor:
        return torch.func.vmap(self._task_loss, in_dims=(None, 0, 0, 0, 0))(p, *data).mean()

    def _fill_grad(self, data: TorchData) -> torch.Tensor:
        named = dict(self.model.named_parameters())
        grads, loss = self._grad_fn({k: v.detach() for k, v in named.items()}, data)
        for k, v in named.items():
            v.grad = grads[k]
        return loss


class HigherImpl(TorchImpl):
    """``higher.innerloop_ctx`` per task; first order drops the inner graph and accumulates the
    query gradient at the adapted weights (``track_higher_grads=False``)."""

    def __init__(self, jax_params: Any, order: str, steps: int):
        super().__init__(jax_params, order, steps)
        self.inner_opt = torch.optim.SGD(self.model.parameters(), lr=INNER_LR)

    def _fill_grad(self, data: TorchData) -> torch.Tensor:
        xs, ys, xq, yq = data
        second = self.order == "second"
        params = list(self.model.parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        total = torch.zeros(())
        for t in range(xs.shape[0]):
            with higher.innerloop_ctx(
                self.model, self.inner_opt, copy_initial_weights=False, track_higher_grads=second
            ) as (fmodel, diffopt):
                for _ in range(self.steps):
                    diffopt.step(_mse(fmodel(xs[t]), ys[t]))
                query = _mse(fmodel(xq[t]), yq[t]) / xs.shape[0]
                if second:
                    query.backward()
                else:
                    grads = torch.autograd.grad(query, list(fmodel.parameters()))
                    for p, g in zip(params, grads, strict=True):
                        p.grad.add_(g)
            total = total + query.detach()
        return total


IMPL_CLASSES: dict[str, Callable[..., Any]] = {"torch.func": TorchFuncImpl, "higher": HigherImpl}


def build_impls(model: Any) -> dict[tuple[str, str, int], Any]:
    impls = {}
    for order in ORDERS:
        for steps in INNER_STEPS:
            impls["jax", order, steps] = JaxImpl(model, order, steps)
            for name, cls in IMPL_CLASSES.items():
                impls[name, order, steps] = cls(model.params, order, steps)
    return impls


def data_for(name: str, task: meta.Task, torch_task: TorchData) -> Any:
    return task if name == "jax" else torch_task


# ----------------------------------------------------------------------------- parity


def grad_and_update(impl: Any, data: Any) -> tuple[float, list, list]:
    """Meta-loss and meta-gradient at the current parameters, then one step's update."""
    loss, grad = impl.meta_grad(data)
    before = impl.param_list()
    impl.step(data)
    return loss, grad, [a - b for a, b in zip(impl.param_list(), before, strict=True)]


def check_parity(impls: dict, task: meta.Task) -> list[dict]:
    """Meta-loss, meta-gradient and first Adam update of each torch form against JAX."""
    torch_task = to_torch_data(task)
    rows = []
    for order in ORDERS:
        for steps in INNER_STEPS:
            ref_loss, ref_grad, ref_update = grad_and_update(impls["jax", order, steps], task)
            for name in IMPL_CLASSES:
                loss, grad, update = grad_and_update(impls[name, order, steps], torch_task)
                row = {
                    "impl": name,
                    "order": order,
                    "steps": steps,
                    "loss": abs(loss - ref_loss) / abs(ref_loss),
                    "grad": rel_err(grad, ref_grad),
                    "update": rel_err(
                        where_grad(update, ref_grad), where_grad(ref_update, ref_grad)
                    ),
                }
                log(
                    f"parity {name:10s} {order:6s} S={steps}: loss {row['loss']:.1e} "
                    f"grad {row['grad']:.1e} update {row['update']:.1e}"
                )
                rows.append(row)
    return rows


def assert_parity(rows: list[dict]) -> None:
    bad = [
        r for r in rows if r["loss"] > LOSS_TOL or r["grad"] > GRAD_TOL or r["update"] > UPDATE_TOL
    ]
    if bad:
        raise AssertionError(
            f"parity failed (tolerances {LOSS_TOL}, {GRAD_TOL}, {UPDATE_TOL}): {bad}"
        )


# ----------------------------------------------------------------------------- timing


def time_impls(impls: dict, rounds: int, per_round: int, warmup: int) -> tuple[dict, float]:
    """Warm up, then round-robin (rotating the order each round).

    Returns seconds per meta-step for each implementation, and the fraction of the machine's
    CPU time that other processes used meanwhile.
    """
    pool = [draw_tasks(1000 + i) for i in range(rounds * per_round + warmup)]
    torch_pool = [to_torch_data(t) for t in pool]
    keys = list(impls)
    for key in keys:
        log(f"warm-up {key}")
        for i in range(warmup):
            impls[key].step(data_for(key[0], pool[i], torch_pool[i]))
    times: dict[Any, list[float]] = {key: [] for key in keys}
    gc.collect()
    gc.disable()
    busy0, total0, own0 = *cpu_seconds(), time.process_time()
    try:
        for r in range(rounds):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                for j in range(per_round):
                    i = warmup + r * per_round + j
                    batch = data_for(key[0], pool[i], torch_pool[i])
                    start = time.perf_counter()
                    impls[key].step(batch)
                    times[key].append(time.perf_counter() - start)
            log(f"round {r + 1}/{rounds}")
    finally:
        gc.enable()
    busy1, total1, own1 = *cpu_seconds(), time.process_time()
    other = (busy1 - busy0 - (own1 - own0)) / max(total1 - total0, 1e-9)
    return times, max(other, 0.0)


# ----------------------------------------------------------------------------- report


def timing_table(times: dict) -> str:
    lines = [
        "| implementation | order | inner steps S | median ms / meta-step | IQR ms | × JAX |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for order in ORDERS:
        for steps in INNER_STEPS:
            ref = statistics.median(times["jax", order, steps])
            for name in IMPLS:
                ts = [1e3 * t for t in times[name, order, steps]]
                q1, med, q3 = statistics.quantiles(ts, n=4)
                lines.append(
                    f"| {name} | {order} | {steps} | {med:.2f} | {q1:.2f}–{q3:.2f} "
                    f"| {med / (1e3 * ref):.1f} |"
                )
    return "\n".join(lines)


def parity_table(rows: list[dict]) -> str:
    lines = [
        "| implementation | order | S | meta-loss rel. err | meta-grad rel. err "
        "| first Adam update rel. err* |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['order']} | {r['steps']} | {r['loss']:.1e} | {r['grad']:.1e} "
            f"| {r['update']:.1e} |"
        )
    return "\n".join(lines)


def versions() -> str:
    names = ("jax", "jaxlib", "optax", "flax", "torch", "higher", "numpy")
    pkgs = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)
    return f"Python {platform.python_version()}, {pkgs}"


class Setup(NamedTuple):
    """How the timing was run (for the report)."""

    rounds: int
    per_round: int
    torch_threads: int
    other_cpu: float  # fraction of all cores busy with other processes while timing


def report(times: dict, parity: list[dict], setup: Setup) -> str:
    return "\n".join(
        [
            "## MAML meta-step: metattt (JAX) vs PyTorch (`torch.func`, `higher`), CPU",
            "",
            f"- Date: {report_lib.today()}",
            f"- Machine: {runlog.cpu_model()}, {os.cpu_count()} cores; torch.set_num_threads("
            f"{setup.torch_threads}), XLA CPU defaults. Other processes used "
            f"{100 * setup.other_cpu:.0f}% of the cores while timing.",
            f"- Versions: {versions()}.",
            f"- Sizes: MLP {'-'.join(map(str, SIZES))} (ReLU), {NUM_TASKS} tasks per meta-batch, "
            f"K={NUM_SUPPORT} support and {NUM_QUERY} query points per task, inner SGD lr "
            f"{INNER_LR} on all parameters for S steps (JAX: `metattt.inner.sgd`, non-finite guard "
            f"on), outer Adam lr {OUTER_LR}, float32.",
            "- Command: `make bench` (or `python -m experiments.bench.maml_torch`).",
            f"- Method: warm-up (JAX compile) first, then {setup.rounds} interleaved round-robin "
            f"rounds × {setup.per_round} meta-steps per implementation on fresh sinusoid batches "
            "drawn in advance; each step timed alone (JAX outputs blocked on), GC off. × JAX = "
            "median torch / median JAX for the same order and S.",
            "- Caveat: run on an idle machine. When other processes share the cores, PyTorch's "
            "intra-op worker threads wait on descheduled peers: with 2 threads, torch.func's "
            "vmapped ops (big enough to go parallel) became ~50× slower here; "
            "`--torch-threads 1` avoids it.",
            "",
            timing_table(times),
            "",
            "Parity before timing (same initial parameters and data; relative errors against "
            f"JAX; asserted: loss ≤ {LOSS_TOL:g}, meta-gradient ≤ {GRAD_TOL:g}, first Adam update "
            f"≤ {UPDATE_TOL:g}). *Over the entries whose gradient is ≥ {UPDATE_MIN_GRAD:g} in "
            "magnitude: Adam's first step, about lr · g / (|g| + eps), turns float32 noise in "
            "near-zero entries into O(lr) differences. The remaining ~1e-5 is the float32 "
            "rounding of new − old parameters plus optax computing Adam's bias corrections in "
            "float32 (6.5e-6 on its own; torch uses Python floats).",
            "",
            parity_table(parity),
        ]
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke run)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--rounds", type=int, default=None, help="round-robin rounds")
    parser.add_argument("--per-round", type=int, default=3, help="meta-steps per round")
    parser.add_argument(
        "--torch-threads", type=int, default=TORCH_THREADS, help="torch.set_num_threads"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 30)
    per_round = 1 if args.quick else args.per_round
    torch.set_num_threads(args.torch_threads)
    model = mlp(list(SIZES), seed=0)
    impls = build_impls(model)
    log("parity (also compiles the JAX steps)")
    parity = check_parity(impls, draw_tasks(0))
    assert_parity(parity)
    times, other = time_impls(impls, rounds, per_round, warmup=2)
    if other > 0.1:
        log(f"warning: other processes used {100 * other:.0f}% of the cores: timings skewed")
    setup = Setup(rounds, per_round, args.torch_threads, other)
    text = report(times, parity, setup)
    print(text)
    if not args.no_write:
        report_lib.update_section("bench_maml_torch", text)
        log(f"updated {report_lib.BENCHMARKS}")


if __name__ == "__main__":
    main()
