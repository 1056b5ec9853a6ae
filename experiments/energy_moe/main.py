"""The experiment: config -> checks, per seed a trained model and a shifted stream, every method
served on it (cached per (seed, method) cell), then ``results.json`` in the workdir.

With ``train.mesh_devices`` the pretraining is data-parallel over a mesh of all processes'
devices (:mod:`.runtime`); every process then serves every cell alike, and process 0 alone
writes the cell records, ``results.json``, ``summary.md`` and the figures.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from experiments import harness
from experiments.energy_moe import (
    backend,
    expert,
    pressure,
    registry,
    runtime,
    schedules,
    serving,
    tuning,
    windows,
)
from experiments.energy_moe.aggregate import aggregate, figure_data
from experiments.energy_moe.plots import plot_all
from experiments.energy_moe.tables import summary
from experiments.energy_moe.tasks import task_of
from metattt import atomic, multihost, runlog, train
from metattt.energy import lambda_controller
from metattt.models import moe
from metattt.params import select

MONITOR_KINDS = ("simulated", "auto", "nvml")


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    task = task_of(cfg)
    task.validate_data(cfg)
    backend.validate(cfg)
    validate_methods(cfg, task.model_config(cfg))
    expert.validate(cfg, task.model_config(cfg), task.head)
    schedules.validate(cfg)
    windows.validate(cfg, task.head)
    pressure.validate(cfg, task.model_config(cfg).top_k, task.head)
    tuning.validate(cfg, task)


def validate_methods(cfg, mcfg: moe.MoEConfig) -> None:
    """Checks shared by every task: seeds, monitor, training, TTT, budgets and baselines."""
    if not cfg.seeds:
        raise ValueError("config.seeds is empty")
    if cfg.monitor.kind not in MONITOR_KINDS:
        raise ValueError(f"monitor.kind must be one of {MONITOR_KINDS}, got {cfg.monitor.kind!r}")
    if not 0 < cfg.monitor.utilization <= 1:
        raise ValueError(f"monitor.utilization must be in (0, 1], got {cfg.monitor.utilization}")
    others = tuple(cfg.monitor.memory_others_gb)
    if not cfg.monitor.memory_gb > 0 or not others or min(others) < 0:
        raise ValueError(f"need monitor.memory_gb > 0 and a non-empty monitor.memory_others_gb of "
                         f"values >= 0, got {cfg.monitor.memory_gb}, {others}")  # fmt: skip
    # Validates the model config; shapes only, so JAX starts no backend (a multi-process run
    # calls jax.distributed.initialize after these checks).
    params = jax.eval_shape(lambda: moe.init_moe(mcfg).params)
    select(params, cfg.ttt.params)  # an unknown preset or an empty selection raises
    t = cfg.train
    train.check_counts(
        t.num_steps, t.steps_per_call, t.checkpoint_every, t.steps_per_call, prefix="train."
    )
    harness.check_mesh_devices("train.mesh_devices", t.mesh_devices, {"train.batch": t.batch},
                               "examples")  # fmt: skip
    if cfg.ttt.steps < 1 or cfg.ttt.every < 1 or not 1 <= cfg.ttt.windows <= cfg.data.batch:
        raise ValueError("need ttt.steps >= 1, ttt.every >= 1 and 1 <= ttt.windows <= data.batch")
    if any(not lam > 0 for lam in cfg.ttt.lambdas):
        raise ValueError(f"ttt.lambdas must be > 0 (λ = 0 is the 'ttt' method), got "
                         f"{tuple(cfg.ttt.lambdas)}")  # fmt: skip
    if any(not 0 < f < 1 for f in cfg.budget.fractions):
        raise ValueError(f"budget.fractions must be in (0, 1), got {tuple(cfg.budget.fractions)}")
    lambda_controller(
        1.0,
        lam_init=cfg.budget.lam_init,
        lam_min=cfg.budget.lam_min,
        lam_max=cfg.budget.lam_max,
        gain=cfg.budget.gain,
    )
    for n in cfg.baselines.prune:
        if not 1 <= n <= mcfg.num_experts - mcfg.top_k:
            raise ValueError(
                f"baselines.prune entries must be in [1, num_experts - top_k = "
                f"{mcfg.num_experts - mcfg.top_k}], got {n}"
            )
    for k in cfg.baselines.top_k:
        if not 1 <= k < mcfg.top_k:
            raise ValueError(f"baselines.top_k entries must be in [1, top_k), got {k}")
    if "int8" in cfg and any(not lam > 0 for lam in cfg.int8.lambdas):
        raise ValueError(f"int8.lambdas must be > 0, got {tuple(cfg.int8.lambdas)}")


def cell_path(workdir: str, seed: int, name: str) -> str:
    """Where the cell of (seed, method) is cached."""
    return os.path.join(workdir, "cells", f"seed_{seed}", name.replace("/", "_") + ".json")


def run(cfg, workdir: str) -> dict[str, Any]:
    """Train per seed, serve the shifted stream with every method (cached per cell).

    Writes ``results.json`` (everything the report renders), ``summary.md`` and the figures
    into ``workdir``; returns the results.
    """
    validate(cfg)
    cfg, choice = backend.resolve(cfg, workdir)  # "cost_model": measured, stored, chosen
    task = task_of(cfg)
    rt = runtime.build_runtime(cfg, task.model_config(cfg), head=task.head)
    b, length = cfg.data.batch, cfg.data.length
    rate = serving.stream_rate(rt, batch=b, length=length, utilization=cfg.monitor.utilization)
    tuned = None
    if tuning.enabled(cfg):  # the fast-weight settings, chosen on the validation stream
        tuned = tuning.tune(cfg, rt, task, workdir, rate=rate)
        cfg = tuning.with_point(cfg, tuning.Point(**tuned["settings"]))
    variants = expert.build_variants(cfg, rt, task.head)
    p_fixed = serving.stream_fixed_power(rt, batch=b, length=length, rate=rate)
    table = registry.methods(cfg)
    cells: dict[str, list[dict[str, Any]]] = {name: [] for name in table}
    seeds_info = []
    for seed in cfg.seeds:
        cell = {n: cell_path(workdir, seed, tuning.cell_name(cfg, n, m)) for n, m in table.items()}
        pending = [n for n in table if not os.path.isfile(cell[n])]
        if multihost.any_process(bool(pending)):  # only then load the data, the parameters and
            # compile what is pending (every process, as the training's collectives need them all)
            params, stream, info, reference = task.prepare(cfg, rt, seed, workdir)
            todo = [table[n] for n in pending]
            int8 = any(m.int8 and not expert.needs_variant(m) for m in todo)
            signals = any(m.schedule and not expert.needs_variant(m) for m in todo)
            runtime.warm_up(rt, params, stream, batch=b, windows=cfg.ttt.windows, int8=int8,
                            signals=signals)  # fmt: skip
            expert.warm_up({n: variants[n] for n in pending if n in variants}, params, stream,
                           batch=b, windows=cfg.ttt.windows)  # fmt: skip
        else:
            with open(runtime.info_path(workdir, seed)) as f:
                info = json.load(f)
        seeds_info.append(info)
        for name, method in runlog.progress(table.items(), desc=f"methods seed {seed}"):
            budget_w = None
            if method.kind in ("budget", "lora_hw"):  # a share of no_ttt's dynamic power
                p0 = cells["no_ttt"][-1]["mean_power_w"]
                share = method.fraction if method.kind == "budget" else cfg.expert.hw_fraction
                budget_w = p_fixed + share * (p0 - p_fixed)
            cells[name].append(
                harness.json_cell(
                    cell[name],
                    lambda m=method, bw=budget_w, n=name: serving.serve(
                        cfg,
                        rt,
                        params,
                        stream,
                        m,
                        rate=rate,
                        seed=seed,
                        budget_w=bw,
                        metric=task.metric,
                        variant=variants.get(n),
                        reference=reference,
                    ),  # fmt: skip
                )
            )
    results = aggregate(cells, table, task.metric)
    results.update(
        seeds=list(cfg.seeds),
        seed_info=seeds_info,
        serving_rate_tokens_s=rate,
        fixed_power_w=p_fixed,
        idle_power_w=rt.device.idle_power_w,
        expert_uj_per_token=(1e6 * rt.joules).tolist(),
        expert_widths=list(rt.mcfg.expert_widths),
        monitor=cells["no_ttt"][0]["monitor"],
        monitor_fallback=cells["no_ttt"][0]["monitor_fallback"],
        kinds={name: m.kind for name, m in table.items()},
        expert=expert.describe(variants, table),
        figures=figure_data(cells, table),
    )
    if tuned is not None:
        results["tuning"] = tuned
    if choice is not None:
        results["backend_choice"] = backend.record(choice)
    if multihost.is_primary():  # every process of a multi-process run holds the same results
        atomic.write_json(os.path.join(workdir, "results.json"), results, indent=1)
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(summary(results, cfg) + "\n")
        plot_all(results, workdir, metric=task.metric, prefix=task.section)
    return results


#: The demo's power budget: this share of no TTT's dynamic power above the fixed power (that of
#: the full runs' ``budget/0.9`` and ``lora_hw``).
DEMO_BUDGET_SHARE = 0.9


def demo_rows(workdir: str) -> list[tuple[str, str, str, float, float, float]]:
    """``make demo``: no TTT vs the full runs' best energy-aware point (the experts quantized to
    weight-only int8 and energy-aware TENT of the router at λ 1 on the batches whose router
    margin marks them hard, ``int8_energy_ttt/1@margin``) on the demo config's shifted (code)
    stream.

    Returns rows ``(system, method, metric, before, after, seconds)``: the simulated mean power
    over the second half of the stream against a budget (:data:`DEMO_BUDGET_SHARE` of no TTT's
    dynamic power; the metric says whether the method meets it), the dynamic energy per token
    with the adaptation's own work included, and bits/char.
    """
    from configs import energy_moe as energy_config  # configs are read by experiments only

    cfg = energy_config.get_config("demo")
    cfg.budget.fractions = ()
    cfg.baselines.prune = ()
    cfg.baselines.top_k = ()
    cfg.int8.enabled = False
    start = time.perf_counter()
    results = run(cfg, os.path.join(workdir, "energy_moe"))
    seconds = time.perf_counter() - start
    rows = results["methods"]
    (name,) = cfg.schedule.methods
    base, best = rows["no_ttt"], rows[name]
    fixed = results["fixed_power_w"]
    budget = fixed + DEMO_BUDGET_SHARE * (base["mean_power_w"]["mean"] - fixed)
    met = "met" if best["late_power_w"]["mean"] <= budget else "not met"
    system = "energy-aware MoE TTT"
    served = registry.parse_method(name)
    method = (
        f"{'int8 experts, ' if served.int8 else ''}TENT+energy (λ={served.lam:g}) on hard "
        f"batches (router margin), {best['adapt_calls']['mean']:.0f} adaptations"
    )
    metrics = (
        ("late_power_w", f"sim. power, 2nd half of stream (W); budget {budget:.1f} W {met}"),
        ("uj_per_token", "sim. dyn. energy/token incl. adaptation (µJ)"),
        ("bpc", "bits/char, docs -> code"),
    )
    return [
        (system, method, metric, base[key]["mean"], best[key]["mean"], seconds)
        for key, metric in metrics
    ]
