"""Tables, plots, the reading of the claim and the BENCHMARKS.md section of a forecasting run.

Everything here reads ``results.json`` (and the config): a report is rebuilt from a kept
results file without training.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments import report
from experiments.forecasting.aggregate import seed_record
from experiments.forecasting.configure import FINETUNE, perceiver_config, window_counts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(a: dict[str, Any], digits: int = 3) -> str:
    if a["ci"] and np.isfinite(a["ci"]):
        return f"{a['mean']:.{digits}f} ± {a['ci']:.{digits}f}"
    return f"{a['mean']:.{digits}f}"


def summary(results: dict[str, Any], cfg) -> str:
    """Markdown tables: adaptation, data requirement, meta-training, online, memory."""
    k = cfg.meta.inner_steps
    steps = cfg.test.steps
    lines = [
        f"**Held-out sessions** (means over seeds ± 95% CI; R² per neuron, averaged; "
        f"POCO = 1 - MSE/MSE_copy; k = {k} trained inner steps, curves run {steps} steps)",
        "",
        f"| method | R² step 0 | R² step {k} | R² step {steps} | MSE step {steps} | "
        f"POCO step {steps} | steps to 95% of own R² gain | steps to 95% of fine-tuning's "
        "final R² | s / step | s to 95% of gain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["methods"].items():
        lines.append(
            f"| {name} | {_fmt(r['r2_0'])} | {_fmt(r['r2_k'])} | {_fmt(r['r2_final'])} | "
            f"{_fmt(r['mse_final'], 4)} | {_fmt(r['poco_final'])} | {_fmt(r['steps95'], 1)} | "
            f"{_fmt(r['steps_to_ft95'], 1)} | "
            f"{r['seconds_per_step']['mean'] * 1e3:.2f} ms | {_fmt(r['seconds95'], 3)} |"
        )
    g = results["unadapted_gap"]
    lines += [
        "",
        f"Data requirement (held-out R² after fine-tuning minus unadapted R², per seed): "
        f"{', '.join(f'{v:.3f}' for v in g['per_seed'])} (required >= {g['required']}: "
        f"{'holds' if g['holds'] else 'does NOT hold'}).",
        "",
        "| meta-training | query loss before (pretrained init) | after | seconds |",
        "|---|---|---|---|",
    ]
    for name, r in results["meta"].items():
        lines.append(
            f"| {name} | {_fmt(r['query_before'], 4)} | {_fmt(r['query_after'], 4)} | "
            f"{_fmt(r['seconds'], 0)} |"
        )
    if results["online"]:
        lines += [
            "",
            f"**Online vs offline under drift** (held-out R² on the stream after the support "
            f"half; init {cfg.online.method}, offline = {k} inner steps then frozen, online = "
            f"then Adam lr {cfg.online.lr} on each window whose target has fully arrived, P "
            "steps late)",
            "",
            "| drift | unadapted | offline | online | online - offline |",
            "|---|---|---|---|---|",
        ]
    for drift, r in results["online"].items():
        diff = np.subtract(r["online"]["per_seed"], r["offline"]["per_seed"])
        lines.append(
            f"| {drift} | {_fmt(r['unadapted'])} | {_fmt(r['offline'])} | {_fmt(r['online'])} | "
            f"{_fmt(seed_record(diff))} |"
        )
    if not results["memory"]:
        return "\n".join(lines)
    lines += [
        "",
        "**Compiled memory of one second-order (E2E-TTT) meta-gradient** "
        "(XLA memory analysis; one task micro-batch)",
        "",
        "| compute dtype | inner steps | remat | temp MiB | arguments MiB | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["memory"]:
        lines.append(
            f"| {r['dtype']} | {r['inner_steps']} | {'on' if r['remat'] else 'off'} | "
            f"{r['temp_bytes'] / 2**20:.2f} | {r['argument_bytes'] / 2**20:.2f} | "
            f"{r['compile_seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot_curves(results: dict[str, Any], cfg, path: str) -> None:
    """Held-out R² and POCO score vs adaptation step, one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["methods"].items():
        style = "-" if " @ " not in name else "--"
        for ax, key in zip(axes, ("r2", "poco"), strict=True):
            curve = np.asarray(r[f"{key}_curve"])
            ax.plot(np.arange(1, curve.size + 1), curve, style, label=name)
    for ax, key in zip(axes, ("held-out R² (per neuron, mean)", "POCO score"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("adaptation step + 1")
        ax.set_ylabel(key)
        ax.axvline(cfg.meta.inner_steps + 1, color="gray", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_online(results: dict[str, Any], path: str) -> None:
    """Held-out stream R² vs drift magnitude: unadapted, offline, online (no file without an
    online comparison)."""
    if not results["online"]:
        return
    plt = _pyplot()
    drifts = list(results["online"])
    fig, ax = plt.subplots(figsize=(5, 4))
    for name in ("unadapted", "offline", "online"):
        means = [results["online"][d][name]["mean"] for d in drifts]
        cis = [results["online"][d][name]["ci"] for d in drifts]
        ax.errorbar([float(d) for d in drifts], means, yerr=cis, marker="o", capsize=3, label=name)
    ax.set_xlabel("drift magnitude (relative loading change over the session)")
    ax.set_ylabel("held-out stream R²")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reading(results: dict[str, Any], cfg) -> list[str]:
    """The reading of the claim, from the numbers: speed is judged by the steps to reach 95%
    of fine-tuning's final R² (a common target), quality by the final R²."""
    ft = results["methods"][FINETUNE]
    lines = []
    for method in cfg.meta.methods:
        r = results["methods"][method]
        faster = ft["steps_to_ft95"]["mean"] / max(r["steps_to_ft95"]["mean"], 1.0)
        r2_diff = np.subtract(r["r2_final"]["per_seed"], ft["r2_final"]["per_seed"])
        at_k = np.subtract(r["r2_k"]["per_seed"], ft["r2_k"]["per_seed"])
        equal_or_better = r2_diff.mean() >= -max(ft["r2_final"]["ci"], 0.005)
        holds = faster >= 2.0 and equal_or_better
        why = [] if holds else ["fewer than 2x fewer steps"] * (faster < 2.0)
        why += [] if equal_or_better else ["lower final R²"]
        lines.append(
            f"- {method}: reaches 95% of fine-tuning's final R² in "
            f"{r['steps_to_ft95']['mean']:.1f} steps vs {ft['steps_to_ft95']['mean']:.1f} for "
            f"fine-tuning (ratio fine-tuning / method = {faster:.1f}); 95% of its own R² gain in "
            f"{r['steps95']['mean']:.1f} vs {ft['steps95']['mean']:.1f} steps (from R² "
            f"{r['r2_0']['mean']:.3f} vs {ft['r2_0']['mean']:.3f} at step 0); final R² "
            f"{r['r2_final']['mean']:.3f} vs {ft['r2_final']['mean']:.3f} ({r2_diff.mean():+.3f}); "
            f"after k = {cfg.meta.inner_steps} steps {r['r2_k']['mean']:.3f} vs "
            f"{ft['r2_k']['mean']:.3f} ({at_k.mean():+.3f}). The claim "
            + ("holds here." if holds else f"does not hold here ({', '.join(why)}).")
        )
    diffs = {
        d: np.mean(np.subtract(r["online"]["per_seed"], r["offline"]["per_seed"]))
        for d, r in results["online"].items()
    }
    if diffs:
        lines.append(
            "- Online minus offline stream R² by drift: "
            + ", ".join(f"{d}: {v:+.3f}" for d, v in diffs.items())
            + "."
        )
    for dtype in sorted({r["dtype"] for r in results["memory"]}):
        rows = {
            (r["inner_steps"], r["remat"]): r["temp_bytes"]
            for r in results["memory"]
            if r["dtype"] == dtype
        }
        k = max(k for k, _ in rows)
        lines.append(
            f"- Memory ({dtype}): at {k} inner steps remat cuts the temporary buffers from "
            f"{rows[k, False] / 2**20:.1f} to {rows[k, True] / 2**20:.1f} MiB "
            f"({rows[k, False] / rows[k, True]:.1f}x)."
        )
    return lines


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """Tables, plots and provenance into BENCHMARKS.md's forecasting section."""
    root = report.BENCHMARKS.parent
    figures = root / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    plot_curves(results, cfg, str(figures / "forecasting_curves.png"))
    plot_online(results, str(figures / "forecasting_online.png"))
    pcfg = perceiver_config(cfg)
    d, m = cfg.data, cfg.meta
    support, query = window_counts(cfg)
    pre = results["pretrain"]
    body = "\n".join(
        [
            "## Forecasting: meta-learned fast adaptation of a Perceiver to new sessions",
            "",
            f"- Date: {report.today()}; machine: {report.machine()}; wall time of all cells "
            f"(compilation included) {results['cell_seconds'] / 60:.1f} min, with other "
            "experiments sharing the 2 cores (cells are cached: a rerun reuses them).",
            "- Command: `python -m experiments.run --config configs/forecasting.py "
            "--workdir runs/forecasting`.",
            f"- Data: per seed one multi-region chaotic rate RNN ({d.num_regions} x "
            f"{d.units_per_region} units); {d.num_train_sessions} training and "
            f"{d.num_test_sessions} held-out sessions of {d.num_steps} samples and "
            f"{d.min_neurons}-{d.max_neurons} neurons (calcium smoothing, gains, offsets, "
            f"noise); windows C={pcfg.context}, P={pcfg.horizon}, stride {d.stride}: "
            f"{support} support windows before the time cut, {query} query windows after it.",
            f"- Model: Perceiver-IO, D={pcfg.dim}, {pcfg.num_latents} latents, "
            f"{pcfg.num_heads} heads, {pcfg.num_layers} self-attention layer(s), "
            f"query_context={pcfg.query_context}; tables of {pcfg.max_units} units / "
            f"{pcfg.max_sessions} sessions. Pretraining: {cfg.pretrain.steps} Adam steps (lr "
            f"{cfg.pretrain.lr}, {cfg.pretrain.batch} windows), loss "
            f"{_fmt(pre['loss_first'], 3)} -> {_fmt(pre['loss_last'], 4)}.",
            f"- Meta-training from the pretrained model: {m.steps} steps, {m.tasks_per_step} "
            f"sessions per step in {m.micro_batches} accumulated micro-batches, "
            f"{m.support_windows} support / {m.query_windows} query windows, embeddings reset "
            f"per task, K={m.inner_steps} inner Adam steps (lr {m.inner_lr}) on "
            f"'{cfg.adapt}', outer Adam lr {m.outer_lr}, clip {m.clip_norm}; E2E-TTT second "
            f"order, remat {bool(m.remat)}, compute dtype {m.dtype or 'float32'}.",
            f"- Test: each held-out session is registered (fresh unit and session rows), then "
            f"adapted on its support windows for {cfg.test.steps} steps: fine-tuning = AdamW "
            f"(lr {m.inner_lr}, wd {cfg.test.weight_decay}) from the pretrained model; meta "
            "methods = their inner rule from the meta-learned init. Seeds "
            f"{tuple(cfg.seeds)}. Seconds per step are measured on the compiled adaptation "
            "alone (no scoring).",
            "",
            summary(results, cfg),
            "",
            "![adaptation curves](docs/figures/forecasting_curves.png)",
            "![online vs offline](docs/figures/forecasting_online.png)",
            "",
            "Reading (the claim: meta-learned inits reach 95% of final R² in several times "
            "fewer steps than fine-tuning, at equal or better final R²):",
            "",
            *reading(results, cfg),
        ]
    )
    report.publish("forecasting", body, kept_results(results))


# Per-method fields no table, plot or reading shows (the per-seed R² curves feed steps_to_ft95,
# which results.json already holds).
_UNRENDERED = ("r2_curve_per_seed", "mse_curve", "mse_0", "mse_k", "poco_0", "poco_k")


def kept_results(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` less the per-method fields the report does not render: what
    ``docs/results/forecasting.json`` keeps, enough to rebuild the section and the figures."""
    methods = {
        name: {k: v for k, v in r.items() if k not in _UNRENDERED}
        for name, r in results["methods"].items()
    }
    return {**results, "methods": methods}
