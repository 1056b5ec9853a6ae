"""From per-(seed, method) cells to results: means ± CIs, changes vs no_ttt, targets, the
Pareto front, the matched-accuracy comparison, and the per-method data the figures draw."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.energy_moe.registry import BASELINES, ENERGY_AWARE, Method
from experiments.energy_moe.tasks import BPC, Metric
from metattt import stats
from metattt.energy import pareto_front

SCALARS = (
    "bpc",
    "routed_uj_per_token_late",
    "bpc_late",
    "uj_per_token",
    "total_uj_per_token",
    "edp",
    "overhead",
    "infer_wall_s",
    "adapt_wall_s",
    "mean_power_w",
    "late_power_w",
)


def scalars(metric: Metric = BPC) -> tuple[str, ...]:
    """The per-cell scalars :func:`aggregate` averages, with ``bpc`` renamed to the metric."""
    return tuple(key.replace("bpc", metric.key) for key in SCALARS)


def aggregate(
    cells: dict[str, list[dict]], table: dict[str, Method], metric: Metric = BPC
) -> dict[str, Any]:
    """Means ± 95% CIs over seeds, changes relative to ``no_ttt`` per seed, targets, front.

    The accuracy target is ``<metric>_change < 0.05``: a relative change for bits/char, an
    absolute one (accuracy points) for an error rate.
    """
    base = cells["no_ttt"]
    key_m = metric.key
    rows: dict[str, dict[str, Any]] = {}
    for name, runs in cells.items():
        row = {key: stats.seed_summary([r[key] for r in runs]) for key in scalars(metric)}
        row["energy_reduction"] = stats.seed_summary(
            [1 - r["uj_per_token"] / b["uj_per_token"] for r, b in zip(runs, base, strict=True)]
        )
        row[f"{key_m}_change"] = stats.seed_summary(
            [r[key_m] / b[key_m] - 1 if metric.relative else r[key_m] - b[key_m]
             for r, b in zip(runs, base, strict=True)]
        )  # fmt: skip
        row["adapt_share_of_energy"] = stats.seed_summary(
            [r["adapt_dynamic_j"] / r["dynamic_j"] for r in runs]
        )
        row["expert_share_of_energy"] = stats.seed_summary(
            [r["expert_j"] / r["dynamic_j"] for r in runs]
        )
        if table[name].kind == "budget":
            row["budget_w"] = stats.seed_summary([r["budget_w"] for r in runs])
            for key in ("final_level", "final_top_k", "final_pruned", "budget_kept"):
                row[key] = [r[key] for r in runs]
            row["plan_budget_met"] = [r["plan_budget_met"] for r in runs]
        if table[name].kind == "lora_hw":  # the share of the rank buffer the hardware allowed
            row["rank_share"] = stats.seed_summary(
                [float(np.mean(r["rank_trace"])) / r["rank_units_max"] for r in runs]
            )
        row.update(_issue15_rows(runs, table[name]))
        red, chg = row["energy_reduction"]["mean"], row[f"{key_m}_change"]["mean"]
        row["meets_energy_target"] = bool(red >= 0.20 and chg < 0.05)
        row["meets_overhead_target"] = (
            bool(row["overhead"]["mean"] < 0.10) if table[name].adapts else None
        )
        rows[name] = row
    names = list(rows)
    points = [(rows[n]["uj_per_token"]["mean"], rows[n][key_m]["mean"]) for n in names]
    front = [names[i] for i in pareto_front(points)]
    return {"methods": rows, "pareto_front": front, "matched": matched(rows, table, key_m)}


def _issue15_rows(runs: list[dict], method: Method) -> dict[str, Any]:
    """Per-seed summaries of the schedules (adaptations, signal threshold, share of hard
    batches), the memory-pressure method (batches over the memory left, degraded share) and the
    routing explanations (energy of avoided and adopted assignments, top-k agreement; activation
    shares averaged over seeds; the first seed's token explanation)."""
    row: dict[str, Any] = {}
    if method.adapts:
        row["adapt_calls"] = stats.seed_summary([r["adapt_calls"] for r in runs])
    if method.window:
        row["window"] = method.window
        row["window_unit"] = runs[0].get("window_unit", "tokens")
    if method.schedule:
        for key in ("threshold", "hard_share"):
            row[key] = stats.seed_summary([r[key] for r in runs])
    if method.kind == "memory":
        for key in ("memory_over", "memory_over_full"):
            row[key] = [r[key] for r in runs]
        row["memory_degraded_share"] = stats.seed_summary(
            [r["memory_degraded_share"] for r in runs]
        )
        row["memory_level_bytes"] = runs[0]["memory_level_bytes"]
        row["memory_levels"] = runs[0]["memory_levels"]
        if "memory_level_shares" in runs[0]:  # mean over seeds of each level's share of batches
            row["memory_level_shares"] = np.mean(
                [r["memory_level_shares"] for r in runs], axis=0
            ).tolist()
    if "explain" in runs[0]:
        ex = [r["explain"] for r in runs]
        keys = ("avoided_uj_per_token", "adopted_uj_per_token", "saved_uj_per_token",
                "agreement_mid", "agreement_end", "agreement_mid_end")  # fmt: skip
        row["explain"] = {key: stats.seed_summary([e[key] for e in ex]) for key in keys}
        for key in ("avoided", "adopted"):
            row["explain"][key] = np.sum([e[key] for e in ex], axis=0).tolist()
        for key in ("shares_before", "shares_after"):
            row["explain"][key] = np.mean([e[key] for e in ex], axis=0).tolist()
        row["explain"]["token"] = ex[0]["token"]
    return row


def matched(
    rows: dict[str, dict], table: dict[str, Method], key: str = "bpc"
) -> dict[str, dict[str, Any]]:
    """For each static baseline: the cheapest energy-aware TTT point at no worse ``key``.

    ``beats`` when that point uses less dynamic energy per token than the baseline (means over
    seeds); ``None`` when no energy-aware point is as accurate as the baseline.
    """
    aware = [n for n, m in table.items() if m.kind in ENERGY_AWARE]
    out = {}
    for name, method in table.items():
        if method.kind not in BASELINES:
            continue
        bpc, energy = rows[name][key]["mean"], rows[name]["uj_per_token"]["mean"]
        ok = [n for n in aware if rows[n][key]["mean"] <= bpc]
        best = min(ok, key=lambda n: rows[n]["uj_per_token"]["mean"]) if ok else None
        out[name] = {
            "baseline_bpc": bpc,
            "baseline_uj": energy,
            "best_aware": best,
            "aware_bpc": rows[best][key]["mean"] if best else None,
            "aware_uj": rows[best]["uj_per_token"]["mean"] if best else None,
            "beats": (rows[best]["uj_per_token"]["mean"] < energy) if best else None,
        }
    return out


#: (figure key, cell field) of the per-step adaptation curves.
CURVE_FIELDS = (("energy_uj", "curve_energy_uj"), ("loss", "curve_loss"))


def _prefix_mean(curves: list[list[float]]) -> list[float]:
    """Mean over seeds of each step's value, over the steps every seed has: a scheduled method
    adapts a different number of times per seed, so its curves differ in length."""
    steps = min(len(c) for c in curves)
    return np.mean([c[:steps] for c in curves], axis=0).tolist()


def figure_data(cells: dict[str, list[dict]], table: dict[str, Method]) -> dict[str, Any]:
    """What the figures draw beyond the per-method summaries, so that a report needs only
    ``results.json``:

    * ``counts_late``: per method, the expert assignments (layers, E) of the last quarter of
      the stream, summed over seeds (the heatmap);
    * ``curves``: per adapting method but the budgets, the expected routing energy
      (µJ/token) and the adaptation's task loss (the metric's unit before its scale) after each
      adaptation step, averaged over seeds over the steps every seed has (a scheduled method's
      seeds adapt different numbers of times) (the convergence plot);
    * ``traces``: the first seed's power per batch of ``no_ttt`` and of each budget, with the
      budget (W) and the controller's λ per batch (the budget plot).
    """
    curves = {
        name: {key: _prefix_mean([r[field] for r in runs]) for key, field in CURVE_FIELDS}
        for name, runs in cells.items()
        if table[name].adapts and table[name].kind != "budget" and runs[0]["curve_energy_uj"]
    }
    traces = {"no_ttt": {"power_w": cells["no_ttt"][0]["power_trace"]}}
    for name, runs in cells.items():
        if table[name].kind == "budget":
            run0 = runs[0]
            traces[name] = {
                "power_w": run0["power_trace"],
                "budget_w": run0["budget_w"],
                "lambda": run0["lambda_trace"],
            }
    return {
        "counts_late": {
            name: np.sum([r["counts_late"] for r in runs], axis=0).tolist()
            for name, runs in cells.items()
        },
        "curves": curves,
        "traces": traces,
    }
