"""The report of the dynamics-shift tasks (issue 17): the test mixture, accuracy per shift band,
paired gains over the fixed model, and a verdict for each of the issue's targets."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.attd_lra.methods import SHIFT_TASKS, method_label, parse_method
from experiments.attd_lra.readings import fmt, fmt_diff, paired_difference, rho


def table(results: dict[str, Any], id_share: float) -> str:
    """Per dynamics task: mixture and per-band accuracy, paired gain over the fixed model,
    mean K and inner steps per input on the mixture."""
    parts = []
    for task_name, t in results["tasks"].items():
        if task_name not in SHIFT_TASKS or "fixed" not in t:
            continue
        bands = list(next(iter(t.values()))["band_acc"])
        parts += [
            f"**{task_name}**: test mixture of {100 * id_share:.0f}% in-distribution and "
            f"{100 * (1 - id_share):.0f}% shifted inputs; accuracy per shift band (factor "
            "either way); gain = paired difference with the fixed model over seeds, 95% "
            "t-interval.",
            "",
            "| method | acc (mixture) | gain (mixture) | acc (in-dist.) | gain (in-dist.) | "
            + " | ".join(f"acc ×{b}" for b in bands)
            + " | mean K (mixture) |",
            "|---" * (6 + len(bands)) + "|",
        ]
        for name, e in t.items():
            gains = [
                "-" if name == "fixed" else fmt_diff(paired_difference(t, name, "fixed", s))
                for s in ("mix", "id")
            ]
            parts.append(
                f"| {method_label(name)} | {fmt(e['acc_mix'])} | {gains[0]} | "
                f"{fmt(e['acc_id'])} | {gains[1]} | "
                + " | ".join(fmt(e["band_acc"][b]) for b in bands)
                + f" | {e['mean_k_mix']['mean']:.2f} |"
            )
        lr = results.get("inner_lr", {}).get(task_name)
        if lr:
            parts += [
                "",
                "Inner learning rate per adapter family, chosen on the outer split (accuracy of "
                "uniform TTT at K_max on its first inputs, first seed): "
                + "; ".join(
                    f"{fam}: "
                    + ", ".join(
                        f"{g:g} → {a:.3f}" for g, a in zip(v["grid"], v["accuracy"], strict=True)
                    )
                    + f" (chosen {v['chosen']:g})"
                    for fam, v in lr.items()
                )
                + ".",
            ]
        parts.append("")
    return "\n".join(parts).strip()


def _uniform(t: dict[str, Any], k_max: int) -> dict[int, str]:
    """K -> the name of uniform low-rank TTT with K steps (``ttt`` is K_max)."""
    out = {}
    for name in t:
        spec = parse_method(name)
        if spec.base == "ttt" and spec.adapter is None and not spec.psi_rank:
            if not (spec.second_order or spec.inner_opt or spec.joint):
                out[spec.steps or k_max] = name
    return out


def _overshoot(task_name: str, t: dict[str, Any], uniform: dict[int, str]) -> str:
    """Do more inner steps ever cost accuracy? The largest paired loss from K to K + 1 steps
    of uniform TTT (K = 0 is the fixed model) over the in-distribution split and each band."""
    steps = {0: "fixed", **uniform}
    ks = sorted(steps)
    worst = None
    for split in ["id", *t["fixed"]["band_acc"]]:
        for a, b in zip(ks, ks[1:], strict=False):
            d = paired_difference(t, steps[b], steps[a], split)
            if worst is None or d.mean < worst[0].mean:
                worst = (d, split, a, b)
    d, split, a, b = worst
    where = "in-distribution" if split == "id" else f"band ×{split}"
    head = (
        f"- {task_name}: more inner steps vs fewer (uniform K → K + 1, in distribution and per "
        "band): "
    )
    if d.mean >= 0:
        return (
            head + f"no split loses accuracy (smallest paired change {fmt_diff(d)}, {where}, "
            f"K = {a} → {b}; the target: no overshoot)."
        )
    return head + (
        f"the largest paired loss is {fmt_diff(d)} ({where}, K = {a} → {b}): "
        + (
            "an overshoot (its interval is below 0)."
            if d.high < 0
            else "no overshoot the seeds can resolve (the target: none)."
        )
    )


def verdicts(results: dict[str, Any]) -> list[str]:
    """One line per target of issue 17, computed from the numbers, met or not."""
    lines: list[str] = []
    k_max = results["k_max"]
    for task_name, t in results["tasks"].items():
        if task_name not in SHIFT_TASKS or "fixed" not in t:
            continue
        uniform = _uniform(t, k_max)
        if k_max in uniform:
            g = paired_difference(t, uniform[k_max], "fixed", "shift")
            met = "met" if g.low > 0 else "not met"
            lines.append(
                f"- {task_name}: TTT (K = {k_max}) vs the fixed model on shifted inputs: "
                f"{fmt_diff(g)} ({met}: the target is an interval above 0)."
            )
        if len(uniform) > 1:
            lines.append(_overshoot(task_name, t, uniform))
        if "attd" in t:
            splits = ["id", "shift", *t["attd"]["band_acc"]]
            worst = min(paired_difference(t, "attd", "fixed", s).mean for s in splits)
            lines.append(
                f"- {task_name}: ATTD's largest mean loss to the fixed model over the "
                f"in-distribution, shifted and per-band splits is {abs(min(worst, 0.0)):.3f} "
                f"({'met' if worst >= -0.005 else 'not met'}: the target is at most 0.005)."
            )
            if uniform:
                best_k = max(uniform, key=lambda k: t[uniform[k]]["acc_mix"]["mean"])
                best = t[uniform[best_k]]
                d = paired_difference(t, "attd", uniform[best_k], "mix")
                share = t["attd"]["mean_k_mix"]["mean"] / best_k
                reach = d.mean >= -best["acc_mix"]["ci"] if best["acc_mix"]["ci"] else d.mean >= 0
                lines.append(
                    f"- {task_name}: best uniform K on the mixture is K = {best_k} "
                    f"({fmt(best['acc_mix'])}); ATTD − it = {fmt_diff(d)} at "
                    f"{100 * share:.0f}% of its inner steps "
                    f"({'met' if reach and share <= 0.6 else 'not met'}: the target is its "
                    "accuracy within its interval at ≤ 60% of its steps)."
                )
            sp = t["attd"]["spearman_k_difficulty"]
            if sp:
                ok = np.isfinite(sp["low"]) and sp["estimate"] >= 0.6 and sp["low"] > 0
                lines.append(
                    f"- {task_name}: Spearman(K, shift magnitude) of ATTD {rho(sp)} "
                    f"({'met' if ok else 'not met'}: the target is ≥ 0.6 with its interval "
                    "above 0; both test splits pooled)."
                )
        control = "ttt+d_skip"
        if control in t:
            for name in t:
                spec = parse_method(name)
                if spec.base == "ttt" and not spec.steps and name != control:
                    g = paired_difference(t, name, control, "shift")
                    lines.append(
                        f"- {task_name}: {method_label(name)} − the D-skip control (same "
                        f"inner loop) on shifted inputs: {fmt_diff(g)}"
                        + (
                            " (the dynamics adapter is better)."
                            if g.low > 0
                            else " (worse than the control)."
                            if g.high < 0
                            else " (no difference the seeds can resolve)."
                        )
                    )
    return lines
