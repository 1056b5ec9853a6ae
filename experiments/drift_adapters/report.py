"""Tables, the stream plot and the BENCHMARKS.md section of a finished drift_adapters run."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments import report
from experiments.drift_adapters.stream import segments
from experiments.drift_adapters.tent import TENT_METHODS
from metattt import stats


def _cell(entry: dict[str, float], digits: int = 3, scale: float = 1.0) -> str:
    mean, ci = entry["mean"] * scale, entry["ci"] * scale
    if not np.isfinite(ci):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


def summary(results: dict[str, Any], cfg) -> str:
    """The tables :mod:`experiments.run` prints at the end."""
    streams = [
        f"Objective `{name}`:\n\n{stream_table(table)}"
        for name, table in results["summary"].items()
    ]
    return "\n\n".join([*streams, tent_tables(results["tent_summary"], cfg)])


def stream_table(summary: dict[str, Any]) -> str:
    """Markdown: accuracy per segment, post-drift accuracy, active params, reallocations."""
    cols = ["clean", "sev1", "sev2", "sev3", "sev4", "sev5", "after", "post_drift"]
    head = ["method", *[f"acc {c}" for c in cols], "mean active params", "reallocations"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, s in summary.items():
        cells = [_cell(s[f"acc_{c}"]) for c in cols]
        cells += [_cell(s["mean_active_params"], 0), _cell(s["reallocations"], 1)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_corruption_table(summary: dict[str, Any]) -> str:
    """Markdown: post-drift accuracy and mean active params per corruption and method."""
    methods = list(summary)
    corruptions = list(summary[methods[0]]["per_corruption"])
    head = ["corruption", *[f"{m} post-drift acc" for m in methods]]
    head += [f"{m} active params" for m in methods if m != "none"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for c in corruptions:
        cells = [f"{summary[m]['per_corruption'][c]['acc_post_drift']:.3f}" for m in methods]
        cells += [
            f"{summary[m]['per_corruption'][c]['mean_active_params']:.0f}"
            for m in methods
            if m != "none"
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tent_tables(tent_summary: dict[str, Any], cfg) -> str:
    """Markdown: error (%) per corruption (mean over severities) and per severity."""
    lines = ["| corruption | " + " | ".join(f"{m} error %" for m in TENT_METHODS) + " |"]
    lines.append("|---" * (len(TENT_METHODS) + 1) + "|")
    clean = tent_summary["clean"]
    lines.append("| clean | " + " | ".join(_cell(clean[m], 1, 100) for m in TENT_METHODS) + " |")
    for c in cfg.tent.corruptions:
        keys = [f"{c}/{s}" for s in cfg.tent.severities]
        cells = [
            f"{100 * np.mean([tent_summary[k][m]['mean'] for k in keys]):.1f}" for m in TENT_METHODS
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "| severity | " + " | ".join(f"{m} error %" for m in TENT_METHODS) + " |"]
    lines.append("|---" * (len(TENT_METHODS) + 1) + "|")
    for s in cfg.tent.severities:
        keys = [f"{c}/{s}" for c in cfg.tent.corruptions]
        cells = [
            f"{100 * np.mean([tent_summary[k][m]['mean'] for k in keys]):.1f}" for m in TENT_METHODS
        ]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    kernel = np.ones(width) / width
    return np.convolve(
        np.pad(x, (width // 2, width - 1 - width // 2), mode="edge"), kernel, "valid"
    )


def stream_curves(results: dict[str, Any]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per objective and method, the accuracy and active adapter parameters at each stream step,
    averaged over seeds and corruptions (accuracy to 3 decimals, parameters to 1): what the
    stream plot draws. A kept
    results file holds these curves in place of the per-run records."""
    if "stream_curves" in results:
        return results["stream_curves"]
    curves = {}
    for objective, by_method in results["streams"].items():
        curves[objective] = {}
        for method, by_corruption in by_method.items():
            runs = [r for rs in by_corruption.values() for r in rs]
            curves[objective][method] = {
                key: np.round(np.mean([r[key] for r in runs], axis=0), digits).tolist()
                for key, digits in (("accuracy", 3), ("active_params", 1))
            }
    return curves


