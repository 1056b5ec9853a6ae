"""The table, the curve plot and the BENCHMARKS.md section of a finished sinusoid run."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments import report

DIVERGED = 1e3  # a mean query MSE at or above this (or not finite) is reported as "diverges"


def table(results: dict[str, Any], report_steps) -> str:
    """Markdown table: method, MSE ± 95% CI over test tasks after each reported step count."""
    head = "| method | " + " | ".join(f"MSE after {k} step{'s' * (k != 1)}" for k in report_steps)
    lines = [head + " |", "|---" * (len(report_steps) + 1) + "|"]
    for method, r in results.items():
        cells = [
            f"{r['curve_mean'][k]:.3f} ± {r['curve_ci'][k]:.3f}"
            if np.isfinite(r["curve_mean"][k]) and r["curve_mean"][k] < DIVERGED
            else "diverges"
            for k in report_steps
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: dict[str, Any], cfg) -> str:
    """The table :mod:`experiments.run` prints at the end."""
    return table(results, cfg.eval.report_steps)


def plot_curves(results: dict[str, Any], path: str) -> None:
    """Query MSE against inner steps, one line per method with a 95% CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    top = 10.0  # a diverging curve leaves the plot instead of flattening the others
    for method, r in results.items():
        mean, ci = np.array(r["curve_mean"]), np.array(r["curve_ci"])
        steps = np.arange(mean.size)
        shown = np.isfinite(mean) & (mean < top)
        ax.plot(steps[shown], mean[shown], marker="o", ms=3, label=method)
        low = np.maximum(mean - ci, 0.05)
        ax.fill_between(steps[shown], low[shown], (mean + ci)[shown], alpha=0.2)
    ax.set_yscale("log")
    ax.set_ylim(0.05, top)
    ax.set_xlabel("gradient steps at test time")
    ax.set_ylabel("query MSE (K=10, log scale)")
    ax.set_title("sinusoid regression")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(results: dict[str, Any], cfg) -> str:
    """BENCHMARKS.md's sinusoid section: provenance, setup, training times, table, plot."""
    seconds = {m: np.mean(r["train_seconds"]) for m, r in results.items()}
    sizes = "-".join(map(str, (1, *cfg.model.hidden, 1)))
    return "\n".join(
        [
            "## Sinusoid regression (MAML, Finn et al. 2017), reproduction",
            "",
            f"- Date: {report.today()}; machine: {report.machine()}.",
            "- Command: `python -m experiments.run --config configs/sinusoid.py "
            "--workdir runs/sinusoid`.",
            f"- Setup: MLP {sizes} (ReLU), K={cfg.task.num_support} support points, inner SGD "
            f"lr {cfg.inner.lr} ({cfg.inner.train_steps} step in training), meta-batch "
            f"{cfg.train.meta_batch}, Adam meta lr {cfg.train.meta_lr}, "
            f"{cfg.train.num_steps} meta-iterations, seeds {tuple(cfg.seeds)}.",
            f"- Test: {results[cfg.methods[0]]['num_test_tasks']} new tasks in all "
            f"({cfg.eval.num_tasks} per seed), query MSE on {cfg.eval.num_query} points; mean ± "
            "95% CI over tasks.",
            "- Mean training time per seed: "
            + ", ".join(f"{m} {t:.0f} s" for m, t in seconds.items())
            + ".",
            "",
            table(results, cfg.eval.report_steps),
            "",
            "![query MSE against test-time steps](docs/figures/sinusoid_curves.png)",
        ]
    )


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """Put the section into BENCHMARKS.md, its plot into ``docs/figures/`` and keep
    ``docs/results/sinusoid.json``."""
    del workdir
    figure = report.BENCHMARKS.parent / "docs" / "figures" / "sinusoid_curves.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(results, str(figure))
    report.publish("sinusoid", section(results, cfg), results)
