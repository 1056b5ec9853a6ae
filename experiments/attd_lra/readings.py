"""The reading of the results: plain statements and verdicts computed from the numbers."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.attd_lra.methods import (
    CONTROLLED,
    DIFFICULTY,
    METHOD_LABELS,
    METHODS,
    method_label,
    parse_method,
)
from metattt import stats

SPLITS = ("mix", "id", "shift")  # the per-seed accuracy lists: acc_<split>_seeds


def hist(counts: list[int]) -> str:
    total = max(sum(counts), 1)
    return " / ".join(f"{100 * c / total:.0f}" for c in counts)


def rho(ci: dict[str, float] | None) -> str:
    if ci is None:
        return "-"
    if not np.isfinite(ci["estimate"]):
        return "n/a (K constant)"
    if not (np.isfinite(ci["low"]) and np.isfinite(ci["high"])):
        return f"{ci['estimate']:+.2f} (no CI: K constant in some resamples)"
    return f"{ci['estimate']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]"


def _droprho(e: dict[str, Any]) -> str:
    return rho(e["spearman_drop_correct"]) if e["spearman_drop_correct"] else "-"


def reading(results: dict[str, Any]) -> list[str]:
    """Plain statements computed from the results (what helped, what the diagnostics say)."""
    lines = []
    for task_name, t in results["tasks"].items():
        if "fixed" not in t:
            continue
        base = t["fixed"]["acc_shift"]["mean"]
        parts = []
        for name, e in t.items():
            if name == "fixed":
                continue
            diff = e["acc_shift"]["mean"] - _fixed_on(t, e["seeds"])
            lowered = e["lint_lowered_share"]
            drop = e["lint_before_shift"]["mean"] - e["lint_after_shift"]["mean"]
            fell = (
                "diverged: L_int is NaN after outer training"
                if not np.isfinite(e["lint_after_shift"]["mean"])
                else f"L_int fell on {100 * lowered:.0f}% of adapted inputs, mean drop {drop:.4f}"
                if np.isfinite(lowered)
                else "no input adapted"
            )
            parts.append(
                f"{method_label(name)} {diff:+.3f} accuracy vs fixed at mean K "
                f"{e['mean_k_shift']['mean']:.2f} ({fell})"
            )
        lines.append(f"- {task_name} (shifted split, fixed Mamba {base:.3f}): " + "; ".join(parts))
        for name, e in t.items():
            if e["spearman_drop_correct"]:
                lines.append(
                    f"  - {method_label(name)}: Spearman of the per-input L_int drop with "
                    f"correctness {_droprho(e)} (both test splits; does lowering L_int go "
                    "with a right answer?)."
                )
            if e.get("spearman_drop_dlogp"):  # measured by runs from 2026-12-07 on
                lines.append(
                    f"  - {method_label(name)}: Spearman of the per-input L_int drop with the "
                    f"change of log p(true class) from ψ₀ {rho(e['spearman_drop_dlogp'])} "
                    "(both test splits; does the self-supervised progress carry to the task?)."
                )
        for name, e in t.items():
            if parse_method(name).base not in CONTROLLED:
                continue
            first = np.mean([th[0] for th in e["thresholds"]])
            lines.append(
                f"  - {method_label(name)}: K histogram over both test splits "
                f"{hist(np.add(e['k_hist_id'], e['k_hist_shift']).tolist())} % for K = "
                f"0..{results['k_max']}; first threshold after training {first:.3f} (mean over "
                f"seeds) vs mean signal s = {e['lint_before_shift']['mean']:.3f} on the shifted "
                f"split; Spearman of K with {DIFFICULTY[task_name]}: "
                f"{rho(e['spearman_k_difficulty'])}."
            )
        skipped = {n: e.get("skipped_outer_steps") for n, e in t.items() if n != "fixed"}
        if any(skipped.values()):
            lines.append(
                "  - Outer steps skipped because their loss or gradient was not finite (summed "
                "over seeds; the outer step keeps θ, ψ₀ and the thresholds as they were): "
                + "; ".join(f"{method_label(n)} {c}" for n, c in skipped.items() if c)
                + "."
            )
    return lines + _conclusions(results) + _order_conclusions(results) + _joint_conclusions(results)


def _fixed_on(table: dict[str, Any], seeds: list[int]) -> float:
    """The fixed model's mean shifted accuracy over ``seeds`` (an ablation may run on fewer)."""
    fixed = table["fixed"]
    by_seed = dict(zip(fixed["seeds"], fixed["acc_shift_seeds"], strict=True))
    return float(np.mean([by_seed[s] for s in seeds]))


