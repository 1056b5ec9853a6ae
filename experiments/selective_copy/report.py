"""The table, the reading and the BENCHMARKS.md section of a finished selective_copy run."""

from __future__ import annotations

from typing import Any

from experiments import report
from experiments.selective_copy.main import VARIANTS


def summary(results: dict[str, Any], cfg) -> str:
    """Markdown table: answer-token accuracy and training seconds per variant."""
    del cfg
    lines = ["| model | answer-token accuracy | training s |", "|---|---|---|"]
    for variant, r in results.items():
        lines.append(f"| {variant} | {r['accuracy']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def reading(results: dict[str, Any]) -> list[str]:
    """The issue's three checks, computed: S6 ≥ 90%, LTI ≥ 30 points lower, < 10 min a model.

    Empty unless both variants ran."""
    if set(results) != set(VARIANTS):
        return []
    s6, lti = (results[v]["accuracy"] for v in VARIANTS)
    slowest = max(r["train_seconds"] for r in results.values()) / 60
    return [
        f"Selective {100 * s6:.1f}% (≥ 90% asked: {'met' if s6 >= 0.9 else 'not met'}); "
        f"time-invariant {100 * lti:.1f}%, {100 * (s6 - lti):.1f} points lower (≥ 30 asked: "
        f"{'met' if s6 - lti >= 0.3 else 'not met'}); the slower model trained in "
        f"{slowest:.1f} min (< 10 asked: {'met' if slowest < 10 else 'not met'}). The "
        "time-invariant SSM applies one fixed filter to every sequence, so it cannot choose "
        "which tokens among the noise to keep."
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
            f"{cfg.train.lr}, batch {cfg.train.batch}, {cfg.train.steps} steps, seed {cfg.seed}; "
            f"accuracy on {cfg.eval.num_examples} fresh sequences.",
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
