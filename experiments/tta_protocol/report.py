"""Tables, the rolling-loss plot, the reading and the BENCHMARKS.md section of a finished run.

Everything here is a function of ``results.json`` and the run's config: the section can be
rebuilt from ``docs/results/tta_protocol.json`` without training.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments import report
from experiments.tta_protocol.cells import BASELINE, cell_name, parse_cell
from metattt import stats


def _fmt(mean: float, ci: float) -> str:
    return f"{mean:.4f} ± {ci:.4f}" if ci and np.isfinite(ci) else f"{mean:.4f}"


def ratios(table: dict[str, Any], name: str) -> np.ndarray:
    """Per seed, cell ``name``'s mean post-adapt loss divided by the baseline's (S,)."""
    per_seed = np.asarray(table[name]["per_seed_mean_post"])
    return per_seed / np.asarray(table[BASELINE]["per_seed_mean_post"])


def _ratio_cell(values: np.ndarray) -> str:
    """The mean of per-seed ratios, ± its 95% CI when there are several seeds."""
    if values.size == 1:
        return f"{values.mean():.3f}"
    return f"{values.mean():.3f} ± {stats.mean_ci(values).half_width:.3f}"


def summary(results: dict[str, Any], cfg) -> str:
    """The table :mod:`experiments.run` prints at the end."""
    del cfg
    return summary_table(results)


def summary_table(results: dict[str, Any]) -> str:
    """Markdown tables, one per shift: final mean rollout loss, improvement, trainable share.

    Losses are means over seeds ± 95% CI; since seeds draw different systems, whose losses
    differ in scale, "post / baseline" (per seed, then averaged) is the comparable number.
    """
    parts = []
    for shift, table in results["cells"].items():
        parts += [
            f"**Shift: {shift}** (clips alternate between the two opposite sub-populations)",
            "",
            "| adapted layers | reset | setting | mode | trainable (share) | mean rollout loss "
            "(post-adapt) | post / baseline | mean improvement | final rolling loss "
            "(last 50 clips) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in table.items():
            c = parse_cell(name, results.get("mode", "-"))
            parts.append(
                f"| {c.layers} | {c.reset} | {c.setting} | {c.mode} | "
                f"{int(r['trainable_params'])} ({100 * r['trainable_share']:.2f}%) | "
                f"{_fmt(r['mean_post'], r['mean_post_ci'])} | "
                f"{_ratio_cell(ratios(table, name))} | "
                f"{r['mean_improvement']:+.2e} | {r['final_rolling_post']:.4f} |"
            )
        parts.append("")
    return "\n".join(parts).strip()


def plotted(names) -> tuple[str | None, list[str]]:
    """``(setting, cells)`` the rolling-loss plot draws: the baseline and the main loss mode's
    cells of the ``stronger`` setting (of every setting when the run has no ``stronger``)."""
    main = [n for n in names if n.count("/") == 2]
    setting = "stronger" if any(n.endswith("/stronger") for n in main) else None
    return setting, [BASELINE] + [n for n in main if setting is None or n.endswith("/" + setting)]


def kept_results(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with only the rolling curves the plot draws: what
    ``docs/results/tta_protocol.json`` keeps, enough to render the section and its figure."""
    curves = {
        shift: {name: by_cell[name] for name in plotted(by_cell)[1]}
        for shift, by_cell in results["rolling_post"].items()
    }
    return {**results, "rolling_post": curves}