def paired_difference(
    table: dict[str, Any], name: str, other: str, split: str = "shift"
) -> stats.MeanCI:
    """Mean over shared seeds of (``name``'s accuracy − ``other``'s) on ``split``, with its 95%
    t-interval: ``shift``, ``id`` or ``mix`` (``acc_<split>_seeds``), or a shift band's label
    (``band_acc_seeds``)."""

    def by_seed(e: dict[str, Any]) -> dict[int, float]:
        values = e[f"acc_{split}_seeds"] if split in SPLITS else e["band_acc_seeds"][split]
        return dict(zip(e["seeds"], values, strict=True))

    a, b = by_seed(table[name]), by_seed(table[other])
    return stats.mean_ci([a[s] - b[s] for s in a if s in b])


def fmt_diff(ci: stats.MeanCI) -> str:
    """``+0.012 [-0.003, +0.027]``, or ``(one seed)`` without an interval."""
    if np.isfinite(ci.half_width):
        return f"{ci.mean:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]"
    return f"{ci.mean:+.3f} (one seed)"


def fmt(e: dict[str, float], digits: int = 3) -> str:
    """A seed summary ``{mean, ci}`` as ``mean ± ci`` (the mean alone without an interval)."""
    if e["ci"] and np.isfinite(e["ci"]):
        return f"{e['mean']:.{digits}f} ± {e['ci']:.{digits}f}"
    return f"{e['mean']:.{digits}f}"


def _paired_tasks(results: dict[str, Any], has_twin, header: str, lines: list[str]):
    """Yield (task, table, methods with a twin) for each task that has any, appending a blank
    line and ``header`` to ``lines`` before the first. ``has_twin(name, table) -> bool``."""
    for task_name, t in results["tasks"].items():
        pairs = [n for n in t if has_twin(n, t)]
        if pairs:
            if not lines:
                lines += ["", header]
            yield task_name, t, pairs


def _order_conclusions(results: dict[str, Any]) -> list[str]:
    """Second vs first order, per controller: paired accuracy differences over seeds, the L_int
    drop ↔ correctness correlation, and whether K follows difficulty."""
    lines = []
    header = "Second vs first order (paired over seeds, 95% t-interval):"
    has_twin = lambda n, t: n in METHODS and f"{n}+so" in t
    for task_name, t, pairs in _paired_tasks(results, has_twin, header, lines):
        for n in pairs:
            so = f"{n}+so"
            vs_fo = paired_difference(t, so, n)
            vs_fixed = paired_difference(t, so, "fixed") if "fixed" in t else None
            verdict = (
                "second order helps"
                if vs_fo.low > 0
                else "second order hurts"
                if vs_fo.high < 0
                else "no difference the seeds can resolve"
            )
            lines.append(
                f"- {task_name}, {METHOD_LABELS[n]}: shifted accuracy, 2nd − 1st order "
                f"{fmt_diff(vs_fo)} ({verdict})"
                + (f"; 2nd order − fixed {fmt_diff(vs_fixed)}" if vs_fixed else "")
                + f"; mean K {t[n]['mean_k_shift']['mean']:.2f} → "
                f"{t[so]['mean_k_shift']['mean']:.2f}"
                + (
                    f"; L_int drop ~ correctness {_droprho(t[n])} → {_droprho(t[so])}"
                    if t[n]["spearman_drop_correct"] or t[so]["spearman_drop_correct"]
                    else ""
                )
                + (
                    f"; K ~ {DIFFICULTY[task_name]} {rho(t[n]['spearman_k_difficulty'])} → "
                    f"{rho(t[so]['spearman_k_difficulty'])}"
                    if n in CONTROLLED
                    else ""
                )
                + "."
            )
        lines += _order_verdict(task_name, t)
    return lines


def _excludes_zero(ci: dict[str, float] | None) -> bool:
    return bool(ci) and np.isfinite(ci["low"]) and (ci["low"] > 0 or ci["high"] < 0)


def _order_verdict(task_name: str, t: dict[str, Any]) -> list[str]:
    """The two questions of the comparison, answered from the numbers of one task."""
    lines = []
    s_at = {n: t[n]["lint_before_shift"]["mean"] for n in ("ttt", "ttt+so") if n in t}
    drop_of = {n: s_at[n] - t[n]["lint_after_shift"]["mean"] for n in s_at}
    if {"fixed", "ttt", "ttt+so"} <= set(t):
        gain = paired_difference(t, "ttt+so", "fixed")
        helps = gain.low > 0 if np.isfinite(gain.half_width) else False
        drop = t["ttt+so"]["spearman_drop_correct"]
        lines.append(
            f"- {task_name}: does second-order meta-training make TTT of the dynamics help? "
            + ("Yes" if helps else "No")
            + f": full TTT trained second order − fixed Mamba = {fmt_diff(gain)} shifted accuracy; "
            f"the per-input L_int drop ↔ correctness is {_droprho(t['ttt+so'])} "
            + ("(it carries task information)" if _excludes_zero(drop) else "(no association)")
            + f". How the order changed θ: s = L_int at ψ₀ on the shifted split "
            f"{s_at['ttt']:.3f} (1st) vs {s_at['ttt+so']:.3f} (2nd), and TTT lowers it by "
            f"{drop_of['ttt']:.3f} vs {drop_of['ttt+so']:.3f}."
        )
    if "attd+so" in t:
        ci = t["attd+so"]["spearman_k_difficulty"]
        more = _excludes_zero(ci) and ci["low"] > 0
        lines.append(
            f"- {task_name}: does ATTD trained second order spend more on harder inputs? "
            + ("Yes" if more else "No")
            + f": Spearman of K with {DIFFICULTY[task_name]} {rho(ci)}, mean K "
            f"{t['attd+so']['mean_k_shift']['mean']:.2f} on the shifted split."
        )
    return lines


