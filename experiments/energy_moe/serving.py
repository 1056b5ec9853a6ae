"""Serving a stream with one method: the MoE's work, the serving rate and fixed power of a
config, and a cell of results from :func:`metattt.energy.serving.serve_stream` (prequential:
every batch is scored before the method may adapt on it; every batch is one monitor window).

A forward pass costs the dense layers plus :func:`metattt.models.moe.expert_work` of the
experts actually used (int8 methods: their experts' weights read as int8, see
:mod:`metattt.models.quantize`; with expert LoRA, each expert's merge at its active rank too);
an adaptation step ``1 + BACKWARD_FACTOR`` forward passes (each of its passes, when the
objective runs two). Expert-level methods and other objectives are served through their
:class:`.expert.Variant`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.energy_moe import schedules, windows
from experiments.energy_moe.expert import HardwareRanks, Variant, hardware_limits, prepare
from experiments.energy_moe.explanations import Snapshots, explain, explains
from experiments.energy_moe.pressure import MemoryPressure
from experiments.energy_moe.registry import Method
from experiments.energy_moe.runtime import Runtime
from experiments.energy_moe.tasks import Metric
from metattt.energy import (
    AbstractMonitor,
    MemoryReading,
    SimulatedMemory,
    Work,
    create_monitor,
    dense_work,
    edp,
    fixed_power,
    forward_work,
    lambda_controller,
    power_budget,
    read_memory,
    routed_energy,
    serving_rate,
)
from metattt.energy.serving import serve_stream
from metattt.models import moe, quantize

BACKWARD_FACTOR = 2.0  # a backward pass costs about two forwards (input and weight gradients)


def batch_dense_work(rt: Runtime, batch: int, length: int) -> Work:
    """Work of everything but the experts in one forward pass of (batch, length) tokens."""
    m = rt.mcfg
    return dense_work(
        d_model=m.d_model, num_layers=m.num_layers, num_experts=m.num_experts,
        vocab_size=m.vocab_size, batch=batch, length=length,
    )  # fmt: skip


def batch_work(
    rt: Runtime,
    counts: Any,
    batch: int,
    length: int,
    variant: Variant | None = None,
    lora_ranks: Any = None,
    weights: str = "float",
) -> Work:
    """Dense work plus the work of the experts actually used (``counts`` (layers, E)), their
    weights stored as ``weights`` (:data:`metattt.models.moe.WEIGHT_FORMATS`), with the
    variant's expert LoRA merges at ``lora_ranks`` ((layers, E); None: its rank) and its
    fast-weight terms (:func:`metattt.models.fast_weights.fast_work`)."""
    if variant is not None and variant.rank and not variant.mcfg.fast_rank:
        ranks = variant.rank if lora_ranks is None else jnp.asarray(lora_ranks)
        experts = moe.expert_work(
            jnp.asarray(counts), variant.mcfg, lora_ranks=ranks, weights=weights
        )
    elif variant is not None:
        m = variant.mcfg
        groups = batch * -(-length // m.fast_chunk) if m.fast_rank else None  # sequences × chunks
        experts = moe.expert_work(jnp.asarray(counts), m, weights=weights, fast_groups=groups)
    else:
        experts = moe.expert_work(jnp.asarray(counts), rt.mcfg, weights=weights)
    return forward_work(batch_dense_work(rt, batch, length), experts.flops, experts.bytes)


def stream_rate(rt: Runtime, *, batch: int, length: int, utilization: float) -> float:
    """r tokens/s: the unadapted model at mean-cost routing keeps the device busy
    ``utilization`` of the time (:func:`metattt.energy.serving_rate`)."""
    return serving_rate(
        rt.device, batch_dense_work(rt, batch, length), *moe.expert_token_costs(rt.mcfg),
        tokens=batch * length, top_k=rt.mcfg.top_k, num_layers=rt.mcfg.num_layers,
        utilization=utilization,
    )  # fmt: skip


def stream_fixed_power(rt: Runtime, *, batch: int, length: int, rate: float) -> float:
    """Idle plus the dense layers' dynamic power at ``rate`` (what routing cannot change)."""
    dense = batch_dense_work(rt, batch, length)
    return fixed_power(rt.device, dense, tokens=batch * length, rate=rate)


def static_mask(joules: np.ndarray, prune: int) -> np.ndarray:
    """(E,) bool with the ``prune`` costliest experts off (ties: the higher index)."""
    e = len(joules)
    order = e - 1 - np.argsort(-joules[::-1], kind="stable")
    mask = np.ones((e,), bool)
    mask[order[:prune]] = False
    return mask


