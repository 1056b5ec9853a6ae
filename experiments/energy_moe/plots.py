"""The figures of a run, drawn from its results alone (``results["figures"]``, see
:func:`.aggregate.figure_data`): the energy-vs-metric Pareto plot, the expert activation
heatmaps, the routing convergence during adaptation and the power budgets."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from experiments.energy_moe.tasks import Metric

logger = logging.getLogger(__name__)
COLORS = {"no_ttt": "k", "ttt": "tab:blue", "energy_ttt": "tab:green", "budget": "tab:purple",
          "prune": "tab:red", "top_k": "tab:orange", "lora_ttt": "tab:cyan", "lora_hw": "tab:pink",
          "norm_ttt": "tab:olive", "bias_ttt": "tab:brown", "int8": "tab:gray",
          "int8_ttt": "darkcyan", "int8_energy_ttt": "darkgreen", "memory": "gold",
          "fast_ttt": "magenta", "int8_fast_ttt": "darkmagenta"}  # fmt: skip


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(results: dict[str, Any], path: str, metric: Metric) -> None:
    """Dynamic energy per token vs the metric for every method (means ± CI), front joined."""
    plt = _pyplot()
    rows, kinds = results["methods"], results["kinds"]
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for name, r in rows.items():
        x, y = r["uj_per_token"], r[metric.key]
        ax.errorbar(x["mean"], y["mean"], xerr=np.nan_to_num(x["ci"]),
                    yerr=np.nan_to_num(y["ci"]), fmt="o", color=COLORS[kinds[name]],
                    label=kinds[name], ms=5, capsize=2)  # fmt: skip
        ax.annotate(name, (x["mean"], y["mean"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    front = sorted(results["pareto_front"], key=lambda n: rows[n]["uj_per_token"]["mean"])
    xs = [rows[n]["uj_per_token"]["mean"] for n in front]
    ys = [rows[n][metric.key]["mean"] for n in front]
    ax.plot(xs, ys, "k--", lw=0.8, label="Pareto front")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xlabel("dynamic energy per token (µJ, simulated monitor, adaptation included)")
    ax.set_ylabel(f"{metric.label} on the shifted stream (prequential)")
    ax.set_title("energy vs accuracy on the shifted stream")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap_methods(results: dict[str, Any], metric: Metric) -> list[str]:
    """no_ttt, ttt and the router energy-aware TTT point with the largest saving at < 5%
    loss."""
    rows, kinds = results["methods"], results["kinds"]
    change = f"{metric.key}_change"
    router = [n for n in rows if kinds[n] == "energy_ttt" and n not in results.get("expert", {})]
    aware = [n for n in router if rows[n][change]["mean"] < 0.05] or router
    pick = max(aware, key=lambda n: rows[n]["energy_reduction"]["mean"])
    return ["no_ttt", "ttt", pick]


def plot_heatmaps(results: dict[str, Any], path: str, metric: Metric) -> None:
    """Share of each layer's assignments per expert over the last quarter of the stream."""
    plt = _pyplot()
    shown = heatmap_methods(results, metric)
    widths = results["expert_widths"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.2), squeeze=False)
    for ax, name in zip(axes[0], shown, strict=True):
        counts = np.asarray(results["figures"]["counts_late"][name], np.float64)
        share = counts / counts.sum(axis=1, keepdims=True)
        im = ax.imshow(share, vmin=0, vmax=max(0.5, share.max()), cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(widths)), [str(w) for w in widths], fontsize=7)
        ax.set_yticks(range(share.shape[0]))
        ax.set_xlabel("expert (hidden width)")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: {results['methods'][name]['uj_per_token']['mean']:.4f} µJ/tok",
                     fontsize=8)  # fmt: skip
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of assignments")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_convergence(results: dict[str, Any], path: str, metric: Metric) -> None:
    """Expected routing energy and the task loss of the adapted batch vs adaptation step."""
    plt = _pyplot()
    fig, (ax_e, ax_l) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for name, curve in results["figures"]["curves"].items():
        steps = np.arange(1, len(curve["energy_uj"]) + 1)
        ax_e.plot(steps, curve["energy_uj"], label=name, lw=1)
        ax_l.plot(steps, np.asarray(curve["loss"]) * metric.scale, label=name, lw=1)
    ax_e.set_xlabel("adaptation step (cumulative over the stream)")
    ax_e.set_ylabel("expected expert energy (µJ/token)")
    ax_l.set_xlabel("adaptation step (cumulative over the stream)")
    ax_l.set_ylabel(metric.loss_label)
    ax_e.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_budget(results: dict[str, Any], path: str, metric: Metric) -> None:
    """Power per batch (seed 0) against each budget, and λ_energy from the controller."""
    del metric  # the same for every metric
    plt = _pyplot()
    traces = results["figures"]["traces"]
    fig, (ax_p, ax_l) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    ax_p.plot(traces["no_ttt"]["power_w"], color="k", lw=1, label="no_ttt")
    for i, name in enumerate(n for n in traces if n != "no_ttt"):
        color = f"C{i}"
        ax_p.plot(traces[name]["power_w"], color=color, lw=1, label=name)
        ax_p.axhline(traces[name]["budget_w"], color=color, ls=":", lw=0.8)
        ax_l.plot(traces[name]["lambda"], color=color, lw=1, label=name)
    ax_p.set_xlabel("stream batch")
    ax_p.set_ylabel("simulated power (W); dotted: budgets")
    ax_l.set_xlabel("stream batch")
    ax_l.set_ylabel("λ_energy")
    ax_l.set_yscale("log")
    ax_p.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOTS = {
    "pareto": plot_pareto,
    "heatmap": plot_heatmaps,
    "convergence": plot_convergence,
    "budget": plot_budget,
}


def shown_plots(results: dict[str, Any]) -> list[str]:
    """The plots a run has: the budget plot only when a budget method ran."""
    has_budget = "budget" in results["kinds"].values()
    return [name for name in PLOTS if name != "budget" or has_budget]


def plot_all(results: dict[str, Any], folder: str, *, metric: Metric, prefix: str) -> list[str]:
    """Write ``<prefix>_<plot>.png`` for every plot the results hold into ``folder``.

    Results without ``figures`` (written before the figures' data was kept in them) give the
    Pareto plot only, the rest is logged as skipped. Returns the written paths.
    """
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in shown_plots(results):
        if name != "pareto" and "figures" not in results:
            logger.warning("%s_%s.png not drawn: the results hold no figure data", prefix, name)
            continue
        path = os.path.join(folder, f"{prefix}_{name}.png")
        PLOTS[name](results, path, metric)
        paths.append(path)
    return paths
