"""Markdown tables of a run's results: every method, the matched-accuracy comparison, budgets,
the expert-level adaptation methods against router TTT at the same λ_energy, and (issue 15
items 6-8) the schedules against periodic adaptation, memory pressure and routing
explanations."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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
    lines += expert_table(results, metric) + tuning_table(results, metric)
    lines += schedule_table(results, metric) + memory_table(results, metric)
    lines += explain_table(results)
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
    if info.get("fast_rank"):
        return f"fast R = {info['fast_rank']} (params of LoRA {info['rank']})"
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


#: What each task's validation stream is, and what it shares with the test stream.
VALIDATION = {
    "bpc": "code windows of the same stdlib modules that share no byte with any test window",
    "error": "corrupted images of the train split (no test image; the model was trained on "
    "their clean versions)",
}


def tuning_table(results: dict[str, Any], metric: Metric) -> list[str]:
    """The fast-weight settings' grid on the validation stream, the chosen point marked (no
    lines when the run did not tune)."""
    t = results.get("tuning")
    if not t:
        return []
    key, label = metric.key, metric.label
    bound = f"{100 * t['max_change']:g}{'%' if metric.relative else ' pp'}"
    rule = (
        f"no point within {bound}: the best {label}"
        if t["fallback"]
        else f"the lowest µJ/token at Δ {label} < {bound}"
    )
    chosen, edges = t["points"][t["chosen"]], []
    for field in ("fast_lr", "fast_chunk", "fast_steps"):  # a choice at the grid's border
        tried = sorted({p[field] for p in t["points"]})
        if len(tried) > 1 and chosen[field] in (tried[0], tried[-1]):
            side = "smallest" if chosen[field] == tried[0] else "largest"
            edges.append(f"{field} {chosen[field]:g} is the {side} tried")
    edge = f" At the grid's edge: {', '.join(edges)}." if edges else ""
    lines = [
        "",
        f"**Fast-weight settings chosen on a validation stream** ({t['method']}, "
        f"{t['stream_batches']} batches per seed of {VALIDATION[key]}; no TTT there: "
        f"{fmt(t['no_ttt'][key])} {label}, {fmt(t['no_ttt']['uj_per_token'], 4)} µJ/token). "
        f"Chosen on the seeds' means, {rule}; every fast-weight method serves the test stream "
        f"at it.{edge}",
        "",
        f"| fast_lr | fast_chunk | fast_steps | validation {label} | validation Δ {label} vs no "
        "TTT | validation µJ/token | energy reduction | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(t["points"]):
        lines.append(
            f"| {p['fast_lr']:g} | {p['fast_chunk']} | {p['fast_steps']} | {fmt(p[key])} | "
            f"{change(p[f'{key}_change'], metric)} | {fmt(p['uj_per_token'], 4)} | "
            f"{fmt(p['energy_reduction'], 1, 100)}% | {'**yes**' if i == t['chosen'] else ''} |"
        )
    return lines


def periodic_reference(results: dict[str, Any], name: str) -> str | None:
    """The same method adapting every ``ttt.every``-th batch (its name without ``@...`` or
    ``~w...``)."""
    ref = name.partition("@")[0].partition("~")[0]
    return ref if ref != name and ref in results["methods"] else None


def when_to_adapt(rows: dict[str, Any]) -> list[str]:
    """The methods that choose when to adapt: by a schedule or per window."""
    return [n for n in rows if "hard_share" in rows[n] or "window" in rows[n]]


def window_unit(rows: dict[str, Any]) -> str:
    """What the ``~w<W>`` rows' windows hold: ``"tokens"`` (LM) or ``"images"`` (digits)."""
    return next((r.get("window_unit", "tokens") for r in rows.values() if "window" in r), "tokens")