def memory_reader(cfg, monitor: AbstractMonitor) -> Callable[[], MemoryReading]:
    """Memory readings to go with ``monitor``: under the simulated monitor a simulated device of
    ``monitor.memory_gb`` GiB whose other tenants use ``monitor.memory_others_gb`` per reading
    (:class:`metattt.energy.SimulatedMemory`), so that a run does not depend on the machine;
    otherwise the live device's (or the host's) reading."""
    if monitor.source == "simulated":
        m = cfg.monitor
        others = [round(g * 2**30) for g in m.memory_others_gb]
        return SimulatedMemory(round(m.memory_gb * 2**30), others).read
    return lambda: read_memory(jax.devices()[0])


def _model_fns(rt: Runtime, variant: Variant | None, hw: HardwareRanks | None, seed: int):
    """``infer(params, inputs, targets, top_k, mask)`` and ``adapt(params, tokens, λ, mask)``
    of :func:`metattt.energy.serving.serve_stream`: the router TTT's compiled functions, or the
    variant's, whose adaptation call c draws its corruptions with ``fold_in(key(seed), c)``
    (``lora_hw``: after applying the ranks the last window's readings chose)."""
    if variant is None:
        infer = lambda p, x, y, k, mask: rt.infer[k](p, x, y, jnp.asarray(mask))
        adapt = lambda p, x, lam, mask: rt.adapt(p, x, jnp.float32(lam), jnp.asarray(mask))
        return infer, adapt
    calls, base = itertools.count(), jax.random.key(seed)

    def adapt(p, x, lam, mask):
        key = jax.random.fold_in(base, next(calls))
        if hw is not None:
            p = hw.apply(p, jax.random.fold_in(key, 1))
        return variant.adapt(p, x, jnp.float32(lam), jnp.asarray(mask), key)

    return lambda p, x, y, k, mask: variant.infer(p, x, y, jnp.asarray(mask)), adapt