def _joint_conclusions(results: dict[str, Any]) -> list[str]:
    """``+j`` against the same method without it, and TTT against the fixed model when both are
    trained jointly: paired shifted-accuracy differences over seeds, and L_int at ψ₀."""
    lines = []
    header = "Joint training of L_int (`+j`, paired over seeds, 95% t-interval):"
    has_twin = lambda n, t: not parse_method(n).joint and f"{n}+j" in t
    for task_name, t, pairs in _paired_tasks(results, has_twin, header, lines):
        for n in pairs:
            j = f"{n}+j"
            lines.append(
                f"- {task_name}, {method_label(n)}: shifted accuracy, with − without `+j` "
                f"{fmt_diff(paired_difference(t, j, n))}; L_int at ψ₀ on the shifted split "
                f"{t[n]['lint_before_shift']['mean']:.3f} → {t[j]['lint_before_shift']['mean']:.3f}"
            )
        if "fixed+j" in t:
            for n in t:
                spec = parse_method(n)
                if spec.joint and spec.base != "fixed":
                    gain = paired_difference(t, n, "fixed+j")
                    lines.append(
                        f"- {task_name}, {method_label(n)} − {method_label('fixed+j')} (does TTT "
                        f"help once both keep L_int?): {fmt_diff(gain)}"
                        f"; L_int drop ~ correctness {_droprho(t[n])}"
                    )
    return lines


def _conclusions(results: dict[str, Any]) -> list[str]:
    """What the diagnostics add up to, stated only where the numbers support it."""
    tasks = {t: v for t, v in results["tasks"].items() if {"fixed", "ttt"} <= set(v)}
    if not tasks:
        return []
    gains = {
        t: v["ttt"]["acc_shift"]["mean"] - v["fixed"]["acc_shift"]["mean"] for t, v in tasks.items()
    }
    lines = ["", "What this says:"]
    if all(g <= 0 for g in gains.values()):
        rel = {
            t: 1 - v["ttt"]["lint_after_shift"]["mean"] / v["ttt"]["lint_before_shift"]["mean"]
            for t, v in tasks.items()
        }
        drops = ", ".join(f"{t} {100 * r:.1f}%" for t, r in rel.items())
        lines.append(
            "- Test-time adaptation of the dynamics did not help at these sizes: full TTT is at "
            "or below the fixed model on every shifted split. The inner loop does lower L_int "
            f"(relative drop after {results['k_max']} steps: {drops}), but the per-input drop "
            "is uncorrelated with a right answer (Spearman above), so lowering the next-token "
            "loss through ψ does not carry task information here."
        )
    for name in ("attd", "attd_nocost"):
        off = [
            t for t, v in results["tasks"].items()
            if name in v and v[name]["mean_k_shift"]["mean"] < 0.25 * results["k_max"]
        ]  # fmt: skip
        if off:
            lines.append(
                f"- {METHOD_LABELS[name]} learned to spend little (mean K < K_max/4 on the shifted "
                f"split of {', '.join(off)}): its thresholds ended above most signals"
                + (
                    ", with no step cost at all, so it is the task loss, not λ, that turns "
                    "adaptation off."
                    if name == "attd_nocost"
                    else "."
                )
            )
    lines.append(
        "- Does K follow difficulty? Only where the Spearman interval above excludes 0; where "
        "it does not, the ponder signal (next-token loss) measures how predictable a sequence "
        "is, which need not be what makes an input of these tasks hard."
    )
    lines.append(
        "- max ρ(Ā) prints as 1.000000 where float32 rounds exp(Δ·A) of the slowest channels "
        "(Δ near dt_min) to 1; the log-space update keeps every |Ā| ≤ 1 and the scan finite."
    )
    ratios = [
        v[n]["grouped_ms_per_example"]["mean"] / v[n]["masked_ms_per_example"]["mean"]
        for v in results["tasks"].values()
        for n in ("attd", "gate")
        if n in v and v[n]["masked_ms_per_example"]["mean"] > 0
    ]
    if ratios:
        lines.append(
            f"- Compute follows K only on the grouped path: for ATTD and the gate it takes "
            f"{min(ratios):.2f}-{max(ratios):.2f}x the masked path's time per example. Wall "
            "times come from a machine shared with other jobs, hence the wide intervals."
        )
    return lines