def kept_results(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with the per-run stream records (about 5 MB) replaced by the mean curves the
    plot draws: what ``docs/results/drift_adapters.json`` keeps to rebuild the section."""
    kept = {k: v for k, v in results.items() if k != "streams"}
    return {**kept, "stream_curves": stream_curves(results)}


def plot_stream(results: dict[str, Any], cfg, path: str) -> None:
    """Accuracy over time per objective (smoothed; mean over seeds and corruptions) and the
    active adapter parameters over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = stream_curves(results)
    objectives_ = list(curves)
    fig, axes = plt.subplots(
        len(objectives_) + 1, 1, figsize=(7.5, 2.6 * (len(objectives_) + 1)), sharex=True
    )
    ax_par = axes[-1]
    for ax_acc, objective in zip(axes, objectives_, strict=False):
        for method, curve in curves[objective].items():
            (line,) = ax_acc.plot(
                _smooth(np.asarray(curve["accuracy"]), cfg.plot.smooth), lw=1.2, label=method
            )
            if method != "none":
                ax_par.plot(
                    curve["active_params"],
                    lw=1.2,
                    color=line.get_color(),
                    ls="-" if objective == objectives_[0] else "--",
                    label=f"{method} ({objective})",
                )
        ax_acc.set_ylabel(f"accuracy ({objective})")
        ax_acc.set_ylim(0, 1)
        ax_acc.legend(loc="lower left", fontsize=7)
    for name, (a, _) in segments(cfg).items():
        if name.startswith("sev") or name == "after":
            for ax in axes:
                ax.axvline(a, color="grey", lw=0.6, ls=":")
            axes[0].text(a + 2, 0.03, name, fontsize=7, color="grey")
    ax_par.set_ylabel("active adapter params")
    ax_par.set_xlabel("stream step")
    ax_par.legend(loc="upper left", fontsize=7)
    axes[0].set_title(
        f"digits-C drift streams ({', '.join(cfg.stream.corruptions)}); "
        f"moving mean over {cfg.plot.smooth} steps",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """The tables, the plot and the provenance into BENCHMARKS.md's drift_adapters section."""
    root = report.BENCHMARKS.parent
    figure = root / "docs" / "figures" / "drift_adapters_stream.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_stream(results, cfg, str(figure))
    s, a = cfg.stream, cfg.adapter
    acc = stats.mean_ci(results["backbone_clean_accuracy"])
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in results["timing"].items())
    lines = [
        "## Dynamic-rank adapters under drift, and TENT on digits-C (issue 6, part A)",
        "",
        f"- Date: {report.today()}; machine: {report.machine()}.",
        "- Command: `python -m experiments.run --config configs/drift_adapters.py "
        f"--workdir runs/drift_adapters` ({results['seconds']:.0f} s: {timing}).",
        f"- Backbone: MLP 64-{cfg.backbone.hidden}-10 with batch norm, "
        f"{cfg.backbone.train_steps} AdamW steps (batch {cfg.backbone.batch_size}) on the "
        f"clean train split; clean test accuracy {stats.format_ci(acc)} "
        f"(seeds {tuple(cfg.seeds)}; split, backbone and corruption draws vary with the seed).",
        f"- Stream: test-split digits, batch {s.batch_size}; {s.clean_steps} clean steps, "
        f"then severities 1-5 of one corruption for {s.steps_per_severity} steps each, then "
        f"{s.after_steps} clean steps; corruptions {', '.join(s.corruptions)}, one stream "
        "each per seed. Monitor: Page-Hinkley "
        f"(warm-up {cfg.detector.warmup}, threshold {cfg.detector.threshold}) + recovery "
        f"rule (k {cfg.recovery.k}, patience {cfg.recovery.patience}) on the frozen source "
        "model's batch entropy.",
        f"- Adapter: LoRA on the head (128 -> 10, {cfg.backbone.hidden + 10} parameters per "
        f"rank), max rank {a.max_rank}, scale {a.alpha}/{a.max_rank}, one Adam (lr {a.lr}) "
        "step per batch; `static:R` = rank R from t = 0; `dynamic` = rank "
        f"{a.init_rank} at an alarm, doubled while the adapted model's smoothed entropy "
        f"exceeds the clean mean + {a.grow_k} sd for {a.grow_patience} steps, freed at "
        f"recovery. The jitted step was traced {results['step_traces']} time(s) in the whole "
        "run (every method, objective, seed and rank change).",
        "- Objectives: `entropy` = TENT's mean prediction entropy; `im` = entropy minus the "
        "entropy of the batch's mean prediction (SHOT's information maximisation).",
        "- Accuracy is online (predictions before each batch's step); post_drift = every step "
        "from the drift's onset to the end; mean ± 95% CI over seeds (each seed averaged "
        "over the corruptions). Reallocations count alloc, grow and free events.",
    ]
    for objective, summary in results["summary"].items():
        lines += [
            "",
            f"Objective `{objective}`:",
            "",
            stream_table(summary),
            "",
            f"Objective `{objective}`, post-drift accuracy and mean active parameters per "
            "corruption (mean over seeds):",
            "",
            per_corruption_table(summary),
        ]
    lines += [
        "",
        "![accuracy and active adapter parameters over the stream]"
        "(docs/figures/drift_adapters_stream.png)",
    ]
    if results["tent_summary"]:
        lines += [
            "",
            "### Source vs normalisation statistics vs TENT on digits-C",
            "",
            f"Test split in batches of {cfg.tent.batch_size}, each corruption and severity "
            "a separate online pass (TENT reset in between): source = running statistics; "
            "norm = each batch normalised with its own statistics; TENT = batch statistics "
            f"+ {cfg.tent.steps_per_batch} Adam step(s) (lr {cfg.tent.lr}) of entropy "
            "minimisation on the norm layer's scale and bias per batch. Error in %, mean "
            f"over {len(cfg.seeds)} seeds (per corruption also over severities "
            f"{tuple(cfg.tent.severities)}; per severity over the corruptions); clean with "
            "95% CI over seeds; the per-(corruption, severity) numbers with CIs are in "
            "results.json.",
            "",
            tent_tables(results["tent_summary"], cfg),
        ]
    report.publish("drift_adapters", "\n".join(lines), kept_results(results))