def serve(
    cfg,
    rt: Runtime,
    params: Any,
    stream: Any,
    method: Method,
    *,
    rate: float,
    seed: int,
    metric: Metric,
    budget_w: float | None = None,
    variant: Variant | None = None,
    reference: Any = None,
) -> dict[str, Any]:
    """Serve the stream prequentially with ``method``; every batch is a monitor window.

    ``stream`` has ``inputs`` (S·B, L) tokens and ``targets`` (S·B, ...) for the score;
    ``variant`` serves an expert-level method or another objective (its adaptation call c
    draws its corruptions with ``fold_in(key(seed), c)``); ``reference`` (inputs (N, B, L),
    targets (N, B, ...)) in-distribution batches calibrate a schedule's threshold
    (:mod:`.schedules`; the signal is the served model's own). ``memory`` serves under memory
    pressure (:mod:`.pressure`); the methods that adapt (but budgets) record routing
    explanations (:mod:`.explanations`).
    Returns the cell: the metric, energies, delay, EDP, wall times and per-batch traces.
    """
    mcfg = rt.mcfg
    b, length = cfg.data.batch, cfg.data.length
    tokens = b * length
    monitor = create_monitor(
        cfg.monitor.kind, allow_simulated=cfg.monitor.allow_simulated, seed=seed
    )
    policy = None
    if method.kind == "budget":
        policy = power_budget(
            budget_w,
            rt.joules,
            top_k=mcfg.top_k,
            num_layers=mcfg.num_layers,
            idle_power_w=stream_fixed_power(rt, batch=b, length=length, rate=rate),
            tokens_per_s=rate,
            controller=lambda_controller(
                budget_w,
                lam_init=cfg.budget.lam_init,
                lam_min=cfg.budget.lam_min,
                lam_max=cfg.budget.lam_max,
                gain=cfg.budget.gain,
            ),
            patience=cfg.budget.patience,
        )
    inputs = stream.inputs.reshape(-1, b, length)
    hw = None
    if method.kind == "lora_hw":
        fixed = stream_fixed_power(rt, batch=b, length=length, rate=rate)
        limits = hardware_limits(cfg, variant, budget_w, fixed)
        hw = HardwareRanks(variant, limits, memory_reader(cfg, monitor))
    if variant is not None:
        params = prepare(variant, params, seed)  # int8 experts too where the variant has them
    elif method.int8:
        params = quantize.quantize_experts(params)
    infer, adapt = _model_fns(rt, variant, hw, seed)
    weights = "int8" if method.int8 else "float"
    targets = stream.targets.reshape(len(inputs), b, *stream.targets.shape[1:])
    work = lambda counts, rows: batch_work(
        rt, counts, rows, length, variant, None if hw is None else hw.active, weights
    )
    on_window = None if hw is None else hw.on_window
    schedule = pressure = snaps = None
    signals, probe = (rt.signals, rt.probe) if variant is None else (variant.signals, variant.probe)
    if method.schedule:  # the served model's signal, its threshold from its start parameters
        all_experts = jnp.ones((mcfg.num_experts,), bool)
        threshold = schedules.calibrate(cfg, method, signals, params, reference, all_experts)
        schedule = schedules.make_schedule(cfg, method, threshold)
        infer = schedules.scheduled_infer(signals, method)
    if method.kind == "memory":
        pressure = MemoryPressure(cfg, rt, params, inputs[0], targets[0], work)
        infer, work, on_window = pressure.infer, pressure.work, pressure.on_window
    if explains(method):
        snaps = Snapshots(infer, adapt, half=len(inputs) // 2)
        infer, adapt = snaps.infer, snaps.adapt
    windowed, dense = None, batch_dense_work(rt, b, length)
    window_rows, adapt_windows = None, cfg.ttt.windows
    mask = static_mask(rt.joules, method.prune)
    if method.window:
        adapt_windows = windows.adapt_rows(cfg, mcfg, method.window)
        windowed = windows.windowed(mcfg, rt.adapt, method.window, adapt_windows)
        windows.warm_up(windowed, params, inputs[0], targets[0], jnp.asarray(mask))
        if windows.axis_of(mcfg) == 1:  # a chunk is a (B, W) pass; adapting reads (rows, W)
            work = lambda counts, rows: batch_work(rt, counts, rows, method.window,
                                                   weights=weights)  # fmt: skip
            dense = batch_dense_work(rt, b, method.window)
        else:  # a window is a (W, L) pass of W images; adapting reads (rows, L)
            window_rows = method.window
            dense = batch_dense_work(rt, method.window, length)
    served = serve_stream(
        infer,
        adapt,
        params,
        inputs,
        targets,
        work=work,
        dense=dense,
        device=rt.device,
        monitor=monitor,
        period_s=tokens / rate,
        top_k=method.top_k or mcfg.top_k,
        mask=mask,
        lam=cfg.budget.lam_init if policy is not None else method.lam,
        adapting=method.adapts and policy is None,
        adapt_every=cfg.ttt.every,
        adapt_windows=adapt_windows,
        backward_factor=BACKWARD_FACTOR,
        policy=policy,
        schedule=schedule,
        on_window=on_window,
        windowed=windowed,
        window_rows=window_rows,
    )
    monitor.close()
    steps = len(inputs)
    half = steps // 2
    out = {
        metric.key: float(np.mean(served.scores)) * metric.scale,
        f"{metric.key}_late": float(np.mean(served.scores[half:])) * metric.scale,
        "tokens": steps * tokens,
        "energy_j": served.energy_j,
        "dynamic_j": served.dynamic_j,
        "adapt_dynamic_j": served.adapt_dynamic_j,
        "expert_j": served.expert_j,
        "delay_s": served.busy_s,
        "uj_per_token": 1e6 * served.dynamic_j / (steps * tokens),
        "routed_uj_per_token_late": routed_energy(
            rt.joules, served.counts_late, served.late_batches * tokens
        ),
        "total_uj_per_token": 1e6 * served.energy_j / (steps * tokens),
        "edp": edp(served.dynamic_j, served.busy_s, steps * tokens),
        "infer_wall_s": served.infer_s,
        "adapt_wall_s": served.adapt_s,
        "overhead": served.adapt_s / served.infer_s,
        "adapt_calls": served.adapt_calls,
        "mean_power_w": float(np.mean(served.power_w)),
        "late_power_w": float(np.mean(served.power_w[half:])),
        "power_trace": served.power_w,
        "lambda_trace": served.lambdas,
        "top_k_trace": served.top_ks,
        "counts": served.counts.tolist(),
        "counts_late": served.counts_late.tolist(),
        "curve_energy_uj": [1e6 * v for v in served.curve_energy],
        "curve_loss": served.curve_loss,
        "monitor": monitor.source,
        "monitor_fallback": monitor.fallback_reason,
    }
    if windowed is not None:
        out["window"] = method.window
        out["window_unit"] = "tokens" if window_rows is None else "images"
    if hw is not None:
        out.update(
            hw_budget_w=budget_w,
            rank_trace=hw.trace,
            rank_units_max=int(hw.active.size * variant.rank),
            final_ranks=hw.active.tolist(),
        )
    if schedule is not None:
        out.update(schedules.signal_summary(served.signals, threshold, method))
    if pressure is not None:
        out.update(pressure.summary())
    if snaps is not None:
        out["explain"] = explain(rt, probe, params, snaps, inputs[-1])
    if policy is not None:
        out.update(
            budget_w=budget_w,
            level_trace=served.levels,
            final_level=served.levels[-1],
            final_top_k=served.top_k,
            final_pruned=int(np.sum(~served.mask)),
            plan_budget_met=bool(served.decision.budget_met),
            budget_kept=out["late_power_w"] <= budget_w,
        )
    return out
