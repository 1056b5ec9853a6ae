"""Markdown tables of a run's results: every method, the matched-accuracy comparison, budgets,
and the expert-level adaptation methods against router TTT at the same λ_energy."""

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
    """Markdown tables: every method, the matched-accuracy comparison, the budgets, the
    expert-level methods."""
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
    lines += expert_table(results, metric)
    return "\n".join(lines)


def router_reference(results: dict[str, Any], name: str) -> str | None:
    """The router-only energy-aware TTT at the same λ_energy (``energy_ttt/<λ>``), if it ran
    (the objective variants aside)."""
    info = results["expert"][name]
    ref = f"energy_ttt/{info['lam']:g}"
    return ref if ref in results["methods"] and ref != name else None


def _rank(info: dict[str, Any], row: dict[str, Any]) -> str:
    """The LoRA rank: fixed, or up to R with the mean share the hardware allowed."""
    if info.get("rank_policy"):
        return f"≤ {info['rank']}, mean {fmt(row['rank_share'], 0, 100)}% of the buffer"
    return str(info["rank"] or "-")


def expert_table(results: dict[str, Any], metric: Metric) -> list[str]:
    """The expert-level methods and objectives (issue 15): what adapts, how many parameters,
    and the change vs no TTT and vs router TTT at the same λ (no lines when none ran)."""
    expert = results.get("expert") or {}
    if not expert:
        return []
    rows, m_key, label = results["methods"], metric.key, metric.label
    lines = [
        "",
        "**Expert-level adaptation and objectives** (issue 15): each adapts the listed "
        "parameters with the listed objective plus λ_energy · E; a LoRA factor counts its "
        "active rank only (lora_hw: its largest). 'vs router TTT': the same method's mean minus "
        "energy_ttt's at the same λ.",
        "",
        f"| method | adapts | objective | λ | LoRA rank | adapted params | {label} | Δ {label} vs "
        f"no TTT | energy reduction | Δ {label} vs router TTT | Δ µJ/token vs router TTT | "
        "adapt share of energy | TTT overhead (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, info in expert.items():
        r, ref = rows[name], router_reference(results, name)
        if ref is None:
            d_metric = d_energy = "-"
        else:
            d_metric = f"{r[m_key]['mean'] - rows[ref][m_key]['mean']:+.3f}"
            d_energy = f"{r['uj_per_token']['mean'] - rows[ref]['uj_per_token']['mean']:+.4f}"
        lines.append(
            f"| {name} | {info['params']} | {info['objective']} | {info['lam']:g} | "
            f"{_rank(info, r)} | {info['adapted_params']} | {fmt(r[m_key])} | "
            f"{change(r[f'{m_key}_change'], metric)} | {fmt(r['energy_reduction'], 1, 100)}% | "
            f"{d_metric} | {d_energy} | {fmt(r['adapt_share_of_energy'], 1, 100)}% | "
            f"{fmt(r['overhead'], 1, 100)}% |"
        )
    return lines
