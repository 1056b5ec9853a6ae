"""Markdown tables of a run's results: every method, the matched-accuracy comparison, budgets."""

from __future__ import annotations

import math
from typing import Any

from experiments.energy_moe.registry import ENERGY_AWARE
from experiments.energy_moe.tasks import Metric, task_of


def fmt(entry: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± ci`` of a seed summary (the mean alone when the interval is undefined)."""
    mean, ci = entry["mean"] * scale, entry["ci"] * scale
    if math.isfinite(ci):
        return f"{mean:.{digits}f} ± {ci:.{digits}f}"
    return f"{mean:.{digits}f}"


def change(entry: dict[str, Any], metric: Metric) -> str:
    """A change vs no_ttt: percent when relative, accuracy points (pp) when absolute."""
    return fmt(entry, 1, 100) + ("%" if metric.relative else " pp")


def summary(results: dict[str, Any], cfg) -> str:
    """Markdown tables: every method, the matched-accuracy comparison, the budgets."""
    return summary_tables(results, task_of(cfg).metric)


def summary_tables(results: dict[str, Any], metric: Metric) -> str:
    """:func:`summary`'s tables for any metric."""
    rows = results["methods"]
    front = set(results["pareto_front"])
    kinds = [k for k in ENERGY_AWARE if k in results["kinds"].values()] or list(ENERGY_AWARE)
    aware = " or ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)
    m_key, label = metric.key, metric.label
    lines = [
        f"| method | {label} | Δ {label} vs no TTT | routed expert energy/token, last "
        "quarter (µJ) | dyn. energy/token (µJ) | energy reduction | total energy/token (µJ) "
        "| EDP (µJ·ns) | TTT overhead (wall) | adapt share of energy | Pareto | ≥20% & <5% |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        overhead = (
            fmt(r["overhead"], 1, 100) + "%" if r["meets_overhead_target"] is not None else "-"
        )
        lines.append(
            f"| {name} | {fmt(r[m_key])} | {change(r[f'{m_key}_change'], metric)} | "
            f"{fmt(r['routed_uj_per_token_late'], 4)} | {fmt(r['uj_per_token'], 4)} | "
            f"{fmt(r['energy_reduction'], 1, 100)}% | "
            f"{fmt(r['total_uj_per_token'], 4)} | {fmt(r['edp'], 3, 1e15)} | {overhead} | "
            f"{fmt(r['adapt_share_of_energy'], 1, 100)}% | {'yes' if name in front else ''} | "
            f"{'yes' if r['meets_energy_target'] else 'no'} |"
        )
    lines += [
        "",
        f"**Matched accuracy**: the cheapest energy-aware TTT point ({aware}) with "
        f"{label} no worse than each static baseline.",
        "",
        f"| baseline | {label} | µJ/token | best energy-aware at ≤ {label} | its {label} "
        "| its µJ/token | energy-aware wins |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in results["matched"].items():
        if m["best_aware"] is None:
            lines.append(
                f"| {name} | {m['baseline_bpc']:.3f} | {m['baseline_uj']:.4f} | none as accurate "
                "| - | - | no |"
            )
        else:
            lines.append(
                f"| {name} | {m['baseline_bpc']:.3f} | {m['baseline_uj']:.4f} | {m['best_aware']} "
                f"| {m['aware_bpc']:.3f} | {m['aware_uj']:.4f} | {'yes' if m['beats'] else 'no'} |"
            )
    budgets = [n for n in rows if "budget_w" in rows[n]]
    if budgets:
        lines += [
            "",
            "**Power budgets** (per seed: final level 0 = λ only, 1 = pruned, 2 = smaller top-k; "
            "kept = mean power over the second half of the stream within the budget).",
            "",
            "| budget | budget (W) | mean power, 2nd half (W) | final level | final top-k | "
            f"experts pruned | kept | plan predicts budget met | {label} |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in budgets:
            r = rows[name]
            lines.append(
                f"| {name} | {fmt(r['budget_w'], 2)} | {fmt(r['late_power_w'], 2)} | "
                f"{r['final_level']} | {r['final_top_k']} | {r['final_pruned']} | "
                f"{r['budget_kept']} | {r['plan_budget_met']} | {fmt(r[m_key])} |"
            )
    return "\n".join(lines)