def schedule_table(results: dict[str, Any], metric: Metric) -> list[str]:
    """When to adapt (issue 15 item 7): each scheduled or per-window method against its
    periodic reference."""
    rows, m_key, label = results["methods"], metric.key, metric.label
    names = when_to_adapt(rows)
    if not names:
        return []
    lines = [
        "",
        "**When to adapt** (issue 15 item 7): the signal's threshold is a quantile of its "
        "in-distribution values; 'hard batches' is the share of stream batches past it"
        + (
            f"; '~w<W>' adapts after every W-{window_unit(rows)[:-1]} window of every batch "
            "(adaptations: windows)"
            if any("window" in rows[n] for n in names)
            else ""
        )
        + ". 'vs periodic': this method's mean minus the same method adapting every "
        "ttt.every-th batch.",
        "",
        f"| method | threshold | hard batches | adaptations | {label} | Δ {label} vs no TTT | "
        f"energy reduction | adapt share of energy | TTT overhead (wall) | adaptations vs "
        f"periodic | Δ {label} vs periodic | Δ µJ/token vs periodic |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r, ref = rows[name], periodic_reference(results, name)
        vs = ["-", "-", "-"]
        if ref is not None:
            p = rows[ref]
            vs = [
                f"{r['adapt_calls']['mean']:.1f} vs {p['adapt_calls']['mean']:.1f}",
                f"{r[m_key]['mean'] - p[m_key]['mean']:+.3f}",
                f"{r['uj_per_token']['mean'] - p['uj_per_token']['mean']:+.4f}",
            ]
        when = (
            [fmt(r["threshold"], 3), f"{fmt(r['hard_share'], 0, 100)}%"]
            if "hard_share" in r
            else [f"- (W = {r['window']})", "all"]
        )
        lines.append(
            f"| {name} | {' | '.join(when)} | "
            f"{fmt(r['adapt_calls'], 1)} | {fmt(r[m_key])} | "
            f"{change(r[f'{m_key}_change'], metric)} | {fmt(r['energy_reduction'], 1, 100)}% | "
            f"{fmt(r['adapt_share_of_energy'], 1, 100)}% | {fmt(r['overhead'], 1, 100)}% | "
            + " | ".join(vs)
            + " |"
        )
    return lines


def memory_table(results: dict[str, Any], metric: Metric) -> list[str]:
    """Memory pressure (issue 15 item 6): the levels, their bytes and what serving under the
    trace cost."""
    rows, m_key, label = results["methods"], metric.key, metric.label
    names = [n for n in rows if "memory_over" in rows[n]]
    if not names:
        return []
    shares = any("memory_level_shares" in rows[n] for n in names)
    capacity = any(cf is not None for n in names for cf, _, _ in rows[n]["memory_levels"])
    what = "batch chunks, capacity factor, top-k" if capacity else "batch chunks, top-k"
    lines = [
        "",
        f"**Memory pressure** (issue 15 item 6): levels ({what}) priced by XLA's "
        "peak bytes of the compiled forward; per seed, the batches whose served level exceeded "
        "the memory the other tenants left, with the policy and with full service throughout"
        + ("; after each level, the share of batches served at it (mean over seeds)" if shares
           else "")
        + ".",
        "",
        f"| method | levels: chunks x top-k{', capacity factor' if capacity else ''} (KiB) | "
        f"batches degraded | over the memory left | "
        f"full service: over | {label} | Δ {label} vs no TTT | energy reduction |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name in names:
        r = rows[name]
        share = r.get("memory_level_shares", [None] * len(r["memory_levels"]))
        levels = ", ".join(
            f"{c}x{k}{' ' + _capacity(cf) if capacity else ''} ({b / 1024:.0f})"
            + ("" if s is None else f": {100 * s:.0f}%")
            for (cf, k, c), b, s in zip(
                r["memory_levels"], r["memory_level_bytes"], share, strict=True
            )  # fmt: skip
        )
        lines.append(
            f"| {name} | {levels} | {fmt(r['memory_degraded_share'], 0, 100)}% | "
            f"{r['memory_over']} | {r['memory_over_full']} | {fmt(r[m_key])} | "
            f"{change(r[f'{m_key}_change'], metric)} | {fmt(r['energy_reduction'], 1, 100)}% |"
        )
    return lines


def _capacity(cf: float | None) -> str:
    return "dropless" if cf is None else f"c={cf:g}"


def explained_best(results: dict[str, Any]) -> str | None:
    """The explained method whose routing saved the most energy per token (None: none)."""
    rows = results["methods"]
    names = [n for n in rows if "explain" in rows[n]]
    return max(names, key=lambda n: rows[n]["explain"]["saved_uj_per_token"]["mean"], default=None)


def explain_table(results: dict[str, Any]) -> list[str]:
    """Routing explanations (issue 15 item 8): avoided and adopted assignments' energy, router
    stability, and the activation shares before and after for the largest saving."""
    rows = results["methods"]
    names = [n for n in rows if "explain" in rows[n]]
    if not names:
        return []
    lines = [
        "",
        "**Routing explanations** (issue 15 item 8), on the stream's last batch, final vs "
        "trained router: the energy per token of the assignments the adapted router avoided and "
        "of those it adopted instead (net = saved), and the share of tokens whose top-k set is "
        "unchanged between the trained, the mid-stream and the final router.",
        "",
        "| method | avoided (µJ/token) | adopted (µJ/token) | net saved (µJ/token) | top-k "
        "agreement trained→mid | trained→final | mid→final |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        e = rows[name]["explain"]
        lines.append(
            f"| {name} | {fmt(e['avoided_uj_per_token'], 4)} | {fmt(e['adopted_uj_per_token'], 4)}"
            f" | {fmt(e['saved_uj_per_token'], 4)} | {fmt(e['agreement_mid'], 3)} | "
            f"{fmt(e['agreement_end'], 3)} | {fmt(e['agreement_mid_end'], 3)} |"
        )
    best = explained_best(results)
    e = rows[best]["explain"]
    before = np.mean(e["shares_before"], axis=0)
    after = np.mean(e["shares_after"], axis=0)
    avoided, adopted = np.sum(e["avoided"], axis=0), np.sum(e["adopted"], axis=0)
    lines += [
        "",
        f"Expert activation before → after for {best} (share of the assignments, mean over "
        f"layers and seeds; assignments avoided / adopted, all seeds). One token (seed "
        f"{results['seeds'][0]}): {e['token']}.",
        "",
        "| expert | width | µJ/token | share before | share after | avoided | adopted |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (w, uj) in enumerate(zip(results["expert_widths"], results["expert_uj_per_token"],
                                    strict=True)):  # fmt: skip
        lines.append(
            f"| {i} | {w} | {uj:.4f} | {100 * before[i]:.1f}% | {100 * after[i]:.1f}% | "
            f"{int(avoided[i])} | {int(adopted[i])} |"
        )
    return lines
