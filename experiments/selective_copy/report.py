"""The table, the reading and the BENCHMARKS.md section of a finished selective_copy run."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments import report
from experiments.selective_copy.main import VARIANTS
from metattt import stats


def _acc(entry: dict[str, Any]) -> str:
    """``0.999 ± 0.002`` in %-free form; the mean alone for one seed."""
    if np.isfinite(entry["ci"]):
        return f"{entry['mean']:.3f} ± {entry['ci']:.3f}"
    return f"{entry['mean']:.3f}"


def summary(results: dict[str, Any], cfg) -> str:
    """Markdown table: answer-token accuracy (mean ± 95% CI over seeds, and per seed) and the
    mean training seconds per variant."""
    del cfg
    lines = [
        "| model | answer-token accuracy | per seed | training s (mean) |",
        "|---|---|---|---|",
    ]
    for variant, r in results.items():
        per_seed = ", ".join(f"{a:.3f}" for a in r["accuracy"]["per_seed"])
        lines.append(
            f"| {variant} | {_acc(r['accuracy'])} | {per_seed} | {r['train_seconds']['mean']:.0f} |"
        )
    return "\n".join(lines)


def reading(results: dict[str, Any]) -> list[str]:
    """The issue's three checks, computed: S6 ≥ 90%, LTI ≥ 30 points lower (the paired
    difference over seeds, with its 95% t-interval), < 10 min a model (the slower variant's
    mean training time). Empty unless both variants ran."""
    if set(results) != set(VARIANTS):
        return []
    s6, lti = (results[v]["accuracy"] for v in VARIANTS)
    gap = stats.mean_ci(np.subtract(s6["per_seed"], lti["per_seed"]))
    interval = (
        f" [{100 * gap.low:.1f}, {100 * gap.high:.1f}]" if np.isfinite(gap.half_width) else ""
    )
    slowest = max(r["train_seconds"]["mean"] for r in results.values()) / 60
    return [
        f"Selective {100 * s6['mean']:.1f}% (≥ 90% asked: "
        f"{'met' if s6['mean'] >= 0.9 else 'not met'}); time-invariant "
        f"{100 * lti['mean']:.1f}%, {100 * gap.mean:.1f}{interval} points lower (≥ 30 asked: "
        f"{'met' if gap.mean >= 0.3 else 'not met'}); the slower model trained in "
        f"{slowest:.1f} min on average (< 10 asked: {'met' if slowest < 10 else 'not met'}). "
        "The time-invariant SSM applies one fixed filter to every sequence, so it cannot "
        "choose which tokens among the noise to keep."
    ]


def section(results: dict[str, Any], cfg) -> str:
    """BENCHMARKS.md's selective_copy section: provenance, setup, table and reading."""
    return "\n".join(
        [
            "## Selective copying: selective (S6) vs time-invariant SSM (Mamba sanity check)",
            "",
            f"- Date: {report.today()}; machine: {report.machine()}.",
            "- Command: `python -m experiments.run --config configs/selective_copy.py "
            "--workdir runs/selective_copy`.",
            f"- Task: length {cfg.task.length}, {cfg.task.num_tokens} tokens to copy from a "
            f"vocabulary of {cfg.task.vocab - 1} among noise; model: {cfg.model.n_layers} Mamba "
            f"layers of width {cfg.model.d_model}, state {cfg.model.d_state}; AdamW lr "
            f"{cfg.train.lr}, batch {cfg.train.batch}, {cfg.train.steps} steps, seeds "
            f"{tuple(cfg.seeds)} (initial parameters and training batches); accuracy on "
            f"{cfg.eval.num_examples} fresh sequences per seed, mean ± 95% t-interval over seeds.",
            "",
            summary(results, cfg),
            "",
            *reading(results),
        ]
    )


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """Put the section into BENCHMARKS.md and keep ``docs/results/selective_copy.json``."""
    del workdir
    report.publish("selective_copy", section(results, cfg), results)
