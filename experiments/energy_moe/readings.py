"""The reading of an energy_moe run: what its numbers say about each lever (issue 15's targets),
computed from ``results.json`` alone (the report's "Reading" paragraph, :mod:`.report`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.energy_moe.registry import ENERGY_AWARE, INT8
from experiments.energy_moe.tables import (
    change,
    explained_best,
    periodic_reference,
    router_reference,
    when_to_adapt,
)
from experiments.energy_moe.tasks import BPC, Metric


def reading(results: dict[str, Any], metric: Metric = BPC) -> list[str]:
    """Plain-language reading of the targets for any metric, computed from the results."""
    rows, kinds = results["methods"], results["kinds"]
    m_key, label = metric.key, metric.label
    aware = [n for n in rows if kinds[n] in ENERGY_AWARE]
    hits = [n for n in aware if rows[n]["meets_energy_target"]]
    both = [n for n in hits if rows[n]["meets_overhead_target"]]
    base, ttt = rows["no_ttt"], rows["ttt"]
    share = base["expert_share_of_energy"]["mean"]
    routed = base["routed_uj_per_token_late"]["mean"]
    expert = results.get("expert") or {}
    adapt_share = np.mean([rows[n]["adapt_share_of_energy"]["mean"] for n in rows
                           if kinds[n] == "energy_ttt" and n not in expert])  # fmt: skip
    lines = [
        f"- Without TTT the experts are {100 * share:.0f}% of the dynamic energy (the rest is "
        "attention, projections, router and LM head, which routing cannot change): a 20% "
        f"total saving needs the experts' energy cut by {min(100 * 0.2 / share, 999):.0f}%.",
        f"- TTT without the energy term changes {label} by "
        f"{change(ttt[f'{m_key}_change'], metric)} and energy by "
        f"{-100 * ttt['energy_reduction']['mean']:+.1f}%; the adaptation's own forward and "
        f"backward passes are {100 * adapt_share:.1f}% of the energy-aware TTT runs' dynamic "
        "energy.",
        "- Routing alone (routed expert energy per token over the last quarter of the "
        "stream, relative to no_ttt): "
        + ", ".join(
            f"{n} {100 * (rows[n]['routed_uj_per_token_late']['mean'] / routed - 1):+.0f}%"
            for n in rows
            if n != "no_ttt" and kinds[n] != "budget"
        )
        + ".",
        f"- Energy-aware points meeting ≥ 20% energy reduction with < 5"
        f"{'%' if metric.relative else ' pp'} {label} increase: "
        f"{', '.join(hits) or 'none'}; of those also with TTT overhead < 10%: "
        f"{', '.join(both) or 'none'}.",
    ]
    lines += expert_reading(results, metric)
    lines += fast_reading(results, metric)
    lines += plan_reading(results, metric)
    lines += int8_reading(results, metric)
    for name, m in results["matched"].items():
        if m["best_aware"] is None:
            lines.append(f"- vs {name}: no energy-aware point is as accurate, so no win counts.")
        else:
            verdict = "uses less" if m["beats"] else "does NOT use less"
            lines.append(
                f"- vs {name} ({m['baseline_bpc']:.3f} {label}, {m['baseline_uj']:.4f} µJ/tok): "
                f"{m['best_aware']} ({m['aware_bpc']:.3f} {label}) {verdict} energy "
                f"({m['aware_uj']:.4f} µJ/tok)."
            )
    return lines


def int8_reading(results: dict[str, Any], metric: Metric) -> list[str]:
    """One line on the weight-only int8 experts (issue 15 item 5): each int8 method's energy
    saved and change vs no TTT, what int8 adds to the same method on float experts (where that
    ran: ``int8`` -> ``no_ttt``, ``int8_<m>`` -> ``<m>``), and which move toward the targets
    (energy saved at < 5% accuracy loss) or meet them."""
    rows, kinds, m_key, label = results["methods"], results["kinds"], metric.key, metric.label
    int8 = [n for n in rows if kinds[n] in INT8]
    if not int8:
        return []
    unit = "%" if metric.relative else " pp"
    saved = lambda n: rows[n]["energy_reduction"]["mean"]
    parts = []
    for n in int8:
        text = f"{n} {100 * saved(n):+.1f}% / {change(rows[n][f'{m_key}_change'], metric)}"
        same = "no_ttt" if n == "int8" else n.removeprefix("int8_")
        if same in rows:
            text += f" ({100 * (saved(n) - saved(same)):+.1f} pp energy saved vs {same})"
        parts.append(text)
    toward = [n for n in int8 if saved(n) > 0 and rows[n][f"{m_key}_change"]["mean"] < 0.05]
    hits = [n for n in int8 if rows[n]["meets_energy_target"]]
    return [
        "- Weight-only int8 experts (per-output-channel symmetric scales, static; priced at 1 "
        "byte per weight plus float32 scales and one dequantizing multiply per weight, the "
        f"matmuls' FLOPs unchanged), energy reduction and change in {label} vs no_ttt: "
        + ", ".join(parts)
        + f". Saving energy at < 5{unit} {label} increase (toward the target): "
        f"{', '.join(toward) or 'none'}; meeting ≥ 20% at < 5{unit}: {', '.join(hits) or 'none'}."
    ]


def expert_reading(results: dict[str, Any], metric: Metric) -> list[str]:
    """One line on the expert-level methods (issue 15) vs router TTT at the same λ."""
    expert = results.get("expert") or {}
    if not expert:
        return []
    rows = results["methods"]
    m_key, unit = metric.key, "%" if metric.relative else " pp"
    parts = []
    for name in expert:
        r, ref = rows[name], router_reference(results, name)
        text = (
            f"{name} {change(r[f'{m_key}_change'], metric)} {metric.label}, "
            f"{100 * r['energy_reduction']['mean']:+.1f}% energy saved"
        )
        if ref is not None:
            better = r[m_key]["mean"] < rows[ref][m_key]["mean"]
            cheaper = r["uj_per_token"]["mean"] < rows[ref]["uj_per_token"]["mean"]
            text += (
                f" ({'more' if better else 'not more'} accurate and "
                f"{'cheaper' if cheaper else 'not cheaper'} than {ref})"
            )
        parts.append(text)
    hits = [n for n in expert if rows[n]["meets_energy_target"]]
    return [
        "- Expert-level adaptation and objectives (vs no TTT): " + "; ".join(parts) + ". "
        f"Meeting ≥ 20% energy reduction with < 5{unit} {metric.label} increase: "
        f"{', '.join(hits) or 'none'}."
    ]


def fast_reading(results: dict[str, Any], metric: Metric) -> list[str]:
    """One line on the fast-weight methods (issue 15 item 3): each against no TTT and against
    LoRA at the same trainable parameters (``lora_ttt/<ρ>``, when it ran), and whether it moves
    toward the targets (≥ 20% energy at < 5% accuracy loss; overhead < 10%)."""
    expert = results.get("expert") or {}
    rows, m_key = results["methods"], metric.key
    unit = "%" if metric.relative else " pp"

    def point(n):
        row = rows[n]
        return (f"{n} {change(row[f'{m_key}_change'], metric)} {metric.label}, "
                f"{100 * row['energy_reduction']['mean']:+.1f}% energy saved, overhead "
                f"{100 * row['overhead']['mean']:.0f}%")  # fmt: skip

    parts = []
    for name, info in expert.items():
        if not info.get("fast_rank"):
            continue
        r, lora = rows[name], f"lora_ttt/{info['rank']}"
        toward = r["energy_reduction"]["mean"] > 0 and r[f"{m_key}_change"]["mean"] < 0.05
        versus = ""
        if lora in rows:
            versus = f" vs {point(lora)} at the same {info['adapted_params']} adapted parameters"
            toward = (
                toward and r["energy_reduction"]["mean"] > rows[lora]["energy_reduction"]["mean"]
            )
        parts.append(
            f"{point(name)} (fast rank {info['fast_rank']}){versus}: "
            + ("moves" if toward else "does not move")
            + f" toward ≥ 20% energy saved at < 5{unit} {metric.label} increase (target "
            f"{'met' if r['meets_energy_target'] else 'not met'}; overhead < 10%: "
            f"{'met' if r['meets_overhead_target'] else 'not met'})"
        )
    if not parts:
        return []
    return [
        "- Fast-weight experts (item 3; their key/value steps run in every forward pass, so "
        "their work is paid on every token, not only on the adapted batches): "
        + "; ".join(parts)
        + "."
    ]


def plan_reading(results: dict[str, Any], metric: Metric) -> list[str]:
    """Lines on issue 15 items 6-8: schedules vs periodic adaptation, memory pressure, and the
    routing explanations, each saying whether it moves toward the targets."""
    rows, m_key, label = results["methods"], metric.key, metric.label
    lines = []
    for name in when_to_adapt(rows):
        r, ref = rows[name], periodic_reference(results, name)
        when = (
            f"{r['adapt_calls']['mean']:.1f} batches "
            f"({100 * r['hard_share']['mean']:.0f}% of the stream past the threshold)"
            if "hard_share" in r
            else f"{r['adapt_calls']['mean']:.1f} windows of {r['window']} "
            f"{r.get('window_unit', 'tokens')}"
        )
        text = (
            f"- {name} adapted on {when}: "
            f"{change(r[f'{m_key}_change'], metric)} {label}, "
            f"{100 * r['energy_reduction']['mean']:+.1f}% energy, TTT overhead "
            f"{100 * r['overhead']['mean']:.1f}%"
        )
        if ref is not None:
            p = rows[ref]
            text += (
                f"; vs {ref} ({p['adapt_calls']['mean']:.1f} adaptations) "
                f"{r[m_key]['mean'] - p[m_key]['mean']:+.3f} {label} and "
                f"{100 * (r['uj_per_token']['mean'] / p['uj_per_token']['mean'] - 1):+.1f}% "
                "energy per token"
            )
        verdict = "meets" if r["meets_energy_target"] else "does not meet"
        unit = "%" if metric.relative else " pp"
        lines.append(text + f"; it {verdict} the ≥ 20% energy at < 5{unit} {label} target.")
    for name in (n for n in rows if "memory_over" in rows[n]):
        r = rows[name]
        lines.append(
            f"- {name}: with full service throughout, {r['memory_over_full']} batches per seed "
            "would have needed more memory than the other tenants left; the step-down policy "
            f"served {100 * r['memory_degraded_share']['mean']:.0f}% of the batches degraded "
            f"and exceeded the memory left in {r['memory_over']} (the reading follows the batch, "
            f"so a sudden rise is met one batch late), at {change(r[f'{m_key}_change'], metric)}"
            f" {label} and {100 * r['energy_reduction']['mean']:+.1f}% energy vs no_ttt"
            + _capacity_share(r)
            + "; a memory lever, it "
            f"{'meets' if r['meets_energy_target'] else 'does not meet'} the ≥ 20% energy at "
            f"< 5{'%' if metric.relative else ' pp'} {label} target."
        )
    best = explained_best(results)
    if best is not None:
        e = rows[best]["explain"]
        lines.append(
            f"- Routing explanations: {best}'s final router avoided assignments worth "
            f"{e['avoided_uj_per_token']['mean']:.4f} µJ/token on the last batch and adopted "
            f"{e['adopted_uj_per_token']['mean']:.4f} instead (net "
            f"{e['saved_uj_per_token']['mean']:+.4f}); its top-k sets agree with the trained "
            f"router's on {100 * e['agreement_end']['mean']:.0f}% of the tokens (mid-stream "
            f"{100 * e['agreement_mid']['mean']:.0f}%, mid-stream vs final "
            f"{100 * e['agreement_mid_end']['mean']:.0f}%)."
        )
    return lines


def _capacity_share(r: dict[str, Any]) -> str:
    """The share of batches the memory method served at a capacity-factor level (nothing
    without such levels)."""
    levels, shares = r["memory_levels"], r.get("memory_level_shares")
    if shares is None or all(cf is None for cf, _, _ in levels):
        return ""
    at = sum(s for (cf, _, _), s in zip(levels, shares, strict=True) if cf is not None)
    text = f"; {100 * at:.0f}% of the batches were served at a capacity-factor level"
    need = {(cf, k, c): b for (cf, k, c), b in zip(levels, r["memory_level_bytes"], strict=True)}
    extra = [b - need[(None, k, c)] for (cf, k, c), b in need.items()
             if cf is not None and (None, k, c) in need]  # fmt: skip
    if extra and min(extra) >= 0:
        span = f"{min(extra)}" if min(extra) == max(extra) else f"{min(extra)}-{max(extra)}"
        text += (
            f" (each priced {span} bytes above the dropless level of the same chunks and "
            "top-k: the rung buys no memory here)"
        )
    return text
