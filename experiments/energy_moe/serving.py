"""Serving a stream prequentially with one method: every batch is scored before the method may
adapt on it, and every batch is one measured window of the (simulated) monitor.

In a window the device does the batch's forward pass -- the dense layers plus
:func:`metattt.models.moe.expert_work` of the experts actually used -- and, when the method
adapts, ``1 + BACKWARD_FACTOR`` times the forward work of each adaptation step (priced with
that step's own routing), then idles until the next batch arrives at the serving rate.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.energy_moe.registry import Method
from experiments.energy_moe.runtime import Runtime
from experiments.energy_moe.tasks import Metric
from metattt.energy import (
    Work,
    create_monitor,
    dense_work,
    edp,
    fixed_power,
    forward_work,
    lambda_controller,
    power_budget,
    routed_energy,
    serving_rate,
)
from metattt.models import moe

BACKWARD_FACTOR = 2.0  # a backward pass costs about two forwards (input and weight gradients)


def batch_dense_work(rt: Runtime, batch: int, length: int) -> Work:
    """Work of everything but the experts in one forward pass of (batch, length) tokens."""
    m = rt.mcfg
    return dense_work(
        d_model=m.d_model, num_layers=m.num_layers, num_experts=m.num_experts,
        vocab_size=m.vocab_size, batch=batch, length=length,
    )  # fmt: skip


def batch_work(rt: Runtime, counts: Any, batch: int, length: int) -> Work:
    """Dense work plus the work of the experts actually used (``counts`` (layers, E))."""
    experts = moe.expert_work(jnp.asarray(counts), rt.mcfg)
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
) -> dict[str, Any]:
    """Serve the stream prequentially with ``method``; every batch is a monitor window.

    ``stream`` has ``inputs`` (S·B, L) tokens and ``targets`` (S·B, ...) for the score.
    Returns the cell: the metric, energies, delay, EDP, wall times and per-batch traces.
    """
    mcfg = rt.mcfg
    b, length = cfg.data.batch, cfg.data.length
    tokens = b * length
    period = tokens / rate
    monitor = create_monitor(
        cfg.monitor.kind, allow_simulated=cfg.monitor.allow_simulated, seed=seed
    )
    simulated = hasattr(monitor, "record_work")
    k = method.top_k or mcfg.top_k
    mask = static_mask(rt.joules, method.prune)
    lam = method.lam
    allow_adapt = method.kind in ("ttt", "energy_ttt")
    policy = state = None
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
        state = policy.init()
        lam = cfg.budget.lam_init
    inputs = stream.inputs.reshape(-1, b, length)
    targets = stream.targets.reshape(len(inputs), b, *stream.targets.shape[1:])
    nats, power, lams, levels, ks = [], [], [], [], []
    counts_total = np.zeros((mcfg.num_layers, mcfg.num_experts), np.int64)
    counts_late = np.zeros_like(counts_total)
    curve_energy, curve_loss = [], []
    energy = dynamic = busy = adapt_dynamic = expert_j = 0.0
    dense = batch_dense_work(rt, b, length)
    infer_s = adapt_s = 0.0
    adapt_calls = 0
    steps = len(inputs)
    late = max(steps // 4, 1)  # the last quarter of the stream: routing after adaptation
    for t in range(steps):
        with monitor.measure() as window:
            start = time.perf_counter()
            loss, counts = jax.block_until_ready(
                rt.infer[k](params, inputs[t], targets[t], jnp.asarray(mask))
            )
            infer_s += time.perf_counter() - start
            counts = np.asarray(counts)
            work = batch_work(rt, counts, b, length)
            step_busy = monitor.record_work(*work) if simulated else 0.0
            dynamic += rt.device.work_energy(*work)
            expert_j += rt.device.work_energy(*work) - rt.device.work_energy(*dense)
            if allow_adapt and t % cfg.ttt.every == 0:
                sub = inputs[t, : cfg.ttt.windows]
                start = time.perf_counter()
                params, aux = jax.block_until_ready(
                    rt.adapt(params, sub, jnp.float32(lam), jnp.asarray(mask))
                )
                adapt_s += time.perf_counter() - start
                adapt_calls += 1
                curve_energy += np.asarray(aux.joules_per_token).tolist()
                curve_loss += np.asarray(aux.task_loss).tolist()
                for step_counts in np.asarray(aux.expert_counts):
                    w = batch_work(rt, step_counts, sub.shape[0], length).scaled(
                        1 + BACKWARD_FACTOR
                    )
                    if simulated:
                        step_busy += monitor.record_work(*w)
                    adapt_dynamic += rt.device.work_energy(*w)
                    dynamic += rt.device.work_energy(*w)
            if simulated:
                monitor.idle(max(period - step_busy, 0.0))
        rec = window.record
        energy += rec.energy_j
        busy += step_busy
        nats.append(float(loss))
        power.append(rec.mean_power_w)
        lams.append(float(lam))
        ks.append(k)
        counts_total += counts
        if t >= steps - late:
            counts_late += counts
        if policy is not None:
            state, decision = policy.update(state, rec.mean_power_w, rec.max_temperature_c)
            lam, k, mask = decision.lambda_energy, decision.top_k, decision.expert_mask
            allow_adapt = decision.adapt
            levels.append(decision.level)
    monitor.close()
    half = steps // 2
    out = {
        metric.key: float(np.mean(nats)) * metric.scale,
        f"{metric.key}_late": float(np.mean(nats[half:])) * metric.scale,
        "tokens": steps * tokens,
        "energy_j": energy,
        "dynamic_j": dynamic,
        "adapt_dynamic_j": adapt_dynamic,
        "expert_j": expert_j,
        "delay_s": busy,
        "uj_per_token": 1e6 * dynamic / (steps * tokens),
        "routed_uj_per_token_late": routed_energy(rt.joules, counts_late, late * tokens),
        "total_uj_per_token": 1e6 * energy / (steps * tokens),
        "edp": edp(dynamic, busy, steps * tokens),
        "infer_wall_s": infer_s,
        "adapt_wall_s": adapt_s,
        "overhead": adapt_s / infer_s,
        "adapt_calls": adapt_calls,
        "mean_power_w": float(np.mean(power)),
        "late_power_w": float(np.mean(power[half:])),
        "power_trace": power,
        "lambda_trace": lams,
        "top_k_trace": ks,
        "counts": counts_total.tolist(),
        "counts_late": counts_late.tolist(),
        "curve_energy_uj": [1e6 * v for v in curve_energy],
        "curve_loss": curve_loss,
        "monitor": monitor.source,
        "monitor_fallback": monitor.fallback_reason,
    }
    if policy is not None:
        out.update(
            budget_w=budget_w,
            level_trace=levels,
            final_level=levels[-1],
            final_top_k=int(k),
            final_pruned=int(np.sum(~np.asarray(mask))),
            plan_budget_met=bool(decision.budget_met),
            budget_kept=out["late_power_w"] <= budget_w,
        )
    return out