def plot_rolling(results: dict[str, Any], path: str) -> None:
    """Rolling mean (50 clips) of the post-adapt rollout loss per cell, one panel per shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(results["rolling_post"])
    fig, axes = plt.subplots(1, len(shifts), figsize=(6.0 * len(shifts), 4.0), squeeze=False)
    for ax, shift in zip(axes[0], shifts, strict=True):
        curves = results["rolling_post"][shift]
        setting, shown = plotted(curves)
        for name in shown:
            curve = curves[name]
            style = "-" if name == BASELINE or "/reset/" in name else "--"
            width = 2.5 if name == BASELINE else 1.2
            ax.plot(np.arange(1, len(curve) + 1), curve, style, lw=width, label=name)
        ax.set_xlabel("clip")
        ax.set_ylabel("rolling mean of post-adapt rollout MSE")
        ax.set_title(f"shift: {shift}" + (f" ({setting} setting)" if setting else ""))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean_ratio(table: dict[str, Any], name: str) -> float:
    return float(ratios(table, name).mean())


def _layers_verdict(best: dict[str, str], narrowest: str) -> str:
    """Whether the best adapted-layer set per shift parts as the claim "wider adaptation sets
    help when the shift is representational" predicts: the narrowest set best on the offset
    shift, a wider one on the representational shift."""
    if best["representational"] == narrowest:
        return f"does not hold here ({narrowest} alone is best on the representational shift)"
    if best["offset"] == narrowest:
        return (
            f"holds here: the shifts part (offset best with {narrowest}, representational "
            f"with {best['representational']})"
        )
    return (
        "holds only in part: wider sets help on both shifts, not on the representational one alone"
    )


def _layers_lines(tables: dict[str, Any], cfg) -> list[str]:
    """Per setting, reset per clip: post / baseline of each adapted-layer set on each shift."""
    layers = list(cfg.ablation.adapt_layers)
    lines = []
    for setting, s in cfg.ablation.settings.items():
        names = {x: cell_name(x, True, setting) for x in layers}
        best, parts = {}, []
        for shift, table in tables.items():
            by_layers = {x: _mean_ratio(table, n) for x, n in names.items()}
            best[shift] = min(by_layers, key=by_layers.get)
            listed = ", ".join(f"{x} {v:.3f}" for x, v in by_layers.items())
            parts.append(f"{shift}: {listed} (best {best[shift]})")
        table = next(iter(tables.values()))
        narrowest = min(layers, key=lambda x: table[names[x]]["trainable_params"])
        line = (
            f"- **Adapted layers, {setting} setting** ({s.steps} step(s), lr {s.lr}, clip "
            f"{s.clip_norm}; reset per clip), post / baseline: " + "; ".join(parts) + "."
        )
        if {"offset", "representational"} <= set(tables):
            line += (
                ' "Wider adaptation sets help when the shift is representational" '
                + _layers_verdict(best, narrowest)
                + "."
            )
        lines.append(line)
    return lines


def _cumulative_lines(tables: dict[str, Any], cfg) -> list[str]:
    """Cumulative minus reset post / baseline per shift and setting, and the cumulative cells
    that end worse than no adaptation."""
    layers, settings = list(cfg.ablation.adapt_layers), list(cfg.ablation.settings)
    parts, lower, worse, total = [], 0, [], 0
    for shift, table in tables.items():
        diffs = []
        for setting in settings:
            d = []
            for x in layers:
                cum = ratios(table, cell_name(x, False, setting))
                d.append(cum.mean() - _mean_ratio(table, cell_name(x, True, setting)))
                if cum.mean() > 1.0:
                    worse.append(f"{shift} {x} {setting} ({_ratio_cell(cum)})")
            lower += sum(v < 0 for v in d)
            total += len(d)
            diffs.append(f"{setting} {np.mean(d):+.3f}")
        parts.append(f"{shift}: " + ", ".join(diffs))
    line = (
        "- **Cumulative vs reset** (post / baseline, cumulative minus reset, mean over "
        "adapted-layer sets): " + "; ".join(parts) + f". Cumulative is lower in {lower} of "
        f"{total} (shift, layers, setting) pairs, although consecutive clips come from opposite "
        "sub-populations"
    )
    if worse:
        line += "; it ends worse than no adaptation in " + ", ".join(worse)
    return [line + "."]


def _mode_lines(tables: dict[str, Any], cfg, mode: str) -> list[str]:
    """The main loss mode vs the other one, reset per clip, per other-mode setting."""
    other, layers = cfg.ablation.other_mode, list(cfg.ablation.adapt_layers)
    lines = []
    for setting in cfg.ablation.other_mode_settings:
        parts, lower = [], 0
        for shift, table in tables.items():
            main = np.mean([_mean_ratio(table, cell_name(x, True, setting)) for x in layers])
            alt = np.mean([_mean_ratio(table, cell_name(x, True, setting, other)) for x in layers])
            lower += main < alt
            parts.append(f"{shift} {main:.3f} vs {alt:.3f}")
        lines.append(
            f"- **Loss mode {mode} vs {other}** (reset, {setting} setting; post / baseline, "
            "mean over adapted-layer sets): "
            + ", ".join(parts)
            + f"; {mode} is lower on {lower} of {len(tables)} shift(s)."
        )
    return lines


def _seeds_line(tables: dict[str, Any]) -> str:
    """How far the baseline's loss moves between seeds (each seed draws its own system)."""
    parts = []
    for shift, table in tables.items():
        base = np.asarray(table[BASELINE]["per_seed_mean_post"])
        parts.append(
            f"{shift} {base.min():.4f} to {base.max():.4f} (x{base.max() / base.min():.1f})"
        )
    return (
        "- **Seeds**: the baseline's mean loss per seed ranges " + ", ".join(parts) + "; each "
        "seed draws its own system, hence the post / baseline column."
    )


