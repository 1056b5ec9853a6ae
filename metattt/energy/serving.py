"""Prequential serving of a stream under a power monitor, with optional test-time adaptation.

Batch t of the stream is first scored with the current parameters (so no label is seen before
its prediction), then, if adaptation is on and t is a multiple of ``adapt_every``, the model
adapts on the batch's first ``adapt_windows`` rows. Each batch is one measured window of the
monitor. With a simulated monitor the window holds the work of the batch's forward pass and of
each adaptation step (``1 + backward_factor`` forwards priced at that step's own routing), then
idles until the next batch arrives ``period_s`` after this one. A power-budget policy (see
:func:`metattt.energy.power_budget`), when given, reads each window's power and sets λ, top-k,
the expert mask and whether to adapt for the next batch.

The model enters as functions only: ``infer(params, inputs, targets, top_k, mask) -> (score,
counts)`` and ``adapt(params, tokens, lam, mask) -> (params, stats)``, ``stats`` holding per
adaptation step ``joules_per_token``, ``task_loss`` and ``expert_counts`` (see
:class:`metattt.energy.RoutingStats`; (K, layers, E), or (K, P, layers, E) when each step runs P
forward passes, each then charged); ``work(counts, rows) -> Work`` prices one forward pass.
Shapes: inputs (S, B, ...), targets (S, B, ...), counts (layers, E), mask (E,).

When to adapt: every ``adapt_every``-th batch, or by a ``schedule``
(:mod:`metattt.energy.schedule`: on a difficulty signal, at an adaptive frequency); ``infer``
then returns ``(score, counts, signal)``, the batch's label-free signal (e.g. prediction
entropy) from the same forward pass, so the decision costs no extra work. Or within each
batch, per window of tokens or of sequences (:mod:`metattt.energy.windows`): ``windowed`` serves
the batch chunk by chunk, each chunk one forward pass of (B, W) tokens (or of W sequences,
``window_rows``) and each adaptation step on its rows, all charged to the batch's window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from metattt.energy.accounting import Work
from metattt.energy.monitor import AbstractMonitor, SimulatedDevice
from metattt.energy.schedule import Schedule


class ServedStream(NamedTuple):
    """What serving a stream measured.

    Attributes:
        scores: (S,) the score of each batch, before any adaptation on it.
        power_w: (S,) each window's mean power; ``lambdas``, ``top_ks``: (S,) the λ_energy and
            top-k each batch was served with; ``levels``: the policy's level after each batch
            (empty without a policy).
        counts: (layers, E) expert assignments over the stream; ``counts_late``: over its last
            ``late_batches`` = max(S // 4, 1) batches (the routing after adaptation).
        curve_energy: expected routing energy (J/token) after each adaptation step;
            ``curve_loss``: the adaptation's task loss at each step.
        energy_j: the monitor's energy over every window (idle included).
        dynamic_j: the work's energy (no idle), adaptation included; ``adapt_dynamic_j``: the
            adaptation's share; ``expert_j``: the experts' share of the inference work.
        busy_s: the simulated device's busy time (0 for a real monitor).
        infer_s, adapt_s: wall-clock seconds of inference and of adaptation.
        adapt_calls: how many batches were adapted on.
        top_k, mask: the routing at the end; ``decision``: the policy's last decision or None.
        signals: (S,) each batch's difficulty signal (empty without a ``schedule``).
    """

    scores: list[float]
    power_w: list[float]
    lambdas: list[float]
    top_ks: list[int]
    levels: list[int]
    counts: np.ndarray
    counts_late: np.ndarray
    late_batches: int
    curve_energy: list[float]
    curve_loss: list[float]
    energy_j: float
    dynamic_j: float
    adapt_dynamic_j: float
    expert_j: float
    busy_s: float
    infer_s: float
    adapt_s: float
    adapt_calls: int
    top_k: int
    mask: np.ndarray
    decision: Any
    signals: tuple[float, ...] = ()


def serve_stream(
    infer: Callable[..., tuple[Any, Any]],
    adapt: Callable[..., tuple[Any, Any]],
    params: Any,
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    work: Callable[[Any, int], Work],
    dense: Work,
    device: SimulatedDevice,
    monitor: AbstractMonitor,
    period_s: float,
    top_k: int,
    mask: np.ndarray,
    lam: float = 0.0,
    adapting: bool = False,
    adapt_every: int = 1,
    adapt_windows: int = 1,
    backward_factor: float = 2.0,
    policy: Any = None,
    schedule: Schedule | None = None,
    on_window: Callable[[Any, np.ndarray], None] | None = None,
    windowed: Callable[..., Any] | None = None,
    window_rows: int | None = None,
) -> ServedStream:
    """Serve ``inputs`` batch by batch, prequentially, each batch one monitor window.

    Args:
      infer, adapt, work: the model's functions (module docstring).
      params: the parameters at the start; adaptation carries them along the stream.
      inputs, targets: (S, B, ...) batches.
      dense: the work of everything but the experts in one forward pass of a full batch.
      device: prices work in joules (:meth:`SimulatedDevice.work_energy`).
      monitor: measures each window; a simulated one (with ``record_work``) is fed the work
        and idles for the rest of ``period_s``. The caller closes it.
      top_k, mask, lam: the routing and λ_energy of the first batch.
      adapting: adapt from the start (a policy turns it on and off afterwards).
      adapt_every, adapt_windows: adapt on the first ``adapt_windows`` rows of every
        ``adapt_every``-th batch (``windowed``: the rows its adaptation reads, every batch).
      backward_factor: an adaptation step costs ``1 + backward_factor`` forward passes.
      policy: a :class:`metattt.energy.PowerBudget` or None.
      schedule: a :class:`metattt.energy.schedule.Schedule` deciding, from each batch's
        signal, whether to adapt on it (instead of ``adapt_every``); ``infer`` must then
        return ``(score, counts, signal)``.
      on_window: called after each batch with its :class:`WindowRecord` and its inference
        expert counts (layers, E), e.g. to choose adapter ranks from the readings
        (:func:`metattt.energy.adapter_ranks`) for the next adaptation.
      windowed: ``windowed(params, inputs, targets, lam, mask, adapting=...) ->``
        :class:`metattt.energy.windows.WindowServed` (e.g. a jitted
        :func:`~metattt.energy.windows.serve_windows`): adapt after every window (of tokens or of
        sequences) of every batch instead (no policy, no schedule); ``work`` then prices a
        chunk, ``dense`` a chunk's dense work. ``infer_s`` is the wall time of the same pass
        without adaptation, ``adapt_s`` what adapting added to it.
      window_rows: with ``windowed``, the rows each chunk's forward pass reads, as ``work``
        is asked to price them (None: the batch's B, token windows; W for windows of W
        sequences).
    """
    if windowed is not None and (policy is not None or schedule is not None):
        raise ValueError("windowed serving takes no policy and no schedule")
    simulated = hasattr(monitor, "record_work")
    state = policy.init() if policy is not None else None
    decision = None
    steps = len(inputs)
    late = max(steps // 4, 1)
    scores, power, lams, levels, ks = [], [], [], [], []
    counts_total = counts_late = None
    curve_energy, curve_loss = [], []
    energy = dynamic = busy = adapt_dynamic = expert_j = 0.0
    infer_s = adapt_s = 0.0
    adapt_calls = 0
    signals: list[float] = []
    when = schedule.init() if schedule is not None else None

    def charge(counts, rows, scale=1.0):  # price one pass and feed the monitor
        nonlocal dynamic
        w = work(counts, rows).scaled(scale) if scale != 1.0 else work(counts, rows)
        joules = device.work_energy(*w)
        dynamic += joules
        return (monitor.record_work(*w) if simulated else 0.0), joules

    def charge_adaptation(stats, rows):  # every step (each of its passes): its busy time
        nonlocal adapt_dynamic
        step_counts = np.asarray(stats.expert_counts)
        busy_s = 0.0
        for c in step_counts.reshape(-1, *step_counts.shape[-2:]):
            step_busy, joules = charge(c, rows, 1 + backward_factor)
            busy_s += step_busy
            adapt_dynamic += joules
        curve_energy.extend(np.asarray(stats.joules_per_token).reshape(-1).tolist())
        curve_loss.extend(np.asarray(stats.task_loss).reshape(-1).tolist())
        return busy_s

    for t in range(steps):
        with monitor.measure() as window:
            k = top_k
            x, y = inputs[t], targets[t]
            start = time.perf_counter()
            if windowed is not None:
                out = jax.block_until_ready(windowed(params, x, y, lam, mask, adapting=False))
                plain_s = time.perf_counter() - start
                infer_s += plain_s
                if adapting:
                    start = time.perf_counter()
                    out = jax.block_until_ready(windowed(params, x, y, lam, mask, adapting=True))
                    adapt_s += max(time.perf_counter() - start - plain_s, 0.0)
                    params = out.params
                    adapt_calls += len(out.scores)
                score, per_chunk = float(np.mean(out.scores)), np.asarray(out.counts)
                counts = per_chunk.sum(0)
                step_busy = 0.0
                for chunk_counts in per_chunk:
                    chunk_busy, joules = charge(chunk_counts, window_rows or x.shape[0])
                    step_busy += chunk_busy
                    expert_j += joules - device.work_energy(*dense)
                if adapting:
                    step_busy += charge_adaptation(out.stats, adapt_windows)
            else:
                out = jax.block_until_ready(infer(params, x, y, k, mask))
                infer_s += time.perf_counter() - start
                score, counts = out[0], np.asarray(out[1])
                if schedule is not None:
                    if len(out) != 3:
                        raise ValueError(
                            "with a schedule, infer must return (score, counts, signal)"
                        )
                    signals.append(float(out[2]))
                    when, due = schedule.update(when, signals[-1])
                else:
                    due = t % adapt_every == 0
                step_busy, joules = charge(counts, x.shape[0])
                expert_j += joules - device.work_energy(*dense)
                if adapting and due:
                    sub = x[:adapt_windows]
                    start = time.perf_counter()
                    params, stats = jax.block_until_ready(adapt(params, sub, lam, mask))
                    adapt_s += time.perf_counter() - start
                    adapt_calls += 1
                    step_busy += charge_adaptation(stats, sub.shape[0])
            if simulated:
                monitor.idle(max(period_s - step_busy, 0.0))
        rec = window.record
        energy += rec.energy_j
        busy += step_busy
        scores.append(float(score))
        power.append(rec.mean_power_w)
        lams.append(float(lam))
        ks.append(k)
        if counts_total is None:
            counts_total = np.zeros(counts.shape, np.int64)
            counts_late = np.zeros_like(counts_total)
        counts_total += counts
        if t >= steps - late:
            counts_late += counts
        if on_window is not None:
            on_window(rec, counts)
        if policy is not None:
            state, decision = policy.update(state, rec.mean_power_w, rec.max_temperature_c)
            lam, top_k, mask = decision.lambda_energy, decision.top_k, decision.expert_mask
            adapting = decision.adapt
            levels.append(decision.level)
    return ServedStream(
        scores, power, lams, ks, levels, counts_total, counts_late, late, curve_energy,
        curve_loss, energy, dynamic, adapt_dynamic, expert_j, busy, infer_s, adapt_s,
        adapt_calls, int(top_k), np.asarray(mask), decision, tuple(signals),
    )  # fmt: skip
