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


def _mse(r: dict[str, Any], k: int) -> str:
    return f"{r['curve_mean'][k]:.3f} ± {r['curve_ci'][k]:.3f}"


def reading(results: dict[str, Any], cfg) -> list[str]:
    """Plain statements computed from the results: does MAML reproduce (one step at least 3x
    below the pretrained baseline, the paper's K = 10 comparison), first order's cost, what
    Meta-SGD's learned rates do past the steps they were trained for, the tuned baseline."""
    lines: list[str] = []
    last = len(next(iter(results.values()))["curve_mean"]) - 1
    maml, base = results.get("maml"), results.get("pretrained")
    if maml and base:
        ratio = base["curve_mean"][1] / maml["curve_mean"][1]
        lines.append(
            f"- **Does it reproduce?** MAML's query MSE after one step is {_mse(maml, 1)} "
            f"against the pretrained baseline's {_mse(base, 1)}: {ratio:.1f}x lower "
            f"({'met' if ratio >= 3 else 'not met'}: the criterion is at least 3x; Finn et al. "
            "2017's K = 10 figure reads about 0.5 against 2.4 after one step, from about 3). "
            f"After {last} steps: MAML {_mse(maml, last)}, pretrained {_mse(base, last)}."
        )
    fo = results.get("fomaml")
    if fo and maml:
        per_seed = ", ".join(f"{m[0]:.1f}" for m in fo["seed_means"])
        lines.append(
            f"- **First order** (FOMAML): before adaptation {_mse(fo, 0)} (MAML "
            f"{_mse(maml, 0)}; per-seed means {per_seed}), after one step {_mse(fo, 1)}, "
            f"after {last} {_mse(fo, last)} (MAML {_mse(maml, last)})."
        )
    sgd = results.get("meta_sgd")
    if sgd:
        trained = cfg.inner.train_steps
        after = sgd["curve_mean"][trained + 1] if last > trained else float("nan")
        rises = np.isfinite(after) and after > sgd["curve_mean"][trained]
        lines.append(
            f"- **Meta-SGD** after the {trained} step(s) its per-parameter rates were "
            f"trained for: {_mse(sgd, trained)}; "
            + (
                f"one step more raises the error to {after:.3g}"
                + (
                    f" and it diverges by step {last}"
                    if not (np.isfinite(sgd["curve_mean"][last]))
                    or sgd["curve_mean"][last] >= DIVERGED
                    else ""
                )
                + " (learned rates fit the trained number of steps, not more)."
                if rises
                else "further steps keep lowering it."
            )
        )
    tuned = results.get("pretrained_tuned_lr")
    if tuned and base:
        lines.append(
            f"- **Pretrained baseline at a tuned rate** (chosen per seed on validation tasks: "
            f"{', '.join(f'{lr:g}' for lr in tuned['lrs'])}): after one step {_mse(tuned, 1)}, "
            f"against {_mse(base, 1)} at the inner rate."
        )
    return lines


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
            "",
            "### Reading",
            "",
            *reading(results, cfg),
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