def reading(results: dict[str, Any], cfg) -> list[str]:
    """The reading of the ablation from the per-seed post / baseline ratios (seed means).

    One line per question the run's matrix can answer: adapted layers (reset per clip, per
    setting), cumulative vs reset, the two loss modes, and the spread over seeds.
    """
    tables, resets = results["cells"], list(cfg.ablation.resets)
    lines = []
    if True in resets and len(cfg.ablation.adapt_layers) > 1:
        lines += _layers_lines(tables, cfg)
    if True in resets and False in resets:
        lines += _cumulative_lines(tables, cfg)
    if cfg.ablation.other_mode and True in resets:
        lines += _mode_lines(tables, cfg, results["mode"])
    if len(results["seeds"]) > 1:
        lines.append(_seeds_line(tables))
    return lines


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """Put the table, the plot, the reading and the provenance into BENCHMARKS.md's
    tta_protocol section, and keep :func:`kept_results` as ``docs/results/tta_protocol.json``."""
    del workdir
    root = report.BENCHMARKS.parent
    figure = root / "docs" / "figures" / "tta_protocol_rolling.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_rolling(results, str(figure))
    m = cfg.model
    settings = "; ".join(
        f"{name}: {s.steps} step(s), lr {s.lr}, clip {s.clip_norm}"
        for name, s in cfg.ablation.settings.items()
    )
    src = results["source_baseline_loss"]
    body = "\n".join(
        [
            "## Configurable TTA protocol on an action-conditioned transformer predictor",
            "",
            f"- Date: {report.today()}; machine: {report.machine()}.",
            "- Command: `python -m experiments.run --config configs/tta_protocol.py "
            "--workdir runs/tta_protocol`.",
            f"- Model: {m.num_layers} causal pre-norm transformer blocks, width {m.dim}, "
            f"{m.num_heads} heads, MLP x{m.mlp_ratio}; state {m.state_dim}, action "
            f"{m.action_dim}, history W={m.window}, rollout horizon H={m.horizon}; "
            f"trained {cfg.train.num_steps} Adam steps (lr {cfg.train.lr}, batch "
            f"{cfg.train.batch}) on the source regime with the H-step rollout loss.",
            f"- Test: {cfg.data.num_clips} clips per shift and seed, alternating between two "
            f"opposite sub-populations (magnitude {cfg.data.magnitude}); each clip adapts on "
            f"{cfg.data.num_adapt} windows and is scored (rollout MSE over H) on "
            f"{cfg.data.num_eval} later windows of the same trajectory; the score is the "
            "post-adapt loss.",
            f"- Protocol: mode {cfg.protocol.mode}, optimizer {cfg.protocol.optimizer}, settings "
            f"{settings}; seeds {tuple(cfg.seeds)} (system, model init, data); means over seeds "
            "± 95% CI. Source-regime baseline loss (no shift): "
            f"{_fmt(src['mean'], src['ci'])}.",
            "- Wall time per seed (s): training "
            + ", ".join(f"{t:.0f}" for t in results["train_seconds"])
            + "; all TTA cells "
            + ", ".join(f"{t:.0f}" for t in results["tta_seconds"])
            + f" (the first seed compiles the {len(results['cells'][cfg.data.shifts[0]])} "
            "runners; later seeds reuse them).",
            "",
            summary_table(results),
            "",
            "![rolling post-adapt loss](docs/figures/tta_protocol_rolling.png)",
            "",
            "Reading (generated from the per-seed numbers above):",
            "",
            *reading(results, cfg),
        ]
    )
    report.publish("tta_protocol", body, kept_results(results))
